"""kvexp: what quantization buys in accuracy, memory and speed, swept with Hydra and tracked in MLflow."""

__version__ = "0.1.0"
