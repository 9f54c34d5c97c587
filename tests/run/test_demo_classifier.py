"""dinov2/run/demo_classifier.py: the demo's servable classifier, and its serve command."""

import shlex
from pathlib import Path

import torch

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import export_backbone
from dinov2.run.demo_classifier import train_demo_classifier
from dinov2.run.serve import get_args_parser
from dinov2.serve.service import ClassifierService
from dinov2.transfer.classifier import load_classifier

CLASSES = ("basophil", "neutrophil", "platelet")


def test_trains_once_and_serves_from_the_training_cache(tmp_path, monkeypatch):
    generate_synthetic_cells(
        tmp_path / "cells", per_class=9, size=48, seed=0, classes=CLASSES, progress=False
    )
    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, block_chunks=0
    )
    export_backbone(vit, tmp_path / "teacher.safetensors")
    lines: list[str] = []
    out = tmp_path / "classifier"
    made = train_demo_classifier(
        tmp_path / "cells", tmp_path / "teacher.safetensors", out, image_size=32, max_per_class=6, epochs=3,
        log=lines.append,
    )  # fmt: skip
    assert made.model == out / "run" / "best.pth" and made.reference == out / "split" / "TRN"
    assert 0.0 <= made.val_balanced_accuracy <= 1.0
    assert "cached features of 18 images (at most 6 per class" in lines[0]
    for cls in CLASSES:  # 6 sampled per class, split 80/20 with largest-remainder rounding
        assert len(list((out / "split" / "TRN" / cls).iterdir())) == 5
        assert len(list((out / "split" / "VAL" / cls).iterdir())) == 1
        assert all(p.is_symlink() for p in (out / "cells" / cls).iterdir())
    _, classes, prep = load_classifier(made.model)
    assert classes == list(CLASSES) and prep.image_size == 32

    # The printed command is a valid dinov2-serve call, and its reference set is already embedded.
    argv = shlex.split(made.command)
    assert argv[0] == "dinov2-serve"
    args = get_args_parser().parse_args(argv[1:])
    assert Path(args.model) == made.model and Path(args.reference) == made.reference
    monkeypatch.setattr("dinov2.eval.features.load_eval_backbone", _no_backbone_runs)
    service = ClassifierService.from_checkpoint(
        args.model, device="cpu", reference=args.reference, cache_dir=made.model.parent / "feature_cache",
        progress=False,
    )  # fmt: skip
    assert len(service.reference) == 15 and service.reference.features.meta["cache"]["hit"]

    again: list[str] = []
    assert train_demo_classifier(
        tmp_path / "cells", tmp_path / "teacher.safetensors", out, log=again.append
    ).model
    assert again == [f"reusing {made.model}"]


def _no_backbone_runs(*args, **kwargs):
    raise AssertionError("the reference features should come from the training cache")
