"""quant.weights.lm_head: a round-to-nearest int8 / int4 output head (CPU reference path)."""
import pytest
import torch

from conftest import build_engine
from kvexp.core.int4 import PackedLinear
from kvexp.core.kernels.wq_matmul import dequantize_ref


@pytest.fixture(scope="module")
def dense():
    return build_engine("quant=fp16")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_head_is_the_rtn_grid_and_close_to_dense(dense, bits):
    engine = build_engine("quant=fp16", f"quant.weights.lm_head=int{bits}")
    head, ref_head = engine.model.lm_head, dense.model.lm_head
    assert isinstance(head, PackedLinear) and head.bits == bits
    assert engine.model.model.embed_tokens.weight.dtype == ref_head.weight.dtype  # the lookup stays dense
    gen = torch.Generator().manual_seed(bits)
    h = torch.randn(64, head.in_features, generator=gen)
    w = ref_head.weight.double()
    w_q = dequantize_ref(head.qweight, head.scales, head.group, bits).double()
    # every weight within half a quantization step of the original (a qmax off by 2x breaks this)
    step = head.scales.double().repeat_interleave(head.group, dim=1)
    assert ((w_q - w).abs() <= step / 2 + 1e-6).all()
    assert step.max() <= 1.01 * w.abs().max() / {8: 127, 4: 7}[bits]
    out = engine.model.logits(h).double()
    assert torch.allclose(out, h.double() @ w_q.T, rtol=1e-4, atol=1e-4)
    rel = ((out - h.double() @ w.T).norm() / (h.double() @ w.T).norm()).item()
    assert rel < {8: 0.01, 4: 0.2}[bits], rel  # RTN error ~ amax / qmax / sqrt(12) relative to the rms weight
    head_bytes = {8: 1, 4: 0.5}[bits] * w.numel() + head.scales.numel() * head.scales.element_size()
    dense_head = 0 if engine.arch.tie_embeddings else w.numel() * ref_head.weight.element_size()  # tied: it stays
    assert engine.memory().weight_bytes == dense.memory().weight_bytes - dense_head + head_bytes
