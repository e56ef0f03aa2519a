"""engine=trtllm: NVIDIA TensorRT-LLM 1.0-1.2 through its LLM API (docs/trtllm.md).

    options.py  Options (conf/engine/trtllm.yaml)        plan.py    RunSpec -> TensorRT-LLM arguments (pure)
    checks.py   config and environment validation        cache.py   engine cache, calibration text on disk
    bench.py    trtllm-bench inputs, command, report     engine.py  TrtllmEngine

Importing this package never imports tensorrt_llm; only TrtllmEngine.build() does.
"""
from kvexp.engines.trtllm.engine import TrtllmEngine

__all__ = ["TrtllmEngine"]
