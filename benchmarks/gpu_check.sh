#!/usr/bin/env bash
# One GPU check, under 10 minutes on one H100: P1 (training throughput, cleansweep's loop vs open_clip's) for RN50
# and ViT-B-32 in bf16; a 4-trial sweep at resources.gpu 0.25 (4 trials share one GPU) with the GPU's utilisation
# and memory sampled every second; evaluation throughput with amp off (fp32) and on (bf16).
#
#   bash benchmarks/gpu_check.sh [WORKDIR]                         # on a machine with an NVIDIA GPU
#   CLEANSWEEP_GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh [WORKDIR]  # the same steps on CPU, tiny counts
#   bash benchmarks/gpu_check.sh --dry-run [WORKDIR]               # the same as CLEANSWEEP_GPU_CHECK_CPU=1
#
# Report lines start with P1, SWEEP, GPU or EVAL. Exit 2 (one line) when no GPU is visible; 1 when a step fails.
# PYTHON names the interpreter (default: python on PATH, with cleansweep importable).
set -euo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then
  CLEANSWEEP_GPU_CHECK_CPU=1
  shift
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
WORKDIR="${1:-$(mktemp -d -t gpu-check.XXXXXX)}"
mkdir -p "$WORKDIR"

if [[ "${CLEANSWEEP_GPU_CHECK_CPU:-0}" == "1" ]]; then
  # Same steps, counts small enough for 2 CPU cores in a few minutes; tiny models stand in for RN50 / ViT-B-32.
  DEVICE=cpu; MODELS="${GPU_CHECK_MODELS:-tiny-rn,tiny-vit}"; SWEEP_MODEL="${GPU_CHECK_SWEEP_MODEL:-tiny-rn}"
  P1_ARGS=(--batch-size 8 --steps 3 --repeats 1)
  SWEEP_ARGS=(--trials 2 --gpu 0 --cpu 1 --pairs 16 --batch 8 --image-size 32 --classes 2 --eval-images 10)
  EVAL_ARGS=(--images 16 --batch 8 --repeats 1)
else
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
      || ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no GPU visible (nvidia-smi or torch.cuda finds none); run it on a machine with an NVIDIA GPU," \
         "or set CLEANSWEEP_GPU_CHECK_CPU=1 for the CPU dry run" >&2
    exit 2
  fi
  DEVICE=cuda; MODELS="${GPU_CHECK_MODELS:-RN50,ViT-B-32}"; SWEEP_MODEL="${GPU_CHECK_SWEEP_MODEL:-RN50}"
  P1_ARGS=(--batch-size 128 --steps 20 --repeats 3 --amp)
  SWEEP_ARGS=(--trials 4 --gpu 0.25 --cpu 2 --pairs 512 --batch 64 --image-size 224 --classes 10 --eval-images 200)
  EVAL_ARGS=(--images 512 --batch 128 --repeats 3)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU device: /'
fi
echo "gpu_check: device $DEVICE, workdir $WORKDIR, $(date -u +%FT%TZ)"

# 1. P1 in bf16 (fp32 on CPU, where cleansweep ignores amp).
timeout 240 "$PY" "$HERE/train_throughput.py" --models "$MODELS" --device "$DEVICE" "${P1_ARGS[@]}" \
  > "$WORKDIR/p1.log" 2>&1 || { echo "gpu_check: P1 failed, see $WORKDIR/p1.log"; tail -3 "$WORKDIR/p1.log"; exit 1; }
grep '^P1 ' "$WORKDIR/p1.log"

# 2. Trials sharing one GPU, utilisation sampled every second in the background while the sweep runs.
SAMPLER=""
if [[ "$DEVICE" == cuda ]]; then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 1 > "$WORKDIR/gpu_samples.csv" &
  SAMPLER=$!
fi
status=0
timeout 300 "$PY" "$HERE/gpu_check.py" sweep "$WORKDIR/sweep" --model "$SWEEP_MODEL" --device "$DEVICE" \
  "${SWEEP_ARGS[@]}" || status=$?
if [[ -n "$SAMPLER" ]]; then
  kill "$SAMPLER" 2>/dev/null || true
  wait "$SAMPLER" 2>/dev/null || true
  "$PY" "$HERE/gpu_check.py" util "$WORKDIR/gpu_samples.csv"
else
  echo "GPU utilisation: not sampled (CPU dry run)"
fi
[[ $status -eq 0 ]] || { echo "gpu_check: the sweep failed (exit $status), see $WORKDIR/sweep/search.log"; exit 1; }

# 3. Evaluation throughput, amp off vs on, on the sweep's model at its resolution.
timeout 120 "$PY" "$HERE/gpu_check.py" eval --model "$SWEEP_MODEL" --device "$DEVICE" "${EVAL_ARGS[@]}"
echo "gpu_check: done"
