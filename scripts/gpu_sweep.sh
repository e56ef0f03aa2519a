#!/usr/bin/env bash
# The README's main command on one GPU with no network, and where its wall time goes:
#   bash scripts/gpu_sweep.sh OUT_DIR [overrides...]
# runs `python -m kvexp.run -m quant=fp16,int8kv,awq context=short,long` on a random-weight checkpoint of the default
# model's shape (Qwen2.5-1.5B, made here), with the offline share of eval=default (eval=long: the retrieval tasks at the
# run's context) and the shipped calibration text in place of cnn_dailymail (both from the Hub online). Then prints
# the sweep's table and every run's stage wall times (time.<stage>_s, quant.calib_s), and copies the store to OUT_DIR.
# Extra arguments are appended to the sweep's overrides (engine=hf,torch, eval.limit=10, ...); SWEEP_S bounds the
# sweep's seconds (default: none; then Ctrl-C, which ends the running job KILLED), so what finished is tabulated.
set -euo pipefail
out=${1:?usage: gpu_sweep.sh OUT_DIR [overrides...]}; shift
repo=$(cd "$(dirname "$0")/.." && pwd)
ckpt=${KVEXP_SHAPE_CKPT:-/tmp/kvexp-qwen2.5-1.5b-shape}
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - "$ckpt" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from bench_decode import SHAPES, make_checkpoint
make_checkpoint(Path(sys.argv[1]), SHAPES["qwen2.5-1.5b"])
EOF
work=$(mktemp -d)
cd "$work"
start=$SECONDS
timeout -s INT -k 30 "${SWEEP_S:-0}" python3 -m kvexp.run -m quant=fp16,int8kv,awq context=short,long "model.path=$ckpt" eval=long \
  quant.calib.dataset=builtin "$@" || echo "gpu_sweep: the sweep exited $?"
echo "gpu_sweep: the sweep took $((SECONDS - start)) s"
mkdir -p "$out" && cp mlruns/mlflow.db "$out/sweep-mlflow.db"
python3 - <<'EOF'
from kvexp.tracking import TAG, Tracker

stages = ["model", "reference", "build", "fidelity", "accuracy", "bench"]
print("| quant | context | engine | " + " | ".join(stages) + " | of which calibration | run |")
print("|---" * (len(stages) + 5) + "|")
for r in sorted(Tracker("sqlite:///mlruns/mlflow.db", "kvexp").search(), key=lambda r: r.info.start_time):
    t, m = r.data.tags, r.data.metrics
    if t.get(TAG + "sweep") == "true":
        continue
    calib = m.get("quant.calib_s", 0) + m.get("quant.kv_calib_s", 0)
    cells = [f"{m[f'time.{s}_s']:.1f}" if f"time.{s}_s" in m else "-" for s in stages]
    wall = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1e3
    print(f"| {t.get(TAG + 'quant')} | {t.get(TAG + 'context')} | {t.get(TAG + 'engine')} | " + " | ".join(cells)
          + f" | {calib:.1f} | {wall:.1f} ({r.info.status}) |")
EOF
