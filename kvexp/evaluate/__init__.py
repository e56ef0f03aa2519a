"""Accuracy: lm-eval through any kvexp Engine (lm_adapter), the offline task suite (tasks), scores (accuracy), and
their paired differences against fp16 (paired)."""
