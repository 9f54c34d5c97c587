#!/usr/bin/env bash
# GPU smoke check of ViT-L/14 reg4 pretraining: one command, a few minutes, numbers to compare.
#
#   scripts/gpu_check.sh [WORK_DIR]      # WORK_DIR default: a fresh temporary folder
#
# On a machine with one or more visible GPUs it generates synthetic cells (dinov2-synth), then runs
# 30 steps of dinov2/configs/train/vitl_cellsim_register.yaml (bf16, batch 32 per GPU) with torchrun
# over all visible GPUs, three times: eager ddp, train.compile=true, and train.distributed=fsdp
# (FSDP2 shards only with 2+ GPUs; with one GPU that run is plain data parallel). For each run it
# prints images/s per GPU, peak memory and the step-time fields of training_metrics.jsonl, averaged
# over the log windows after the first 10 steps (warm-up and compilation excluded).
#
# Exit status: 0 all runs finished with finite losses; 1 a run failed, timed out or logged a
# non-finite loss (its log tail is printed); 77 no GPU is visible (one line on stderr, nothing run).
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_RUN_TIMEOUT seconds per
# run (default 200, so even three stuck runs end within 10 minutes), GPU_CHECK_STEPS (default 30).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if [[ -n "${PYTHON:-}" ]]; then
    py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi

ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
if [[ "$ngpu" -lt 1 ]]; then
    echo "gpu_check: no GPU visible (torch.cuda.device_count() is 0, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): nothing checked" >&2
    exit 77
fi

steps=${GPU_CHECK_STEPS:-30}
run_timeout=${GPU_CHECK_RUN_TIMEOUT:-200}
work=${1:-$(mktemp -d -t dinov2_gpu_check.XXXXXX)}
mkdir -p "$work"
# DataLoader workers: the config's 10 per GPU, fewer when the machine has fewer cores.
workers=$(( $(nproc) / ngpu - 1 ))
workers=$(( workers < 1 ? 1 : (workers > 10 ? 10 : workers) ))
gpu_name=$("$py" -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check: $ngpu x $gpu_name, $steps steps per run, batch 32 per GPU, $workers workers per GPU, in $work"

if [[ ! -d "$work/cells" ]]; then
    # dinov2-synth (the console script) without needing the package installed: 8 classes x 40 images
    "$py" -m dinov2.data.synthetic --out "$work/cells" --per-class 40 --size 128 --seed 0
fi

failed=0
run() {  # run NAME [key=value ...]
    local name=$1
    shift
    local out="$work/$name"
    rm -rf "$out"
    mkdir -p "$out"
    echo "gpu_check: run $name: $*"
    local start=$SECONDS
    if ! timeout --signal=TERM --kill-after=30 "$run_timeout" \
        "$py" -m torch.distributed.run --standalone --nproc_per_node="$ngpu" dinov2/train/train.py \
        --config-file dinov2/configs/train/vitl_cellsim_register.yaml --output-dir "$out" --no-resume \
        "train.dataset_path=$work/cells" "train.max_iterations=$steps" train.batch_size_per_gpu=32 \
        "train.num_workers=$workers" train.log_period_iterations=5 evaluation.eval_period_iterations=0 \
        train.checkpoint_period_iterations=1000000 "$@" >"$out/run.log" 2>&1; then
        echo "gpu_check: run $name FAILED (exit status or timeout after ${run_timeout}s); last lines of $out/run.log:"
        tail -n 30 "$out/run.log"
        failed=1
        return
    fi
    if ! "$py" - "$out/training_metrics.jsonl" "$name" "$ngpu" "$steps" "$((SECONDS - start))" <<'PY'; then
import json, math, statistics, sys

path, name, ngpu, steps, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
records = [json.loads(line) for line in open(path) if line.strip()]
if not records or records[-1]["iteration"] != steps:
    sys.exit(f"gpu_check: run {name}: training_metrics.jsonl ends at iteration "
             f"{records[-1]['iteration'] if records else 'none'}, expected {steps}")
bad = [(r["iteration"], k, v) for r in records for k, v in r.items()
       if k.endswith("loss") and not (isinstance(v, (int, float)) and math.isfinite(v))]
if bad:
    sys.exit(f"gpu_check: run {name}: non-finite loss {bad[0][1]}={bad[0][2]} at iteration {bad[0][0]}")
steady = [r for r in records if r["iteration"] > 10] or records  # skip warm-up and compilation
mean = lambda key: statistics.fmean(r[key] for r in steady)  # noqa: E731
times = [k for k in steady[0] if k.endswith("_time") and k != "wall_time"]
split = ", ".join(f"{k} {1000 * mean(k):.0f} ms" for k in times)
print(f"gpu_check: {name}: {mean('images_per_second') / ngpu:.1f} img/s per GPU, "
      f"peak memory {max(r['peak_memory_mb'] for r in records):.0f} MiB, {split}, "
      f"total_loss {records[-1]['total_loss']:.3f}, wall {wall} s")
PY
        failed=1
    fi
    rm -rf "$out/checkpoints"  # a ViT-L training checkpoint is ~5 GB; the check needs only the logs
}

run eager
run compiled train.compile=true
if [[ "$ngpu" -eq 1 ]]; then
    echo "gpu_check: note: with one GPU train.distributed=fsdp does not shard (same as the eager run)"
fi
run fsdp train.distributed=fsdp
if [[ "$failed" -ne 0 ]]; then
    echo "gpu_check: FAILED (see above)"
    exit 1
fi
echo "gpu_check: all runs passed"
