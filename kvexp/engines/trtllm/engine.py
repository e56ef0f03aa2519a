"""TrtllmEngine: kvexp's Engine on NVIDIA TensorRT-LLM 1.0-1.2 (LLM API), either backend.

tensorrt_llm is imported in build() only, so this module (and `engine.dry_run=true`) works without it.
"""
from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Optional, Sequence

import torch

from kvexp.core.engine import BuildInfo, Capabilities, Engine, Generations, MemoryReport, Request
from kvexp.engines.trtllm import bench, cache, checks
from kvexp.engines.trtllm.options import Options
from kvexp.engines.trtllm.plan import DTYPE_BYTES, limits, make_plan, sampling_kwargs

log = logging.getLogger(__name__)

CONFIG_CLASSES = ("build_config", "quant_config", "calib_config", "kv_cache_config")
KV_ALGO_BYTES = {"INT8": 1, "FP8": 1}


class TrtllmEngine(Engine):
    name: ClassVar[str] = "trtllm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        devices=frozenset({"cuda"}),
        weight_modes=frozenset({("auto", "none"), ("int4", "awq"), ("fp8", "none")}),
        fp8_activations=frozenset({("fp8", "dynamic"), ("fp8", "static")}),  # QuantAlgo.FP8: no weight-only fp8
        kv_dtypes=frozenset({"auto", "int8", "fp8"}),
        kv_scales=frozenset({("static", "tensor")}),  # one calibrated scale per KV tensor: checks.kv_scales_substituted
    )
    Options: ClassVar[type] = Options

    def __init__(self, spec):
        super().__init__(spec)
        self.limits = limits(spec)
        self.device = torch.device("cuda")  # TensorRT-LLM runs on the GPU only; the perf harness reads this
        self.llm = None
        self.build_plan: Optional[dict] = None  # plan() of this run with the resolved model dir, set by build()
        self.model_dir: Optional[Path] = None
        self.sampling_params_cls = None  # tensorrt_llm.SamplingParams once built
        self._tokenizer = None
        self._warned_kv_faithful = False

    # ---- configuration ----
    @classmethod
    def check_supported(cls, spec) -> None:
        super().check_supported(checks.with_engine_kv_scales(spec))
        checks.check_config(spec)
        if not spec.engine_options.dry_run:  # planning works on any machine
            checks.check_environment(spec)

    @classmethod
    def plan(cls, spec, *, trt_version: Optional[str] = None, gpu_name: Optional[str] = None) -> dict:
        """The TensorRT-LLM arguments for this spec, as JSON-ready data; imports nothing from tensorrt_llm.
        The build key uses the installed tensorrt_llm version and GPU unless given (tests pin them)."""
        return make_plan(spec, trt_version=trt_version or checks.installed_version() or "not-installed",
                         gpu_name=gpu_name or checks.gpu_name() or "no-gpu")

    # ---- build ----
    def build(self) -> BuildInfo:
        from filelock import FileLock

        from kvexp.checkpoint import resolve_model

        start = time.perf_counter()
        trt = _import_tensorrt_llm(self.options.backend)
        self.sampling_params_cls = trt.SamplingParams
        self.model_dir = resolve_model(self.spec)
        self.build_plan = make_plan(self.spec, trt_version=checks.installed_version() or "unknown",
                              gpu_name=checks.gpu_name() or "unknown", model=str(self.model_dir))
        for note in self.build_plan["notes"]:
            log.warning("engine=trtllm: %s", note)
        if self.build_plan["engine_dir"] is None:  # PyTorch backend: nothing to compile or cache
            self.llm = trt.LLM(**_constructor_kwargs(trt, self.build_plan, cached=False))
            return BuildInfo(build_s=time.perf_counter() - start)
        engine_dir = Path(self.build_plan["engine_dir"])
        engine_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(engine_dir) + ".lock"):  # parallel jobs with one key: one builds, the others reuse
            hit = (engine_dir / "config.json").exists()
            if not hit and self.build_plan["calib_config"]:
                target = Path(self.build_plan["calib_config"]["calib_dataset"])
                cache.write_calib_dir(self.spec.cfg.quant.calib, self.tokenizer, target)
            self.llm = trt.LLM(**_constructor_kwargs(trt, self.build_plan, cached=hit))
            if not hit:
                cache.save_engine(self.llm, engine_dir)
        metrics = {"trt.cache_hit": int(hit), "trt.engine_bytes": cache.dir_bytes(engine_dir)}
        return BuildInfo(build_s=time.perf_counter() - start, metrics=metrics)

    # ---- inference ----
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        """The longest request this engine takes (prompt + new tokens, or context + continuation); the TensorRT
        engine itself is built one token longer, for the token a scoring request generates."""
        return self.limits["max_input_len"]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generations:
        """Greedy, ignore_eos, all prompts in flight together. Timings come from TensorRT-LLM's own per-request
        clock (RequestPerfMetrics) when it reports one; otherwise from when the streamed tokens arrive here."""
        params = self.sampling_params_cls(**sampling_kwargs(max_new_tokens, score=False))
        start = time.perf_counter()
        results = asyncio.run(self._stream(prompts, params))
        timed = perf_timings([perf for _, _, perf in results])
        prefill_s, decode_s = timed or stream_timings(start, [stamps for _, stamps, _ in results], max_new_tokens)
        return Generations(tokens=[tokens for tokens, _, _ in results], prefill_s=prefill_s, decode_s=decode_s,
                           decode_steps=max_new_tokens - 1)

    async def _stream(self, prompts, params):
        async def one(prompt):
            stamps, last = [], None
            async for out in self.llm.generate_async(list(prompt), params, streaming=True):
                stamps.append((len(out.outputs[0].token_ids), time.perf_counter()))
                last = out.outputs[0]
            return list(last.token_ids), stamps, getattr(last, "request_perf_metrics", None)

        return await asyncio.gather(*(one(p) for p in prompts))

    def continuation_logprobs(self, requests: Sequence[Request], *, kv_faithful: bool) -> list[torch.Tensor]:
        """One prefill per request with context logits, KV block reuse off (lm-eval's trtllm backend does the same).

        kv_faithful=True cannot be honoured: TensorRT-LLM prefills from full-precision K/V and exposes no way to
        score tokens against what its quantized cache returns. Raising would fail every int8kv run that scores, and
        silently ignoring would mislabel the numbers, so the run proceeds one-pass with a warning and the plan
        notes record it; KV effects on engine=trtllm show in generation tasks and fidelity generations.
        """
        if kv_faithful and not self._warned_kv_faithful:
            log.warning("engine=trtllm: kv_faithful scoring is not available; scoring in one prefill pass, which "
                        "does not read the quantized KV cache")
            self._warned_kv_faithful = True
        fitted = [fit_request(ctx, cont, self.limits["max_input_len"]) for ctx, cont in requests]
        params = self.sampling_params_cls(**sampling_kwargs(1, score=True))
        outputs = self.llm.generate([ids for ids, _ in fitted], sampling_params=params, use_tqdm=False)
        return [logprobs_from_context_logits(out.context_logits, ctxlen, len(cont))
                for out, (_, ctxlen), (_, cont) in zip(outputs, fitted, requests, strict=True)]

    # ---- memory, measurement, teardown ----
    def memory(self) -> MemoryReport:
        """TensorRT-LLM does not expose its KV pool tensors, so "measured" KV bytes/token come from what the engine
        reports it built (its config.json: layers, KV heads, head size, KV quant algo) and the formula from kvexp's
        quant config; they differ only if TensorRT-LLM changed the KV dtype. Weights: the engine file (TensorRT
        backend) or the checkpoint's safetensors (PyTorch backend). Peak: device memory in use (total - free), which
        includes the KV pool sized by kv_cache_config.max_tokens."""
        kv_dtype = self.spec.cfg.quant.kv_cache.dtype
        kv_bytes = 1 if kv_dtype in ("int8", "fp8") else DTYPE_BYTES[self.build_plan["llm_kwargs"]["dtype"]]
        hf = json.loads((self.model_dir / "config.json").read_text())
        heads = hf["num_attention_heads"]
        formula = _kv_bytes_per_token(hf["num_hidden_layers"], hf.get("num_key_value_heads") or heads,
                                      hf.get("head_dim") or hf["hidden_size"] // heads, kv_bytes)
        if self.build_plan["engine_dir"] is None:
            measured, weights = formula, cache.dir_bytes(self.model_dir, "*.safetensors")
        else:
            engine_dir = Path(self.build_plan["engine_dir"])
            measured = _engine_kv_bytes_per_token(json.loads((engine_dir / "config.json").read_text()))
            weights = cache.dir_bytes(engine_dir, "*.engine")
        free, total = torch.cuda.mem_get_info()
        return MemoryReport(weight_bytes=weights, kv_bytes_per_token=measured, kv_bytes_per_token_formula=formula,
                            peak_bytes=total - free)

    def external_bench(self, prompts: Sequence[Sequence[int]], output_tokens: int, work_dir: Path) -> dict:
        """engine.bench_mode with trtllm-bench (trtbench.* metrics), on the cached engine (TensorRT) or the
        checkpoint (PyTorch). The tool loads its own copy of the model, so this engine's LLM is shut down first."""
        if self.options.bench_mode == "none":
            return {}
        self.close()
        return bench.run(self.build_plan, self.spec, model_dir=self.model_dir, prompts=prompts,
                         output_tokens=output_tokens, work_dir=work_dir)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _import_tensorrt_llm(backend: str) -> SimpleNamespace:
    """The classes build() needs; import tensorrt_llm here only (slow: CUDA, MPI, TensorRT)."""
    llmapi = importlib.import_module("tensorrt_llm.llmapi")
    llm_module = "tensorrt_llm._tensorrt_engine" if backend == "tensorrt" else "tensorrt_llm"
    return SimpleNamespace(LLM=importlib.import_module(llm_module).LLM, SamplingParams=llmapi.SamplingParams,
                           BuildConfig=llmapi.BuildConfig, QuantConfig=llmapi.QuantConfig, QuantAlgo=llmapi.QuantAlgo,
                           CalibConfig=llmapi.CalibConfig, KvCacheConfig=llmapi.KvCacheConfig)


def _constructor_kwargs(trt: SimpleNamespace, plan: dict, *, cached: bool) -> dict:
    """Plan data -> LLM(...) kwargs with TensorRT-LLM objects. A cached engine gets only its dir, the tokenizer
    and the runtime KV settings; build, quant and calib configs are baked into it."""
    kwargs = dict(plan["llm_kwargs_cached"] if cached else plan["llm_kwargs"])
    for key in (("kv_cache_config",) if cached else CONFIG_CLASSES):
        values = plan[key]
        if values is None:
            continue
        if key == "quant_config":
            values = {k: (trt.QuantAlgo[v] if k.endswith("quant_algo") and v else v) for k, v in values.items()}
        cls = {"build_config": trt.BuildConfig, "quant_config": trt.QuantConfig, "calib_config": trt.CalibConfig,
               "kv_cache_config": trt.KvCacheConfig}[key]
        kwargs[key] = cls(**values)
    return kwargs


def fit_request(context: Sequence[int], continuation: Sequence[int], max_input_len: int) -> tuple[list[int], int]:
    """context+continuation, left-truncated to max_input_len (as lm-eval does) -> (input ids, context length)."""
    if not context or not continuation:
        raise ValueError("engine=trtllm scores need a non-empty context and continuation")
    if len(continuation) >= max_input_len:
        raise ValueError(f"continuation of {len(continuation)} tokens does not fit max_input_len={max_input_len}")
    ids = (list(context) + list(continuation))[-max_input_len:]
    return ids, len(ids) - len(continuation)


def logprobs_from_context_logits(logits: torch.Tensor, ctxlen: int, n: int) -> torch.Tensor:
    """context_logits [T, V] (position t predicts token t+1) -> log-softmax [n, V] at the n continuation tokens."""
    if logits is None or logits.shape[0] < ctxlen - 1 + n:
        raise RuntimeError("TensorRT-LLM returned no or too few context logits; the engine needs "
                           "build_config.gather_context_logits=True (eval.fidelity or eval.tasks on)")
    return torch.log_softmax(logits[ctxlen - 1: ctxlen - 1 + n].float().cpu(), dim=-1)


def stream_timings(start: float, stamps: Sequence[Sequence[tuple[int, float]]], n: int) -> tuple[float, float]:
    """Streamed (cumulative token count, arrival time) events per request -> (prefill_s, decode_s) of the batch:
    the batch has its first tokens when its slowest request has one, and is done when its last request is."""
    for events in stamps:
        got = events[-1][0] if events else 0
        if got != n:
            raise RuntimeError(f"TensorRT-LLM returned {got} tokens where {n} were asked (ignore_eos is set)")
    first = max(next(t for count, t in events if count >= 1) for events in stamps)
    return first - start, max(events[-1][1] for events in stamps) - first


def perf_timings(perf_metrics: Sequence) -> Optional[tuple[float, float]]:
    """(prefill_s, decode_s) of the batch from RequestPerfMetrics.timing_metrics (timedeltas on one steady clock):
    latest first token minus earliest arrival, then latest last token minus latest first token.
    None when any request lacks the metrics (older versions, or the option unsupported)."""
    if not perf_metrics or any(m is None for m in perf_metrics):
        return None
    timing = [m.timing_metrics for m in perf_metrics]
    first = max(t.first_token_time for t in timing)
    if min(t.first_token_time for t in timing) <= timedelta(0):  # unset fields read as zero
        return None
    prefill = first - min(t.arrival_time for t in timing)
    return prefill.total_seconds(), (max(t.last_token_time for t in timing) - first).total_seconds()


def _kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, value_bytes: int) -> float:
    """K and V of every layer; per-tensor scales add nothing per token."""
    return float(layers * 2 * kv_heads * head_dim * value_bytes)


def _engine_kv_bytes_per_token(engine_config: dict) -> float:
    """From a TensorRT engine's config.json (pretrained_config: the model as built, quantization included)."""
    pc = engine_config["pretrained_config"]
    algo = (pc.get("quantization") or {}).get("kv_cache_quant_algo")
    value_bytes = KV_ALGO_BYTES.get(algo) or DTYPE_BYTES[pc["dtype"]]
    head = pc.get("head_size") or pc["hidden_size"] // pc["num_attention_heads"]
    return _kv_bytes_per_token(pc["num_hidden_layers"], pc.get("num_key_value_heads") or pc["num_attention_heads"],
                               head, value_bytes)
