"""engine=hf: what most users run instead of kvexp, Hugging Face transformers, as a peer engine in the same sweep.

Generation is transformers' own `generate`, greedy: on CUDA with its static cache and torch.compile (the best
path transformers documents), elsewhere eager. KV quantization is transformers' QuantizedCache (kvexp/engines/hf/
kv.py), which cannot be compiled: those runs are eager everywhere. The metric hf.compiled records which path ran.
Weights load as transformers loads them; it has no int4 AWQ path that installs here (its AWQ integration needs
gptqmodel and a pre-quantized checkpoint), so quant.weights other than unquantized are refused at validation.
"""
from __future__ import annotations

import gc
import inspect
import logging
import resource
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch

from kvexp.checkpoint import check_context, resolve_model
from kvexp.core.engine import BuildInfo, Capabilities, Engine, Generations, MemoryReport, Request
from kvexp.engines.hf import kv
from kvexp.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class HfOptions:
    name: str
    device: str  # auto | cpu | cuda | cuda:N
    compile: bool  # CUDA: static cache + torch.compile for decode; a compile failure falls back to eager
    compile_mode: str  # torch.compile mode of transformers' CompileConfig
    kv_backend: str  # hqq | quanto: transformers' QuantizedCache backend for int8/int4 KV
    kv_residual_length: int  # tokens QuantizedCache keeps in full precision before re-quantizing (its default 128)

    def __post_init__(self):
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"engine.device={self.device}: not one of auto, cpu, cuda, cuda:N")
        if self.kv_backend not in kv.BACKENDS:
            raise ConfigError(f"engine.kv_backend={self.kv_backend}: not one of {', '.join(kv.BACKENDS)}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune"):
            raise ConfigError(f"engine.compile_mode={self.compile_mode}: not one of default, reduce-overhead, "
                              "max-autotune")
        if not isinstance(self.kv_residual_length, int) or self.kv_residual_length < 1:
            raise ConfigError(f"engine.kv_residual_length={self.kv_residual_length}: must be a positive integer")


class _FirstToken:
    """A transformers streamer that notes when the first new token reaches the host: generate() hands it the
    prompt, then every step's tokens (already copied to the host, so the time is device-synchronised)."""

    def __init__(self):
        self.calls, self.first_at = 0, None

    def put(self, _tokens) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


class HfEngine(Engine):
    name = "hf"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        weight_modes=frozenset({("auto", "none")}),
        kv_dtypes=frozenset({"auto", *kv.BITS}),
        kv_scales=frozenset({("dynamic", "token")}),
    )
    Options = HfOptions

    @classmethod
    def check_supported(cls, spec) -> None:
        super().check_supported(spec)
        kv.check_kv(spec.cfg.quant.kv_cache.dtype, spec.engine_options.kv_backend)

    # ---- build ----
    def build(self) -> BuildInfo:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.perf_counter()
        self.device, self.dtype = self.spec.build.torch_device, self.spec.build.torch_dtype
        self.model_dir = resolve_model(self.spec)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype).to(self.device).eval()
        config = self.model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        check_context(self.spec, config.max_position_embeddings)
        # what bench/perf.py's roofline reads: an untied embedding table is not read by a decode step
        self.arch = SimpleNamespace(tie_embeddings=bool(config.tie_word_embeddings))
        # every generate() runs exactly max_new_tokens (timings comparable with engine=torch): no EOS stop
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = self._pad_id()
        self.kv_dtype = self.spec.cfg.quant.kv_cache.dtype
        # transformers 5.24 renamed past_key_values to cache (the old name goes in 5.40); the GPU machine has 5.17
        self.cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.compiled = self.options.compile and self.device.type == "cuda" and self.kv_dtype == "auto"
        metrics = {}
        if self.compiled:  # hf.compile_failed=1: it was tried and failed (the warning is in the run's log)
            metrics["hf.compile_s"] = self._warm_compile()
            metrics["hf.compile_failed"] = float(not self.compiled)
        metrics["hf.compiled"] = float(self.compiled)
        self._sync()
        return BuildInfo(build_s=time.perf_counter() - start, metrics=metrics)

    def _pad_id(self) -> int:
        tok = self._tokenizer
        return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

    def _warm_compile(self) -> float:
        """Compile once at build, so a torch.compile failure is found here and the run goes on eager, recorded
        (hf.compiled=0) and logged, rather than failing mid-benchmark."""
        start = time.perf_counter()
        self.generate([[self._pad_id()] * 8], 4)  # a failure falls back to eager inside (_give_up_compile)
        return time.perf_counter() - start

    def _give_up_compile(self, error: Exception) -> None:
        """Dynamo/Inductor raise many types; every one means this stack cannot compile this model: go eager."""
        log.warning("engine=hf: torch.compile failed (%s: %s); running eager from here on (metric hf.compiled=0 "
                    "if this happened at build)", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        self.compiled = False
        torch._dynamo.reset()

    # ---- properties ----
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.model.config.max_position_embeddings

    def new_cache(self, for_generate: bool = False):
        """The cache one sequence batch is decoded with: transformers' QuantizedCache for int8/int4 KV, else
        None (generate builds its static cache itself) or a DynamicCache (scoring)."""
        from transformers import DynamicCache

        if self.kv_dtype != "auto":
            return kv.quantized_cache(self.model.config, self.kv_dtype, self.options.kv_backend,
                                      self.options.kv_residual_length, self.head_dim)
        return None if for_generate else DynamicCache(config=self.model.config)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- generation ----
    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] ids padded on the left (where transformers' generate expects padding) and their attention mask."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty token sequence: every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(list(p))
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate_kwargs(self) -> dict:
        if self.kv_dtype != "auto":
            return {self.cache_kw: self.new_cache(for_generate=True)}
        if not self.compiled:
            return {"cache_implementation": "static", "disable_compile": True}
        from transformers import CompileConfig

        return {"cache_implementation": "static",
                "compile_config": CompileConfig(fullgraph=True, mode=self.options.compile_mode)}

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generations:
        ids, mask = self._left_padded(prompts)
        total = ids.shape[1] + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt + {max_new_tokens} new tokens = {total} > the model's {self.max_seq_len}")
        try:
            out, t0, t1, t2 = self._timed_generate(ids, mask, max_new_tokens)
        except (torch.OutOfMemoryError, ValueError):
            raise
        except Exception as e:  # a new shape recompiles: a compile failure here falls back as at build
            if not self.compiled:
                raise
            self._give_up_compile(e)
            out, t0, t1, t2 = self._timed_generate(ids, mask, max_new_tokens)
        return Generations(tokens=out[:, ids.shape[1]:].tolist(), prefill_s=t1 - t0, decode_s=t2 - t1,
                           decode_steps=max_new_tokens - 1)

    def _timed_generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int):
        """(output ids [B, T + new], start, first token on the host, end): perf_counter seconds, synchronised."""
        first = _FirstToken()
        t0 = self._sync()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, streamer=first,
                                  **self._generate_kwargs())
        t2 = self._sync()
        return out, t0, first.first_at or t2, t2

    # ---- scoring ----
    @torch.inference_mode()
    def continuation_logprobs(self, requests: Sequence[Request], *, kv_faithful: bool) -> list[torch.Tensor]:
        if kv_faithful:
            return [self._score_faithful(ctx, cont) for ctx, cont in requests]
        bs = self.spec.cfg.eval.batch_size
        return [lp for i in range(0, len(requests), bs) for lp in self._score_one_pass(requests[i:i + bs])]

    def _score_one_pass(self, chunk: Sequence[Request]) -> list[torch.Tensor]:
        """Context + continuation in one forward, right-padded (causal attention never looks at the padding)."""
        seqs = [list(c) + list(x) for c, x in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return [logits[b, len(c) - 1: len(c) + len(x) - 1].float().log_softmax(-1).cpu()
                for b, (c, x) in enumerate(chunk)]

    def _score_faithful(self, ctx: Sequence[int], cont: Sequence[int]) -> torch.Tensor:
        """Prefill the context into the (quantized) cache, then feed the continuation but its last token against
        it: every continuation position reads the context's K/V back as transformers' decode would. One request
        at a time, so no padding enters a cache that has no mask of its own (QuantizedCache)."""
        if not ctx or not cont:
            raise ValueError("empty token sequence: every context and continuation needs at least one token")
        cache = self.new_cache()
        first = self.model(input_ids=torch.tensor([list(ctx)], device=self.device), use_cache=True,
                           **{self.cache_kw: cache}).logits[0, -1:]
        if len(cont) == 1:
            return first.float().log_softmax(-1).cpu()
        rest = self.model(input_ids=torch.tensor([list(cont)[:-1]], device=self.device), use_cache=True,
                          **{self.cache_kw: cache}).logits[0]
        return torch.cat((first, rest)).float().log_softmax(-1).cpu()

    # ---- memory ----
    def memory(self) -> MemoryReport:
        # one entry per storage: a tied embedding and output head are one tensor, counted once. Parameters only:
        # the buffers are RoPE's inv_freq, recomputed from the config (engine=torch does not count it either)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.model.parameters()}
        c = self.model.config
        shape = (c.num_hidden_layers, c.num_key_value_heads, self.head_dim, self.dtype)
        measured = kv.measured_bytes_per_token(self.new_cache(), *shape[:3], self.dtype, self.device)
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return MemoryReport(weight_bytes=sum(storages.values()), kv_bytes_per_token=measured,
                            kv_bytes_per_token_formula=kv.formula_bytes_per_token(self.kv_dtype, *shape),
                            peak_bytes=int(peak))

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
