"""Compile the decode-attention stage 1 for sm_90 on a machine without a GPU (triton.compile with a target):
registers, spills, shared memory and SASS instruction mix per variant."""
import collections, re, subprocess, sys, tempfile, os
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvexp.core.kernels import decode_attention as da

def sig(fmt):
    kv = {"dense": "*bf16", "int8": "*i8", "fp8": "*u8", "int4": "*u8"}[fmt]
    return kv

def compile_variant(fmt, mode, G, D, block_n, warps, stages, knat, scales=1):
    kv = {"dense": "*bf16", "int8": "*i8", "fp8": "*u8" if mode in ("asm", "mma", "mma2") else "*fp8e4nv", "int4": "*u8"}[fmt]
    names = list(da._split_kernel.arg_names)
    sig = {}
    types = dict(q="*bf16", k=kv, v=kv, k_scale="*bf16", v_scale="*bf16", lengths="*i32", part_out="*fp32",
                 part_lse="*fp32", qk_scale="fp32", num_splits="i32")
    consts = dict(G=G, BLOCK_H=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n, FMT=da.FMT_CODES[fmt],
                  MODE=da.DEQUANT_MODES[mode if fmt != "dense" else "cvt"], ASM=mode in ("asm", "mma", "mma2"),
                  SCALES=scales if fmt != "dense" else 0, K_NATURAL=knat, NORM_V=mode != "cvt")
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        else:
            sig[n] = types.get(n, "i32")
    div = [i for i, n in enumerate(names) if n not in consts and n not in ("qk_scale", "num_splits", "s_st", "s_lh", "s_ps")]
    src = triton.compiler.ASTSource(fn=da._split_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                                    attrs={(i,): [["tt.divisibility", 16]] for i in div})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    return k

if __name__ == "__main__":
    fmt, mode, G, D, bn, w, s, kn = sys.argv[1:9]
    k = compile_variant(fmt, mode, int(G), int(D), int(bn), int(w), int(s), kn == "1")
    cubin = k.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    nvd = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    res = subprocess.run([str(nvd.parent / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    print("warps", k.metadata.num_warps, "stages", k.metadata.num_stages, "shared", k.metadata.shared, re.findall(r"REG:\d+.*", res))
    sass = subprocess.run([str(nvd), "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M))
    print(sum(ops.values()), "instr;", ", ".join(f"{o}:{c}" for o, c in ops.most_common(28)))
    if len(sys.argv) > 9:
        Path(sys.argv[9]).write_text(sass)
