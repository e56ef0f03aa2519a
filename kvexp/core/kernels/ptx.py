"""Inline PTX shared by the kernels: the grid-dependency wait of programmatic dependent launch, and the unpacking
of kvexp's int4 codes (two per byte, low nibble first, code + 8) for the decode attention kernel and the W4A16
GEMV: lop3 places a nibble under a float's exponent and one fused subtract per two values gives code - 8, exactly,
where Triton's casts issue one I2F per value. Each returns (even, odd) elements of the packed tile, so the caller
dots them against the matching halves of its other operand. Marked impure (is_pure=False), which keeps Triton from
hoisting the conversion into a dot operand's layout (decode_attention's DEQUANT_MODES). CUDA only: Triton's
interpreter runs no PTX, so callers keep a cast path beside these.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: keep this module importable
    from kvexp.core.kernels import _MissingTriton as triton, _MissingTriton as tl
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no triton, or one before 3.3: kernels.pdl is then False, so wait_for_producer never calls these
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def wait_for_producer(PDL: tl.constexpr):
    """Under programmatic dependent launch (kernels.pdl), wait until the kernel before has finished and its writes
    are visible, then let the next kernel launch. Every program of a PDL launch calls this before its first load or
    store: a program that starts early then overlaps only its predecessor's tail, never reads what that kernel
    writes, and since each kernel waits on the one before, the chain orders the whole step as a plain launch does."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def int4_halves_f16(x):
    """int4 bytes (low nibble: even element) -> (even, odd) float16 code - 8 (exact), 8 values in 10
    instructions: lop3 puts a nibble under 0x6400 (1024 + c, or 1024 + 16 c for the high one), then one
    sub.f16x2 of 1032 or one fma.f16x2 by 1/16 minus 72 per 2 values (the AWQ / FasterTransformer trick)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 x, y, c, s, t;
        prmt.b32 x, $4, $4, 0x3120;
        shr.b32 y, x, 8;
        lop3.b32 $0, x, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $1, y, 0x000F000F, 0x64006400, 0xEA;
        lop3.b32 $2, x, 0x00F000F0, 0x64006400, 0xEA;
        lop3.b32 $3, y, 0x00F000F0, 0x64006400, 0xEA;
        mov.b32 c, 0x64086408;
        mov.b32 s, 0x2C002C00;
        mov.b32 t, 0xD480D480;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        fma.rn.f16x2 $2, $2, s, t;
        fma.rn.f16x2 $3, $3, s, t;
        }""", "=r,=r,=r,=r,r", [x], dtype=(tl.float16, tl.float16), is_pure=False, pack=4)


@triton.jit
def int4_halves_bf16(x):
    """int4 bytes (low nibble: even element) -> (even, odd) bfloat16 code - 8 (exact), 8 values in 13 instructions:
    lop3 puts a nibble under bfloat16's 128.0 (0x4300: 128 + c, exact, the mantissa's step there being 1), one
    fma.rn.bf16x2 by 1 minus 136 per 2 values. bfloat16's 7 mantissa bits have no room for a high nibble in place
    (float16's trick), so it is shifted down first. Same element order as int4_halves_f16."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 x, y, xh, yh, one, c;
        prmt.b32 x, $4, $4, 0x3120;
        shr.b32 y, x, 8;
        shr.b32 xh, x, 4;
        shr.b32 yh, x, 12;
        lop3.b32 $0, x, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, y, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $2, xh, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $3, yh, 0x000F000F, 0x43004300, 0xEA;
        mov.b32 one, 0x3F803F80;
        mov.b32 c, 0xC308C308;
        fma.rn.bf16x2 $0, $0, one, c;
        fma.rn.bf16x2 $1, $1, one, c;
        fma.rn.bf16x2 $2, $2, one, c;
        fma.rn.bf16x2 $3, $3, one, c;
        }""", "=r,=r,=r,=r,r", [x], dtype=(tl.bfloat16, tl.bfloat16), is_pure=False, pack=4)
