#!/usr/bin/env bash
# Install NVIDIA TensorRT-LLM 1.0-1.2 and kvexp on a Linux GPU machine: Colab (A100, H100, L4) or any Ubuntu VM.
#
#   bash scripts/setup_colab.sh                                   # newest release before 1.3
#   TRTLLM_SPEC='tensorrt-llm==1.0.0' bash scripts/setup_colab.sh  # a specific one
#
# Order matters: each TensorRT-LLM wheel pins the torch (and transformers, nvidia-modelopt) it was built against,
# so it goes first and pip picks that torch; kvexp follows under a constraints file that keeps those pins.
# See docs/trtllm.md. Not run in CI (no GPU there).
set -euo pipefail

TRTLLM_SPEC="${TRTLLM_SPEC:-tensorrt-llm>=1.0,<1.3}"  # 1.3 removed the TensorRT-engine backend that INT8 KV needs
NVIDIA_INDEX="https://pypi.nvidia.com"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"

die() { echo "setup_colab: $*" >&2; exit 1; }

# 1. A GPU TensorRT-LLM 1.x supports: Ampere (sm80) or newer. A T4 (sm75) is not; engine=torch runs there.
command -v nvidia-smi >/dev/null || die "no NVIDIA driver (nvidia-smi not found): engine=trtllm needs a GPU; use engine=torch"
name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' ')"
[ "${cap%%.*}" -ge 8 ] || die "$name (compute capability $cap) is older than TensorRT-LLM 1.x supports (sm80+); use engine=torch"

# 2. Python: the 1.x wheels are built for CPython 3.10 and 3.12 on Linux.
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$pyver" in 3.10|3.12) ;; *) die "Python $pyver: TensorRT-LLM 1.x wheels exist for Python 3.10 and 3.12" ;; esac

# 3. OpenMPI: the TensorRT-LLM executor loads libmpi when imported.
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq libopenmpi-dev

# 4. TensorRT-LLM from NVIDIA's index, with the torch its wheel pins.
"$PY" -m pip install --upgrade pip setuptools wheel
"$PY" -m pip install --extra-index-url "$NVIDIA_INDEX" "$TRTLLM_SPEC"

# 5. kvexp, editable, without moving what TensorRT-LLM pinned.
constraints="$(mktemp)"
"$PY" -m pip freeze | grep -i -E '^(torch|triton|tensorrt|tensorrt[-_]llm|transformers|nvidia-modelopt)==' > "$constraints"
"$PY" -m pip install --extra-index-url "$NVIDIA_INDEX" -c "$constraints" -e "$REPO"
"$PY" -m pip check || echo "setup_colab: pip reports conflicts (above); see docs/trtllm.md, Troubleshooting" >&2

# 6. Import in a child process with a deadline: a broken MPI set-up hangs at import (NVIDIA/TensorRT-LLM#2426).
timeout 900 "$PY" -c "import tensorrt_llm; print('tensorrt_llm', tensorrt_llm.__version__)" \
    || die "importing tensorrt_llm failed or hung; see docs/trtllm.md, Troubleshooting"
(cd "$REPO" && "$PY" -m kvexp.run engine=trtllm engine.dry_run=true experiment=smoke > /dev/null) \
    || die "kvexp could not plan an engine=trtllm run"
echo "setup_colab: ready on $name (compute capability $cap). Next:"
echo "  python -m pytest -m trtllm tests/test_trtllm.py     # builds, runs and reuses a tiny engine (minutes)"
echo "  python -m kvexp.run -m quant=fp16,int8kv,awq engine=trtllm model=llama3.2-1b"
