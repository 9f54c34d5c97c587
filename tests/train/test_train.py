"""The training loop end to end on CPU (dinov2/train/train.py): outputs, logs, checkpoints, exports,
non-finite losses, corrupt images, bad configs, continued pretraining and real learning."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.models.weights import export_backbone, load_backbone
from dinov2.train import checkpointing
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import (
    CollapseError,
    NonFiniteLossError,
    build_backbones,
    build_data,
    build_model,
    fix_random_seeds,
    get_args_parser,
    main,
)
from dinov2.utils.config import ConfigError
from dinov2.utils.distributed import DistributedInfo

# A very small version of the tiny CPU config: every test below runs a few iterations in seconds.
FAST = [
    "student.depth=2",
    "train.batch_size_per_gpu=4",
    "crops.local_crops_number=2",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=3",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1",
    "teacher.teacher_temp=0.07",  # a warm-up 0.04 -> 0.07 to check the schedule in the logs
    "train.log_period_iterations=1",
    "train.checkpoint_period_iterations=2",
    "train.checkpoint_keep=2",
    "train.collapse_check_period_iterations=3",
    "evaluation.eval_period_iterations=4",
    "dino.head_n_prototypes=64",
    "ibot.head_n_prototypes=64",
]


LOGGED_KEYS = (
    "total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr",
    "wd", "momentum", "teacher_temp", "iter_time", "data_time", "images_per_second", "peak_memory_mb",
    "eta_seconds", "forward_backward_time", "grad_sync_time", "optimizer_time",
)  # fmt: skip


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """A small synthetic PBC-like class-folder tree (8 classes x 4 images, 64 px)."""
    root = tmp_path_factory.mktemp("cells")
    return generate_synthetic_cells(root / "train", per_class=4, size=64, seed=0, progress=False)


def _run(data, out, *extra, resume=True):
    argv = ["--config-file", "train/vit_tiny_cpu", "--output-dir", str(out)]
    if not resume:
        argv.append("--no-resume")
    return main(argv + [f"train.dataset_path={data}", *FAST, *extra])


def _records(out):
    return [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]


def test_outputs_logs_checkpoints_and_teacher_export(cells, tmp_path):
    out = tmp_path / "run"
    result = _run(cells, out, f"evaluation.knn_dataset_path={cells}", "evaluation.knn_period_iterations=3")
    assert (result.status, result.iteration) == ("completed", 6)

    # The merged config is saved and reproduces the run's settings.
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.train.output_dir == str(out) and saved.student.depth == 2
    assert math.isclose(saved.optim.lr, saved.optim.base_lr * math.sqrt(4 / 1024))

    # One JSON line per iteration (log period 1) with every loss and schedule value.
    records = _records(out)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        for key in LOGGED_KEYS:
            assert key in r, key
        assert r["peak_memory_mb"] > 0 and r["images_per_second"] > 0
        # The step's phases, timed with the device synchronised, fit in the (whole) iteration time.
        phases = r["forward_backward_time"] + r["grad_sync_time"] + r["optimizer_time"]
        assert 0 < phases <= r["iter_time"] and r["forward_backward_time"] > r["optimizer_time"] > 0
    # lr: linear warm-up over the first epoch (3 iterations) from 0 to the peak, then a cosine to min_lr.
    peak = saved.optim.lr
    assert [records[i]["lr"] for i in range(3)] == pytest.approx([0.0, peak / 2, peak])
    t = 1  # iteration index 4 is step 1 of the 3-iteration cosine
    assert records[4]["lr"] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * t / 3)))
    # Teacher temperature warms up linearly 0.04 -> 0.07 over the first epoch.
    assert [r["teacher_temp"] for r in records[:4]] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    # Collapse metrics every 3 iterations, kNN every 3 iterations.
    for r in records:
        has = r["iteration"] % 3 == 0
        assert ("teacher_entropy" in r) == has and ("knn_accuracy" in r) == has
        if has:
            assert 0 <= r["teacher_entropy"] <= math.log(64) + 1e-6 and 0 <= r["knn_balanced_accuracy"] <= 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # Checkpoints every 2 iterations, the newest 2 kept; they hold the whole training state.
    assert [it for it, _ in checkpointing.list_checkpoints(out / "checkpoints")] == [4, 6]
    state = checkpointing.load_checkpoint_file(out / "checkpoints" / "model_0000006.pth")
    assert state["iteration"] == 6 and state["world_size"] == 1
    assert state["sampler"]["position"] == 6 * 4
    assert any(k.startswith("teacher.backbone.") for k in state["model"])
    assert "dino_loss.center" in state["model"] and "ibot_patch_loss.center" in state["model"]
    assert len(state["rng"]) == 1 and state["optimizer"]["state"]

    # Teacher exports at iteration 4 (eval period) and at the end; they load with the backbone loader.
    assert (out / "eval" / "4" / "teacher_checkpoint.pth").is_file()
    backbone = load_backbone(out / "eval" / "6" / "teacher_checkpoint.pth")
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, state["model"][f"teacher.backbone.{name}"]), name
    assert backbone.num_register_tokens == 4 and backbone.n_blocks == 2
    # The backbone loader also picks the EMA teacher out of a training checkpoint.
    from_training = load_backbone(out / "checkpoints" / "model_0000006.pth", checkpoint_key="teacher")
    for name, tensor in from_training.state_dict().items():
        assert torch.equal(tensor, state["model"][f"teacher.backbone.{name}"]), name

    # Running again resumes from the newest checkpoint and has nothing left to do.
    again = _run(cells, out)
    assert (again.status, again.iteration) == ("completed", 6)
    assert len(_records(out)) == 6


def test_no_resume_starts_fresh(cells, tmp_path):
    out = tmp_path / "run"
    _run(cells, out, "train.max_iterations=2")
    result = _run(cells, out, "train.max_iterations=1", resume=False)
    assert result.iteration == 1
    assert [r["iteration"] for r in _records(out)] == [1, 2, 1]


def test_non_finite_loss_saves_last_finite_state_and_names_term(cells, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    _run(cells, clean, "train.max_iterations=2", "train.checkpoint_period_iterations=100")

    real = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def poisoned(self, images, teacher_temp, grad_scaler=None):
        losses = real(self, images, teacher_temp, grad_scaler)
        calls["n"] += 1
        if calls["n"] == 3:  # iteration index 2
            losses["ibot_loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(SSLMetaArch, "forward_backward", poisoned)
    bad = tmp_path / "bad"
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: ibot_loss=nan.*model_0000002\.pth"):
        _run(cells, bad, "train.checkpoint_period_iterations=100")
    saved = checkpointing.load_checkpoint_file(bad / "checkpoints" / "model_0000002.pth")
    reference = checkpointing.load_checkpoint_file(clean / "checkpoints" / "model_0000002.pth")
    assert saved["iteration"] == 2 and saved["sampler"] == reference["sampler"]
    for key, value in reference["model"].items():
        assert torch.equal(saved["model"][key], value), key  # weights and centers before the bad step
    for pid, moments in reference["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(saved["optimizer"]["state"][pid][name], value), (pid, name)
    assert torch.equal(saved["rng"][0]["torch"], reference["rng"][0]["torch"])


def test_corrupt_images_do_not_stop_training(cells, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(cells, data)
    (data / "neutrophil" / "zero.jpg").write_bytes(b"")
    (data / "neutrophil" / "text.jpg").write_text("not an image")
    good = next((data / "lymphocyte").glob("*.jpg")).read_bytes()
    (data / "lymphocyte" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    result = _run(data, tmp_path / "run", "train.max_iterations=4", "train.max_failed_fraction=0.5",
                  "train.batch_size_per_gpu=8")  # fmt: skip
    assert (result.status, result.iteration) == ("completed", 4)
    assert all(math.isfinite(r["total_loss"]) for r in _records(tmp_path / "run"))


def test_bad_config_rejected_naming_the_key(cells, tmp_path):
    with pytest.raises(
        ConfigError, match=r"crops\.global_crops_size: must be a multiple of student\.patch_size"
    ):
        _run(cells, tmp_path / "a", "crops.global_crops_size=50")
    # From the command line: a message naming the key and the closest valid one, no traceback.
    script = [sys.executable, "dinov2/train/train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        script + ["--config-file", "train/vit_tiny_cpu", "--output-dir", str(tmp_path / "b"),
                  f"train.dataset_path={cells}", "train.batch_size=8"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "train.batch_size: unknown config key" in text and "'train.batch_size_per_gpu'" in text
    assert "Traceback" not in text
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_args_parser_contract():
    args = get_args_parser().parse_args(
        ["--config-file", "F", "--output-dir", "D", "--no-resume", "a.b=1", "c=2"]
    )
    assert (args.config_file, args.output_dir, args.no_resume, args.opts) == (
        "F",
        "D",
        True,
        ["a.b=1", "c=2"],
    )


def test_continued_pretraining_with_head_warmup(cells, tmp_path):
    cfg = OmegaConf.load("dinov2/configs/train/vit_tiny_cpu.yaml")
    cfg.student.depth = 2
    cfg.crops.global_crops_size = cfg.crops.global_crops_size
    full = OmegaConf.merge(OmegaConf.load("dinov2/configs/ssl_default_config.yaml"), cfg)
    torch.manual_seed(123)
    pretrained, _ = build_backbones(full)
    weights = export_backbone(pretrained, tmp_path / "meta_backbone.pth")
    reference = {k: v.clone() for k, v in pretrained.state_dict().items()}

    out = tmp_path / "run"
    warmup = [f"student.pretrained_weights={weights}", "student.head_warmup_iterations=2"]
    _run(
        cells,
        out,
        *warmup,
        "train.checkpoint_period_iterations=1",
        "train.checkpoint_keep=5",
        "train.max_iterations=3",
    )
    states = {
        it: checkpointing.load_checkpoint_file(p)["model"]
        for it, p in checkpointing.list_checkpoints(out / "checkpoints")
    }
    for it in (1, 2):  # backbone frozen: the student keeps the released weights exactly
        for name, value in reference.items():
            assert torch.equal(states[it][f"student.backbone.{name}"], value), (it, name)
            assert torch.allclose(states[it][f"teacher.backbone.{name}"], value, atol=1e-6), (it, name)
    head = "student.dino_head.mlp.0.weight"
    assert not torch.equal(states[1][head], states[2][head])  # the heads train meanwhile
    changed = [n for n, v in reference.items() if not torch.equal(states[3][f"student.backbone.{n}"], v)]
    assert len(changed) > len(reference) // 2  # unfrozen at iteration 2: the backbone trains


def _knn_accuracy(train_x, train_y, test_x, test_y, k=20):
    """Balanced accuracy of a cosine k-NN majority vote (independent of dinov2.train.online_knn)."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    return balanced_accuracy_score(test_y, clf.predict(test_x))


@torch.no_grad()
def _features(backbone, root, size):
    from dinov2.data.datasets import CellImageDataset
    from dinov2.data.transforms import make_classification_eval_transform

    ds = CellImageDataset(
        str(root), transform=make_classification_eval_transform(resize_size=size, crop_size=size)
    )
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    backbone.eval()
    return backbone(x).numpy(), np.asarray(ds.targets)


@pytest.mark.slow
def test_tiny_config_learns_on_synthetic_cells(tmp_path):
    """A few minutes of the tiny config on synthetic cells: the loss falls and the teacher's 20-NN
    balanced accuracy on held-out cells beats the same network at random initialisation."""
    root = tmp_path / "cells"
    train_root = generate_synthetic_cells(root / "train", per_class=40, size=64, seed=1, progress=False)
    bank = generate_synthetic_cells(root / "bank", per_class=40, size=64, seed=2, progress=False)
    query = generate_synthetic_cells(root / "query", per_class=40, size=64, seed=3, progress=False)
    out = tmp_path / "run"
    argv = [
        "--config-file",
        "train/vit_tiny_cpu",
        "--output-dir",
        str(out),
        f"train.dataset_path={train_root}",
    ]
    # The shipped model and objective; a shorter schedule (80 iterations of 16 images) for the test.
    schedule = ["train.batch_size_per_gpu=16", "train.OFFICIAL_EPOCH_LENGTH=20", "optim.epochs=4",
                "train.log_period_iterations=5", "train.num_workers=1"]  # fmt: skip
    result = main(argv + schedule)
    assert result.iteration == 80
    print("total loss every 5 iterations:", [round(r["total_loss"], 2) for r in _records(out)])

    # The loss falls: on held-out images, the trained student's DINO and iBOT losses against the
    # trained teacher are lower than those of the student it started from. (The logged loss itself is
    # not monotonic in a run this short: the teacher's targets start collapsed, i.e. easy to predict,
    # and become more diverse as it learns, which raises the cross-entropy's entropy floor.)
    cfg = OmegaConf.load(out / "config.yaml")
    state = checkpointing.load_checkpoint_file(out / "checkpoints" / "model_0000080.pth")
    fix_random_seeds(cfg.train.seed)  # as train.main does before building the model
    initial_student = build_model(cfg, torch.device("cpu")).student.state_dict()
    held_out = OmegaConf.merge(cfg, {"train": {"dataset_path": str(bank), "num_workers": 0}})
    _, _, loader = build_data(held_out, DistributedInfo(0, 1, 0, torch.device("cpu")), 0)
    batch = next(iter(loader))
    losses = {}
    for name in ("trained", "initial"):
        model = build_model(cfg, torch.device("cpu"))
        model.load_state_dict(state["model"])
        if name == "initial":
            model.student.load_state_dict(initial_student)
        losses[name] = model.forward_backward(batch, teacher_temp=cfg.teacher.teacher_temp)
    print("held-out losses against the trained teacher:", losses)
    for term in ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss"):
        assert losses["trained"][term] < losses["initial"][term], term

    size = cfg.crops.global_crops_size
    trained = load_backbone(out / "eval" / "80" / "teacher_checkpoint.pth")
    torch.manual_seed(cfg.train.seed)
    random_init, _ = build_backbones(cfg)
    scores = {}
    for name, net in (("trained", trained), ("random", random_init)):
        xb, yb = _features(net, bank, size)
        xq, yq = _features(net, query, size)
        scores[name] = _knn_accuracy(xb, yb, xq, yq)
    print("20-NN balanced accuracy on held-out synthetic cells:", scores)
    assert scores["trained"] > scores["random"] + 0.03


def test_preemption_signal_checkpoints_and_returns(cells, tmp_path, monkeypatch):
    import signal

    real = SSLMetaArch.forward_backward
    calls = {"n": 0}

    def signalled(self, images, teacher_temp, grad_scaler=None):
        calls["n"] += 1
        if calls["n"] == 2:  # SLURM's pre-timeout signal arrives during iteration index 1
            os.kill(os.getpid(), signal.SIGUSR2)
        return real(self, images, teacher_temp, grad_scaler)

    monkeypatch.setattr(SSLMetaArch, "forward_backward", signalled)
    out = tmp_path / "run"
    result = _run(cells, out, "train.checkpoint_period_iterations=100")
    # The step in flight finishes, then a checkpoint is written at the step boundary.
    assert (result.status, result.iteration) == ("preempted", 2)
    assert [it for it, _ in checkpointing.list_checkpoints(out / "checkpoints")] == [2]
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # handlers put back
    monkeypatch.setattr(SSLMetaArch, "forward_backward", real)
    resumed = _run(cells, out, "train.checkpoint_period_iterations=100")
    assert (resumed.status, resumed.iteration) == ("completed", 6)
    assert [r["iteration"] for r in _records(out)] == [1, 2, 3, 4, 5, 6]


def test_collapse_thresholds_come_from_the_config(cells, tmp_path):
    # A CLS-std threshold no real run meets: the monitor must warn at its first check after the warm-up
    # (iteration 6) and quote the measured ratio that was also logged for that iteration.
    out = tmp_path / "run"
    _run(cells, out, "train.collapse_thresholds.min_cls_std_ratio=1000.0")
    ratio = next(r["cls_std_ratio"] for r in _records(out) if r["iteration"] == 6)
    log = (out / "training_log.txt").read_text()
    assert "possible collapse at iteration 6: CLS embeddings barely differ" in log
    assert f"= {ratio:.3f}/sqrt(D) (threshold 1000.0/sqrt(D))" in log
    assert "possible collapse at iteration 3" not in log  # still in the lr warm-up
    with pytest.raises(ConfigError, match="collapse_thresholds"):
        _run(cells, tmp_path / "bad", "train.collapse_thresholds.max_entropy=0.5")


def test_collapse_stop_after_consecutive_warnings_keeps_the_last_good_outputs(cells, tmp_path):
    # A CLS-std threshold no run meets: every check after the lr warm-up (3 iterations) warns, so the
    # run stops at the third warning (iteration 6 of 9) instead of training on.
    out = tmp_path / "run"
    overrides = [
        "optim.epochs=3",
        "train.collapse_check_period_iterations=1",
        "train.collapse_thresholds.min_cls_std_ratio=1000.0",
        "train.collapse_stop_after_warnings=3",
        "train.checkpoint_period_iterations=1",
        "train.checkpoint_keep=1",
        "evaluation.eval_period_iterations=1",
    ]
    good_checkpoint = out / "checkpoints" / "model_0000003.pth"
    good_export = out / "eval" / "3" / "teacher_checkpoint.pth"
    with pytest.raises(CollapseError) as caught:
        _run(cells, out, *overrides)
    assert str(caught.value) == (
        "stopping: the collapse monitor 3 consecutive checks warned (iterations 4, 5, 6) on cls_std_ratio "
        f"(train.collapse_stop_after_warnings=3); last good checkpoint: {good_checkpoint}; "
        f"last good teacher export: {good_export}"
    )
    # checkpoint_keep=1 rotated away 4 but kept 3, the newest from before the first warning.
    assert [it for it, _ in checkpointing.list_checkpoints(out / "checkpoints")] == [3, 5]
    assert checkpointing.load_checkpoint_file(good_checkpoint)["iteration"] == 3
    assert torch.load(good_export, map_location="cpu", weights_only=True)["teacher"]
    assert load_backbone(good_export).embed_dim == 128
    assert not (out / "eval" / "6").exists()  # nothing is exported from the collapsed state
    assert _records(out)[-1]["iteration"] == 6
    log = (out / "training_log.txt").read_text()
    assert "possible collapse at iteration 4: CLS embeddings barely differ" in log


def test_collapse_stop_is_off_by_default(cells, tmp_path):
    out = tmp_path / "run"
    always_warns = [
        "train.collapse_check_period_iterations=1",
        "train.collapse_thresholds.min_cls_std_ratio=1000.0",
    ]
    result = _run(cells, out, "train.collapse_stop_after_warnings=0", *always_warns)
    assert result.status == "completed" and result.iteration == 6
    assert "possible collapse at iteration 6" in (out / "training_log.txt").read_text()
