#!/usr/bin/env bash
# The whole CUDA picture in one command, for whoever has a GPU for a few minutes:
#   scripts/gpu_check.sh [OUT_DIR]        (default: gpu_check/; `make test-gpu` runs it)
# Writes OUT_DIR/summary.txt (GPU, versions, pass/fail), OUT_DIR/pytest.log (the gpu-marked tests,
# tests/test_gpu.py) and OUT_DIR/measurements.jsonl (per method: s/step and peak memory as ratios
# against SFT; CUDA-vs-CPU agreement of the first generated tokens; the 2-GPU comparison when 2 GPUs
# are present). Paste summary.txt and measurements.jsonl into EXPERIMENTS.md.
set -u
OUT_DIR=${1:-gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
if ! $PY -c "import ftsafety, pytest" 2>/dev/null; then
  echo "gpu_check: $PY cannot import ftsafety and pytest; run make install (or PY=/path/to/venv/bin/python)" >&2
  exit 2
fi
rm -f "$OUT_DIR/measurements.jsonl"
{
  echo "# ftsafety gpu_check, $(date -u '+%Y-%m-%d %H:%M UTC'), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| gpus', torch.cuda.device_count(), \
'| bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} > "$OUT_DIR/summary.txt" 2>&1
start=$(date +%s)
FTSAFETY_GPU_REPORT="$OUT_DIR/measurements.jsonl" $PY -m pytest -m gpu -p no:cacheprovider -rs -s -q tests/test_gpu.py \
  > "$OUT_DIR/pytest.log" 2>&1
rc=$?
{
  echo "pytest -m gpu: exit $rc in $(( $(date +%s) - start )) s"
  tail -n 3 "$OUT_DIR/pytest.log"
} >> "$OUT_DIR/summary.txt"
cat "$OUT_DIR/summary.txt"
exit $rc
