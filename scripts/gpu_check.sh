#!/usr/bin/env bash
# The GPU side of kvexp in one go, each part bounded in time so one slow part cannot take the others down:
#   bash scripts/gpu_check.sh OUT_DIR [tests] [attention] [linears] [kv] [hf]
#   tests      pytest over the files whose cases run on CUDA when it is there (kernels vs references, the engine,
#              the organism; their CPU-only cases skip)
#   attention  python -m kvexp.bench.kernels: decode attention, both head layouts, and the prefill cache write
#   linears    scripts/bench_decode.py --quick: the linear kernels side by side at 512 context, both model shapes
#   kv         scripts/bench_decode.py --kv: fp16 vs int8kv / fp8kv / int4kv end to end, 512 and 32k context
#   hf         scripts/bench_decode.py: Hugging Face transformers' best path (static cache + compile) as a baseline
# Needs hydra-core, omegaconf and antlr4 importable (kvexp.config); every log and JSON goes to OUT_DIR.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [parts...]}; shift
mkdir -p "$out"
parts=${*:-tests attention linears kv hf}
export PYTHONUNBUFFERED=1
run() {  # run NAME SECONDS CMD...: the part's output to OUT/NAME.log, its exit code in the summary
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/summary.txt"
for part in $parts; do
  case $part in
    tests) run tests "${TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider -m "not slow" \
             tests/test_gpu_engine.py tests/test_kernels.py tests/test_wq_matmul.py tests/test_kv.py tests/test_lm_head.py \
             tests/test_model.py ${HF_TESTS:-} ;;
    attention) run attention "${ATTENTION_S:-110}" python3 -m kvexp.bench.kernels --prefill-write --json "$out/attention.json" ;;
    linears) run linears "${LINEARS_S:-170}" python3 scripts/bench_decode.py --quick --skip a k hf --budget-s 120 \
               --json "$out/linears.json" ;;
    kv) run kv "${KV_S:-200}" python3 scripts/bench_decode.py --quick --kv --skip a k kernels hf --json "$out/kv.json" ;;
    hf) run hf "${HF_S:-150}" python3 scripts/bench_decode.py --quick --skip a k kernels --json "$out/hf.json" ;;
    *) echo "gpu_check: unknown part $part" >&2; exit 2 ;;
  esac
done
cat "$out/summary.txt"
