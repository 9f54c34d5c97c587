"""Tests of dinov2/transfer/infer.py: reproduces training-time predictions, survives broken files."""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.split import split_dataset
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import export_backbone
from dinov2.transfer.finetune import FinetuneConfig, train_classifier
from dinov2.transfer.infer import expand_inputs, format_table, main, predict
from dinov2.transfer.predictions import Prediction

CLASSES = ("dark", "light")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A linear classifier trained for 2 epochs on tiny two-class images; returns (root, run dir)."""
    root = tmp_path_factory.mktemp("infer")
    rng = np.random.default_rng(1)
    for cls, level in zip(CLASSES, (60, 190)):
        (root / "src" / cls).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(level + rng.normal(0, 30, (30, 34, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "src" / cls / f"{i}.png")
    split_dataset(root / "src", root / "split", (0.5, 0.5, 0.0), seed=0)
    torch.manual_seed(0)
    # embed_dim 64 with one head: a plain .pth (no stored config) infers heads as embed_dim / 64
    vit = DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=1, block_chunks=0
    )
    export_backbone(vit, root / "backbone.pth")
    cfg = FinetuneConfig(
        data=str(root / "split"), backbone=str(root / "backbone.pth"), output_dir=str(root / "run"),
        mode="finetune", head="cls+avgpool", epochs=2, batch_size=4, image_size=28, crop_pct=0.875,
        warmup_epochs=0.0, num_workers=0, progress=False, device="cpu",
    )  # fmt: skip
    train_classifier(cfg)
    return root, root / "run"


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_reproduces_validation_predictions(trained):
    root, run = trained
    recorded = {os.path.realpath(r["path"]): r for r in _read_csv(run / "val_predictions.csv")}
    preds = predict(run / "best.pth", root / "split" / "VAL", batch_size=3, device="cpu", progress=False)
    assert len(preds) == len(recorded) == 8
    for p in preds:
        row = recorded[os.path.realpath(p.path)]
        assert p.error is None
        assert p.predicted_class == row["predicted_class"]
        for cls in CLASSES:
            assert p.probabilities[cls] == pytest.approx(float(row[f"prob_{cls}"]), abs=1e-5)
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert p.probability == max(p.probabilities.values())


def test_broken_files_are_reported_not_fatal(trained, tmp_path, capsys):
    root, run = trained
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    good = (
        sorted((root / "src" / "dark").glob("*.png"))[:2] + sorted((root / "src" / "light").glob("*.png"))[:1]
    )
    shutil.copy(good[0], images / "a.png")
    shutil.copy(good[1], images / "nested" / "b.png")
    shutil.copy(good[2], images / "c.PNG")
    (images / "broken.png").write_bytes(good[0].read_bytes()[:40])  # truncated PNG
    (images / "text.jpg").write_text("not an image")
    (images / ".hidden.png").write_bytes(b"skipped")
    (images / "notes.txt").write_text("not an image extension: skipped")

    preds = predict(run / "best.pth", images, device="cpu", progress=False)
    by_name = {Path(p.path).name: p for p in preds}
    assert sorted(by_name) == ["a.png", "b.png", "broken.png", "c.PNG", "text.jpg"]
    assert by_name["broken.png"].error and by_name["text.jpg"].error
    assert all(
        by_name[n].error is None and by_name[n].predicted_class in CLASSES
        for n in ("a.png", "b.png", "c.PNG")
    )
    # the same file predicted alone gives the same answer (batch composition does not matter)
    alone = predict(run / "best.pth", [images / "a.png"], device="cpu", progress=False)[0]
    assert alone.probabilities == pytest.approx(by_name["a.png"].probabilities, abs=1e-5)

    out_csv = tmp_path / "pred.csv"
    assert main(["--model", str(run / "best.pth"), str(images), "--csv", str(out_csv), "--no-progress"]) == 0
    rows = {Path(r["path"]).name: r for r in _read_csv(out_csv)}
    assert list(_read_csv(out_csv)[0]) == [
        "path",
        "predicted_class",
        "probability",
        "prob_dark",
        "prob_light",
        "error",
    ]
    assert rows["broken.png"]["error"] and rows["broken.png"]["predicted_class"] == ""
    assert (
        rows["a.png"]["error"] == "" and rows["a.png"]["predicted_class"] == by_name["a.png"].predicted_class
    )
    assert float(rows["a.png"]["prob_dark"]) + float(rows["a.png"]["prob_light"]) == pytest.approx(
        1.0, abs=1e-5
    )
    assert "2 of 5 file(s) could not be read" in capsys.readouterr().err

    assert main(["--model", str(run / "best.pth"), str(images), "--topk", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "errors (2 file(s) could not be read):" in table
    assert f"{by_name['a.png'].predicted_class} (" in table.splitlines()[1 + sorted(by_name).index("a.png")]


def test_format_table_topk_order():
    p = Prediction.from_probs("x.png", [0.2, 0.5, 0.3], ["a", "b", "c"])
    assert p.topk(2) == [("b", 0.5), ("c", 0.3)]
    bad = Prediction("y.png", None, None, None, error="ImageDecodeError: truncated")
    lines = format_table([p, bad], topk=2).splitlines()
    assert lines[1].split() == ["x.png", "b", "(0.500)", "c", "(0.300)"]
    assert lines[-1].strip() == "y.png: ImageDecodeError: truncated"


def test_cli_errors(trained, tmp_path, capsys):
    root, run = trained
    assert main(["--model", str(tmp_path / "missing.pth"), str(root / "src")]) == 2
    assert "classifier checkpoint not found" in capsys.readouterr().err
    assert main(["--model", str(root / "backbone.pth"), str(root / "src")]) == 2
    assert "not a classifier checkpoint" in capsys.readouterr().err
    assert main(["--model", str(run / "best.pth"), str(tmp_path / "nothing_here")]) == 2
    assert "input not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(run / "best.pth"), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        expand_inputs([tmp_path / "nothing_here"])
