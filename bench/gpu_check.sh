#!/usr/bin/env bash
# usage: bench/gpu_check.sh [--quick] [--dry-run]
#   (OUT=dir: where results go; PYTHON: the interpreter, default python3; BENCH_CACHE: generated images)
#
# One command for the day a GPU is there (ours, or a user checking an install):
#   pytest-gpu           compiled-kernel parity and every other GPU-only test (full mode only; junit XML)
#   ops                  the Mix Block ops at the presets, Triton against torch (and the attention with its
#                        backward tiled otherwise), and the copy bandwidth
#   train-imagenet-r50   train-step img/s, resnet50 224 px b128: vanilla / mixup / automix eager,
#                        automix in the reference configuration, vanilla / mixup compiled; automix profiled;
#                        quick mode also automix replayed as CUDA graphs, and vanilla compiled and replayed;
#                        last, fp16 (GradScaler; cuDNN's BatchNorm): vanilla and automix eager, automix
#                        replayed (full mode: automix replayed in bf16 and fp16, fp16 automix profiled)
#   train-cifar-r18      resnet18_cifar 32 px b100: vanilla / mixup / automix eager, vanilla / mixup
#                        compiled; automix and vanilla profiled (GPU-busy share, kernels per step);
#                        quick mode also vanilla / mixup / automix replayed as CUDA graphs,
#                        automix's whole step compiled, eager and replayed, and automix with
#                        --q-batched, eager and replayed
#   train-imagenet-r18   resnet18 224 px b256: vanilla / mixup, eager and compiled
#   loader               the torch loader (and DALI when installed) at 224 px with every CPU as a worker;
#                        full mode also the CIFAR cases
# then bench/gpu_summary.py gathers every figure into OUT/gpu-check.json.
# --quick: fewer steps and repetitions, no pytest stage, the 224 px loader only; stage time limits add
#   up to 285 s, leaving ~15 s for the environment record and the summary, so the check (imports and
#   compile warm-ups included) ends within 5 minutes on one H100/H200.
# Full mode: stage limits add up to 590 s, within 10 minutes.
# --dry-run: every stage at tiny sizes on the CPU (tinynet, 1 step; the ops under the Triton
#   interpreter; no torch.compile), to check the scripts and the summary without a GPU; the
#   figures that need CUDA are null with the reason.
# Each stage writes JSON and a log to OUT (default bench/results/gpu-check-<time>/), and a line to
# OUT/stages.jsonl (exit status, seconds, limit). A failing or timed-out stage is recorded and the
# next one still runs; the exit status is 1 when any stage failed, 2 without a GPU (unless --dry-run).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
MODE=full
DRY=0
for arg in "$@"; do
  case $arg in
    --quick) MODE=quick ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown option $arg (expected --quick, --dry-run)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-bench/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}
CACHE=${BENCH_CACHE:-${HOME:-/tmp}/.cache/automix-fast/bench}
mkdir -p "$OUT"
: > "$OUT/stages.jsonl"

env_args=(--mode "$MODE")
if [ "$DRY" = 1 ]; then env_args+=(--dry-run); else env_args+=(--require-cuda); fi
$PY bench/gpu_summary.py "$OUT" --record-env "${env_args[@]}" || exit $?

status=0
stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2 rc t0 t1 ms
  shift 2
  echo "== $name (limit ${limit} s)"
  t0=$(date +%s%N)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  printf '{"stage": "%s", "rc": %d, "seconds": %d.%03d, "limit_s": %d, "log": "%s.log"}\n' \
    "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" "$name" >> "$OUT/stages.jsonl"
  if [ $rc = 0 ]; then echo "   ok ($OUT/$name.log)"
  elif [ $rc = 124 ] || [ $rc = 137 ]; then echo "   TIMED OUT after ${limit} s (see $OUT/$name.log)"; status=1
  else echo "   FAILED (exit $rc; see $OUT/$name.log)"; status=1; fi
}
train() {  # train PRESET TIMEOUT_S ARGS...: bench_train_step.py into OUT/train-PRESET.json
  # A row still to start 70% into the stage's limit (counted from the first row, after imports and
  # CUDA start-up) is skipped (recorded so), not cut off by it.
  local preset=$1 limit=$2
  shift 2
  stage "train-$preset" "$limit" $PY bench/bench_train_step.py "$@" --trace-dir "$OUT/traces" \
    --time-budget $((limit * 7 / 10)) --output "$OUT/train-$preset.json"
}

if [ "$DRY" = 1 ]; then
  # CPU: tiny sizes, one step; no torch.compile (minutes on a CPU), so the compiled figures are null.
  tiny=(--model tinynet --img-size 16 -b 4 --num-classes 10 --steps 1 --repeats 1 --profile-steps 1 --device cpu)
  [ "$MODE" = full ] && stage pytest-gpu 120 $PY -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$OUT/pytest-gpu.xml" -o junit_suite_name=gpu tests
  stage ops 120 env TRITON_INTERPRET=1 $PY bench/bench_ops.py --smoke --providers triton torch triton-tiled --modes nearest \
    --output "$OUT/ops.json"
  train imagenet-r50 120 "${tiny[@]}" --runs optimized:vanilla optimized:mixup optimized:automix reference:automix \
    graphed:automix optimized-fp16:vanilla optimized-fp16:automix graphed-fp16:automix --profile optimized:automix
  train cifar-r18 120 "${tiny[@]}" --runs optimized:vanilla optimized:mixup optimized:automix graphed:vanilla \
    graphed:mixup graphed:automix optimized:automix-q-batched graphed:automix-q-batched --profile optimized:automix
  train imagenet-r18 120 "${tiny[@]}" --runs optimized:vanilla optimized:mixup
  stage loader 120 $PY bench/bench_loader.py --device cpu --workers all -b 4 --imagenet-count 8 --warmup 1 \
    --batches 1 --only imagenet/dali,imagenet/torch-stream --cache-dir "$CACHE" --out "$OUT/loader.json"
elif [ "$MODE" = quick ]; then
  # Per stage, an estimate (not a measurement) of its H200 seconds, imports, Triton JIT and
  # torch.compile warm-ups included; a training stage starts no row past 70% of its limit (those
  # are recorded as skipped), and a stage past its limit keeps the rows it finished.
  # ~30 s: 3 presets x (attention, mask_mix nearest) x (triton, torch), copy bandwidth; then, last
  # (cut first), the attention's backward with tiling "tiled" (triton-tiled) at the D = 128 presets
  # The limits add up to 285 s (the environment record and the summary take the rest of 5
  # minutes); the rows of a stage run in order of need, so a stage cut short keeps the figures
  # that matter most.
  stage ops 35 $PY bench/bench_ops.py --providers triton torch triton-tiled --modes nearest --warmup-ms 10 --rep-ms 30 \
    --output "$OUT/ops.json"
  # ~85 s: ~45 of them compiling resnet50 (compiled mixup and the graphed compiled vanilla reuse
  # vanilla's compiled code from inductor's cache)
  train imagenet-r50 90 --model resnet50 --img-size 224 -b 128 --num-classes 1000 --steps 8 --repeats 2 \
    --runs optimized:vanilla optimized:mixup optimized:automix graphed:automix reference:automix compiled:vanilla \
    compiled:mixup graphed-compiled:vanilla optimized-fp16:vanilla optimized-fp16:automix graphed-fp16:automix \
    --profile optimized:automix
  # ~105 s: ~30 of them compiling resnet18_cifar, ~40 compiling AutoMix's whole step, twice (2
  # graphs each; the graphed one from inductor's cache; the warm-up epoch, steps 0-19 of seed 0,
  # has both kinds of step, so no compile is timed)
  train cifar-r18 100 --model resnet18_cifar --img-size 32 -b 100 --num-classes 100 --steps 20 --repeats 2 \
    --runs optimized:vanilla optimized:mixup optimized:automix graphed:vanilla graphed:mixup graphed:automix \
    compiled:vanilla compiled:mixup compiled-step:automix graphed-compiled-step:automix \
    optimized:automix-q-batched graphed:automix-q-batched --profile optimized:automix optimized:vanilla
  # ~35 s
  train imagenet-r18 35 --model resnet18 --img-size 224 -b 256 --num-classes 1000 --steps 8 --repeats 2 \
    --runs optimized:vanilla optimized:mixup compiled:vanilla compiled:mixup
  # ~20 s: 512 generated JPEGs (once per machine), 48 batches of 128
  stage loader 25 $PY bench/bench_loader.py --device cuda --workers all -b 128 --imagenet-count 512 --warmup 16 \
    --batches 32 --only imagenet/dali,imagenet/torch-stream --cache-dir "$CACHE" --out "$OUT/loader.json"
else
  stage pytest-gpu 130 $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    -o junit_suite_name=gpu tests
  stage ops 130 $PY bench/bench_ops.py --providers triton torch triton-tiled --output "$OUT/ops.json"
  train imagenet-r50 130 --model resnet50 --img-size 224 -b 128 --num-classes 1000 --steps 10 --repeats 3 \
    --runs optimized:vanilla optimized:mixup optimized:automix reference:automix compiled:vanilla compiled:mixup \
    optimized-fp16:vanilla optimized-fp16:automix graphed:automix graphed-fp16:automix \
    --profile optimized:automix optimized-fp16:automix --profile-steps 5
  train cifar-r18 70 --model resnet18_cifar --img-size 32 -b 100 --num-classes 100 --steps 20 --repeats 3 \
    --runs optimized:vanilla optimized:mixup optimized:automix compiled:vanilla compiled:mixup \
    --profile optimized:automix optimized:vanilla --profile-steps 5
  train imagenet-r18 60 --model resnet18 --img-size 224 -b 256 --num-classes 1000 --steps 10 --repeats 3 \
    --runs optimized:vanilla optimized:mixup compiled:vanilla compiled:mixup
  stage loader 70 $PY bench/bench_loader.py --device cuda --workers all -b 256 --imagenet-count 1000 \
    --cifar-count 5000 --cache-dir "$CACHE" --out "$OUT/loader.json"
fi
$PY bench/gpu_summary.py "$OUT" || status=1
echo "results: $OUT (summary: $OUT/gpu-check.json)"
exit $status
