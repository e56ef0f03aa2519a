"""Where one generate() of the bench shape spends its time, kernel by kernel (bench.profile=torch|ncu|nsys).

torch  torch.profiler around one generate() (after an unprofiled warm-up that compiles Triton kernels and captures
       the CUDA graph), with "prefill" and "decode" ranges (record_function, plus NVTX on CUDA). Writes the Chrome
       trace (trace.json) and a summary of CUDA kernels (on CPU: aten ops by self time) per phase.
       CUPTI reports the kernels a CUDA-graph replay runs, correlated with its cudaGraphLaunch, so decode is
       profiled as benchmarked, graph and all; a CUPTI that does not is detected and named (_check_graph_kernels).
       (CUPTI before CUDA 12.6 can hang on graphs: meta-pytorch/tritonbench#413.)
ncu    Nsight Compute on the decode attention and matmul kernels of a child process (python -m kvexp.bench.profile
       CONFIG) that repeats this generate(), with cudaProfilerStart/Stop around decode: measured duration and DRAM
       bytes per launch.
nsys   Nsight Systems over the same child's decode: its CUDA GPU kernel summary.

Every kernel or op is put in one class by its name; the first rule that matches wins (case-insensitive):
  elementwise  Inductor's fused pointwise/reduction kernels (triton_poi_/triton_per_/triton_red_: the compiled
               norms, RoPE and SiLU of fused.py); first, because their names list the ops they fuse
  attention    kvexp's Triton decode attention (_split_kernel, _merge_kernel) and cache write (_write_kv_kernel),
               FlashAttention / cuDNN / CUTLASS fmha, SDPA, softmax: everything that reads or writes the KV cache
  matmul       cuBLAS/cuBLASLt gemm, gemv, xmma, nvjet, splitKreduce; CUTLASS; torch's tinygemm int4 and
               _weight_int4pack_mm; Inductor matmul templates (triton_tem_); on CPU aten::mm/addmm/bmm/matmul/linear
  elementwise  ATen elementwise and reduce kernels, cat/copy/index/gather/fill/embedding; on CPU the pointwise aten ops
  other        the rest: memcpy/memset, allocation, views, host syncs
On CPU an op's self time is charged to the class of the outermost recognised op above it (a copy inside
aten::linear is matmul time), so the classes partition the profiled time.
"""
from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from kvexp.bench.perf import bench_prompts, copy_bandwidth, decode_bytes_per_step
from kvexp.config import RunSpec
from kvexp.errors import MissingDependency

CLASSES = ("attention", "matmul", "elementwise", "other")
PHASES = ("prefill", "decode")
OUTSIDE = "outside"  # work of generate() in neither phase (padding the prompts, the cache's first allocation)
ORDER = PHASES + (OUTSIDE,)
ATTENTION_KERNELS = ("_split_kernel", "_merge_kernel", "_write_kv_kernel", "flash", "fmha", "attention", "sdpa",
                     "softmax")
MATMUL_KERNELS = ("gemm", "gemv", "cublas", "cutlass", "xmma", "nvjet", "tinygemm", "int4pack_mm", "splitKreduce",
                  "triton_tem_")
RULES = (
    ("elementwise", re.compile(r"triton_(poi|per|red)_", re.I)),
    ("attention", re.compile("|".join(ATTENTION_KERNELS), re.I)),
    ("matmul", re.compile("|".join(MATMUL_KERNELS) + r"|^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$", re.I)),
    ("elementwise", re.compile(
        r"elementwise|reduce_kernel|catarraybatchedcopy|copy|index|gather|scatter|fill|embedding|"
        r"^aten::_?(add|sub|rsub|mul|div|neg|pow|rsqrt|sqrt|exp|silu|sigmoid|cos|sin|mean|sum|amax|max|min|argmax|"
        r"where|cat|clone|zero|clamp|round|arange|masked_fill|abs|eq|ne|ge|le|lt|gt|cumsum|remainder)_?$", re.I)),
)
HOST_CATS = ("user_annotation", "cpu_op", "cuda_runtime", "cuda_driver")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
# ncu replays every profiled launch (~0.1-1 s each): about two decode steps of a 16-layer model's attention and
# matmul kernels, enough for their shares, in minutes
NCU_LAUNCHES = 256
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum")
MISSING = {"ncu": "ncu (Nsight Compute) not found on PATH; install the CUDA toolkit's nsight-compute or use "
                   "bench.profile=torch",
           "nsys": "nsys (Nsight Systems) not found on PATH; use bench.profile=torch or ncu"}
SUMMARY_TOP = 20  # kernels.txt rows per phase; kernels.csv has them all
# Time in ns; bytes in bytes. Recent ncu prints "ns" with --print-units base (seen on the H100); older, and scaled,
# output spells the units out.
NCU_UNITS = {"ns": 1.0, "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
             "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}


def classify(name: str) -> str:
    for cls, pattern in RULES:
        if pattern.search(name):
            return cls
    return "other"


@dataclass
class Row:
    """One kernel (or CPU op) name in one phase: launches, total device (CPU: self) time, and the DRAM bytes
    they moved where a tool measured them (ncu), else None."""
    phase: str
    name: str
    cls: str
    count: int
    total_ms: float
    bytes: Optional[float] = None


def aggregate(items: Iterable[tuple[str, str, str, float, Optional[float]]]) -> list[Row]:
    """(phase, name, class, µs, bytes) per launch -> one Row per (phase, name, class), longest first in a phase.
    The class is in the key because a CPU op's class depends on where it ran (a copy_ in aten::linear is matmul)."""
    rows: dict[tuple[str, str, str], Row] = {}
    for phase, name, cls, us, nbytes in items:
        row = rows.setdefault((phase, name, cls), Row(phase, name, cls, 0, 0.0, None))
        row.count += 1
        row.total_ms += us / 1e3
        if nbytes is not None:
            row.bytes = (row.bytes or 0.0) + nbytes
    return sorted(rows.values(), key=lambda r: (ORDER.index(r.phase), -r.total_ms))


# ---- the Chrome trace ----
def _walk_host(events: list[dict]) -> list[tuple[dict, str, Optional[str], float]]:
    """Nest each thread's host events by time. Per event: its phase (the prefill/decode range around it), the
    class it is charged to (the outermost recognised op above it, else its own) and its self time in µs."""
    threads = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST_CATS:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [event, phase, class, self µs]
        for e in evs:
            while stack and e["ts"] >= stack[-1][0]["ts"] + stack[-1][0]["dur"]:
                out.append(tuple(stack.pop()))
            phase, cls = (stack[-1][1], stack[-1][2]) if stack else (OUTSIDE, None)
            if e["cat"] == "user_annotation" and e["name"] in PHASES:
                phase = e["name"]
            if e["cat"] == "cpu_op" and cls in (None, "other"):
                cls = classify(e["name"])
            if stack:
                stack[-1][3] -= e["dur"]
            stack.append([e, phase, cls, e["dur"]])
        out.extend(tuple(s) for s in reversed(stack))
    return out


def _check_graph_kernels(host, device: list[dict]) -> None:
    """Graph launches but none of their kernels in the trace: an old CUPTI, and a decode profile that would be empty."""
    seen = {d.get("args", {}).get("correlation") for d in device}
    launches = [e for e, *_ in host if "GraphLaunch" in e["name"]]
    if launches and not any(e.get("args", {}).get("correlation") in seen for e in launches):
        raise MissingDependency("this CUPTI reports no kernels inside CUDA graph replays, so the decode profile "
                                "would be empty; rerun with engine.cuda_graphs=false")


def summarize_trace(events: list[dict], on_device: bool) -> list[Row]:
    """Rows of a torch.profiler Chrome trace: device kernels, memcpys and memsets (each put in the phase of the
    host call that launched it, via its correlation id) when on_device, else CPU ops by self time."""
    host = _walk_host(events)
    if not on_device:
        return aggregate((phase, e["name"], cls, self_us, None)
                         for e, phase, cls, self_us in host if e["cat"] == "cpu_op")
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    _check_graph_kernels(host, device)
    launch_phase = {e["args"]["correlation"]: phase for e, phase, _, _ in host if "correlation" in e.get("args", {})}
    return aggregate((launch_phase.get(d.get("args", {}).get("correlation"), OUTSIDE), d["name"], classify(d["name"]),
                      d["dur"], None) for d in device)


# ---- metrics and tables ----
def class_metrics(rows: list[Row], prefix: str, class_bytes: Optional[dict] = None,
                  copy_bw: Optional[float] = None) -> dict[str, float]:
    """{prefix}total_ms, {prefix}<class>_frac (summing to 1) and, where the bytes of a class are known,
    {prefix}<class>_bw_frac: its achieved bandwidth (bytes / its time) over the measured copy bandwidth."""
    total = sum(r.total_ms for r in rows)
    out = {f"{prefix}total_ms": total}
    for cls in CLASSES:
        ms = sum(r.total_ms for r in rows if r.cls == cls)
        out[f"{prefix}{cls}_frac"] = ms / total
        if copy_bw and ms and (class_bytes or {}).get(cls):
            out[f"{prefix}{cls}_bw_frac"] = class_bytes[cls] / (ms / 1e3) / copy_bw
    return out


def _class_line(phase: str, rows: list[Row], class_bytes: Optional[dict], copy_bw: Optional[float]) -> str:
    m = class_metrics(rows, "", class_bytes, copy_bw)
    parts = [f"{c} {m[c + '_frac']:.1%}" + (f" ({m[c + '_bw_frac']:.0%} of copy bw)" if c + "_bw_frac" in m else "")
             for c in CLASSES]
    return f"{phase:8} {m['total_ms']:10.3f} ms: " + ", ".join(parts)


def write_summary(rows: list[Row], out_dir: Path, title: str, decode_bytes: Optional[dict] = None,
                  copy_bw: Optional[float] = None) -> None:
    """kernels.csv (every row; share = of its phase's time) and kernels.txt (each phase's top rows, then its classes;
    bandwidth where the bytes are known, against the measured copy bandwidth)."""
    phase_ms = defaultdict(float)
    for r in rows:
        phase_ms[r.phase] += r.total_ms
    table = [(r, r.total_ms / phase_ms[r.phase], r.bytes / r.total_ms / 1e6 if r.bytes else None) for r in rows]
    with open(out_dir / "kernels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phase", "class", "kernel", "count", "total_ms", "share", "avg_us", "gbs"])
        writer.writerows([r.phase, r.cls, r.name, r.count, f"{r.total_ms:.6g}", f"{share:.6g}",
                          f"{r.total_ms * 1e3 / r.count:.6g}", "" if gbs is None else f"{gbs:.6g}"]
                         for r, share, gbs in table)
    lines = [title, f"{'phase':8} {'class':11} {'count':>7} {'total ms':>10} {'share':>6} {'avg us':>9} {'GB/s':>7}  "
                    "kernel"]
    shown: dict[str, int] = defaultdict(int)
    for r, share, gbs in table:
        shown[r.phase] += 1
        if shown[r.phase] <= SUMMARY_TOP:
            lines.append(f"{r.phase:8} {r.cls:11} {r.count:7d} {r.total_ms:10.3f} {share:6.1%} "
                         f"{r.total_ms * 1e3 / r.count:9.2f} {'-' if gbs is None else f'{gbs:.0f}':>7}  {r.name[:120]}")
    lines += ["", "by class"] + [_class_line(phase, [r for r in rows if r.phase == phase],
                                             decode_bytes if phase == "decode" else None, copy_bw)
                                 for phase in ORDER if phase in phase_ms]
    (out_dir / "kernels.txt").write_text("\n".join(lines) + "\n")


def run_metrics(rows: list[Row], decode_bytes: Optional[dict] = None, copy_bw: Optional[float] = None) -> dict:
    """prof.* over the whole call, prof.<phase>_* per phase that ran (decode with bandwidth where bytes are known)."""
    out = class_metrics(rows, "prof.")
    for phase in PHASES:
        part = [r for r in rows if r.phase == phase]
        if part:
            out |= class_metrics(part, f"prof.{phase}_", decode_bytes if phase == "decode" else None, copy_bw)
    return out


# ---- marking the phases of one generate() ----
def _phase(name: str, nvtx: bool, capture: bool) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.profiler.record_function(name))
    if nvtx:
        stack.enter_context(torch.cuda.nvtx.range(name))
    if capture and name == "decode":  # cudaProfilerStart/Stop: ncu and nsys record decode only
        stack.enter_context(torch.cuda.profiler.profile())
    return stack


@contextlib.contextmanager
def marked_phases(model: torch.nn.Module, nvtx: bool, capture_decode: bool = False):
    """Ranges around the phases of the generate() calls made inside: "prefill" around the model's prefill forward,
    "decode" from its end until the block exits. The Engine API is one generate() call, so the split is made with
    forward hooks on the engine's model; on CUDA its decode is a graph replay, with no forward to hook."""
    current: list[contextlib.ExitStack] = []

    def enter(name: str) -> None:
        while current:
            current.pop().close()
        current.append(_phase(name, nvtx, capture_decode))

    def on_prefill(name: str):
        def hook(module, args, kwargs, *output):
            if kwargs.get("mode", args[3] if len(args) > 3 else None) == "prefill":  # forward(tokens, pos, cache, mode)
                enter(name)
        return hook

    hooks = [model.register_forward_pre_hook(on_prefill("prefill"), with_kwargs=True),
             model.register_forward_hook(on_prefill("decode"), with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        while current:
            current.pop().close()


def generate_marked(engine, spec: RunSpec, profiler=None, capture_decode: bool = False) -> None:
    """One generate() of the bench shape with its phases marked, inside `profiler`, after an unmarked warm-up
    (Triton compilation, the CUDA-graph capture and the cache allocation stay out of the profile). The engine has a
    PyTorch `model`: validation let only engines whose Capabilities.profilers allow bench.profile get here."""
    model = engine.model
    b, ctx = spec.cfg.bench, spec.cfg.context
    prompts = bench_prompts(engine, b.batch_size, ctx.prompt_len, spec.cfg.seed)
    engine.generate(prompts, ctx.gen_len)
    cuda = engine.device.type == "cuda"
    with profiler or contextlib.nullcontext(), marked_phases(model, nvtx=cuda, capture_decode=capture_decode):
        engine.generate(prompts, ctx.gen_len)


# ---- the three profilers ----
def _shape(spec: RunSpec) -> str:
    b, ctx = spec.cfg.bench, spec.cfg.context
    return f"one generate() of batch {b.batch_size} x {ctx.prompt_len} prompt + {ctx.gen_len} new tokens"


def _bandwidth(engine, spec: RunSpec) -> tuple[Optional[dict], Optional[float]]:
    """On CUDA: the fewest bytes the decode steps must move (as perf.roofline_frac: matmuls read every weight once
    a step, attention the KV cache at the mean decode context) and the measured copy bandwidth."""
    b, ctx = spec.cfg.bench, spec.cfg.context
    if engine.device.type != "cuda" or ctx.gen_len < 2:
        return None, None
    mem, steps = engine.memory(), ctx.gen_len - 1
    weights = decode_bytes_per_step(engine, mem, b.batch_size, 0)
    kv = mem.kv_bytes_per_token * b.batch_size * (ctx.prompt_len + ctx.gen_len // 2)
    return {"matmul": weights * steps, "attention": kv * steps}, copy_bandwidth(str(engine.device))


def profile_torch(engine, spec: RunSpec, out_dir: Path) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    generate_marked(engine, spec, profiler=prof)
    trace = out_dir / "trace.json"
    prof.export_chrome_trace(str(trace))
    rows = summarize_trace(json.loads(trace.read_text())["traceEvents"], on_device=cuda)
    decode_bytes, bw = _bandwidth(engine, spec)
    what = "CUDA kernels" if cuda else "CPU ops by self time"
    write_summary(rows, out_dir, f"torch.profiler, {what}: {_shape(spec)}", decode_bytes, bw)
    return run_metrics(rows, decode_bytes, bw)


def _child_command(spec: RunSpec, out_dir: Path) -> list[str]:
    """The process a tool profiles: this run's config, written out, repeated by `python -m kvexp.bench.profile`."""
    from omegaconf import OmegaConf

    config = out_dir / "profile_config.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.structured(spec.cfg)))
    return [sys.executable, "-m", "kvexp.bench.profile", str(config)]


def _run_child(command: list[str], log: Path, engine) -> None:
    """Run a tool over the child, its output to log, with the engine freed first: the child builds the same engine
    again, and two copies of the weights and full KV cache need not fit on one GPU."""
    engine.close()
    with open(log, "w") as log_file:
        subprocess.run(command, check=True, stdout=log_file, stderr=subprocess.STDOUT)


def require_tool(mode: str) -> str:
    """The path of the ncu/nsys executable, else MissingDependency in one line (config validation can call this
    before anything is built)."""
    path = shutil.which(mode)
    if path is None:
        raise MissingDependency(MISSING[mode])
    return path


def ncu_command(ncu: str, spec: RunSpec, out_dir: Path) -> list[str]:
    kernels = "|".join(ATTENTION_KERNELS + MATMUL_KERNELS)
    return [ncu, "--target-processes", "all",
            "--profile-from-start", "off",  # from the child's cudaProfilerStart at the start of decode
            "--kernel-name", f"regex:{kernels}", "--launch-count", str(NCU_LAUNCHES),
            "--section", "SpeedOfLight", "--metrics", ",".join(NCU_METRICS),
            "--clock-control", "none",  # the boost clocks the bench ran at, not ncu's default base clocks
            "--print-units", "base", "--csv", "--log-file", str(out_dir / "ncu.csv")] + _child_command(spec, out_dir)


def parse_ncu_csv(text: str) -> list[Row]:
    """ncu --csv (details page): one line per (launch ID, metric), after any ==PROF== lines. Duration and DRAM
    bytes per launch, summed per kernel name."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise RuntimeError("ncu wrote no kernel table (no kernel matched the filter inside decode?); see ncu.csv")
    launches: dict[str, dict] = {}
    for rec in csv.DictReader(lines[start:]):
        if rec["Metric Name"] not in NCU_METRICS:
            continue
        launch = launches.setdefault(rec["ID"], {"name": rec["Kernel Name"], "ns": 0.0, "bytes": 0.0})
        value = float(rec["Metric Value"].replace(",", "")) * NCU_UNITS[rec["Metric Unit"]]
        launch["ns" if rec["Metric Name"] == "gpu__time_duration.sum" else "bytes"] += value
    return aggregate(("decode", v["name"], classify(v["name"]), v["ns"] / 1e3, v["bytes"]) for v in launches.values())


def profile_ncu(engine, spec: RunSpec, out_dir: Path) -> dict[str, float]:
    command = ncu_command(require_tool("ncu"), spec, out_dir)
    bw = copy_bandwidth(str(engine.device)) if engine.device.type == "cuda" else None
    _run_child(command, out_dir / "ncu.log", engine)
    rows = parse_ncu_csv((out_dir / "ncu.csv").read_text())
    measured = {c: sum(r.bytes or 0.0 for r in rows if r.cls == c) for c in CLASSES}
    write_summary(rows, out_dir, f"Nsight Compute, decode attention and matmul kernels (first {NCU_LAUNCHES} "
                                 f"launches, DRAM bytes measured): {_shape(spec)}", measured, bw)
    return class_metrics(rows, "prof.ncu_", measured, bw)


def parse_nsys_kern_sum(text: str) -> list[Row]:
    """`nsys stats --report cuda_gpu_kern_sum --format csv`: one line per kernel name, times in ns."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Time")), None)
    if start is None:
        raise RuntimeError("nsys stats printed no kernel summary (did decode launch kernels?); see nsys.log")
    rows = [Row("decode", r["Name"], classify(r["Name"]), int(r["Instances"]), float(r["Total Time (ns)"]) / 1e6)
            for r in csv.DictReader(lines[start:])]
    return sorted(rows, key=lambda r: -r.total_ms)


def profile_nsys(engine, spec: RunSpec, out_dir: Path) -> dict[str, float]:
    nsys = require_tool("nsys")
    report = out_dir / "decode.nsys-rep"  # nsys adds the extension to --output
    decode_bytes, bw = _bandwidth(engine, spec)
    command = [nsys, "profile", "--trace", "cuda,nvtx", "--capture-range", "cudaProfilerApi", "--capture-range-end",
               "stop", "--force-overwrite", "true", "--output", str(out_dir / "decode")] + _child_command(spec, out_dir)
    _run_child(command, out_dir / "nsys.log", engine)
    stats = subprocess.run([nsys, "stats", "--report", "cuda_gpu_kern_sum", "--format", "csv", "--output", "-",
                            str(report)], check=True, capture_output=True, text=True).stdout
    rows = parse_nsys_kern_sum(stats)
    write_summary(rows, out_dir, f"Nsight Systems, decode kernels: {_shape(spec)}", decode_bytes, bw)
    return class_metrics(rows, "prof.decode_", decode_bytes, bw)


PROFILERS = {"torch": profile_torch, "ncu": profile_ncu, "nsys": profile_nsys}


def profile_run(engine, spec: RunSpec, out_dir: Path) -> dict[str, float]:
    """Profile the built engine as spec.cfg.bench.profile (torch|ncu|nsys, validated by config.py) says; artifacts
    go to out_dir, prof.* metrics are returned. ncu and nsys close the engine (their child builds its own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return PROFILERS[spec.cfg.bench.profile](engine, spec, out_dir)


def main(config_path: str) -> None:
    """The process ncu/nsys launch: build this run's engine and run generate_marked, decode between
    cudaProfilerStart and cudaProfilerStop."""
    from omegaconf import OmegaConf

    from kvexp.config import KvexpConfig
    from kvexp.resolve import validate
    from kvexp.engines import engine_class

    spec = validate(OmegaConf.merge(OmegaConf.structured(KvexpConfig), OmegaConf.load(config_path)))
    engine = engine_class(spec.engine_options.name)(spec)
    engine.build()
    try:
        generate_marked(engine, spec, capture_decode=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main(sys.argv[1])
