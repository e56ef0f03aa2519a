"""Measuring with NVIDIA's own `trtllm-bench` (throughput | latency) and mapping its report to kvexp metric names.

Sources (TensorRT-LLM 1.x): CLI in tensorrt_llm/commands/bench.py (global --model/--model_path/--workspace) and
tensorrt_llm/bench/benchmark/{throughput,low_latency}.py; dataset lines in tensorrt_llm/bench/utils/data.py
(create_dataset_from_stream); the report in tensorrt_llm/bench/dataclasses/reporting.py
(ReportUtility.get_statistics_dict) with percentiles from bench/dataclasses/statistics.py (PercentileStats).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from kvexp.config import RunSpec

# kvexp metric -> path in the report. Per-user throughput comes from "performance" (present with and without
# streaming, includes the first token) so its meaning does not change with engine.bench_streaming.
REPORT_METRICS = {
    "trtbench.request_throughput": ("performance", "request_throughput_req_s"),
    "trtbench.decode_tok_s": ("performance", "system_output_throughput_tok_s"),
    "trtbench.per_user_tok_s": ("performance", "output_throughput_per_user_tok_s"),
    "trtbench.latency_p50_ms": ("performance", "request_latency_percentiles_ms", "p50"),
    "trtbench.latency_p99_ms": ("performance", "request_latency_percentiles_ms", "p99"),
}
# Only a streaming run can see the first token arrive: "streaming_metrics" exists only then (always for latency).
STREAMING_METRICS = {
    "trtbench.ttft_ms": ("streaming_metrics", "avg_ttft_ms"),
    "trtbench.tpot_ms": ("streaming_metrics", "avg_tpot_ms"),
}


def _lookup(report: dict, path: tuple) -> float:
    node = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"trtllm-bench report: missing {'.'.join(path)}")
        node = node[key]
    return float(node)


def parse_bench_report(report: dict) -> dict[str, float]:
    """trtllm-bench --report_json contents -> kvexp metrics (ms, tokens/s, requests/s)."""
    metrics = {name: _lookup(report, path) for name, path in REPORT_METRICS.items()}
    if "streaming_metrics" in report:
        metrics.update({name: _lookup(report, path) for name, path in STREAMING_METRICS.items()})
    return metrics


def write_dataset(path: Path, prompts: Sequence[Sequence[int]], output_tokens: int, num_requests: int) -> Path:
    """One JSON object a line: task_id, input_ids (pre-tokenized, so no tokenizer runs) and output_tokens.
    The prompts are cycled to num_requests lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(num_requests):
            line = {"task_id": i, "input_ids": list(prompts[i % len(prompts)]), "output_tokens": output_tokens}
            f.write(json.dumps(line) + "\n")
    return path


def extra_llm_api_options(plan: dict) -> dict:
    """The YAML for --extra_llm_api_options: the run's KV cache settings, so the tool runs the configuration kvexp
    planned (block reuse off, the same pool cap, fp8 on the PyTorch backend)."""
    return {"kv_cache_config": plan["kv_cache_config"]}


def command(plan: dict, spec: RunSpec, *, model_dir: Path, dataset: Path, report_json: Path,
            extra_options: Path, work_dir: Path) -> list[str]:
    """The trtllm-bench command line for engine.bench_mode. --model must be a name (BenchmarkEnvironment rejects
    a path) and --model_path the checkpoint; the TensorRT backend runs the cached engine (--engine_dir) and takes
    no --max_seq_len (it is an engine property there)."""
    from kvexp.engines.trtllm.plan import model_name_for_bench

    opts, mode = spec.engine_options, spec.engine_options.bench_mode
    cmd = ["trtllm-bench", "--model", model_name_for_bench(spec), "--model_path", str(model_dir),
           "--workspace", str(work_dir), mode, "--backend", plan["backend"]]
    if plan["backend"] == "tensorrt":
        cmd += ["--engine_dir", plan["engine_dir"]]
    cmd += ["--extra_llm_api_options", str(extra_options), "--dataset", str(dataset),
            "--num_requests", str(opts.bench_requests), "--warmup", str(spec.cfg.bench.warmup),
            "--concurrency", str(opts.bench_concurrency),
            "--kv_cache_free_gpu_mem_fraction", str(opts.kv_cache_free_gpu_memory_fraction),
            "--report_json", str(report_json)]
    if mode == "throughput" and opts.bench_streaming:  # latency always streams and has no such flag
        cmd.append("--streaming")
    return cmd


def run(plan: dict, spec: RunSpec, *, model_dir: Path, prompts: Sequence[Sequence[int]], output_tokens: int,
        work_dir: Path, runner=subprocess.run) -> dict[str, float]:
    """Write the inputs, run trtllm-bench, parse its report. Raises CalledProcessError with the tool's exit code."""
    import yaml

    work_dir.mkdir(parents=True, exist_ok=True)
    dataset = write_dataset(work_dir / "dataset.jsonl", prompts, output_tokens, spec.engine_options.bench_requests)
    extra = work_dir / "extra_llm_api_options.yaml"
    extra.write_text(yaml.safe_dump(extra_llm_api_options(plan)))
    report = work_dir / "report.json"
    runner(command(plan, spec, model_dir=model_dir, dataset=dataset, report_json=report, extra_options=extra,
                   work_dir=work_dir), check=True)
    return parse_bench_report(json.loads(report.read_text()))
