"""A servable classifier from the demo's pretrained teacher (`make demo`, then `make serve`).

After pretraining, the demo trains a linear head on the frozen teacher with cached features
(seconds on a CPU): a seeded subsample of the demo's labeled images (at most ``max_per_class``
per class, linked, not copied) is split 80/20 into TRN/VAL and given to `dinov2-finetune`'s
`train_classifier` in linear mode. It returns the one command that serves the result with the
training split as the reference set; that split's embeddings are the ones training cached, so the
server starts without running the backbone over them again.

Layout under ``out_dir``: ``cells/<class>/...`` (symbolic links to the sampled images),
``split/TRN|VAL``, ``run/`` (`dinov2-finetune`'s output: ``best.pth``, ``feature_cache/``, logs).
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPLIT_RATIOS = (0.8, 0.2, 0.0)


@dataclass(frozen=True)
class DemoClassifier:
    """What `train_demo_classifier` made."""

    model: Path
    """The ``best.pth`` to serve."""
    reference: Path
    """The training split, the reference set of the serve command."""
    val_balanced_accuracy: float | None
    """Validation balanced accuracy of ``best.pth`` (None when reused from an earlier run)."""

    @property
    def command(self) -> str:
        """The shell command that serves the classifier (what `make serve` runs)."""
        return shlex.join(["dinov2-serve", "--model", str(self.model), "--reference", str(self.reference)])


def _link_subsample(root: Path, cells: Path, max_per_class: int, seed: int) -> int:
    """Symbolic links ``cells/<class>/<path below the class folder>`` to a seeded subsample of
    ``root`` (the same images `dinov2.eval.selection.sample_images_per_class` picks)."""
    from dinov2.eval.selection import sample_images_per_class

    paths = sample_images_per_class(root, per_class=max_per_class, seed=seed)
    for path in paths:
        link = cells / os.path.relpath(path, root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(path).resolve())
    return len(paths)


def train_demo_classifier(
    data_root: str | os.PathLike,
    backbone: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    image_size: int = 64,
    max_per_class: int = 200,
    epochs: int = 30,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> DemoClassifier:
    """Train (or reuse) a linear classifier of ``backbone`` on the labeled tree ``data_root``.

    Args:
        data_root: labeled class-folder dataset (the demo's synthetic cells or ``--data``).
        backbone: backbone checkpoint (the demo's ``teacher_backbone.safetensors``).
        out_dir: receives ``cells/``, ``split/`` and ``run/``.
        image_size: crop side fed to the backbone (a multiple of its patch size).
        max_per_class: images per class used (seeded subsample).
        epochs: passes of the linear head over the cached TRN features.
        seed: subsample, split and training seed.
        force: start over even when ``run/best.pth`` exists.
        log: receives one status line per step.
    """
    from dinov2.data.split import split_dataset
    from dinov2.transfer.config import FinetuneConfig
    from dinov2.transfer.finetune import train_classifier

    out = Path(out_dir)
    best = out / "run" / "best.pth"
    reference = out / "split" / "TRN"
    if best.is_file() and not force:
        log(f"reusing {best}")
        return DemoClassifier(best, reference, None)
    if out.exists():
        shutil.rmtree(out)
    n = _link_subsample(Path(data_root), out / "cells", max_per_class, seed)
    split_dataset(out / "cells", out / "split", SPLIT_RATIOS, seed=seed, mode="symlink")
    log(f"linear head on cached features of {n} images (at most {max_per_class} per class, 80/20 split)")
    config = FinetuneConfig(
        data=str(out / "split"),
        backbone=os.fspath(backbone),
        output_dir=str(out / "run"),
        mode="linear",
        head="cls+avgpool",
        epochs=epochs,
        batch_size=64,
        warmup_epochs=1.0,
        image_size=image_size,
        cache_features=True,
        num_workers=0,
        seed=seed,
        device="cpu",
        progress=False,
    )
    result = train_classifier(config)
    accuracy = 100 * result.best_val_balanced_accuracy
    log(f"{result.best_checkpoint}: validation balanced accuracy {accuracy:.1f} %, epoch {result.best_epoch}")
    return DemoClassifier(result.best_checkpoint, reference, result.best_val_balanced_accuracy)
