"""kvexp's own engine: the compact model, a static (optionally quantized) KV cache, batched greedy decoding
(CUDA-graph captured on GPUs) and teacher-forced scoring. Runs on CPU, T4 and any CUDA GPU."""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kvexp.checkpoint import check_context, read_model_config, resolve_model
from kvexp.core import fused, memory
from kvexp.core.decode import DecodeLoop
from kvexp.core.engine import BuildInfo, Capabilities, Engine, Generations, MemoryReport, Request
from kvexp.core.kernels import pdl
from kvexp.core.kv import FORMATS, KVCache, QuantizedKVCache
from kvexp.core.model import ArchConfig, CausalLM, load_state
from kvexp.errors import ConfigError, UnsupportedConfig


@dataclass
class TorchOptions:
    name: str
    device: str  # auto | cpu | cuda | cuda:N
    attention: str  # auto | triton | torch
    cuda_graphs: bool
    int4_kernel: str = "auto"  # auto | tinygemm | triton; resolved per job (TorchEngine.resolve_options)

    def __post_init__(self):
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"engine.device={self.device}: not one of auto, cpu, cuda, cuda:N")
        if self.attention not in ("auto", "triton", "torch"):
            raise ConfigError(f"engine.attention={self.attention}: not one of auto, triton, torch")
        if self.int4_kernel not in INT4_CHOICES + RESOLVED_INT4:
            raise ConfigError(f"engine.int4_kernel={self.int4_kernel}: not one of {', '.join(INT4_CHOICES)}")


INT4_CHOICES = ("auto", "tinygemm", "triton")
RESOLVED_INT4 = ("dequant", "reference", "none")  # what auto becomes off sm80+ GPUs, and without int4 weights
# auto's batch rule, from the H200 side by side (docs/benchmarks.md, issue 14): at batch 1 tinygemm decodes
# 1.25x / 1.22x fp16 (Llama-3.2-1B / Qwen2.5-1.5B shapes) against the Triton W4A16 kernel's 1.04x / 1.06x; at
# batch 8 Triton wins every projection (gate|up 16.7 against 26.6 us) and its prefill (TTFT 0.82x fp16 against
# tinygemm's 6.1x, whose tiles serve few rows). Batches 2-7 were not measured; they take Triton.
TINYGEMM_MAX_BATCH = 1


def kv_format(kv_dtype: str) -> str:
    """The fmt_name of the cache new_cache builds for quant.kv_cache.dtype: what the kernels call its format."""
    return KVCache.fmt_name if kv_dtype == "auto" else FORMATS[kv_dtype].name


class TorchEngine(Engine):
    name = "torch"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        weight_modes=frozenset({("auto", "none"), ("int4", "awq"), ("int4", "rtn"), ("fp8", "none")}),
        fp8_activations=frozenset({("auto", "dynamic"), ("fp8", "dynamic"), ("fp8", "static")}),
        kv_dtypes=frozenset({"auto", "int8", "fp8", "int4"}),
        kv_scales=frozenset({("dynamic", "token"), ("static", "head"), ("static", "tensor")}),
        lm_heads=frozenset({"bf16", "int8", "int4"}),
        profilers=frozenset({"torch", "ncu", "nsys"}),
    )
    Options = TorchOptions

    @classmethod
    def check_supported(cls, spec) -> None:
        super().check_supported(spec)
        if spec.build.weights.dtype == "fp8":  # on a CPU the reference runs (a numerics-only run)
            from kvexp.core.fp8 import check_device

            check_device(spec.build.torch_device, f"quant={spec.cfg.quant.name}")

    @classmethod
    def attention_impl(cls, kv, device: torch.device, dtype: torch.dtype, options: TorchOptions) -> str:
        """"triton:<fmt>" where the Triton kernel serves the cache format and dtype on a CUDA device, else
        "torch:<fmt>" (the PyTorch reference: the CPU path, or what engine.attention=torch asks for). On CUDA a
        combination the kernel cannot serve is refused rather than silently run on the slow reference path."""
        fmt = kv_format(kv.dtype)
        if options.attention == "torch" or (device.type != "cuda" and options.attention == "auto"):
            return f"torch:{fmt}"
        from kvexp.core.kernels import triton_available
        from kvexp.core.kernels.kv_write import KERNEL_FORMATS, MODEL_DTYPES

        if device.type != "cuda" or not triton_available():
            raise UnsupportedConfig("engine.attention=triton: needs a CUDA GPU and triton; use engine.attention=auto")
        if fmt not in KERNEL_FORMATS:
            raise UnsupportedConfig(f"quant.kv_cache.dtype={kv.dtype}: the Triton decode kernel reads "
                                    f"{', '.join(KERNEL_FORMATS)} caches, not {fmt}; add engine.attention=torch to run "
                                    "it on the (slow) PyTorch reference path")
        if dtype not in MODEL_DTYPES:
            names = "|".join(str(d).removeprefix("torch.") for d in MODEL_DTYPES)
            raise UnsupportedConfig(f"model.dtype={str(dtype).removeprefix('torch.')}: the Triton decode kernel takes "
                                    f"{names} queries; use model.dtype=auto|{names}, or engine.attention=torch")
        return f"triton:{fmt}"

    @classmethod
    def resolve_options(cls, options: TorchOptions, cfg, device: torch.device, dtype: torch.dtype) -> TorchOptions:
        """engine.int4_kernel for this job's int4 weights: auto -> tinygemm up to TINYGEMM_MAX_BATCH sequences
        (bench.batch_size) in bf16, else the Triton W4A16 kernel, on sm80+ GPUs; dequantize + GEMM on older GPUs
        and the PyTorch reference on the CPU. 'none' where no layer is int4 (weights or output head). A layer whose
        shape the chosen kernel does not take runs the next of PackedLinear.prepare's order (kernels.int4.* count)."""
        kernel = options.int4_kernel
        if kernel not in INT4_CHOICES:  # a resolved value is what the BuildSpec records, not an input
            raise ConfigError(f"engine.int4_kernel={kernel}: not one of {', '.join(INT4_CHOICES)}")
        if cfg.quant.weights.dtype != "int4" and cfg.quant.weights.lm_head != "int4":
            return dataclasses.replace(options, int4_kernel="none")
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        sm80 = capability is not None and capability[0] >= 8
        if kernel == "auto":
            kernel = ("tinygemm" if cfg.bench.batch_size <= TINYGEMM_MAX_BATCH and dtype == torch.bfloat16
                      else "triton") if sm80 else "dequant" if device.type == "cuda" else "reference"
        elif not sm80:
            here = "a CPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
            raise UnsupportedConfig(f"engine.int4_kernel={kernel}: needs a CUDA GPU of compute capability 8.0+ "
                                    f"(here {here}); use engine.int4_kernel=auto")
        elif kernel == "tinygemm" and dtype != torch.bfloat16:
            raise UnsupportedConfig(f"engine.int4_kernel=tinygemm: needs model.dtype=bfloat16 (torch's int4 kernel "
                                    f"takes bf16 only), here {str(dtype).removeprefix('torch.')}; use "
                                    "engine.int4_kernel=triton")
        return dataclasses.replace(options, int4_kernel=kernel)

    # ---- build ----
    def build(self) -> BuildInfo:
        start = time.perf_counter()
        self.device, self.dtype = self.spec.build.torch_device, self.spec.build.torch_dtype
        self.model_dir = resolve_model(self.spec)
        self.arch = ArchConfig.from_hf(read_model_config(self.model_dir))
        check_context(self.spec, self.arch.max_positions)
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        with torch.device("meta"):
            model = CausalLM(self.arch)
        load_state(model, sorted(self.model_dir.glob("*.safetensors")), self.dtype, self.device)
        self.model = model.eval()
        metrics = self._quantize_weights()
        self.model.fuse_projections()
        if self.device.type == "cuda":
            self.model.ops = fused.compiled()
            kernels = self.model.prepare_kernels(int4=self.spec.build.options["int4_kernel"])
            metrics |= {f"kernels.{k}": n for k, n in kernels.items()}
            metrics["quant.int4_fast_layers"] = kernels.get("int4.triton", 0) + kernels.get("int4.tinygemm", 0)
            # 1: kvexp's Triton kernels launch chained (programmatic dependent launch, sm90+; KVEXP_PDL=0 turns it off)
            metrics["kernels.pdl"] = int(pdl(self.model.model.embed_tokens.weight))
        self.kv_scales = None
        kv = self.spec.cfg.quant.kv_cache
        if kv.dtype != "auto" and kv.scale == "static":
            from kvexp.quant.kv_calib import static_kv_scales

            t0 = time.perf_counter()
            self.kv_scales = static_kv_scales(self.spec, self.model, self._tokenizer, self.device)
            metrics["quant.kv_calib_s"] = time.perf_counter() - t0  # ~0 when the scales come from the cache
        self.model.decode_attn = self._decode_attention()
        self._loop: DecodeLoop | None = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return BuildInfo(build_s=time.perf_counter() - start, metrics=metrics)

    def _quantize_weights(self) -> dict:
        w, metrics = self.spec.cfg.quant.weights, {}
        if w.lm_head != "bf16":  # round-to-nearest copy; a tied embedding stays dense for the lookup
            from kvexp.core.int4 import quantize_linear

            self.model.lm_head = quantize_linear(self.model.lm_head, int(w.lm_head[3:]), w.group_size)
            metrics["quant.lm_head_bits"] = self.model.lm_head.bits
        if w.dtype == "fp8":
            return metrics | self._fp8_weights()
        if w.dtype != "int4":
            return metrics
        from kvexp.quant.weights import int4_weights, swap_int4

        path, seconds = int4_weights(self.spec, self.model_dir, self._tokenizer, self.device)
        swapped = swap_int4(self.model, path, w.group_size, self.dtype, self.device)
        return metrics | {"quant.calib_s": seconds, "quant.int4_layers": swapped,
                          "quant.input_scales_folded": self.model.fold_input_scales()}

    def _fp8_weights(self) -> dict:
        from kvexp.core.fp8 import swap_fp8

        w, scales, metrics = self.spec.build.weights, None, {}
        if w.activations == "fp8" and w.act_scale == "static":
            from kvexp.quant.weights import fp8_input_scales

            scales, metrics["quant.calib_s"] = fp8_input_scales(self.spec, self.model_dir, self._tokenizer,
                                                                self.device)
        metrics["quant.fp8_layers"] = swap_fp8(self.model, w.activations == "fp8", scales)
        return metrics

    def _decode_attention(self):
        """The fused Triton kernel where the BuildSpec chose it; None = the PyTorch reference path."""
        if not self.spec.build.attention.startswith("triton:"):
            return None
        from kvexp.core.kernels.decode_attention import decode_attention

        sm_scale = self.arch.head_dim ** -0.5

        def attend(q, cache, layer, lengths):
            return decode_attention(q, cache.k[layer], cache.v[layer], *cache.scales(layer), lengths, sm_scale,
                                    cache.fmt_name)

        return attend

    # ---- properties ----
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.arch.max_positions

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        a, kv = self.arch, self.spec.cfg.quant.kv_cache
        args = (a.num_layers, batch, a.num_kv_heads, max_len, a.head_dim, self.dtype, self.device)
        fused = self.model.decode_attn is not None  # the Triton path: its fused write kernel too
        if kv.dtype == "auto":
            return KVCache(*args, fused_write=fused)
        return QuantizedKVCache(*args, fmt=FORMATS[kv.dtype], static_scales=self.kv_scales, fused_write=fused)

    def _padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded [B, max_len] tokens and [B] lengths (causal attention never sees the padding)."""
        lens = torch.tensor([len(s) for s in seqs])
        if (lens == 0).any():
            raise ValueError("empty token sequence: every prompt/context needs at least one token")
        tokens = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.as_tensor(list(s))
        return tokens.to(self.device), lens.to(self.device)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # ---- generation ----
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generations:
        return self._generate(prompts, max_new_tokens, from_cache=False)

    def generate_from_cache(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generations:
        return self._generate(prompts, max_new_tokens, from_cache=True)

    @torch.inference_mode()
    def _generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, from_cache: bool) -> Generations:
        tokens, lens = self._padded(prompts)
        total = int(lens.max()) + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"prompt + {max_new_tokens} new tokens = {total} > the model's {self.max_seq_len}")
        loop = self._decode_loop(len(prompts), total)
        t0 = self._sync()
        zeros = torch.zeros_like(lens)
        hidden = self.model(tokens, zeros, loop.cache, "prefill")
        rows = torch.arange(len(prompts), device=self.device)
        if from_cache:  # one decode step more: the last prompt token again, its K/V rewritten, the cache read back
            t1, steps = self._sync(), max_new_tokens
            out = loop.run(tokens[rows, lens - 1], lens - 1, steps)[:, 1:]
        else:
            first = self.model.greedy(hidden[rows, lens - 1])
            t1, steps = self._sync(), max_new_tokens - 1
            out = loop.run(first, lens, steps)
        t2 = self._sync()
        return Generations(tokens=out.tolist(), prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps)

    def _decode_loop(self, batch: int, max_len: int) -> DecodeLoop:
        """One cache (and captured graph) reused while the shape repeats: benchmarks call generate many times."""
        if self._loop is None or not self._loop.fits(batch, max_len):
            self._loop = None
            gc.collect()
            graphs = self.options.cuda_graphs and self.device.type == "cuda"
            self._loop = DecodeLoop(self.model, self.new_cache(batch, max_len), graphs)
        return self._loop

    # ---- scoring ----
    @torch.inference_mode()
    def continuation_logprobs(self, requests: Sequence[Request], *, kv_faithful: bool) -> list[torch.Tensor]:
        bs = self.spec.cfg.eval.batch_size
        out: list[torch.Tensor] = []
        for i in range(0, len(requests), bs):
            chunk = requests[i:i + bs]
            out.extend(self._score_faithful(chunk) if kv_faithful else self._score_one_pass(chunk))
        return out

    def _score_one_pass(self, chunk: Sequence[Request]) -> list[torch.Tensor]:
        tokens, _ = self._padded([list(c) + list(x) for c, x in chunk])
        hidden = self.model(tokens, torch.zeros(len(chunk), dtype=torch.long, device=self.device))
        return [self.model.logits(hidden[b, len(c) - 1: len(c) + len(x) - 1]).log_softmax(-1).cpu()
                for b, (c, x) in enumerate(chunk)]

    def _score_faithful(self, chunk: Sequence[Request]) -> list[torch.Tensor]:
        """Prefill contexts into the cache, then extend with the continuations (minus their last token), so every
        continuation position after the first reads K/V back from the (quantized) cache, as decode does."""
        ctx, ctx_lens = self._padded([c for c, _ in chunk])
        # every continuation is padded to the longest, so a long context with a short continuation still writes
        # max continuation positions past its context
        cache = self.new_cache(len(chunk), max(len(c) for c, _ in chunk) + max(len(x) for _, x in chunk))
        hidden = self.model(ctx, torch.zeros_like(ctx_lens), cache, "prefill")
        first = hidden[torch.arange(len(chunk), device=self.device), ctx_lens - 1]  # predicts cont[0]
        rest = None
        if max(len(x) for _, x in chunk) > 1:
            ext, _ = self._padded([list(x)[:-1] or [0] for _, x in chunk])
            rest = self.model(ext, ctx_lens, cache, "extend")
        out = []
        for b, (_, x) in enumerate(chunk):
            h = first[b:b + 1] if rest is None else torch.cat((first[b:b + 1], rest[b, : len(x) - 1]))
            out.append(self.model.logits(h).log_softmax(-1).cpu())
        return out

    # ---- memory ----
    def memory(self) -> MemoryReport:
        # one entry per storage: a tied embedding and output head are one tensor, counted once
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in list(self.model.parameters()) + list(self.model.buffers()) if t is not self.model.inv_freq}
        probe = self.new_cache(1, 16)  # bytes/token are measured from real cache tensors, not assumed
        return MemoryReport(weight_bytes=sum(storages.values()),
                            kv_bytes_per_token=probe.bytes_per_token(),
                            kv_bytes_per_token_formula=probe.formula_bytes_per_token(),
                            peak_bytes=memory.peak_bytes(self.device))

    def close(self) -> None:
        self._loop = None
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
