"""Multi-process training on CPU with torchrun (gloo): DDP and FSDP2 match one process on the same
global batch, checkpoints written by 2 processes resume with 1 (dinov2/train/train.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.train import checkpointing

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Per-sample terms only, so that 2 processes x 2 images equal 1 process x 4 images up to rounding:
# no KoLeo (a within-batch nearest-neighbour term), no iBOT (masks are drawn per process batch), no
# stochastic depth. DINO's center / Sinkhorn statistics are all-reduced across processes.
EQUIVALENT = [
    "student.depth=2",
    "crops.local_crops_number=2",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=4",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "train.log_period_iterations=1",
    "train.checkpoint_period_iterations=2",
    "train.checkpoint_keep=10",
    "train.collapse_check_period_iterations=0",
    "dino.head_n_prototypes=64",
    "dino.koleo_loss_weight=0",
    "ibot.loss_weight=0",
    "ibot.mask_sample_probability=0",
    "student.drop_path_rate=0",
    "optim.scaling_rule=none",
]


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return generate_synthetic_cells(
        tmp_path_factory.mktemp("cells"), per_class=3, size=48, seed=0, progress=False
    )


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(launcher, data, out, batch, *extra):
    cmd = [
        *launcher,
        "dinov2/train/train.py",
        "--config-file",
        "train/vit_tiny_cpu",
        "--output-dir",
        str(out),
    ]
    cmd += [f"train.dataset_path={data}", f"train.batch_size_per_gpu={batch}", *EQUIVALENT, *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _torchrun(n):
    return [TORCHRUN, "--standalone", f"--nproc_per_node={n}"]


def _state(out, iteration):
    return checkpointing.load_checkpoint_file(out / "checkpoints" / checkpointing.checkpoint_name(iteration))


def _losses(out):
    lines = (out / "training_metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["total_loss"] for r in map(json.loads, lines)}


def _assert_same_training(out, reference, iteration):
    """Same losses at every iteration and the same weights, up to float32 summation order.

    Weights get a looser bound than losses: AdamW divides by sqrt(v), which turns a rounding-level
    difference in a near-zero gradient into an update difference of up to lr (8e-3 here).
    """
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-4)
    a, b = _state(out, iteration)["model"], _state(reference, iteration)["model"]
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 2e-3, worst


@pytest.mark.slow
def test_ddp_two_processes_then_resume_with_one(cells, tmp_path):
    single = tmp_path / "single"
    _train([sys.executable], cells, single, 4, "train.max_iterations=4")

    ddp = tmp_path / "ddp"
    _train(_torchrun(2), cells, ddp, 2, "train.max_iterations=4")
    state = _state(ddp, 4)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["sampler"]["position"] == 4 * 2 * 2  # 4 iterations x 2 processes x 2 images
    # Same global stream and per-sample augmentation: DDP on 2 x 2 images equals 1 x 4 images.
    _assert_same_training(ddp, single, 4)
    assert state["model"]["dino_loss.center"].abs().sum() > 0

    # Resume the 2-process run with 1 process (4 images per iteration): the stream continues.
    proc = _train([sys.executable], cells, ddp, 4, "train.max_iterations=6")
    assert "checkpoint was written by 2 processes, this run has 1" in proc.stdout + proc.stderr
    resumed = _state(ddp, 6)
    assert resumed["iteration"] == 6 and resumed["world_size"] == 1
    assert resumed["sampler"]["position"] == 16 + 2 * 4
    lines = [json.loads(x) for x in (ddp / "training_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_fsdp2_on_cpu_matches_one_process(cells, tmp_path):
    single = tmp_path / "single"
    _train([sys.executable], cells, single, 4, "train.max_iterations=2")
    fsdp = tmp_path / "fsdp"
    fp32 = [
        f"compute_precision.student.{p}.mixed_precision.param_dtype=fp32" for p in ("backbone", "dino_head")
    ]
    fp32 += [
        f"compute_precision.teacher.{p}.mixed_precision.param_dtype=fp32" for p in ("backbone", "dino_head")
    ]
    _train(_torchrun(2), cells, fsdp, 2, "train.distributed=fsdp", "train.max_iterations=2",
           "compute_precision.student.backbone.sharding_strategy=FULL_SHARD", *fp32)  # fmt: skip
    state = _state(fsdp, 2)
    assert state["world_size"] == 2
    # Full (unsharded) tensors in the checkpoint, equal to the 1-process run up to rounding.
    _assert_same_training(fsdp, single, 2)
    assert (fsdp / "eval" / "2" / "teacher_checkpoint.pth").is_file()
    # Head warm-up under FSDP2: both iterations fall in optim.freeze_last_layer_epochs (1 epoch = 4
    # iterations), so the student's last layer never moved and the EMA teacher's copy still equals it
    # (up to the EMA's float rounding), while the rest of the head trained (by ~lr) and the teacher
    # lags behind it.
    model = state["model"]

    def gap(key):
        return (model[key] - model[key.replace("student.", "teacher.", 1)]).abs().max().item()

    last = [k for k in model if k.startswith("student.dino_head.last_layer")]
    mlp = [k for k in model if k.startswith("student.dino_head.mlp") and k.endswith("weight")]
    assert last and mlp
    assert max(gap(k) for k in last) < 1e-6
    assert min(gap(k) for k in mlp) > 1e-4
    # An FSDP checkpoint resumes in a plain single-process run.
    _train([sys.executable], cells, fsdp, 4, "train.max_iterations=3")
    assert torch.isfinite(_state(fsdp, 3)["model"]["student.backbone.cls_token"]).all()
