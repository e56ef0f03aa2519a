"""The Engine interface every backend implements, and the records it returns.

Token ids in, token ids and log-probabilities out: tokenization belongs to the caller (the engine
exposes its tokenizer), so lm-eval, fidelity and the benchmark all drive every engine the same way.
"""
from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

from kvexp.core.spec import KVFormatSpec
from kvexp.errors import ConfigError, UnsupportedConfig

if TYPE_CHECKING:
    from kvexp.config import RunSpec

log = logging.getLogger(__name__)
Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class Capabilities:
    """What an engine can run; checked at validation, before any download or build."""
    devices: frozenset = frozenset({"cpu", "cuda"})
    weight_modes: frozenset = frozenset({("auto", "none")})  # (quant.weights.dtype, quant.weights.algo)
    # with fp8 weights: the (quant.activations.dtype, scale) pairs the engine runs ("auto": weight-only)
    fp8_activations: frozenset = frozenset()
    kv_dtypes: frozenset = frozenset({"auto"})
    kv_scales: frozenset = frozenset({("dynamic", "token")})  # (quant.kv_cache.scale, granularity)
    lm_heads: frozenset = frozenset({"bf16"})  # quant.weights.lm_head values
    # bench.profile values other than none: bench/profile.py marks the prefill/decode phases of generate() with
    # hooks on the engine's PyTorch `model`, so only an engine that has one can list them.
    profilers: frozenset = frozenset()


@dataclass
class Generations:
    """Greedy generations of one batch: new token ids per prompt (EOS/stop not trimmed) and timings."""
    tokens: list[list[int]]
    prefill_s: float  # wall time of the batched prefill, up to and including the first new token
    decode_s: float  # wall time of the decode steps after the first token (device-synchronised)
    decode_steps: int  # number of those steps (max_new_tokens - 1)


@dataclass
class MemoryReport:
    weight_bytes: int  # bytes of the weights as stored on the device (packed int4 counts as 0.5 B/elem)
    kv_bytes_per_token: float  # measured from the allocated cache tensors (values + scales), all layers
    kv_bytes_per_token_formula: float  # layers * 2 * kv_heads * (head_dim * bits/8 + scale bytes)
    peak_bytes: int  # device peak (CUDA) or process peak RSS (CPU)


@dataclass
class BuildInfo:
    build_s: float
    metrics: dict = field(default_factory=dict)  # engine-specific numbers (e.g. engine size, calib time)


class Engine(ABC):
    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type]  # a dataclass of this engine's options; conf/engine/<name>.yaml mirrors it

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.options = spec.engine_options

    # ---- configuration, before anything heavy ----
    @classmethod
    def parse_options(cls, engine_cfg: dict) -> Any:
        """engine.* -> the engine's Options dataclass; unknown keys name the valid ones."""
        known = {f.name for f in dataclasses.fields(cls.Options)}
        for key in engine_cfg:
            if key not in known:
                raise ConfigError(f"engine.{key}: unknown option for engine={cls.name}; known: {', '.join(sorted(known))}")
        return cls.Options(**engine_cfg)

    @classmethod
    def check_supported(cls, spec: RunSpec) -> None:
        """Raise UnsupportedConfig naming the field and the engines that do support the value."""
        from kvexp.engines import ENGINES, engine_class

        q, caps = spec.cfg.quant, cls.capabilities

        def others(pred) -> str:
            names = [n for n in ENGINES if n != cls.name and pred(engine_class(n).capabilities)]
            return f"; supported by engine={'|'.join(names)}" if names else ""

        weights = (q.weights.dtype, q.weights.algo)
        if weights not in caps.weight_modes:
            raise UnsupportedConfig(
                f"quant.weights (dtype={weights[0]}, algo={weights[1]}): not supported by engine={cls.name}"
                + others(lambda c: weights in c.weight_modes))
        act = (q.activations.dtype, q.activations.scale)
        if q.weights.dtype == "fp8" and act not in caps.fp8_activations:
            raise UnsupportedConfig(
                f"quant.activations (dtype={act[0]}, scale={act[1]}) with fp8 weights: not supported by "
                f"engine={cls.name}" + others(lambda c: act in c.fp8_activations))
        if q.weights.lm_head not in caps.lm_heads:
            raise UnsupportedConfig(f"quant.weights.lm_head={q.weights.lm_head}: not supported by engine={cls.name}"
                                    + others(lambda c: q.weights.lm_head in c.lm_heads))
        kv = q.kv_cache
        if kv.dtype not in caps.kv_dtypes:
            raise UnsupportedConfig(
                f"quant.kv_cache.dtype={kv.dtype}: not supported by engine={cls.name} "
                f"(it has {', '.join(sorted(caps.kv_dtypes))})" + others(lambda c: kv.dtype in c.kv_dtypes))
        if kv.dtype != "auto" and (kv.scale, kv.granularity) not in caps.kv_scales:
            raise UnsupportedConfig(
                f"quant.kv_cache.scale={kv.scale}/granularity={kv.granularity}: not supported by engine={cls.name}; "
                f"it has {', '.join('/'.join(s) for s in sorted(caps.kv_scales))}")
        profiler = spec.cfg.bench.profile
        if profiler != "none" and profiler not in caps.profilers:
            raise UnsupportedConfig(f"bench.profile={profiler}: not supported by engine={cls.name}"
                                    + others(lambda c: profiler in c.profilers))

    @classmethod
    def attention_impl(cls, kv: KVFormatSpec, device: torch.device, dtype: torch.dtype, options: Any) -> str:
        """Which decode attention serves this build, recorded in the BuildSpec and as the run's kvexp.attention tag
        (an engine with several, like engine=torch, says which; a combination none serves is UnsupportedConfig)."""
        return cls.name

    @classmethod
    def resolve_options(cls, options: Any, cfg: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """options with every 'auto' this engine leaves to preflight resolved for this job (cfg: its
        KvexpConfig), so that the BuildSpec records what will run; UnsupportedConfig where nothing can."""
        return options

    # ---- the engine proper ----
    @abstractmethod
    def build(self) -> BuildInfo:
        """Load, quantize (through the shared calibration cache) and compile. Raises UnsupportedConfig early."""

    @property
    @abstractmethod
    def tokenizer(self):
        """The model's HF tokenizer (encode/decode, eos_token_id)."""

    @property
    @abstractmethod
    def max_seq_len(self) -> int:
        """Longest prompt + generation this engine was built for."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generations:
        """Greedy decode of max_new_tokens per prompt (no early stop, so timings are comparable)."""

    def generate_from_cache(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> Generations:
        """generate(), but the last prompt token is decoded against the cache too, so every new token is predicted
        from K/V read back from the (quantized) cache; generate() predicts the first over the prefill's
        full-precision K/V. What eval.kv_faithful means for generation tasks. An engine without it generates."""
        if not getattr(self, "_warned_from_cache", False):
            log.warning("engine=%s cannot decode the prompt's last token from the cache: eval.kv_faithful generations "
                        "predict their first token at the end of the prefill", self.name)
            self._warned_from_cache = True
        return self.generate(prompts, max_new_tokens)

    @abstractmethod
    def continuation_logprobs(self, requests: Sequence[Request], *, kv_faithful: bool) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at each continuation position: one float32 [len(cont), V] per request.

        kv_faithful=False scores context+continuation in one prefill pass (full-precision K/V, as serving
        engines prefill). kv_faithful=True prefills the context into the cache, then scores the continuation
        against what the cache gives back, as decode would read it.
        """

    def score(self, requests: Sequence[Request], *, kv_faithful: bool) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding reproduces the continuation) per request."""
        out = []
        for (_, cont), logp in zip(requests, self.continuation_logprobs(requests, kv_faithful=kv_faithful)):
            target = torch.as_tensor(list(cont), dtype=torch.long)
            picked = logp.gather(-1, target[:, None]).sum().item()
            out.append((picked, bool((logp.argmax(-1) == target).all())))
        return out

    def external_bench(self, prompts: Sequence[Sequence[int]], output_tokens: int, work_dir) -> dict[str, float]:
        """Numbers from the engine's own benchmark tool, when it has one and it is enabled (trtllm-bench)."""
        return {}

    @abstractmethod
    def memory(self) -> MemoryReport:
        """Weights, KV cache and peak memory of the built engine."""

    def close(self) -> None:
        """Release device memory before the next job."""
