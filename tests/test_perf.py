"""The benchmark's numbers a reader can trust: every timing with its spread, and the KV capacity of the memory."""
import types

import pytest
import torch

from kvexp.bench import perf
from kvexp.core import memory
from kvexp.core.engine import Generations, MemoryReport
from kvexp.core.formats import FORMATS
from kvexp.core.kv import KVCache, QuantizedKVCache

GIB = 1 << 30


class TimedEngine:
    """An engine whose generate() calls take the given (prefill, decode) seconds, in turn."""

    def __init__(self, timings):
        self.timings, self.calls = list(timings), 0
        self.tokenizer = types.SimpleNamespace(vocab_size=50)

    def generate(self, prompts, max_new):
        prefill, decode = self.timings[self.calls % len(self.timings)]
        self.calls += 1
        return Generations([[0] * max_new for _ in prompts], prefill, decode, max_new - 1)

    def memory(self):
        return MemoryReport(weight_bytes=1000, kv_bytes_per_token=10.0, kv_bytes_per_token_formula=10.0,
                            peak_bytes=5000)


def test_every_timing_carries_its_median_min_and_max_over_the_timed_iterations():
    from conftest import make_spec

    spec = make_spec("bench.iters=3", "bench.warmup=1", "context.prompt_len=10", "context.gen_len=5")
    # the warm-up call (first) is slowest and must not count; decode: 4 steps per call
    engine = TimedEngine([(9.0, 9.0), (0.2, 0.4), (0.1, 0.8), (0.4, 0.2)])
    out = perf.measure(engine, spec)
    assert engine.calls == 4
    assert (out["perf.ttft_ms_min"], out["perf.ttft_ms"], out["perf.ttft_ms_max"]) == pytest.approx((100, 200, 400))
    assert (out["perf.tpot_ms_min"], out["perf.tpot_ms"], out["perf.tpot_ms_max"]) == pytest.approx((50, 100, 200))
    assert (out["perf.decode_tok_s_min"], out["perf.decode_tok_s"], out["perf.decode_tok_s_max"]) == \
        pytest.approx((5, 10, 20))
    assert (out["perf.prefill_tok_s_min"], out["perf.prefill_tok_s_max"]) == pytest.approx((25, 100))
    assert (out["perf.e2e_tok_s_min"], out["perf.e2e_tok_s_max"]) == pytest.approx((5 / 0.9, 5 / 0.6))


def qwen_cache(fmt=None):
    """A cache of Qwen2.5-1.5B's shape (28 layers, 2 KV heads of 128 dims) in bf16, or in a quantized format."""
    shape = dict(layers=28, batch=1, kv_heads=2, max_len=4, head_dim=128, dtype=torch.bfloat16, device="cpu")
    return KVCache(**shape) if fmt is None else QuantizedKVCache(**shape, fmt=FORMATS[fmt])


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A CPU with 20 GiB available, this process resident in 2 GiB, and no cgroup limit unless a test sets one."""
    (tmp_path / "meminfo").write_text(f"MemTotal: {32 * GIB // 1024} kB\nMemAvailable: {20 * GIB // 1024} kB\n")
    (tmp_path / "status").write_text(f"VmHWM: {3 * GIB // 1024} kB\nVmRSS: {2 * GIB // 1024} kB\n")
    (tmp_path / "cgroup" / "memory").mkdir(parents=True)
    monkeypatch.setattr(memory, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "_STATUS", tmp_path / "status")
    monkeypatch.setattr(memory, "_CGROUP", tmp_path / "cgroup")
    return tmp_path / "cgroup"


def test_cpu_budget_is_the_resident_set_plus_what_the_machine_or_the_cgroup_still_allows(machine):
    cpu = torch.device("cpu")
    assert memory.budget_bytes(cpu) == 22 * GIB
    (machine / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1: no limit
    (machine / "memory" / "memory.usage_in_bytes").write_text(f"{4 * GIB}\n")
    assert memory.budget_bytes(cpu) == 22 * GIB
    (machine / "memory.max").write_text(f"{10 * GIB}\n")  # v2: 10 GiB, 4 in use: 6 GiB left in the container
    (machine / "memory.current").write_text(f"{4 * GIB}\n")
    assert memory.budget_bytes(cpu) == 8 * GIB
    (machine / "memory.max").write_text("max\n")
    (machine / "memory" / "memory.limit_in_bytes").write_text(f"{8 * GIB}\n")  # v1 with a limit
    assert memory.budget_bytes(cpu) == 6 * GIB


def test_capacity_is_the_memory_left_in_each_formats_exact_bytes_per_token(machine):
    """22 GiB budget; 3.5 GiB of bf16 weights; the benchmark's peak holds the weights, one 32k-token sequence's
    cache and 1 GiB of the runtime's own."""
    per_token = {"bf16": 28 * 2 * 2 * 128 * 2, "int8": 28 * 2 * 2 * (128 + 2), "int4": 28 * 2 * 2 * (64 + 2)}
    caches = {"bf16": qwen_cache(), "int8": qwen_cache("int8"), "int4": qwen_cache("int4")}
    assert {k: c.bytes_per_token() for k, c in caches.items()} == per_token  # what the engine reports
    seq, weights = 32256, int(3.5 * GIB)
    out = {}
    for name, bpt in per_token.items():
        mem = MemoryReport(weight_bytes=weights, kv_bytes_per_token=bpt, kv_bytes_per_token_formula=bpt,
                           peak_bytes=weights + bpt * seq + GIB)
        out[name] = perf.capacity(mem, torch.device("cpu"), 1, seq)
        assert out[name]["mem.working_bytes"] == GIB
        assert out[name]["mem.kv_capacity_tokens"] == (22 * GIB - weights - GIB) // bpt
        assert out[name]["mem.max_batch"] == out[name]["mem.kv_capacity_tokens"] // seq
    # 17.5 GiB over (bytes per token x 32256 tokens): 20.3, 40.01, 78.8 sequences
    assert [out[k]["mem.max_batch"] for k in per_token] == [20, 40, 78]
    assert out["int8"]["mem.kv_capacity_tokens"] / out["bf16"]["mem.kv_capacity_tokens"] == pytest.approx(256 / 130, 1e-5)


def test_no_capacity_is_negative():
    assert memory.kv_capacity(GIB, 2 * GIB, 0, 100.0, 10) == (0, 0)
