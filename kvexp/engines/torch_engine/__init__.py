"""kvexp's native PyTorch/Triton engine."""
from kvexp.engines.torch_engine.engine import TorchEngine, TorchOptions

__all__ = ["TorchEngine", "TorchOptions"]
