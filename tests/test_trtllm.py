"""engine=trtllm on CPU, without tensorrt_llm: argument mapping checked against TensorRT-LLM 1.x names recorded from
its sources (tests/data/trtllm_api.json), cache keys, calibration files, trtllm-bench, error paths, and the engine's
glue code driven by a stand-in LLM. The one real run is marked trtllm and skips unless tensorrt_llm and CUDA exist."""
from __future__ import annotations

import dataclasses
import enum
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import compose
from omegaconf import OmegaConf

import kvexp.engines
from kvexp.config import RunSpec
from kvexp.engines.trtllm import TrtllmEngine, bench, cache, checks
from kvexp.engines.trtllm.engine import _constructor_kwargs, perf_timings, stream_timings
from kvexp.engines.trtllm.options import Options
from kvexp.errors import ConfigError, MissingDependency, UnsupportedConfig
from kvexp.resolve import build_spec, run_hash

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
API = json.loads((DATA / "trtllm_api.json").read_text())
REPORT = json.loads((DATA / "trtllm_bench_report.json").read_text())
H100, A100, T4 = ("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0)), ("Tesla T4", (7, 5))
# preset -> (QuantConfig.quant_algo, kv_cache_quant_algo) on backend=tensorrt; "reject": UnsupportedConfig
TENSORRT = {"fp16": (None, None), "int8kv": (None, "INT8"), "int8kv_static": (None, "INT8"),
            "awq": ("W4A16_AWQ", None), "awq_int8kv": ("W4A16_AWQ", "INT8"), "fp8": ("FP8", "FP8"),
            "fp8_static": ("FP8", "FP8"), "fp8_weights": "reject",  # QuantAlgo.FP8 has no weight-only form
            "fp8kv": (None, "FP8"), "int4kv": "reject", "int4kv_static": "reject"}
# what a rejected preset's message names: the capability table rejects it before any backend rule
REJECTED_FIELD = {"fp8_weights": "quant.activations"}
PYTORCH = {"fp16": "auto", "fp8kv": "fp8"}  # KvCacheConfig.dtype; every other preset is rejected on this backend


def make_spec(*overrides: str) -> RunSpec:
    """Composed like the CLI; the RunSpec is built here rather than by validate(), whose model check is not ours."""
    cfg = OmegaConf.to_object(compose("engine=trtllm", "experiment=smoke", *overrides))
    options = TrtllmEngine.parse_options(dict(cfg.engine))
    build = build_spec(cfg, options, TrtllmEngine)
    return RunSpec(cfg=cfg, engine_options=options, build=build, config_hash=run_hash(cfg, build))


@pytest.fixture
def only_trtllm(monkeypatch):
    """Rejection messages list other engines that support a value; keep these tests off their modules."""
    monkeypatch.setattr(kvexp.engines, "ENGINES", {"trtllm": kvexp.engines.ENGINES["trtllm"]})


@pytest.fixture
def gpu(monkeypatch):
    """Pretend tensorrt_llm <version> is installed on a GPU: gpu(name_capability, version)."""
    def install(card=H100, found="1.2.0"):
        monkeypatch.setattr(checks, "find_spec", lambda name: object() if name == "tensorrt_llm" else None)
        monkeypatch.setattr(checks, "version", lambda name: found)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: card is not None)
        if card:
            monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: card[0])
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: card[1])
    return install


def assert_names_exist(plan: dict) -> None:
    """Every name the plan passes to TensorRT-LLM exists in the 1.x sources."""
    backend = plan["backend"]
    assert plan["llm_class"] == API["llm_classes"][backend]
    llm_fields = set(API["BaseLlmArgs"]) | set(API["TrtLlmArgs" if backend == "tensorrt" else "TorchLlmArgs"])
    configs = {"build_config": "BuildConfig", "quant_config": "QuantConfig", "calib_config": "CalibConfig",
               "kv_cache_config": "KvCacheConfig"}
    passed = {k for k in configs if plan[k] is not None}
    assert set(plan["llm_kwargs"]) | passed <= llm_fields
    for key, cls in configs.items():
        assert set(plan[key] or {}) <= set(API[cls]), key
    for params in plan["sampling_params"].values():
        assert set(params) <= set(API["SamplingParams"])
    if backend == "tensorrt":  # TrtLlmArgs.validate_kv_cache_dtype: dtype must stay 'auto' there
        assert "dtype" not in plan["kv_cache_config"]
    assert plan["kv_cache_config"].get("dtype", "auto") in API["pytorch_kv_cache_dtypes"]
    if plan["llm_kwargs_cached"]:
        assert set(plan["llm_kwargs_cached"]) <= llm_fields
    json.dumps(plan)  # printable as JSON


def test_every_quant_preset_is_mapped():
    presets = {p.stem for p in (ROOT / "conf" / "quant").glob("*.yaml")}
    assert presets == set(TENSORRT)


@pytest.mark.parametrize("preset", sorted(TENSORRT))
def test_tensorrt_backend_plan_per_preset(preset, tmp_path, only_trtllm):
    spec = make_spec(f"quant={preset}", "engine.dry_run=true", f"cache_dir={tmp_path}")
    if TENSORRT[preset] == "reject":
        with pytest.raises(UnsupportedConfig, match=REJECTED_FIELD.get(preset, "quant.kv_cache.dtype=int4")):
            TrtllmEngine.check_supported(spec)
        return
    TrtllmEngine.check_supported(spec)
    plan = TrtllmEngine.plan(spec, trt_version="1.2.0", gpu_name=H100[0])
    assert_names_exist(plan)
    quant = plan["quant_config"]
    algos = (quant["quant_algo"], quant["kv_cache_quant_algo"]) if quant else (None, None)  # fp16: no QuantConfig
    assert algos == TENSORRT[preset]
    if quant:
        assert quant["quant_algo"] in API["QuantAlgo"] + [None]
        assert quant["kv_cache_quant_algo"] in API["KV_CACHE_QUANT_ALGO_LIST"] + [None]
        assert plan["calib_config"]["calib_dataset"].endswith(cache.CALIB_LEAF)  # smoke calibrates on builtin text
    assert plan["build_config"]["gather_context_logits"] is True  # fidelity is on: scoring needs prompt logits
    assert plan["engine_dir"] == str(tmp_path.resolve() / "trtllm" / "engines" / plan["build_key"][:16])


@pytest.mark.parametrize("preset", sorted(TENSORRT))
def test_pytorch_backend_plan_per_preset(preset, tmp_path, only_trtllm):
    spec = make_spec(f"quant={preset}", "engine.backend=pytorch", "engine.dry_run=true", f"cache_dir={tmp_path}")
    if preset not in PYTORCH:
        with pytest.raises(UnsupportedConfig) as err:
            TrtllmEngine.check_supported(spec)
        expected = REJECTED_FIELD.get(preset, "quant.kv_cache.dtype=int4") if TENSORRT[preset] == "reject" \
            else "engine.backend=tensorrt"
        assert expected in str(err.value)
        return
    TrtllmEngine.check_supported(spec)
    plan = TrtllmEngine.plan(spec, trt_version="1.2.0", gpu_name=H100[0])
    assert_names_exist(plan)
    assert plan["quant_config"] is plan["calib_config"] is plan["build_config"] is plan["engine_dir"] is None
    assert plan["kv_cache_config"].get("dtype", "auto") == PYTORCH[preset]


def test_limits_come_from_context_and_batch_configs(tmp_path):
    spec = make_spec("quant=fp16", "eval=none", "context.prompt_len=100", "context.gen_len=28", "bench.batch_size=4",
                     "eval.batch_size=2", "eval.fidelity.enabled=false", f"cache_dir={tmp_path}")
    build = TrtllmEngine.plan(spec, trt_version="1.2.0", gpu_name=H100[0])["build_config"]
    assert build == dict(max_input_len=128, max_seq_len=129, max_batch_size=4, max_num_tokens=516,
                         gather_context_logits=False)
    spec = make_spec("quant=fp16", "context.prompt_len=64", "context.gen_len=4", "eval.fidelity.score_tokens=20",
                     f"cache_dir={tmp_path}")
    build = TrtllmEngine.plan(spec, trt_version="1.2.0", gpu_name=H100[0])["build_config"]
    assert (build["max_input_len"], build["max_seq_len"]) == (64 + 20, 64 + 20 + 1)  # fidelity's scored tokens fit
    spec = make_spec("quant=fp16", "engine.max_batch_size=16", f"cache_dir={tmp_path}")
    assert TrtllmEngine.plan(spec, trt_version="1.2.0", gpu_name=H100[0])["build_config"]["max_batch_size"] == 16


def test_notes_record_substituted_kv_scales_and_one_pass_scores(tmp_path):
    notes = " ".join(TrtllmEngine.plan(make_spec("quant=int8kv", f"cache_dir={tmp_path}"))["notes"])
    assert "one calibrated scale per tensor" in notes and "quant=int8kv_static" in notes
    assert "kv_faithful is not available" in notes
    assert TrtllmEngine.plan(make_spec("quant=fp16", f"cache_dir={tmp_path}"))["notes"] == []


def test_options_mirror_yaml():
    assert yaml.safe_load((ROOT / "conf" / "engine" / "trtllm.yaml").read_text()) == dataclasses.asdict(Options())
    with pytest.raises(ConfigError, match="engine.backend=onnx: not one of tensorrt, pytorch"):
        Options(backend="onnx")


def test_planning_never_imports_tensorrt_llm():
    code = ("import sys; sys.modules['tensorrt_llm'] = None; sys.path.insert(0, 'tests')\n"  # importing it raises
            "from test_trtllm import make_spec, TrtllmEngine\n"
            "for q in ('fp16', 'int8kv', 'awq', 'fp8'):\n"
            "    spec = make_spec(f'quant={q}', 'engine.dry_run=true')\n"
            "    TrtllmEngine.check_supported(spec); TrtllmEngine.plan(spec)\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ---- build cache key ----
def build_key(tmp_path, *overrides, version="1.2.0", gpu_name=H100[0]):
    spec = make_spec("quant=awq", f"cache_dir={tmp_path}", *overrides)
    return TrtllmEngine.plan(spec, trt_version=version, gpu_name=gpu_name)["build_key"]


def test_build_key_same_config_same_key(tmp_path):
    base = build_key(tmp_path)
    assert build_key(tmp_path) == base
    assert build_key(tmp_path, "context.gen_len=32", "context.prompt_len=256") == base  # same values, given explicitly
    for unrelated in ("tracking.uri=sqlite:////tmp/other.db", "force=true", "engine.dry_run=true", "eval.limit=3",
                      f"cache_dir={tmp_path / 'elsewhere'}", "engine.bench_mode=throughput"):
        assert build_key(tmp_path, unrelated) == base, unrelated


def test_build_key_changes_with_what_the_engine_depends_on(tmp_path):
    base = build_key(tmp_path)
    changed = [build_key(tmp_path, o) for o in ("quant=int8kv", "quant.weights.group_size=64", "context.prompt_len=96",
                                                "bench.batch_size=16", "quant.calib.num_samples=16",
                                                "model.dtype=float16")]
    changed += [build_key(tmp_path, version="1.1.0"), build_key(tmp_path, gpu_name=A100[0])]
    assert base not in changed and len(set(changed)) == len(changed)


def test_build_key_follows_local_calibration_file_contents(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("one line of text\n")
    first = build_key(tmp_path, f"quant.calib.dataset={text}")
    text.write_text("another line of text\n")
    assert build_key(tmp_path, f"quant.calib.dataset={text}") != first


# ---- calibration text on disk ----
def load_like_tensorrt_llm(directory: Path, tmp_path, monkeypatch) -> tuple[list, list]:
    """Both TensorRT-LLM readers of a local calibration dir, reproduced with the installed `datasets`:
    ModelOpt flow: load_dataset(dir, split="train")["text"] (quantize_by_modelopt.get_calib_dataloader);
    legacy flow: the first DEFAULT_HF_DATASET_META name contained in the path picks split and column
    (convert_utils.load_calib_dataset)."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    meta = {"ccdv/cnn_dailymail": ("3.0.0", "train", "article"), "cnn_dailymail": ("3.0.0", "train", "article"),
            "lambada": (None, "validation", "text")}
    path = str(directory)
    assert not any(t in path.lower() for t in ("cnn_dailymail", "scienceqa", "science_qa"))
    modelopt = datasets.load_dataset(path, split="train")["text"]
    name, split, key = next(v for k, v in meta.items() if k in path)
    legacy = datasets.load_dataset(path, name=name, split=split)[key]
    return list(modelopt), list(legacy)


class CharTokenizer:
    """One token per character: enough to cut and decode calibration windows."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("source", ["builtin", "txt", "jsonl"])
def test_calibration_dir_reads_in_both_tensorrt_llm_flows(source, tmp_path, monkeypatch):
    from kvexp.quant.calib import calibration_batches

    texts = [f"calibration paragraph number {i}" for i in range(20)]
    dataset = {"builtin": "builtin", "txt": tmp_path / "c.txt", "jsonl": tmp_path / "c.jsonl"}[source]
    if source == "txt":
        dataset.write_text("\n\n".join(texts))
    if source == "jsonl":
        dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    spec = make_spec("quant=int8kv", f"quant.calib.dataset={dataset}", "quant.calib.num_samples=10",
                     "quant.calib.seq_len=24", f"cache_dir={tmp_path}")
    target = Path(TrtllmEngine.plan(spec)["calib_config"]["calib_dataset"])
    cache.write_calib_dir(spec.cfg.quant.calib, CharTokenizer(), target)
    modelopt, legacy = load_like_tensorrt_llm(target, tmp_path, monkeypatch)
    assert modelopt == legacy and len(modelopt) == cache.CALIB_MIN_ROWS
    tok = CharTokenizer()
    windows = [tok.decode(w[0].tolist()) for w in calibration_batches(tok, spec.cfg.quant.calib)]
    assert modelopt[:10] == windows and modelopt[10:20] == windows  # engine=torch's windows, cycled
    assert all(len(row) == 24 for row in windows)


def test_calibration_path_must_not_trigger_hub_datasets(tmp_path):
    spec = make_spec("quant=int8kv", f"cache_dir={tmp_path / 'cnn_dailymail_runs'}")
    with pytest.raises(ConfigError, match="cache_dir=.*contains 'cnn_dailymail'"):
        TrtllmEngine.plan(spec)


# ---- errors: one line each, before anything heavy ----
def one_line_error(kind, spec, match):
    with pytest.raises(kind, match=match) as err:
        TrtllmEngine.check_supported(spec)
    assert "\n" not in str(err.value)


def test_missing_tensorrt_llm(monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "find_spec", lambda name: None)
    spec = make_spec("quant=int8kv", f"cache_dir={tmp_path}")
    with pytest.raises(MissingDependency) as err:
        TrtllmEngine.check_supported(spec)
    assert str(err.value) == ("engine=trtllm needs tensorrt_llm (pip install --extra-index-url https://pypi.nvidia.com "
                              "'tensorrt-llm>=1.0,<1.3', see scripts/setup_colab.sh), or use engine=torch")


def test_dry_run_needs_neither_tensorrt_llm_nor_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(checks, "find_spec", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for preset in ("fp16", "int8kv", "awq", "fp8"):
        TrtllmEngine.check_supported(make_spec(f"quant={preset}", "engine.dry_run=true", f"cache_dir={tmp_path}"))


def test_environment_errors(gpu, tmp_path):
    spec = lambda *o: make_spec(*o, f"cache_dir={tmp_path}")  # noqa: E731
    gpu(H100, "1.3.0rc2")
    one_line_error(UnsupportedConfig, spec("quant=int8kv"), r"quant.kv_cache.dtype=int8 needs .* removed after 1\.2")
    one_line_error(UnsupportedConfig, spec("quant=fp16"), r"engine.backend=tensorrt needs .*tensorrt-llm>=1.0,<1.3")
    TrtllmEngine.check_supported(spec("quant=fp16", "engine.backend=pytorch"))
    gpu(H100, "0.21.0")
    one_line_error(MissingDependency, spec("quant=fp16"), r"needs tensorrt_llm>=1.0,<1.3 \(found 0.21.0\)")
    gpu(None)
    one_line_error(MissingDependency, spec("quant=fp16"), "no.*GPU|GPU.*none is visible.*engine=torch")
    gpu(T4)
    one_line_error(UnsupportedConfig, spec("quant=fp16"), r"Tesla T4 \(sm75\).*use engine=torch")
    gpu(A100)
    one_line_error(UnsupportedConfig, spec("quant=fp8"), r"FP8 needs an sm89\+ GPU .*A100.*sm80")
    one_line_error(UnsupportedConfig, spec("quant=fp8kv"), "FP8 needs an sm89")
    TrtllmEngine.check_supported(spec("quant=awq_int8kv"))
    gpu(H100)
    TrtllmEngine.check_supported(spec("quant=fp8"))


def test_config_errors_hold_in_dry_run(tmp_path, only_trtllm):
    spec = lambda *o: make_spec(*o, "engine.dry_run=true", f"cache_dir={tmp_path}")  # noqa: E731
    one_line_error(UnsupportedConfig, spec("quant=int8kv", "engine.backend=pytorch"),
                   "quant.kv_cache.dtype=int8: .*PyTorch backend.*use engine.backend=tensorrt")
    one_line_error(UnsupportedConfig, spec("quant=awq", "engine.backend=pytorch"), "use engine.backend=tensorrt")
    for dataset in ("c4", "/nonexistent/c.txt"):  # refused while the BuildSpec is resolved, before any engine check
        with pytest.raises(ConfigError, match=f"quant.calib.dataset={dataset}: not builtin, .*an existing .txt"):
            spec("quant=awq", f"quant.calib.dataset={dataset}")
    one_line_error(UnsupportedConfig, spec("quant=int8kv", "quant.kv_cache.scale=static",
                                           "quant.kv_cache.granularity=head"), "static/tensor")
    TrtllmEngine.check_supported(spec("quant=fp16", "quant.calib.dataset=c4"))  # nothing to calibrate


# ---- trtllm-bench ----
def test_parse_recorded_bench_report():
    assert bench.parse_bench_report(REPORT) == {
        "trtbench.request_throughput": 104.5066, "trtbench.decode_tok_s": 13376.8501, "trtbench.per_user_tok_s": 238.1874,
        "trtbench.latency_p50_ms": 573.1022, "trtbench.latency_p99_ms": 598.7240, "trtbench.ttft_ms": 38.6124,
        "trtbench.tpot_ms": 4.1984}
    no_stream = {k: v for k, v in REPORT.items() if k != "streaming_metrics"}
    assert set(bench.parse_bench_report(no_stream)) == set(bench.REPORT_METRICS)
    broken = json.loads(json.dumps(REPORT))
    del broken["performance"]["request_latency_percentiles_ms"]["p99"]
    with pytest.raises(ValueError, match="missing performance.request_latency_percentiles_ms.p99"):
        bench.parse_bench_report(broken)


@pytest.mark.parametrize("backend,mode", [("tensorrt", "throughput"), ("tensorrt", "latency"),
                                          ("pytorch", "throughput")])
def test_bench_run_writes_inputs_and_uses_real_flags(backend, mode, tmp_path):
    spec = make_spec("quant=fp16", f"engine.backend={backend}", f"engine.bench_mode={mode}",
                     "engine.bench_requests=5", f"cache_dir={tmp_path}")
    plan = TrtllmEngine.plan(spec, trt_version="1.2.0", gpu_name=H100[0])
    seen = []

    def runner(cmd, check):
        seen.append(cmd)
        Path(cmd[cmd.index("--report_json") + 1]).write_text(json.dumps(REPORT))

    metrics = bench.run(plan, spec, model_dir=tmp_path / "ckpt", prompts=[[1, 2, 3], [4, 5]], output_tokens=7,
                        work_dir=tmp_path / "bench", runner=runner)
    assert metrics["trtbench.ttft_ms"] == 38.6124
    cmd = seen[0]
    sub = cmd.index(mode)
    flags = lambda part: {a for a in part if a.startswith("--")}  # noqa: E731
    assert flags(cmd[:sub]) <= set(API["trtllm_bench"]["global"]) and flags(cmd[sub:]) <= set(API["trtllm_bench"][mode])
    assert ("--engine_dir" in cmd) == (backend == "tensorrt") and ("--streaming" in cmd) == (mode == "throughput")
    assert not Path(cmd[cmd.index("--model") + 1]).exists()  # a name: trtllm-bench rejects paths there
    lines = [json.loads(x) for x in (tmp_path / "bench" / "dataset.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and set(lines[0]) == set(API["trtllm_bench"]["dataset_line_keys"])
    assert [x["input_ids"] for x in lines[:3]] == [[1, 2, 3], [4, 5], [1, 2, 3]] and lines[0]["output_tokens"] == 7
    extra = yaml.safe_load((tmp_path / "bench" / "extra_llm_api_options.yaml").read_text())
    assert extra == {"kv_cache_config": plan["kv_cache_config"]}


# ---- engine glue, driven by a stand-in for tensorrt_llm's LLM ----
class FakeLLM:
    """Answers like tensorrt_llm's LLM: context_logits [T, V] per prompt; streamed cumulative token_ids."""

    def __init__(self, vocab=11, perf=None):
        self.vocab, self.perf, self.params = vocab, perf, []

    def logits(self, ids):
        return torch.randn(len(ids), self.vocab, generator=torch.Generator().manual_seed(sum(ids) + len(ids)))

    def generate(self, inputs, sampling_params, use_tqdm):
        self.params.append(sampling_params)
        return [SimpleNamespace(context_logits=self.logits(ids)) for ids in inputs]

    async def generate_async(self, prompt, params, streaming):
        for n in range(1, params["max_tokens"] + 1):
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7] * n, request_perf_metrics=self.perf)])


def fake_engine(tmp_path, *overrides, **fake):
    engine = TrtllmEngine(make_spec("quant=int8kv", f"cache_dir={tmp_path}", *overrides))
    engine.llm, engine.sampling_params_cls = FakeLLM(**fake), dict  # dict(**kwargs) stands in for SamplingParams
    return engine


def test_continuation_logprobs_slice_and_truncate(tmp_path, caplog):
    engine = fake_engine(tmp_path)  # smoke: max_input_len = 256 + 32
    requests = [([1, 2, 3], [4, 5]), (list(range(1, 301)), [9])]
    out = engine.continuation_logprobs(requests, kv_faithful=True)
    engine.continuation_logprobs(requests, kv_faithful=True)
    assert engine.llm.params[0] == {"max_tokens": 1, "temperature": 0.0, "return_context_logits": True,
                                    "detokenize": False}
    expect = torch.log_softmax(engine.llm.logits([1, 2, 3, 4, 5])[2:4], -1)
    torch.testing.assert_close(out[0], expect)
    kept = (list(range(1, 301)) + [9])[-288:]  # left-truncated to max_input_len, continuation kept
    torch.testing.assert_close(out[1], torch.log_softmax(engine.llm.logits(kept)[286:287], -1))
    assert [r.message for r in caplog.records].count(
        "engine=trtllm: kv_faithful scoring is not available; scoring in one prefill pass, which does not read "
        "the quantized KV cache") == 1


def test_generate_returns_requested_tokens_and_timings(tmp_path):
    engine = fake_engine(tmp_path)
    gens = engine.generate([[1, 2, 3], [4, 5]], 6)
    assert gens.tokens == [[7] * 6, [7] * 6] and gens.decode_steps == 5
    assert gens.prefill_s > 0 and gens.decode_s >= 0
    timing = SimpleNamespace(arrival_time=timedelta(seconds=1.0), first_token_time=timedelta(seconds=1.25),
                             last_token_time=timedelta(seconds=1.75))
    gens = fake_engine(tmp_path, perf=SimpleNamespace(timing_metrics=timing)).generate([[1, 2]], 3)
    assert (gens.prefill_s, gens.decode_s) == pytest.approx((0.25, 0.5))


def test_stream_timings_from_streamed_events():
    # request A got tokens 1-3 at 1.0, 2.0, 3.0; B got token 1 at 1.5 and tokens 2-3 together at 2.5
    assert stream_timings(0.5, [[(1, 1.0), (2, 2.0), (3, 3.0)], [(1, 1.5), (3, 2.5)]], 3) == (1.0, 1.5)
    with pytest.raises(RuntimeError, match="returned 2 tokens where 3"):
        stream_timings(0.0, [[(1, 1.0), (2, 2.0)]], 3)


def test_perf_timings_need_every_request_timed():
    t = lambda a, f, last: SimpleNamespace(timing_metrics=SimpleNamespace(  # noqa: E731
        arrival_time=timedelta(seconds=a), first_token_time=timedelta(seconds=f),
        last_token_time=timedelta(seconds=last)))
    assert perf_timings([t(1.0, 1.2, 2.0), t(1.1, 1.4, 2.2)]) == pytest.approx((0.4, 0.8))
    assert perf_timings([t(1.0, 1.2, 2.0), None]) is None and perf_timings([t(0.0, 0.0, 0.0)]) is None


def test_constructor_kwargs_make_tensorrt_llm_objects(tmp_path):
    trt = SimpleNamespace(BuildConfig=dict, QuantConfig=dict, CalibConfig=dict, KvCacheConfig=dict,
                          QuantAlgo=enum.Enum("QuantAlgo", {n: n for n in API["QuantAlgo"]}))
    plan = TrtllmEngine.plan(make_spec("quant=awq_int8kv", f"cache_dir={tmp_path}"))
    fresh = _constructor_kwargs(trt, plan, cached=False)
    assert fresh["quant_config"]["quant_algo"] is trt.QuantAlgo.W4A16_AWQ
    assert fresh["quant_config"]["kv_cache_quant_algo"] is trt.QuantAlgo.INT8
    assert set(fresh) == {"model", "dtype", "build_config", "quant_config", "calib_config", "kv_cache_config"}
    cached = _constructor_kwargs(trt, plan, cached=True)
    assert cached == {"model": plan["engine_dir"], "tokenizer": "builtin:tiny",
                      "kv_cache_config": plan["kv_cache_config"]}


def test_memory_reads_the_built_engine(tmp_path, monkeypatch):
    """Llama-3.2-1B shapes (FACTS.md: 16 KiB/token of INT8 KV). The engine's config.json says what it built."""
    engine = TrtllmEngine(make_spec("quant=int8kv", f"cache_dir={tmp_path}"))
    engine.build_plan = TrtllmEngine.plan(engine.spec)
    engine.model_dir = tmp_path / "ckpt"
    engine.model_dir.mkdir()
    shapes = dict(num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, hidden_size=2048)
    (engine.model_dir / "config.json").write_text(json.dumps(dict(shapes, head_dim=64)))
    built = Path(engine.build_plan["engine_dir"])
    built.mkdir(parents=True)
    (built / "rank0.engine").write_bytes(b"\0" * 1000)
    pretrained = dict(shapes, dtype="bfloat16", head_size=64, quantization={"kv_cache_quant_algo": "INT8"})
    (built / "config.json").write_text(json.dumps({"pretrained_config": pretrained}))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (30, 100))
    mem = engine.memory()
    assert (mem.weight_bytes, mem.peak_bytes) == (1000, 70)
    assert mem.kv_bytes_per_token == mem.kv_bytes_per_token_formula == 16 * 2 * 8 * 64 * 1
    pretrained["quantization"]["kv_cache_quant_algo"] = None  # an engine that silently kept a bf16 cache
    (built / "config.json").write_text(json.dumps({"pretrained_config": pretrained}))
    assert engine.memory().kv_bytes_per_token == 2 * mem.kv_bytes_per_token_formula


# ---- the real thing ----
@pytest.mark.trtllm
def test_build_generate_and_reuse_on_gpu(tmp_path):
    from importlib.util import find_spec

    if find_spec("tensorrt_llm") is None or not torch.cuda.is_available():
        pytest.skip("needs tensorrt_llm and a CUDA GPU")
    spec = make_spec("quant=fp16", f"cache_dir={tmp_path}")
    TrtllmEngine.check_supported(spec)
    engine = TrtllmEngine(spec)
    assert engine.build().metrics["trt.cache_hit"] == 0
    gens = engine.generate([[1, 2, 3, 4], [5, 6, 7]], 8)
    assert [len(t) for t in gens.tokens] == [8, 8] and gens.decode_steps == 7 and gens.decode_s > 0
    assert engine.continuation_logprobs([([1, 2, 3], [4, 5])], kv_faithful=False)[0].shape[0] == 2
    engine.close()
    again = TrtllmEngine(spec)
    assert again.build().metrics["trt.cache_hit"] == 1
    again.close()
