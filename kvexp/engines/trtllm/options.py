"""engine=trtllm options. conf/engine/trtllm.yaml lists the same keys with the same values (tests/test_trtllm.py
checks both), so `engine=trtllm` composes to exactly these defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvexp.errors import ConfigError

BACKENDS = ("tensorrt", "pytorch")
BENCH_MODES = ("none", "throughput", "latency")


@dataclass(frozen=True)
class Options:
    name: str = "trtllm"
    # tensorrt: tensorrt_llm._tensorrt_engine.LLM builds a TensorRT engine (INT8 KV, AWQ and FP8 calibrated at build).
    # pytorch: tensorrt_llm.LLM, no engine; KV cache auto/fp8 only, and it quantizes no weights itself.
    backend: str = "tensorrt"
    dry_run: bool = False  # print TrtllmEngine.plan() as JSON and run nothing (no GPU, no tensorrt_llm needed)
    max_batch_size: Optional[int] = None  # None: max(bench.batch_size, eval.batch_size)
    kv_cache_free_gpu_memory_fraction: float = 0.9  # upper bound; the pool is also capped at what the run needs
    bench_mode: str = "none"  # none | throughput | latency: also measure with `trtllm-bench`
    bench_requests: int = 64  # trtllm-bench --num_requests (the prompts are cycled to this many)
    bench_concurrency: int = -1  # trtllm-bench --concurrency; <= 0 means no limit
    bench_streaming: bool = True  # throughput only: stream, so the report carries TTFT and TPOT

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"engine.backend={self.backend}: not one of {', '.join(BACKENDS)}")
        if self.bench_mode not in BENCH_MODES:
            raise ConfigError(f"engine.bench_mode={self.bench_mode}: not one of {', '.join(BENCH_MODES)}")
        if self.max_batch_size is not None and (isinstance(self.max_batch_size, bool) or self.max_batch_size <= 0):
            raise ConfigError(f"engine.max_batch_size={self.max_batch_size}: must be a positive integer or null")
        if not 0.0 < self.kv_cache_free_gpu_memory_fraction <= 1.0:
            raise ConfigError(f"engine.kv_cache_free_gpu_memory_fraction={self.kv_cache_free_gpu_memory_fraction}: "
                              "must be in (0, 1]")
        if self.bench_requests <= 0:
            raise ConfigError(f"engine.bench_requests={self.bench_requests}: must be a positive integer")
