#!/usr/bin/env bash
# One command for the day a GPU is there (ours, or a user checking an install), < 10 min on one H100:
#   1. compiled-kernel parity and every other GPU-only test   (pytest -m gpu -> JSON report)
#   2. the Mix Block ops at the presets                       (bench_ops.py -> JSON)
#   3. train-step img/s at ResNet-50/224 and ResNet-18/CIFAR  (bench_train_step.py -> JSON)
#   4. the DALI loader against the torch loaders              (bench_loader.py -> JSON)
# Everything lands in bench/results/gpu-check-<date>/ (override with OUT=...). A failing stage is
# recorded and the next one still runs; the exit status is non-zero when any stage failed.
# Stage time limits add up to 580 s, so the whole check ends within 10 minutes.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to torch; gpu_check.sh needs a GPU" >&2
  exit 2
fi
status=0
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then echo "   ok ($OUT/$name.log)"
  else echo "   FAILED (exit $?; see $OUT/$name.log)"; status=1; fi
}
stage pytest-gpu 180 $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
  -o junit_suite_name=gpu tests
stage ops 150 $PY bench/bench_ops.py --providers triton torch --output "$OUT/ops.json"
stage train-step-r50 100 $PY bench/bench_train_step.py --model resnet50 --img-size 224 -b 128 --num-classes 1000 \
  --mixes mixup automix --steps 10 --repeats 3 --output "$OUT/train-step-r50.json"
stage train-step-cifar 50 $PY bench/bench_train_step.py --model resnet18_cifar --img-size 32 -b 100 --num-classes 100 \
  --mixes mixup automix --steps 20 --repeats 3 --output "$OUT/train-step-cifar-r18.json"
stage loader 100 $PY bench/bench_loader.py --device cuda --workers 8 -b 256 --imagenet-count 1000 \
  --cifar-count 5000 --out "$OUT/loader.json"
echo "results: $OUT"
exit $status
