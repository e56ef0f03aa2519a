"""Where decode time goes at long context: a torch-profiler kernel summary of fp16 vs int8kv decode on
Llama-3.2-1B's shape (random weights), batch 8, 32k context, on one GPU.

    python scripts/profile_decode.py OUT_DIR

Writes OUT_DIR/<quant>/{trace.json, kernels.csv, kernels.txt} and prints each run's decode split by class.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_decode import make_checkpoint  # noqa: E402

from kvexp.bench.profile import profile_run  # noqa: E402
from kvexp.resolve import validate  # noqa: E402
from kvexp.engines.torch_engine import TorchEngine  # noqa: E402
from kvexp.preflight import compose_job  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    ckpt = make_checkpoint(Path(tempfile.gettempdir()) / "kvexp-llama-1b-shape")
    results = {}
    for quant in ("fp16", "int8kv"):
        spec = validate(compose_job([f"model.path={ckpt}", f"quant={quant}", "model.dtype=bfloat16", "eval=none",
                                     "engine.device=cuda", "eval.fidelity.enabled=false", "context.prompt_len=32768",
                                     "context.gen_len=32", "bench.batch_size=8", "bench.profile=torch"]))
        engine = TorchEngine(spec)
        engine.build()
        results[quant] = profile_run(engine, spec, out / quant)
        engine.close()
        print(quant, (out / quant / "kernels.txt").read_text()[:3000], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
