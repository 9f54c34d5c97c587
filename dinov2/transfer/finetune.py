"""Train a classifier on a DINOv2 backbone: linear probe or full fine-tune (`dinov2-finetune`).

Input: a split folder ``DATA/TRN``, ``DATA/VAL`` (and optionally ``DATA/TST``) of class folders, as
written by `dinov2-split`, and a backbone (a checkpoint path or hub name, loaded with
`dinov2.models.weights.load_backbone`). Output folder:

- ``best.pth``: the checkpoint with the highest validation balanced accuracy (ties keep the
  earlier epoch), self-contained for `dinov2-infer` (see `dinov2.transfer.classifier`).
- ``last.pth``: model, optimiser, scheduler, epoch and history after every epoch; re-running with
  the same output folder resumes from it (``--no-resume`` starts over).
- ``log.jsonl`` (one JSON object per epoch: train/val loss, accuracy, balanced accuracy, the lr
  after the epoch's last step, seconds), ``learning_curves.png``, ``val_predictions.csv``
  (validation predictions of the best epoch), ``config.json``; with ``cache_features``,
  ``feature_cache/`` (reused when the run resumes).
- ``test/``: metrics, per-class report and confusion matrices of the best model on ``DATA/TST``.

Modes: ``linear`` freezes the backbone (no gradients, eval mode) and trains only the head;
``finetune`` trains everything, the backbone at ``lr * backbone_lr_mult`` with layer-wise decay.
Optimiser: AdamW; schedule: linear warm-up then cosine to zero, stepped every iteration.

Reproducibility: the RNGs (torch, numpy, random) and the data-loader generator are re-seeded
from ``(seed, epoch)`` at the start of every epoch, so a resumed run sees the same data order and
augmentations as an uninterrupted one and, on CPU with deterministic kernels, ends with the same
weights. Data-loader worker seeds derive from the loader generator, so this also holds with
``num_workers > 0``.

Unreadable images: `CellImageDataset` replaces an image that fails to decode by the next sample
(and stops past its ``max_failed_fraction``), so metrics stay consistent but that file's row in a
predictions CSV shows its neighbour's output; split with ``dinov2-split --check-corrupted`` to leave
such files out.

Example::

    dinov2-split /data/pbc split --ratios 0.7 0.2 0.1
    dinov2-finetune --data split --backbone dinov2_vits14 --mode linear --output-dir runs/linear
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dinov2.eval.features import Preprocessing
from dinov2.eval.metrics import classification_metrics
from dinov2.eval.reports import write_json
from dinov2.transfer.classifier import (
    BackboneClassifier,
    classifier_checkpoint,
    classifier_features,
    classifier_param_groups,
    make_eval_transform,
    make_train_transform,
    preprocessing_for,
)
from dinov2.transfer.config import RESUME_FREE_FIELDS, FinetuneConfig, FinetuneResult
from dinov2.transfer.loop import (
    EpochOutput,
    epoch_seed,
    load_split,
    make_criterion,
    make_eval_loader,
    make_optimizer,
    make_train_loader,
    run_epoch,
)
from dinov2.transfer.outputs import (
    plot_learning_curves,
    write_json_lines,
    write_predictions,
    write_test_report,
)
from dinov2.utils.dataclass_cli import add_dataclass_arguments
from dinov2.utils.device import resolve_device
from dinov2.utils.files import atomic_torch_save
from dinov2.utils.utils import fix_random_seeds

__all__ = ["FinetuneConfig", "FinetuneResult", "get_args_parser", "main", "train_classifier"]


def _resume_state(path: Path, config: FinetuneConfig, classes: Sequence[str]) -> dict[str, Any] | None:
    if not (config.resume and path.is_file()):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["config"]
    except Exception as e:  # not ours, or from an incompatible version: never guess, never overwrite
        raise ValueError(
            f"cannot resume from {path} ({type(e).__name__}: {e}); "
            "use another --output-dir or --no-resume to start over"
        ) from e
    current = asdict(config)
    changed = [k for k in current if k not in RESUME_FREE_FIELDS and saved.get(k) != current[k]]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(
            f"{path.parent} holds a run with different settings ({details}); "
            "use another --output-dir, the same settings, or --no-resume to start over"
        )
    if list(state["classes"]) != list(classes):
        raise ValueError(
            f"{path} was trained on classes {state['classes']}, the data now has {list(classes)}"
        )
    return state


def _cached_features(
    model: BackboneClassifier,
    folder: Path,
    classes: Sequence[str],
    prep: Preprocessing,
    config: FinetuneConfig,
    device: torch.device,
) -> TensorDataset:
    """(features, TRN-ordered labels) of ``folder`` from the frozen backbone, cached on disk under
    ``output_dir/feature_cache`` (keyed on weights, data and preprocessing) so a resumed run skips
    the extraction."""
    fs = classifier_features(
        model,
        prep,
        folder,
        cache_dir=Path(config.output_dir) / "feature_cache",
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        device=device,
        progress=config.progress,
    )
    unknown = [c for c in fs.class_names if c not in classes]
    if unknown:
        raise ValueError(
            f"{folder} has classes {unknown} that the training split lacks (TRN classes: {classes})"
        )
    to_trn = np.array([list(classes).index(c) for c in fs.class_names], dtype=np.int64)
    return TensorDataset(torch.from_numpy(fs.features), torch.from_numpy(to_trn[fs.labels]))


@dataclass
class _Training:
    """What the epochs of a run work with."""

    step_model: nn.Module
    """The module each step runs: the whole classifier, or only its head on cached features."""
    train_loader: DataLoader
    val_loader: DataLoader
    generator: torch.Generator
    """The training loader's generator, re-seeded every epoch."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module


def _check_data(config: FinetuneConfig) -> Path:
    config.validate()
    data = Path(config.data)
    for name in ("TRN", "VAL"):
        if not (data / name).is_dir():
            raise FileNotFoundError(
                f"{data / name} not found: --data must hold TRN/ and VAL/ (see dinov2-split)"
            )
    return data


def _build_model(config: FinetuneConfig, num_classes: int, device: torch.device) -> BackboneClassifier:
    from dinov2.models.weights import load_backbone

    backbone = load_backbone(config.backbone, device="cpu")
    if config.image_size % backbone.patch_size:
        raise ValueError(
            f"image_size {config.image_size} is not a multiple of the backbone's patch size "
            f"{backbone.patch_size}"
        )
    model = BackboneClassifier(backbone, num_classes, config.head, freeze_backbone=config.mode == "linear")
    return model.to(device)


def _build_training(
    config: FinetuneConfig, model: BackboneClassifier, trn, val, prep: Preprocessing, device: torch.device
) -> _Training:
    """Loaders, optimiser, schedule and loss for ``model`` on the TRN / VAL splits."""
    classes = list(trn.dataset.classes)
    num_classes = len(classes)
    data = Path(config.data)
    if config.cache_features:
        # The frozen backbone's features never change, so it runs once per image instead of per epoch
        # and the epochs only train the head.
        trn_set: Dataset = _cached_features(model, data / "TRN", classes, prep, config, device)
        val_set: Dataset = _cached_features(model, data / "VAL", classes, prep, config, device)
        step_model: nn.Module = model.head
        workers = 0
    else:
        trn_set, val_set, step_model, workers = trn.dataset, val.dataset, model, config.num_workers
    generator = torch.Generator()
    train_loader = make_train_loader(
        trn_set, trn.targets, num_classes, config.batch_size, config.balance, workers, generator, device
    )
    steps_per_epoch = len(train_loader)
    params = classifier_param_groups(
        model,
        config.lr,
        config.weight_decay,
        config.backbone_lr_mult,
        config.layer_decay if config.mode == "finetune" else 1.0,
    )
    optimizer, scheduler = make_optimizer(
        params, config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    )
    return _Training(
        step_model=step_model,
        train_loader=train_loader,
        val_loader=make_eval_loader(val_set, config.batch_size, workers, device),
        generator=generator,
        optimizer=optimizer,
        scheduler=scheduler,
        criterion=make_criterion(config.balance, trn.targets, num_classes, device),
    )


def _run_one_epoch(
    run: _Training, config: FinetuneConfig, epoch: int, num_classes: int, device: torch.device
) -> tuple[dict[str, float], EpochOutput]:
    """Train one epoch and evaluate on VAL; returns the epoch's log record and the VAL outputs."""
    t0 = time.perf_counter()
    # Re-seeding per epoch makes data order and augmentations independent of where a run resumed.
    fix_random_seeds(epoch_seed(config.seed, epoch))
    run.generator.manual_seed(epoch_seed(config.seed, epoch))
    tag = f"epoch {epoch + 1}/{config.epochs}"
    train_out = run_epoch(
        run.step_model,
        run.train_loader,
        run.criterion,
        device,
        run.optimizer,
        run.scheduler,
        f"{tag} train",
        config.progress,
    )
    val_out = run_epoch(
        run.step_model,
        run.val_loader,
        nn.CrossEntropyLoss(),
        device,
        desc=f"{tag} val",
        progress=config.progress,
    )
    train_scores = classification_metrics(train_out.targets, train_out.preds, num_classes)
    val_scores = classification_metrics(val_out.targets, val_out.preds, num_classes)
    record = {
        "epoch": epoch + 1,
        "train_loss": train_out.loss,
        "train_accuracy": train_scores["accuracy"],
        "train_balanced_accuracy": train_scores["balanced_accuracy"],
        "val_loss": val_out.loss,
        "val_accuracy": val_scores["accuracy"],
        "val_balanced_accuracy": val_scores["balanced_accuracy"],
        "lr": run.optimizer.param_groups[-1]["lr"],
        "epoch_time_s": time.perf_counter() - t0,
    }
    return record, val_out


def _epoch_line(record: dict[str, float], epochs: int, is_best: bool, eta: float) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}: train loss {record['train_loss']:.4f} "
        f"acc {record['train_accuracy']:.4f} | val loss {record['val_loss']:.4f} "
        f"acc {record['val_accuracy']:.4f} bal-acc {record['val_balanced_accuracy']:.4f}"
        f"{' (best)' if is_best else ''} | {record['epoch_time_s']:.1f}s, ETA {eta:.0f}s"
    )


def train_classifier(config: FinetuneConfig) -> FinetuneResult:
    """Train (or resume training) a classifier as described by ``config``; see the module docstring.

    Raises:
        ValueError / FileNotFoundError for invalid settings, missing split folders or backbone, or
        an output folder holding a run with other settings.
    """
    data = _check_data(config)
    device, out_dir = resolve_device(config.device), Path(config.output_dir)
    # Data and settings first: a bad folder or a clashing earlier run fails before any heavy work.
    prep = preprocessing_for(config.image_size, config.crop_pct)
    eval_tf = make_eval_transform(prep)
    trn = load_split(
        data / "TRN", None, make_train_transform(prep, (config.crop_scale_min, 1.0), config.color_jitter)
    )
    classes = list(trn.dataset.classes)
    val = load_split(data / "VAL", classes, eval_tf)
    if len(classes) < 2:
        raise ValueError(f"{data / 'TRN'} has {len(classes)} class folder(s); a classifier needs at least 2")
    last_path, best_path = out_dir / "last.pth", out_dir / "best.pth"
    state = _resume_state(last_path, config, classes)

    fix_random_seeds(config.seed)
    model = _build_model(config, len(classes), device)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(asdict(config), out_dir / "config.json")
    run = _build_training(config, model, trn, val, prep, device)
    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_balanced_accuracy": -1.0}
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        print(f"resuming {out_dir} after epoch {start_epoch}/{config.epochs}", file=sys.stderr)
    print(
        f"{config.mode}: {len(trn.targets)} TRN / {len(val.targets)} VAL images, {len(classes)} classes, "
        f"{len(run.train_loader)} steps per epoch on {device}",
        file=sys.stderr,
    )

    times: list[float] = []
    for epoch in range(start_epoch, config.epochs):
        record, val_out = _run_one_epoch(run, config, epoch, len(classes), device)
        history.append(record)
        times.append(record["epoch_time_s"])
        is_best = record["val_balanced_accuracy"] > best["val_balanced_accuracy"]
        if is_best:
            best = {"epoch": epoch + 1, "val_balanced_accuracy": record["val_balanced_accuracy"]}
            checkpoint = classifier_checkpoint(
                model,
                classes,
                prep,
                epoch=epoch + 1,
                val_accuracy=record["val_accuracy"],
                val_balanced_accuracy=record["val_balanced_accuracy"],
                config=asdict(config),
            )
            atomic_torch_save(checkpoint, best_path)
            write_predictions(out_dir / "val_predictions.csv", val.paths, val_out, classes)
        last = {
            "model": model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "best": best,
            "classes": classes,
            "config": asdict(config),
        }
        atomic_torch_save(last, last_path)
        write_json_lines(history, out_dir / "log.jsonl")
        plot_learning_curves(history, out_dir / "learning_curves.png")
        eta = (config.epochs - epoch - 1) * sum(times) / len(times)
        print(_epoch_line(record, config.epochs, is_best, eta), file=sys.stderr)

    test_metrics = None
    if _holds_files(data / "TST"):
        test_metrics = _evaluate_best_on_test(model, best_path, data / "TST", classes, eval_tf, config)
    return FinetuneResult(
        output_dir=out_dir,
        best_checkpoint=best_path,
        best_epoch=int(best["epoch"]),
        best_val_balanced_accuracy=float(best["val_balanced_accuracy"]),
        start_epoch=start_epoch,
        epochs_run=config.epochs - start_epoch,
        history=history,
        test_metrics=test_metrics,
    )


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` exists and holds at least one non-hidden file (a TST split may be empty)."""
    return folder.is_dir() and any(not f.startswith(".") for _, _, files in os.walk(folder) for f in files)


def _evaluate_best_on_test(
    model: BackboneClassifier,
    best_path: Path,
    folder: Path,
    classes: list[str],
    eval_tf,
    config: FinetuneConfig,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    tst = load_split(folder, classes, eval_tf)
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    loader = make_eval_loader(tst.dataset, config.batch_size, config.num_workers, device)
    out = run_epoch(model, loader, nn.CrossEntropyLoss(), device, desc="test", progress=config.progress)
    metrics = write_test_report(Path(config.output_dir) / "test", tst.paths, out, classes)
    print(
        f"test (best epoch {best['epoch']}): accuracy {metrics['accuracy']:.4f}, "
        f"balanced accuracy {metrics['balanced_accuracy']:.4f} -> {Path(config.output_dir) / 'test'}",
        file=sys.stderr,
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The ``dinov2-finetune`` parser: one flag per `FinetuneConfig` field, help from its docstring."""
    parser = argparse.ArgumentParser(
        "dinov2-finetune",
        description="Train a classifier (linear probe or fine-tune) on a DINOv2 backbone over a "
        "dinov2-split folder; resumes automatically from OUTPUT_DIR/last.pth.",
        add_help=add_help,
    )
    return add_dataclass_arguments(parser, FinetuneConfig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on invalid arguments or inputs."""
    args = get_args_parser().parse_args(argv)
    config = FinetuneConfig(**vars(args))
    try:
        result = train_classifier(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"dinov2-finetune: error: {e}", file=sys.stderr)
        return 2
    print(f"best epoch {result.best_epoch}: val balanced accuracy {result.best_val_balanced_accuracy:.4f}")
    if result.test_metrics is not None:
        print(
            f"test: accuracy {result.test_metrics['accuracy']:.4f}, "
            f"balanced accuracy {result.test_metrics['balanced_accuracy']:.4f}"
        )
    print(f"outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
