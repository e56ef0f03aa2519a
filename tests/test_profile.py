"""bench.profile: the torch-profiler path on the tiny model (CPU), which engines may profile, kernel classification,
phase attribution of CUDA kernels in a kineto trace, the ncu/nsys command lines and CSV parsing, the engine freed
before the profiled child starts, and the one-line missing-tool errors."""
import copy
import csv
import dataclasses
import json
import shutil
import stat
import subprocess

import pytest
import torch

from conftest import build_engine, make_spec
from kvexp.bench import profile
from kvexp.errors import MissingDependency, UnsupportedConfig


@pytest.fixture(scope="module")
def engine():
    e = build_engine("bench.batch_size=1", "engine.device=cpu")  # the CPU path, on GPU machines too
    yield e
    e.close()


def with_profile(spec, mode: str):
    """The spec with bench.profile=mode (a copy: the engine's own spec is left as built)."""
    from kvexp.resolve import run_hash

    cfg = copy.deepcopy(spec.cfg)
    cfg.bench.profile = mode
    return dataclasses.replace(spec, cfg=cfg, config_hash=run_hash(cfg, spec.build))


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_fractions_sum_to_one(metrics, prefix):
    assert sum(metrics[f"{prefix}{c}_frac"] for c in profile.CLASSES) == pytest.approx(1.0)


# ---- the torch path on CPU ----
def test_torch_profile_writes_trace_summary_and_metrics(engine, tmp_path):
    spec = with_profile(engine.spec, "torch")
    metrics = profile.profile_run(engine, spec, tmp_path)

    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    ranges = {e["name"]: e for e in events if e.get("cat") == "user_annotation"}
    assert set(ranges) == {"prefill", "decode"}
    assert ranges["prefill"]["ts"] + ranges["prefill"]["dur"] <= ranges["decode"]["ts"]

    rows = read_rows(tmp_path / "kernels.csv")
    for phase in ("prefill", "decode"):
        assert sum(float(r["share"]) for r in rows if r["phase"] == phase) == pytest.approx(1.0)
    # each layer attends once in the prefill and once per decode step: the ops land in the right phase
    sdpa = {r["phase"]: int(r["count"]) for r in rows if r["kernel"] == "aten::scaled_dot_product_attention"}
    layers, steps = engine.arch.num_layers, spec.cfg.context.gen_len - 1
    assert sdpa == {"prefill": layers, "decode": layers * steps}
    assert {r["class"] for r in rows if r["kernel"] == "aten::mm"} == {"matmul"}

    for prefix in ("prof.", "prof.prefill_", "prof.decode_"):
        assert_fractions_sum_to_one(metrics, prefix)
        assert metrics[f"{prefix}attention_frac"] > 0 and metrics[f"{prefix}matmul_frac"] > 0
    assert metrics["prof.prefill_total_ms"] + metrics["prof.decode_total_ms"] <= metrics["prof.total_ms"]
    assert not any(k.endswith("_bw_frac") for k in metrics)  # no bandwidth claims on CPU
    text = (tmp_path / "kernels.txt").read_text()
    assert "aten::mm" in text and any(line.startswith("decode") and "ms: attention" in line
                                      for line in text.splitlines())


def test_profiling_is_an_engine_capability(tmp_path):
    # trtllm has no PyTorch model to mark: rejected at validation, before anything is built
    with pytest.raises(UnsupportedConfig, match="bench.profile=torch: not supported by engine=trtllm; "
                                                "supported by engine=torch"):
        make_spec("engine=trtllm", "engine.dry_run=true", "bench.profile=torch", f"cache_dir={tmp_path}")


# ---- classification ----
@pytest.mark.parametrize("name, cls", [
    ("_split_kernel", "attention"),
    ("_merge_kernel", "attention"),
    ("_write_kv_kernel", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bfloat16_t>::Params)",
     "attention"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, true>(...)",
     "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
     "matmul"),
    ("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>(...)", "matmul"),
    ("void at::native::tinygemm_m16n8k16_chunk_kernel<(at::native::KReductionType)0, 128, 8>(...)", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(...)", "matmul"),
    ("aten::addmm", "matmul"),
    ("aten::linear", "matmul"),
    ("aten::_weight_int4pack_mm_for_cpu", "matmul"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "elementwise"),
    ("triton_poi_fused_mul_silu_0", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>(...)",
     "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>(...)",
     "elementwise"),
    ("aten::mul", "elementwise"),
    ("aten::copy_", "elementwise"),
    ("aten::cat", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("aten::empty", "other"),
    ("aten::mma", "other"),  # anchored: a name that merely starts like a matmul op is not one
])
def test_classify(name, cls):
    assert profile.classify(name) == cls


# ---- traces: CPU ops by self time, CUDA kernels in the phase of the host call that launched them ----
def test_cpu_ops_charge_self_time_to_the_outermost_recognised_op():
    op = lambda name, ts, dur, cat="cpu_op": {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1,  # noqa: E731
                                              "ts": ts, "dur": dur}
    events = [op("decode", 0, 100, "user_annotation"),
              op("aten::linear", 10, 50), op("aten::t", 11, 4), op("aten::addmm", 20, 30), op("aten::copy_", 25, 10),
              op("aten::copy_", 70, 10),
              op("aten::to", 85, 10), op("aten::_to_copy", 86, 8), op("aten::copy_", 87, 6)]
    rows = {(r.name, r.cls): (r.phase, r.count, round(r.total_ms * 1e3, 6))
            for r in profile.summarize_trace(events, on_device=False)}
    assert rows == {("aten::linear", "matmul"): ("decode", 1, 16), ("aten::t", "matmul"): ("decode", 1, 4),
                    ("aten::addmm", "matmul"): ("decode", 1, 20), ("aten::copy_", "matmul"): ("decode", 1, 10),
                    ("aten::copy_", "elementwise"): ("decode", 2, 16), ("aten::to", "other"): ("decode", 1, 2),
                    ("aten::_to_copy", "elementwise"): ("decode", 1, 2)}



def kineto_trace(graph_kernels: bool = True) -> list[dict]:
    """A kineto-style trace: host ranges and launches on one thread (pid 1), device events on stream 7."""
    host = lambda cat, name, ts, dur, corr=None: {  # noqa: E731
        "ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur,
        "args": {} if corr is None else {"correlation": corr}}
    dev = lambda cat, name, ts, dur, corr: {  # noqa: E731
        "ph": "X", "cat": cat, "name": name, "pid": 0, "tid": 7, "ts": ts, "dur": dur, "args": {"correlation": corr}}
    events = [host("cuda_runtime", "cudaMemcpyAsync", 1, 2, 1), dev("gpu_memcpy", "Memcpy HtoD", 5, 3, 1),
              host("user_annotation", "prefill", 10, 90), host("cpu_op", "aten::mm", 11, 20),
              host("cuda_runtime", "cudaLaunchKernel", 12, 5, 2), dev("kernel", "sm90_xmma_gemm_bf16", 40, 50, 2),
              host("user_annotation", "decode", 100, 900),
              host("cuda_driver", "cuLaunchKernel", 110, 5, 3), dev("kernel", "_split_kernel", 200, 10, 3),
              host("cuda_runtime", "cudaGraphLaunch", 120, 5, 4)]
    if graph_kernels:
        events += [dev("kernel", "gemv2T_kernel_val", 220, 30, 4), dev("kernel", "_split_kernel", 260, 10, 4),
                   dev("kernel", "triton_poi_fused_mul_silu_0", 280, 5, 4),
                   dev("kernel", "gemv2T_kernel_val", 290, 30, 4)]
    return events


def test_device_kernels_are_attributed_by_correlation():
    rows = {(r.phase, r.name): r for r in profile.summarize_trace(kineto_trace(), on_device=True)}
    assert set(rows) == {("outside", "Memcpy HtoD"), ("prefill", "sm90_xmma_gemm_bf16"),
                         ("decode", "_split_kernel"), ("decode", "gemv2T_kernel_val"),
                         ("decode", "triton_poi_fused_mul_silu_0")}  # the host aten::mm is not device time
    assert (rows["decode", "_split_kernel"].count, rows["decode", "_split_kernel"].total_ms) == (2, 0.02)
    decode = [r for r in rows.values() if r.phase == "decode"]
    m = profile.class_metrics(decode, "prof.decode_", {"matmul": 6e6, "attention": 1e6}, copy_bw=1e12)
    assert m["prof.decode_total_ms"] == pytest.approx(0.085)
    assert m["prof.decode_matmul_frac"] == pytest.approx(60 / 85)
    assert m["prof.decode_attention_frac"] == pytest.approx(20 / 85)
    assert m["prof.decode_matmul_bw_frac"] == pytest.approx(6e6 / 60e-6 / 1e12)  # bytes / class time / copy bw
    assert "prof.decode_elementwise_bw_frac" not in m  # no bytes known: no claim


def test_graph_replays_without_kernels_are_named():
    with pytest.raises(MissingDependency, match="engine.cuda_graphs=false"):
        profile.summarize_trace(kineto_trace(graph_kernels=False), on_device=True)


# ---- ncu ----
NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def ncu_line(launch, kernel, section, metric, unit, value):
    return (f'"{launch}","4242","python3","127.0.0.1","{kernel}","1","7","(128, 1, 1)","(8, 32, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}"')


NCU_CSV = "\n".join([
    "==PROF== Connected to process 4242 (/usr/bin/python3.12)",
    "==PROF== Profiling \"_split_kernel\" - 0: 0%....50%....100% - 9 passes",
    NCU_HEADER,
    ncu_line(0, "_split_kernel", "GPU Speed Of Light Throughput", "DRAM Throughput", "%", "85.31"),
    ncu_line(0, "_split_kernel", "GPU Speed Of Light Throughput", "Duration", "nsecond", "20,000"),
    ncu_line(0, "_split_kernel", "Command line profiler metrics", "dram__bytes_read.sum", "byte", "50,000,000"),
    ncu_line(0, "_split_kernel", "Command line profiler metrics", "dram__bytes_write.sum", "byte", "1,000"),
    ncu_line(0, "_split_kernel", "Command line profiler metrics", "gpu__time_duration.sum", "nsecond", "20,000"),
    ncu_line(1, "gemv2T_kernel_val", "Command line profiler metrics", "dram__bytes_read.sum", "Mbyte", "25.5"),
    ncu_line(1, "gemv2T_kernel_val", "Command line profiler metrics", "dram__bytes_write.sum", "Kbyte", "4"),
    ncu_line(1, "gemv2T_kernel_val", "Command line profiler metrics", "gpu__time_duration.sum", "usecond", "10.5"),
    ncu_line(2, "_split_kernel", "Command line profiler metrics", "dram__bytes_read.sum", "byte", "50,000,000"),
    ncu_line(2, "_split_kernel", "Command line profiler metrics", "dram__bytes_write.sum", "byte", "1,000"),
    # "ns": what ncu 2025 prints with --print-units base (ncu.csv of the H100 run)
    ncu_line(2, "_split_kernel", "Command line profiler metrics", "gpu__time_duration.sum", "ns", "19,000"),
    "==PROF== Disconnected from process 4242",
])


def test_parse_ncu_csv():
    rows = {r.name: r for r in profile.parse_ncu_csv(NCU_CSV)}
    split, gemv = rows["_split_kernel"], rows["gemv2T_kernel_val"]
    assert (split.phase, split.cls, split.count) == ("decode", "attention", 2)
    assert split.total_ms == pytest.approx(0.039) and split.bytes == pytest.approx(100_002_000)
    assert (gemv.cls, gemv.count) == ("matmul", 1)
    assert gemv.total_ms == pytest.approx(0.0105) and gemv.bytes == pytest.approx(25_504_000)


def test_parse_ncu_csv_without_a_table_says_so():
    with pytest.raises(RuntimeError, match="no kernel table"):
        profile.parse_ncu_csv("==PROF== Connected to process 1\n==WARNING== No kernels were profiled.\n")


def test_ncu_command(engine, tmp_path, monkeypatch):
    import re

    from omegaconf import OmegaConf

    from kvexp.config import KvexpConfig
    from kvexp.resolve import validate

    spec = with_profile(engine.spec, "ncu")
    cmd = profile.ncu_command("/opt/ncu", spec, tmp_path)
    assert cmd[0] == "/opt/ncu" and cmd[cmd.index("--profile-from-start") + 1] == "off"
    assert cmd[cmd.index("--launch-count") + 1] == str(profile.NCU_LAUNCHES)
    assert cmd[cmd.index("--log-file") + 1] == str(tmp_path / "ncu.csv") and "--csv" in cmd
    assert set(cmd[cmd.index("--metrics") + 1].split(",")) == set(profile.NCU_METRICS)
    kernels = re.compile(cmd[cmd.index("--kernel-name") + 1].removeprefix("regex:"))
    for name in ("_split_kernel", "_merge_kernel", "gemv2T_kernel_val", "nvjet_hsh_64x8", "tinygemm_m16n8k16"):
        assert kernels.search(name), name
    for name in ("triton_poi_fused_mul_silu_0", "vectorized_elementwise_kernel"):
        assert not kernels.search(name), name
    # the child repeats exactly this run: its config file validates to the same config hash (validation checks
    # that ncu exists, as it does where the child runs)
    monkeypatch.setattr(profile.shutil, "which", lambda name: f"/opt/{name}")
    assert cmd[-4:-1] == [profile.sys.executable, "-m", "kvexp.bench.profile"]
    child = validate(OmegaConf.merge(OmegaConf.structured(KvexpConfig), OmegaConf.load(cmd[-1])))
    assert child.config_hash == spec.config_hash


@pytest.fixture
def child_runs(engine, monkeypatch):
    """In order: "close" per engine.close() (a stand-in, so the module's engine stays built) and "run" per tool run."""
    events = []
    run = subprocess.run

    def spy_run(command, **kwargs):
        events.append("run")
        return run(command, **kwargs)

    monkeypatch.setattr(engine, "close", lambda: events.append("close"))
    monkeypatch.setattr(profile.subprocess, "run", spy_run)
    return events


def fake_tool(tmp_path, name: str, script: str) -> str:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_ncu_run_end_to_end_with_a_recorded_csv(engine, tmp_path, monkeypatch, child_runs):
    (tmp_path / "recorded.csv").write_text(NCU_CSV)
    # a stand-in ncu that writes the recorded CSV where --log-file says
    tool = fake_tool(tmp_path, "ncu",
                     f'while [ "$1" != --log-file ]; do shift; done; cp {tmp_path}/recorded.csv "$2"\n')
    monkeypatch.setattr(shutil, "which", lambda name: tool if name == "ncu" else None)
    out = tmp_path / "out"
    metrics = profile.profile_run(engine, with_profile(engine.spec, "ncu"), out)
    assert metrics["prof.ncu_total_ms"] == pytest.approx(0.0495)
    assert metrics["prof.ncu_attention_frac"] == pytest.approx(0.039 / 0.0495)
    assert_fractions_sum_to_one(metrics, "prof.ncu_")
    assert {r["kernel"] for r in read_rows(out / "kernels.csv")} == {"_split_kernel", "gemv2T_kernel_val"}
    assert (out / "profile_config.yaml").exists()
    assert child_runs == ["close", "run"]  # the child builds its own engine: the parent's is freed first


# ---- nsys ----
NSYS_CSV = "\n".join([
    "Generating SQLite file decode.sqlite from decode.nsys-rep",
    "Time (%),Total Time (ns),Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Name",
    "61.5,800000,320,2500.0,2496.0,2400,2700,50.1,\"void gemv2T_kernel_val<int, int, __nv_bfloat16>(...)\"",
    "30.8,400000,160,2500.0,2500.0,2450,2600,20.0,_split_kernel",
    "7.7,100000,160,625.0,620.0,600,700,10.0,triton_poi_fused_mul_silu_0",
])


def test_nsys_run_end_to_end_with_a_recorded_summary(engine, tmp_path, monkeypatch, child_runs):
    (tmp_path / "kern_sum.csv").write_text(NSYS_CSV)
    tool = fake_tool(tmp_path, "nsys", f'[ "$1" = stats ] && cat {tmp_path}/kern_sum.csv\nexit 0\n')
    monkeypatch.setattr(shutil, "which", lambda name: tool if name == "nsys" else None)
    metrics = profile.profile_run(engine, with_profile(engine.spec, "nsys"), tmp_path / "out")
    assert metrics["prof.decode_total_ms"] == pytest.approx(1.3)
    assert metrics["prof.decode_matmul_frac"] == pytest.approx(0.8 / 1.3)
    assert_fractions_sum_to_one(metrics, "prof.decode_")
    rows = read_rows(tmp_path / "out" / "kernels.csv")
    assert [(r["kernel"], r["count"]) for r in rows][1] == ("_split_kernel", "160")
    assert child_runs == ["close", "run", "run"]  # freed before `nsys profile`; `nsys stats` reads its report


@pytest.mark.parametrize("mode, message", [
    ("ncu", "ncu (Nsight Compute) not found on PATH; install"),
    ("nsys", "nsys (Nsight Systems) not found on PATH; use bench.profile=torch or ncu"),
])
def test_missing_tool_is_one_line(engine, tmp_path, monkeypatch, mode, message):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MissingDependency) as err:
        profile.profile_run(engine, with_profile(engine.spec, mode), tmp_path)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# ---- on a GPU ----
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profile_sees_graph_replayed_decode_kernels(tmp_path):
    gpu = build_engine("bench.batch_size=1", "engine.device=cuda", "model.dtype=bfloat16")
    try:
        spec = with_profile(gpu.spec, "torch")
        metrics = profile.profile_run(gpu, spec, tmp_path)
        rows = read_rows(tmp_path / "kernels.csv")
        decode = {r["kernel"]: r for r in rows if r["phase"] == "decode"}
        steps = spec.cfg.context.gen_len - 1
        # the Triton decode attention runs once per layer and step, inside the graph replays
        assert int(decode["_split_kernel"]["count"]) == gpu.arch.num_layers * steps
        assert any(r["class"] == "matmul" for r in decode.values())
        assert_fractions_sum_to_one(metrics, "prof.decode_")
        assert 0 < metrics["prof.decode_attention_bw_frac"] and 0 < metrics["prof.decode_matmul_bw_frac"]
        if shutil.which("ncu"):
            ncu = profile.profile_run(gpu, with_profile(gpu.spec, "ncu"), tmp_path / "ncu")
            assert ncu["prof.ncu_attention_frac"] > 0 and ncu["prof.ncu_matmul_frac"] > 0
    finally:
        gpu.close()
