"""Engine registry: name -> "module:Class", imported lazily so a missing optional library fails only when used."""
from __future__ import annotations

import importlib

from kvexp.errors import ConfigError

ENGINES = {
    "torch": "kvexp.engines.torch_engine:TorchEngine",
    "trtllm": "kvexp.engines.trtllm:TrtllmEngine",
    "hf": "kvexp.engines.hf:HfEngine",
}


def engine_class(name):
    if name not in ENGINES:
        raise ConfigError(f"engine.name={name}: not one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)
