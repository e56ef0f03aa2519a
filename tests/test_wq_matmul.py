"""kvexp.core.kernels.wq_matmul: the W4A16/W8A16 decode kernel and the dequantize kernel against float64 math
on fresh random inputs, outputs poisoned with NaN first. On CUDA, or on CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), in fp16 there: the interpreter's tl.dot reads bf16 as raw bits."""
from __future__ import annotations

import pytest
import torch

from kvexp.core.int4 import Int4Linear, Int8Linear, rtn_quantize
from kvexp.core.kernels import wq_matmul as wq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]
# The kernel's only rounding is the output's (integer weights are exact, fp32 accumulation): |rel| <= eps/2
# per element. A scale off by 2x, a nibble swap or a group off by one gives O(1) errors.
TOL = {torch.float16: 2 * 2.0 ** -11, torch.bfloat16: 2 * 2.0 ** -8}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    from test_kernels import _kernel_skip_reason

    reason = _kernel_skip_reason()
    if reason:
        pytest.skip(reason)


def _weights(n: int, k: int, group: int, bits: int, dtype, gen):
    w = torch.randn(n, k, generator=gen) * (torch.rand(n, 1, generator=gen) + 0.1)
    qweight, scales = rtn_quantize(w, group, bits)
    return qweight.to(DEVICE), scales.to(DEVICE, dtype)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten outputs (NaN poison survived)"
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits,asm", [(4, True), (4, False), (8, True)])  # int4 on CUDA: PTX unpack or Triton casts
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group,split,block_n", [
    (1, 48, 256, 64, 0, 16), (5, 40, 512, 128, 3, 16), (16, 64, 384, 128, 2, 32), (3, 33, 256, 32, 1, 16),
    (17, 32, 256, 128, 4, 16),  # two row tiles; more splits than one group each
])
def test_wq_matmul_matches_float64(bits, asm, dtype, m, n, k, group, split, block_n):
    gen = torch.Generator().manual_seed(1000 * bits + m + n + k)
    qweight, scales = _weights(n, k, group, bits, dtype, gen)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    pre = (torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    for p, b in ((pre, bias), (None, None)):
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
        config = wq.MatmulConfig(block_n=block_n, split_k=split, int4_asm=asm)
        wq.wq_matmul(x, qweight, scales, group, bits, p, b, config=config, out=out)
        xs = x if p is None else x * p  # the model rounds (x * pre_scale) to its dtype, so does the kernel
        ref = xs.double() @ wq.dequantize_ref(qweight, scales, group, bits).double().T
        ref = ref if b is None else ref + b.double()
        assert _rel(out, ref) < TOL[dtype], (p is None, _rel(out, ref))
    assert not wq._LOCKS[x.device].any(), "split-K counters must be left at zero for the next launch"  # cuda:0


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("m,split", [(1, 0), (5, 3), (17, 1)])
def test_gated_epilogue_and_dense_weights(bits, m, split):
    """gated: [gate; up] weights -> silu(gate) * up in the kernel's epilogue; bits 16: dense weights, no scales."""
    gen = torch.Generator().manual_seed(100 * bits + m)
    n, k, group = 40, 256, 64
    x = torch.randn(m, k, generator=gen).to(DEVICE).half()
    bias = torch.randn(2 * n, generator=gen).to(DEVICE).half()
    if bits == 16:
        qweight, scales = (torch.randn(2 * n, k, generator=gen) / 16).to(DEVICE).half(), None
        w = qweight.double()
    else:
        qweight, scales = _weights(2 * n, k, group, bits, torch.float16, gen)
        w = wq.dequantize_ref(qweight, scales, group, bits).double()
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    wq.wq_matmul(x, qweight, scales, group, bits, None, bias, gated=True,
                 config=wq.MatmulConfig(block_n=16, split_k=split), out=out)
    h = x.double() @ w.T + bias.double()
    ref = torch.nn.functional.silu(h[:, :n]) * h[:, n:]
    assert _rel(out, ref) < TOL[torch.float16]
    plain = wq.wq_matmul(x, qweight, scales, group, bits, config=wq.MatmulConfig(block_n=16, split_k=split))
    assert _rel(plain, x.double() @ w.T) < TOL[torch.float16]


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_kernel_is_bit_exact(bits):
    gen = torch.Generator().manual_seed(7 + bits)
    for n, k, group in ((40, 512, 128), (17, 288, 32)):
        qweight, scales = _weights(n, k, group, bits, torch.float16, gen)
        out = torch.full((n, k), float("nan"), dtype=torch.float16, device=DEVICE)
        wq.dequantize(qweight, scales, group, bits, torch.float16, out=out)
        assert torch.equal(out, wq.dequantize_ref(qweight, scales, group, bits, torch.float16))


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_packed_linear_kernels_agree_on_decode_and_prefill_rows(cls):
    """The layer's triton kernel (decode rows) and dequant path (prefill rows) against its reference path."""
    gen = torch.Generator().manual_seed(3)
    qweight, scales = _weights(64, 256, 64, cls.bits, torch.float16, gen)
    pre, bias = (torch.rand(256, generator=gen) + 0.5).to(DEVICE).half(), torch.randn(64, generator=gen).to(DEVICE).half()
    layer = cls(qweight, scales, 64, pre, bias)
    layer.kernel = "triton"  # what prepare() picks on sm80+; set directly so the interpreter runs it on CPU
    for rows in (1, 8, wq.GEMV_ROWS + 1):
        x = torch.randn(rows, 256, generator=gen).to(DEVICE).half()
        ref = (x * pre).double() @ layer.dequantize().double().T + bias.double()
        assert _rel(layer(x[None])[0], ref) < TOL[torch.float16], rows
