"""A compact Llama-family decoder (Llama, Qwen2 with its qkv bias, Mistral) over an explicit KV cache.

Module names mirror Hugging Face's, so a safetensors state dict loads as is and quantized linears swap in
by name. Three attention modes:
  prefill  fresh sequences: causal attention over the new K/V in the model dtype, then K/V are written to
           the cache. This is what serving engines do, so one-pass scores never see KV quantization.
  extend   n new tokens per sequence at positions pos[b]..pos[b]+n-1: K/V are written first, then every
           query attends over what the cache gives back (dequantized): decode is extend with n = 1.
  none     no cache at all (one-pass scoring of whole sequences).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kvexp.core import fused
from kvexp.core.int4 import DenseLinear, PackedLinear
from kvexp.core.kernels import triton_available
from kvexp.errors import UnsupportedConfig


@dataclass(frozen=True)
class ArchConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    qkv_bias: bool
    tie_embeddings: bool
    max_positions: int
    inv_freq: tuple  # RoPE inverse frequencies (after any rope scaling), length head_dim / 2

    @classmethod
    def from_hf(cls, c: dict) -> "ArchConfig":
        arch = (c.get("architectures") or ["?"])[0]
        if c.get("model_type") not in ("llama", "qwen2", "mistral"):
            raise UnsupportedConfig(f"model.path: architecture {arch} ({c.get('model_type')}) is not supported by "
                                    "engine=torch; it loads Llama, Qwen2 and Mistral checkpoints")
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_eps=c.get("rms_norm_eps", 1e-6), qkv_bias=c.get("model_type") == "qwen2" or c.get("attention_bias", False),
            tie_embeddings=c.get("tie_word_embeddings", False),
            max_positions=c.get("max_position_embeddings", 4096), inv_freq=tuple(rope_inv_freq(c, head_dim)))


def rope_inv_freq(c: dict, head_dim: int) -> list[float]:
    """Inverse frequencies for default, linear and llama3 RoPE (transformers 4.x 'rope_scaling' or 5.x
    'rope_parameters'), computed in float32 as transformers does so positions rotate identically; the
    llama3 recipe is Meta's, as in transformers' _compute_llama3_parameters."""
    params = dict(c.get("rope_parameters") or {})
    scaling = dict(c.get("rope_scaling") or params)
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        inv = inv / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, smoothed, scaled)
    elif rope_type != "default":
        raise UnsupportedConfig(f"model.path: RoPE type {rope_type} is not supported by engine=torch "
                                "(default, linear and llama3 are)")
    return inv.tolist()


def _triton_wins(name: str, linear: nn.Linear) -> bool:
    """Where the Triton GEMV beat cuBLAS at batch 1 and 8 on the H200 (2026-12-02, scripts/bench_linears.py):
    the gate|up matrix (its silu * up epilogue saves a kernel), and matrices over 16 MB (down, the head);
    cuBLAS kept q|k|v and o of Llama-3.2-1B by 0.4-1.3 us and tied on Qwen2.5-1.5B's."""
    return name == "gate_up" or linear.weight.numel() * linear.weight.element_size() > 16e6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


# decode_attn(q [B, Hq, D], cache, layer, lengths [B] int32) -> [B, Hq, D]: one new token per sequence
DecodeAttention = Callable[[torch.Tensor, object, int, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """What every layer needs for one forward: RoPE tables [B, 1, n, D], the cache, start positions pos [B],
    valid cache lengths after the write [B] int32 (extend mode), the mode, and the op implementations."""
    cos: torch.Tensor
    sin: torch.Tensor
    cache: object
    pos: torch.Tensor
    lengths: Optional[torch.Tensor]
    mode: str
    decode_attn: Optional[DecodeAttention]
    observer: Optional[Callable]
    ops: SimpleNamespace


class Attention(nn.Module):
    def __init__(self, a: ArchConfig, layer: int):
        super().__init__()
        self.a, self.layer = a, layer
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)
        self.qkv: Optional[nn.Module] = None  # q|k|v in one matrix, after fuse_projections()

    def forward(self, x: torch.Tensor, s: Step) -> torch.Tensor:
        B, n, _ = x.shape
        a = self.a
        qkv = self.qkv(x) if self.qkv is not None else torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1)
        if s.mode == "extend" and s.cache.fused_write and s.observer is None:
            # RoPE and the cache write in one kernel, straight from the projection (kernels.kv_write.rope_write)
            q = s.cache.write_rope(self.layer, qkv, s.cos, s.sin, s.pos, a.num_heads)
        else:
            q, k, v = s.ops.split_heads(qkv, a.num_heads, a.num_kv_heads, a.head_dim, s.cos, s.sin)
            if s.observer is not None:
                s.observer(self.layer, k, v)
            if s.mode == "extend":
                s.cache.write(self.layer, k, v, s.pos)
        if s.mode == "extend":
            if n == 1 and s.decode_attn is not None:
                out = s.decode_attn(q[:, :, 0], s.cache, self.layer, s.lengths)[:, :, None]
            else:
                out = self._attend_cache(q, s.cache, s.pos)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            if s.cache is not None:
                s.cache.write(self.layer, k, v, s.pos)
        return self.o_proj(out.transpose(1, 2).reshape(B, n, -1))

    def _attend_cache(self, q, cache, pos):
        """Reference attention over the dequantized cache; query j of sequence b sees positions <= pos[b]+j."""
        n = q.shape[2]
        # Inside CUDA-graph capture the lengths are device data: read the whole cache and let the mask cut it.
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        length = cache.max_len if capturing else int((pos.max() + n).item())
        k, v = cache.read(self.layer, length)
        qpos = pos[:, None] + torch.arange(n, device=q.device)  # [B, n]
        mask = torch.arange(length, device=q.device)[None, None, :] <= qpos[:, :, None]  # [B, n, T]
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None], enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, a: ArchConfig):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.gate_up: Optional[nn.Module] = None  # gate|up in one matrix, after fuse_projections()

    def forward(self, x, ops):
        if self.gate_up is None:
            return self.down_proj(ops.silu_mul(torch.cat((self.gate_proj(x), self.up_proj(x)), -1)))
        h = self.gate_up.silu_mul(x) if isinstance(self.gate_up, PackedLinear) else None  # fused epilogue
        return self.down_proj(ops.silu_mul(self.gate_up(x)) if h is None else h)


class DecoderLayer(nn.Module):
    def __init__(self, a: ArchConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_eps)

    def forward(self, residual, delta, s: Step):
        """The stream is residual + delta; the add is fused into the norm that reads it. Returns the same pair."""
        norm = self.input_layernorm
        if delta is None:
            h = s.ops.rms_norm(residual, norm.weight, norm.eps)
        else:
            residual, h = s.ops.add_rms_norm(residual, delta, norm.weight, norm.eps)
        norm = self.post_attention_layernorm
        residual, h = s.ops.add_rms_norm(residual, self.self_attn(h, s), norm.weight, norm.eps)
        return residual, self.mlp(h, s.ops)


class Backbone(nn.Module):
    def __init__(self, a: ArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_eps)


class CausalLM(nn.Module):
    def __init__(self, a: ArchConfig):
        super().__init__()
        self.arch = a
        self.model = Backbone(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.tensor(a.inv_freq, dtype=torch.float32), persistent=False)
        self.decode_attn: Optional[DecodeAttention] = None  # set by the engine (Triton kernel on CUDA)
        self.observer = None  # set during KV-scale calibration: observer(layer, k, v)
        self.ops = fused.EAGER  # fused.compiled() on CUDA

    def fold_input_scales(self) -> int:
        """Move AWQ's input scales (PackedLinear.pre_scale, x -> x * s before the product) to where they cost
        nothing at run time, exactly in real arithmetic: a scale shared by q|k|v (or gate|up) into the weight of
        the RMSNorm that feeds them, and down's into up's output rows (silu(g) * (u * s) = (silu(g) * u) * s). At
        batch 1 each scale left in place is an elementwise kernel of its own before tinygemm: 84 of them a step on
        Qwen2.5-1.5B, 0.13 ms of its 1.57 (H200, 2026-12-03). o's input (attention's output, mixed across the query
        heads of a kv head) has no such place and keeps its scale. Returns how many scales were folded."""
        folded = 0

        def shared(linears) -> Optional[torch.Tensor]:
            pres = [getattr(m, "pre_scale", None) for m in linears]
            if pres[0] is None or any(p is None or not torch.equal(p, pres[0]) for p in pres):
                return None
            return pres[0]

        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, linears in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                s = shared(linears)
                if s is not None:
                    norm.weight.data = (norm.weight.float() * s.float()).to(norm.weight.dtype)
                    for m in linears:
                        m.pre_scale = None
                    folded += len(linears)
            s, up = getattr(mlp.down_proj, "pre_scale", None), mlp.up_proj
            if s is not None and isinstance(up, PackedLinear):
                up.scales = (up.scales.float() * s.float()[:, None]).to(up.scales.dtype)
                if up.bias is not None:
                    up.bias = (up.bias.float() * s.float()).to(up.bias.dtype)
                mlp.down_proj.pre_scale = None
                folded += 1
        return folded

    def fuse_projections(self) -> None:
        """q|k|v and gate|up as one matrix each: fewer, larger matrix-vector products per decode step."""
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = fused.concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if attn.qkv is not None:
                del attn.q_proj, attn.k_proj, attn.v_proj
            mlp.gate_up = fused.concat_linears([mlp.gate_proj, mlp.up_proj])
            if mlp.gate_up is not None:
                del mlp.gate_proj, mlp.up_proj

    def prepare_kernels(self, dense: str = "auto", int4: str = "auto") -> dict[str, int]:
        """Choose the linears' kernels for this device (after fuse_projections): packed layers take the first
        kernel their shape allows in PackedLinear.prepare's 'auto' order, with the Triton kernel ahead of
        tinygemm where int4 is 'triton' (engine.int4_kernel); dense projections and the head run the Triton GEMV
        for decode rows when dense is 'triton' ('auto': on CUDA sm80+), else stay nn.Linear (cuBLAS). Returns
        {'int4.triton': layers, ...}: what each layer runs."""
        count: dict[str, int] = {}
        device = self.model.embed_tokens.weight.device
        if dense == "auto":
            dense = "triton" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 \
                else "cublas"
        for parent in [self] + [m for layer in self.model.layers for m in (layer.self_attn, layer.mlp)]:
            for name, child in list(parent.named_children()):
                if dense == "triton" and type(child) is nn.Linear and _triton_wins(name, child):
                    child = DenseLinear.from_linear(child)
                    setattr(parent, name, child)
                if isinstance(child, PackedLinear):
                    key = f"{child.fmt}.{child.prepare('auto', tinygemm_first=int4 != 'triton')}"
                    count[key] = count.get(key, 0) + 1
        return count

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, cache=None, mode: str = "none") -> torch.Tensor:
        """tokens [B, n] at positions pos[b] + j -> final hidden states [B, n, hidden] (apply lm_head to the
        positions you need: full-vocab logits for every position would not fit at long context)."""
        n = tokens.shape[1]
        positions = (pos[:, None] + torch.arange(n, device=tokens.device)).float()  # [B, n]
        freqs = positions[..., None] * self.inv_freq  # [B, n, D/2]
        emb = torch.cat((freqs, freqs), -1)[:, None]  # [B, 1, n, D]
        lengths = (pos + n).to(torch.int32) if mode == "extend" else None  # valid cache length after the write
        step = Step(emb.cos(), emb.sin(), cache, pos, lengths, mode, self.decode_attn, self.observer, self.ops)
        residual, delta = self.model.embed_tokens(tokens), None
        for layer in self.model.layers:
            residual, delta = layer(residual, delta, step)
        norm = self.model.norm
        return self.ops.add_rms_norm(residual, delta, norm.weight, norm.eps)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> [B] int64, the argmax of the logits: on CUDA over the head's own output by
        kernels.argmax (torch's one-block reduction over a float32 copy took 3% of a decode step), elsewhere torch's."""
        logits = self.lm_head(hidden)
        if logits.is_cuda and triton_available():
            from kvexp.core.kernels.argmax import argmax_rows

            return argmax_rows(logits)
        return logits.float().argmax(-1)


def load_state(model: CausalLM, files: list, dtype: torch.dtype, device: torch.device) -> None:
    """Load HF safetensors shards into the meta-initialised model, cast to dtype, on device."""
    from safetensors import safe_open

    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                state[key] = sf.get_tensor(key).to(device=device, dtype=dtype)
    if model.arch.tie_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.inv_freq = torch.tensor(model.arch.inv_freq, dtype=torch.float32, device=device)
    missing = [m for m in missing if m != "inv_freq"]
    if missing or unexpected:
        raise UnsupportedConfig(f"model.path: checkpoint does not match the {model.arch.num_layers}-layer "
                                f"Llama-family layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
