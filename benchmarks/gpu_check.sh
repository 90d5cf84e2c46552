#!/usr/bin/env bash
# The GPU check of issue 18, for one lent GPU (an H200 with torch + CUDA and transformers, but no
# TRL and no network): install the wheels that travelled with the checkout, run the CUDA-marked
# tests, bench_step on SmolLM2 in bf16-mixed vs TRL (bf16, same settings), bench_sampler on the
# GPU (built-in vs HF generate); every line of output goes to one file.
#
#   benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--wheels DIR] [--model DIR]
#
# --dry-run (runs anywhere, no GPU): checks the wheels and the model folder it would use and
# prints the commands it would run; exits non-zero naming what is missing.
# Budget: <= 8 minutes on the GPU (each step has its own timeout below).
# Wheels: `pip download --no-deps -d .whl trl==1.16.0 accelerate datasets dill multiprocess
# xxhash` on a machine with PyPI (pyarrow and pandas too if the GPU machine lacks them).
# Model: SmolLM2-135M-Instruct as examples/smollm2_reasoning/prepare.py writes it (~540 MB in
# fp32: more than a 64 MiB carry; it must already be on the GPU machine or under shared/).
set -uo pipefail

DRY=0
OUT="benchmarks/gpu_check_results.txt"
WHEELS=".whl"
MODEL="runs/smollm2-135m-instruct"
PY="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --model) MODEL="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out, --wheels, --model)" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.." || exit 2

# what TRL 1.16 needs beyond torch and transformers
NEED_WHEELS="trl accelerate datasets dill multiprocess xxhash"
STEPS=(
  "timeout 120 $PY -m pip install --no-index --no-deps $WHEELS/*.whl"
  "timeout 120 $PY -m pip install --no-deps --no-build-isolation -e ."
  "timeout 30 $PY -c 'import torch, transformers, trl; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \"transformers\", transformers.__version__, \"trl\", trl.__version__)'"
  "timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/"
  "timeout 170 $PY benchmarks/bench_step.py --configs smol --device cuda --precision bf16-mixed --repeats 3"
  "timeout 90 $PY benchmarks/bench_sampler.py --device cuda --repeats 3"
)

missing=()
for w in $NEED_WHEELS; do
  ls "$WHEELS"/"$w"-*.whl >/dev/null 2>&1 || missing+=("$WHEELS/$w-*.whl")
done
[ -f "$MODEL/config.json" ] || missing+=("$MODEL/config.json (SmolLM2-135M-Instruct)")

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh --dry-run: would write $OUT, running:"
  for s in "${STEPS[@]}"; do echo "  $s"; done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]}" >&2
    exit 1
  fi
  echo "wheels and model present"
  exit 0
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check.sh: missing ${missing[*]} (see the header of this script)" >&2
  exit 1
fi
export GRPO_AR_SMOLLM2="$MODEL"
{
  echo "# gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  status=0
  for s in "${STEPS[@]}"; do
    echo "## $s"
    start=$(date +%s)
    bash -c "$s" 2>&1
    rc=$?
    echo "## rc $rc, $(($(date +%s) - start)) s"
    [ $rc = 0 ] || status=1
  done
  exit $status
} 2>&1 | tee "$OUT"
exit "${PIPESTATUS[0]}"
