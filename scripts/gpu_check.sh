#!/usr/bin/env bash
# Check the CLIP pipeline on one NVIDIA GPU without network: ViT-B-32 with random weights,
# synthetic images; times fine-tuning steps, an evaluation pass and a NegMerge merge of 8
# checkpoints on the GPU, and prints a table. Finishes within 5 minutes (timeout below).
#
#   scripts/gpu_check.sh                       # uses ./.venv/bin/python, or $PYTHON
#   scripts/gpu_check.sh --device cpu --tiny   # dry run of the script itself, no GPU needed
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONWARNINGS=ignore::FutureWarning
if [[ " $* " != *" --device cpu "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 300 "$PYTHON" scripts/gpu_check.py "$@"
