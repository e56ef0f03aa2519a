"""Hugging Face transformers as a kvexp engine (engine=hf): the baseline a user already has."""
from kvexp.engines.hf.engine import HfEngine, HfOptions

__all__ = ["HfEngine", "HfOptions"]
