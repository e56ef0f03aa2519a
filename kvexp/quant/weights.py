"""INT4 weight quantization in two steps (as gpt-fast): build packed weights offline, cached under their own
hash, then swap them into the model at load; and the static FP8 activation scales.

AWQ runs through nvidia-modelopt (mtq.INT4_AWQ_CFG) on the Hugging Face model, so any engine can reuse the
calibrated result; RTN (round to nearest, no calibration) is the baseline AWQ should beat. FP8 weights need no
artifact (per-channel amax, rounded at load: kvexp.core.fp8); static FP8 activation scales are ModelOpt's
(mtq.FP8_DEFAULT_CFG, max calibration of every linear's input quantizer), cached like the int4 weights.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from kvexp import artifacts
from kvexp.core.int4 import Int4Linear, pack, quantize_groups, rtn_quantize

if TYPE_CHECKING:
    from kvexp.config import RunSpec

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # bump when the stored format or the recipe changes (2: AWQ input scales shared)


def artifact_key(spec: RunSpec, *parts: str) -> dict:
    """What a quantization artifact of this run depends on: the model's fingerprint, the named BuildSpec fields,
    the stored format's version and the device type (AWQ and KV calibration run in bf16 on CUDA, fp32 on CPU)."""
    return spec.build.artifact_key(*parts) | {"format": FORMAT_VERSION, "device_type": spec.build.torch_device.type}


def int4_weights(spec: RunSpec, model_dir: Path, tokenizer, device: torch.device) -> tuple[Path, float]:
    """Packed int4 weights for the run's quant.weights (cached). Returns (safetensors path, seconds spent)."""
    w = spec.build.weights
    key = artifact_key(spec, *(("calib", "versions") if w.algo == "awq" else ()))
    key["weights"] = (w.dtype, w.algo, w.group_size)  # not lm_head: the head is quantized at load, not here
    dest = artifacts.path(spec.cache_dir, f"quant/int4-{w.algo}", key, ".safetensors")
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        state = _awq(spec, model_dir, tokenizer, device) if w.algo == "awq" else _rtn(model_dir, w.group_size)
        save_file(state, str(tmp))

    path, built = artifacts.cached(dest, f"int4 {w.algo} weights", build, lambda p: p)
    return path, time.perf_counter() - start if built else 0.0


def _rtn(model_dir: Path, group: int) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if _quantizable(key):
                    name = key[: -len(".weight")]
                    state[f"{name}.qweight"], state[f"{name}.scales"] = rtn_quantize(sf.get_tensor(key).float(), group)
    return state


def _quantizable(key: str) -> bool:
    return key.endswith("_proj.weight") and ".layers." in key


def _modelopt_quantize(spec: RunSpec, model_dir: Path, tokenizer, device: torch.device, cfg: dict,
                       act_bytes_per_token: int, what: str, passes: tuple[str, ...]) -> torch.nn.Module:
    """The checkpoint through mtq.quantize(cfg) on the calibration windows, batched as the device fits
    (act_bytes_per_token: the largest activations a forward keeps per token), one named bar per pass that
    ModelOpt makes; its print()s go to the "modelopt" logger (the run's log, not the console)."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from kvexp.quant.calib import calibration_batches, rows_that_fit

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    rows = rows_that_fit(device, spec.cfg.quant.calib.seq_len, act_bytes_per_token)
    batches = calibration_batches(tokenizer, spec.cfg.quant.calib, batch_size=rows)
    samples = sum(len(b) for b in batches)
    log.info("%s on %d x %d tokens, %d per forward", what, samples, batches[0].shape[1], rows)
    names = iter(passes)

    def forward_loop(m):
        # the backbone alone: calibration looks at the quantized linears' inputs, and the head (not quantized)
        # would only add [rows, seq_len, vocab] logits
        backbone = getattr(m, "base_model", m)
        with torch.no_grad(), tqdm(total=samples, desc=next(names, "extra pass"), unit="sample") as bar:
            for b in batches:
                backbone(b.to(device))
                bar.update(len(b))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # ModelOpt print()s its steps ("Inserted 56 quantizers")
        mtq.quantize(model, cfg, forward_loop)
    for line in filter(None, printed.getvalue().splitlines()):
        logging.getLogger("modelopt").info(line)
    return model


def _awq(spec: RunSpec, model_dir: Path, tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    import modelopt.torch.quantization as mtq
    from transformers import AutoConfig

    group = spec.cfg.quant.weights.group_size
    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)  # a private copy: ModelOpt's dicts are module globals
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = group
    c = AutoConfig.from_pretrained(model_dir)
    # fp32 copies of a linear's input and output per AWQ scale candidate are the largest activations
    model = _modelopt_quantize(spec, model_dir, tokenizer, device, cfg,
                               4 * (8 * c.hidden_size + 12 * c.intermediate_size),
                               f"AWQ calibration (ModelOpt INT4_AWQ_CFG, group {group})",
                               ("AWQ 1/2 activation statistics", "AWQ 2/2 scale search"))
    share_input_scales(model)
    state = export_int4(model, group)
    del model
    return state


def share_input_scales(model: torch.nn.Module) -> None:
    """One AWQ input scale per input: q|k|v and gate|up read the same activations, but ModelOpt's AWQ searches a
    pre_quant_scale per linear. As ModelOpt's own export for TensorRT-LLM's fused QKV and gate-up does
    (modelopt.torch.export.quant_utils.preprocess_linear_fusion), each group takes the mean of its scales, its float
    weights are re-smoothed by old / new and their int4 amax re-collected. With distinct scales kvexp could not fuse
    the projections: on the H200 the Qwen2.5-1.5B shape then decoded at 0.79x fp16 (7 int4 kernels and 7 scale
    multiplies a layer instead of 4 kernels), where round-to-nearest weights, fused, ran at 1.22x (2026-12-03)."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    for layer in model.model.layers:  # the Llama-family layout kvexp loads (ArchConfig.from_hf)
        attn, mlp = layer.self_attn, layer.mlp
        for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
            if getattr(group[0].input_quantizer, "pre_quant_scale", None) is not None:
                preprocess_linear_fusion(list(group), resmooth_only=True)


def fp8_input_scales(spec: RunSpec, model_dir: Path, tokenizer, device: torch.device
                     ) -> tuple[dict[str, torch.Tensor], float]:
    """{linear name: 0-d float32 input scale (amax / 448)} for static fp8 activations (cached), and seconds spent."""
    key = artifact_key(spec, "calib", "versions") | {"fp8_inputs": "FP8_DEFAULT_CFG"}
    dest = artifacts.path(spec.cache_dir, "quant/fp8-input-scales", key, ".safetensors")
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        save_file(_fp8_calibrate(spec, model_dir, tokenizer, device), str(tmp))

    path, built = artifacts.cached(dest, "fp8 input scales", build, lambda p: p)
    return load_file(str(path)), time.perf_counter() - start if built else 0.0


def _fp8_calibrate(spec: RunSpec, model_dir: Path, tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    import modelopt.torch.quantization as mtq
    from transformers import AutoConfig

    from kvexp.core.kernels.wq_matmul import E4M3_MAX

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)  # a private copy: ModelOpt's dicts are module globals
    c = AutoConfig.from_pretrained(model_dir)
    # max calibration keeps no copies: a forward's own activations (hidden and MLP widths, fp32) bound it
    model = _modelopt_quantize(spec, model_dir, tokenizer, device, cfg,
                               4 * (4 * c.hidden_size + 2 * c.intermediate_size),
                               "FP8 activation calibration (ModelOpt FP8_DEFAULT_CFG)", ("FP8 input amax",))
    state = export_fp8_input_scales(model, E4M3_MAX)
    del model
    return state


def export_fp8_input_scales(model: torch.nn.Module, qmax: float) -> dict[str, torch.Tensor]:
    """ModelOpt-calibrated linears -> {name: input amax / qmax} for the decoder layers' projections."""
    state = {}
    for name, module in model.named_modules():
        iq = getattr(module, "input_quantizer", None)
        if iq is None or not iq.is_enabled or not _quantizable(f"{name}.weight"):
            continue
        state[name] = (iq._amax.detach().float().reshape(()) / qmax).cpu()
    return state


def export_int4(model: torch.nn.Module, group: int) -> dict[str, torch.Tensor]:
    """ModelOpt-calibrated linears -> kvexp's packed int4 state ({name}.qweight / .scales / .pre_scale)."""
    state = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is None or not wq.is_enabled:
            continue
        weight = module.weight.detach().float()  # ModelOpt has already divided in the AWQ scale
        amax = wq._amax.float().reshape(weight.shape[0], weight.shape[1] // group)
        state[f"{name}.qweight"] = pack(quantize_groups(weight, amax, group)).cpu()
        state[f"{name}.scales"] = (amax / 7.0).cpu()
        pre = getattr(module.input_quantizer, "_pre_quant_scale", None)
        if pre is not None:
            state[f"{name}.pre_scale"] = pre.detach().float().cpu()
    return state


def swap_int4(model: torch.nn.Module, path: Path, group: int, dtype: torch.dtype, device: torch.device) -> int:
    """Replace every nn.Linear named in the artifact by an Int4Linear; returns how many were swapped."""
    state = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        pre = state.get(f"{name}.pre_scale")
        new = Int4Linear(state[f"{name}.qweight"].to(device), state[f"{name}.scales"].to(device, dtype), group,
                         None if pre is None else pre.to(device, dtype),
                         None if old.bias is None else old.bias.detach())
        setattr(parent, child, new)
    return len(names)
