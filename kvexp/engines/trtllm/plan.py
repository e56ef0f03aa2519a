"""RunSpec -> the exact TensorRT-LLM 1.0-1.2 arguments. Pure: no tensorrt_llm import, nothing written.

What `engine.dry_run=true` prints, and what build() turns into objects (engine.py). Enum members are written as
their names: QuantAlgo is a StrEnum of auto() members, so its values are its names
(tensorrt_llm/quantization/mode.py). Field names follow tensorrt_llm/llmapi/llm_args.py (KvCacheConfig,
CalibConfig, TrtLlmArgs, TorchLlmArgs), tensorrt_llm/models/modeling_utils.py (QuantConfig),
tensorrt_llm/builder.py (BuildConfig) and tensorrt_llm/sampling_params.py (SamplingParams).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kvexp import artifacts
from kvexp.engines.trtllm import cache

if TYPE_CHECKING:
    from kvexp.config import RunSpec

LLM_CLASSES = {"tensorrt": "tensorrt_llm._tensorrt_engine.LLM", "pytorch": "tensorrt_llm.LLM"}
WEIGHT_ALGOS = {("auto", "none"): None, ("int4", "awq"): "W4A16_AWQ", ("fp8", "none"): "FP8"}
KV_ALGOS = {"auto": None, "int8": "INT8", "fp8": "FP8"}
# kvexp's auto is bf16 on any CUDA GPU with bf16, and every GPU TensorRT-LLM 1.x supports (sm80+) has it.
DTYPES = {"auto": "bfloat16", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_MAX_NUM_TOKENS = 8192  # TensorRT-LLM's own default (BuildConfig.max_num_tokens, BaseLlmArgs.max_num_tokens)


def longest_request(spec: RunSpec) -> int:
    """Tokens of the longest request kvexp sends: a prompt plus the generation, or plus the fidelity stage's
    scored continuation or generation when those are longer (lm-eval requests are cut to this by the adapter)."""
    ctx, fid = spec.cfg.context, spec.cfg.eval.fidelity
    extra = max(fid.score_tokens, fid.gen_tokens) if fid.enabled else 0
    return ctx.prompt_len + max(ctx.gen_len, extra)


def limits(spec: RunSpec) -> dict:
    """Engine limits from the context, fidelity and batch configs.

    A scoring request is prefilled whole and still generates one token (max_tokens=1; the TensorRT backend
    rejects prompt + max_tokens > max_seq_len: BaseLLM._check_arguments), hence max_seq_len = longest + 1.
    max_num_tokens covers one full prompt per step and stays within max_seq_len * max_batch_size, the bound
    TensorRT-LLM enforces (it clamps larger values with a warning).
    """
    cfg, longest = spec.cfg, longest_request(spec)
    max_batch_size = spec.engine_options.max_batch_size or max(cfg.bench.batch_size, cfg.eval.batch_size)
    max_num_tokens = min(max(longest, DEFAULT_MAX_NUM_TOKENS), (longest + 1) * max_batch_size)
    return dict(max_input_len=longest, max_seq_len=longest + 1, max_batch_size=max_batch_size,
                max_num_tokens=max_num_tokens)


def dtype(spec: RunSpec) -> str:
    """float32 only for unquantized runs: TensorRT-LLM's int4/fp8 GEMMs and int8/fp8 KV attention take 16-bit inputs."""
    name = DTYPES[spec.cfg.model.dtype]
    return "bfloat16" if name == "float32" and is_quantized(spec) else name


def is_quantized(spec: RunSpec) -> bool:
    q = spec.cfg.quant
    return (q.weights.dtype, q.weights.algo) != ("auto", "none") or q.kv_cache.dtype != "auto"


def needs_calibration(spec: RunSpec) -> bool:
    """Only the TensorRT backend calibrates (QuantConfig._requires_calibration: AWQ, FP8, and any KV quant algo)."""
    return spec.engine_options.backend == "tensorrt" and is_quantized(spec)


def scores_need_logits(spec: RunSpec) -> bool:
    return bool(spec.cfg.eval.tasks) or spec.cfg.eval.fidelity.enabled


def build_config_kwargs(spec: RunSpec) -> Optional[dict]:
    """BuildConfig, TensorRT backend only. gather_context_logits lets requests return prompt logits
    (the TensorRT backend turns prompt_logprobs into return_context_logits: BaseLLM._prepare_sampling_params)."""
    if spec.engine_options.backend != "tensorrt":
        return None
    return dict(limits(spec), gather_context_logits=scores_need_logits(spec))


def quant_config_kwargs(spec: RunSpec) -> Optional[dict]:
    """QuantConfig, TensorRT backend only (TorchLlmArgs has no quant_config field: it reads hf_quant_config.json)."""
    if spec.engine_options.backend != "tensorrt" or not is_quantized(spec):
        return None
    q = spec.cfg.quant
    return dict(quant_algo=WEIGHT_ALGOS[(q.weights.dtype, q.weights.algo)],
                kv_cache_quant_algo=KV_ALGOS[q.kv_cache.dtype], group_size=q.weights.group_size)


def calib_key(spec: RunSpec) -> str:
    """Changes when the calibration windows change: the source's contents (the BuildSpec's digest of it), the
    sampling, and the model, whose tokenizer cuts the windows."""
    return artifacts.digest({"model": spec.build.model_fingerprint, "calib": spec.build.calib})


def calib_source(spec: RunSpec) -> Optional[str]:
    """What CalibConfig.calib_dataset gets: always a directory kvexp writes, holding engine=torch's calibration
    windows, so both engines calibrate on the same tokens (a Hub name would make TensorRT-LLM sample its own)."""
    if not needs_calibration(spec):
        return None
    return str(cache.calib_dir(spec.cache_dir, calib_key(spec)))


def calib_config_kwargs(spec: RunSpec) -> Optional[dict]:
    """CalibConfig, TensorRT backend only. TensorRT-LLM's AWQ path caps calib_batches at 32
    (quantize_by_modelopt.quantize_and_export), so awq runs calibrate on min(num_samples, 32) texts."""
    source = calib_source(spec)
    if source is None:
        return None
    calib = spec.cfg.quant.calib
    return dict(calib_dataset=source, calib_batches=calib.num_samples, calib_batch_size=1,
                calib_max_seq_length=calib.seq_len, random_seed=spec.cfg.seed,
                tokenizer_max_seq_length=max(2048, calib.seq_len))


def kv_cache_config_kwargs(spec: RunSpec) -> dict:
    """Block reuse off: a reused prefix is not recomputed, so its prompt logits would be missing (lm-eval's trtllm
    backend does the same). max_tokens sizes the pool to the run (batch x sequence) instead of 90% of the GPU, so
    peak memory compares across quant modes. KvCacheConfig.dtype exists for the PyTorch backend only; TrtLlmArgs
    asserts it is 'auto' (validate_kv_cache_dtype)."""
    lim = limits(spec)
    kwargs = dict(enable_block_reuse=False,
                  free_gpu_memory_fraction=spec.engine_options.kv_cache_free_gpu_memory_fraction,
                  max_tokens=lim["max_batch_size"] * lim["max_seq_len"])
    if spec.engine_options.backend == "pytorch" and spec.cfg.quant.kv_cache.dtype == "fp8":
        kwargs["dtype"] = "fp8"
    return kwargs


def sampling_kwargs(max_tokens: int, *, score: bool) -> dict:
    """Greedy (temperature 0). Scoring asks for the full context logits, not prompt_logprobs: lm-eval's top-k
    dicts cannot give the [len(cont), V] distributions that fidelity (KL vs fp16) needs."""
    if score:
        return dict(max_tokens=1, temperature=0.0, return_context_logits=True, detokenize=False)
    return dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False, return_perf_metrics=True)


def llm_kwargs(spec: RunSpec, model: str) -> dict:
    """Scalar LLM(...) kwargs; the four *_config kwargs are listed beside them in the plan."""
    kwargs = dict(model=model, dtype=dtype(spec))
    if spec.engine_options.backend == "pytorch":
        kwargs.update(limits(spec))  # TorchLlmArgs reads limits from top-level fields (its build_config is deprecated)
    return kwargs


def build_key_inputs(spec: RunSpec, trt_version: str, gpu_name: str) -> dict:
    """Everything an engine depends on; output dirs, tracking and labels are not in it."""
    return dict(model=spec.build.model_fingerprint, backend=spec.engine_options.backend,
                dtype=dtype(spec), build_config=build_config_kwargs(spec), quant_config=quant_config_kwargs(spec),
                calib=calib_key(spec) if needs_calibration(spec) else None,
                tensorrt_llm=trt_version, gpu=gpu_name)


def make_plan(spec: RunSpec, *, trt_version: str, gpu_name: str, model: Optional[str] = None) -> dict:
    """model: the local checkpoint dir at build; the configured model.path when only planning."""
    from kvexp.engines.trtllm.checks import kv_scales_substituted

    backend = spec.engine_options.backend
    key_inputs = build_key_inputs(spec, trt_version, gpu_name)
    key = artifacts.digest(key_inputs)
    engine_dir = str(cache.engine_dir(spec.cache_dir, key)) if backend == "tensorrt" else None
    model = model or spec.cfg.model.path
    return {
        "engine": "trtllm",
        "backend": backend,
        "llm_class": LLM_CLASSES[backend],
        "model": {"path": spec.cfg.model.path, "revision": spec.cfg.model.revision},
        "llm_kwargs": llm_kwargs(spec, model),
        "build_config": build_config_kwargs(spec),
        "quant_config": quant_config_kwargs(spec),
        "calib_config": calib_config_kwargs(spec),
        "kv_cache_config": kv_cache_config_kwargs(spec),
        # A cached engine is loaded by passing its dir as model; TensorRT-LLM then ignores build_config
        # (BaseLlmArgs.validate_model_format_misc) and reads limits and quantization from the engine's config.json.
        "llm_kwargs_cached": ({"model": engine_dir, "tokenizer": model} if engine_dir else None),
        "sampling_params": {"generate": sampling_kwargs(spec.cfg.context.gen_len, score=False),
                            "score": sampling_kwargs(1, score=True)},
        "build_key": key,
        "build_key_inputs": key_inputs,
        "engine_dir": engine_dir,
        "notes": notes(spec, kv_scales_substituted(spec)),
    }


def notes(spec: RunSpec, kv_substituted: bool) -> list[str]:
    """The decisions a reader of the plan must know to interpret this run's numbers."""
    q, out = spec.cfg.quant, []
    if kv_substituted:
        out.append(f"quant.kv_cache: {q.kv_cache.dtype} with scale={q.kv_cache.scale}/granularity="
                   f"{q.kv_cache.granularity} runs with TensorRT-LLM's one calibrated scale per tensor (it has no "
                   "per-token scales); for the same numerics on engine=torch use quant=int8kv_static")
    if spec.kv_faithful and spec.kv_quantized:
        out.append("eval.kv_faithful is not available on engine=trtllm: scores are one prefill pass, which never "
                   "reads the quantized KV cache; KV effects show in generation tasks and fidelity generations")
    if DTYPES[spec.cfg.model.dtype] == "float32" and is_quantized(spec):
        out.append("model.dtype=float32 runs as bfloat16: TensorRT-LLM's quantized kernels take 16-bit inputs")
    if needs_calibration(spec):
        out.append("calibrated by TensorRT-LLM's own flow (ModelOpt for AWQ/FP8, its convert path for INT8 KV "
                   "alone) on engine=torch's calibration windows; the scales are TensorRT-LLM's, not kvexp's")
    if spec.engine_options.backend == "pytorch" and q.kv_cache.dtype == "fp8":
        out.append("PyTorch backend FP8 KV on an unquantized checkpoint uses its default, uncalibrated KV scales")
    return out


def model_name_for_bench(spec: RunSpec) -> str:
    """trtllm-bench --model must be a name, not a path (BenchmarkEnvironment.verify_model_name)."""
    path = spec.cfg.model.path
    local = path.startswith("builtin:") or Path(path).expanduser().exists()
    return spec.cfg.model.name if local else path
