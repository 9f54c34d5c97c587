"""`dinov2-eval` subcommands end to end on a tiny folder, and their clear errors (exit status 2)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval.cli import main
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import export_backbone

CLASSES = ["blue", "green", "red"]


@pytest.fixture
def data(tmp_path):
    """3 colour classes x 6 noisy 16x16 images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
            arr[..., 2 - c] += 150
            Image.fromarray(arr).save(root / name / f"{name}{i}.png")
    return root


@pytest.fixture
def vit_ckpt(tmp_path):
    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_register_tokens=2, block_chunks=0
    )
    return str(export_backbone(vit, tmp_path / "vit.safetensors"))


def _exit_code(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize("cmd", ["features", "cv", "knn", "linear", "umap", "attention"])
def test_help(cmd, capsys):
    assert _exit_code([cmd, "-h"]) == 0
    out = capsys.readouterr().out
    assert f"dinov2-eval {cmd}" in out and "--backbone" in out


def test_cv_writes_fork_table_and_reports(data, tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["cv", "--backbone", "colorstats", "--data", str(data), "--output-dir", str(out)]
    argv += ["--folds", "3", "--k", "1", "5", "--C", "1.0", "--image-size", "16", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert md in printed
    assert [line.split("|")[1].strip() for line in md.splitlines()[2:]] == ["1-NN", "5-NN", "Linear Probing"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["n_folds"] == 3 and metrics["info"]["n_samples"] == 18
    assert metrics["summary"]["1-NN"]["balanced_accuracy"]["mean"] > 0.9  # colour classes are easy
    assert metrics["extra"]["command"].startswith("dinov2-eval cv --backbone colorstats")
    assert (out / "Linear_Probing" / "confusion_normalized.png").is_file()
    assert len(list((out / "feature_cache").glob("features-*.npz"))) == 1


def test_features_then_cv_and_knn_from_files(data, tmp_path, vit_ckpt):
    feats = tmp_path / "f.npz"
    base = ["--image-size", "16", "--no-progress"]
    assert main(["features", "--backbone", vit_ckpt, "--data", str(data), "--output", str(feats)] + base) == 0
    assert np.load(feats)["features"].shape == (18, 16)
    out = tmp_path / "cv2"
    argv = ["cv", "--features", str(feats), "--output-dir", str(out), "--folds", "2", "--linear", "none"]
    assert main(argv + ["--k", "1", "3", "--vote", "weighted", "--no-progress"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["classifiers"]
    assert rows == ["1-NN (weighted)", "3-NN (weighted)"]
    knn_out = tmp_path / "knn"
    argv = ["knn", "--backbone", "pixels:4", "--train", str(data), "--test", str(data)]
    argv += ["--output-dir", str(knn_out), "--k", "1", "--n-boot", "50"] + base
    assert main(argv) == 0
    m = json.loads((knn_out / "metrics.json").read_text())
    assert m["summary"]["1-NN"]["accuracy"]["mean"] == 1.0  # test == train: each image finds itself
    assert m["confidence_intervals"]["1-NN"]["accuracy"]["n_boot"] == 50
    rows = list(csv.DictReader((knn_out / "predictions.csv").open()))
    assert len(rows) == 18 and all(r["true"] == r["1-NN"] for r in rows)


def test_linear_with_val_and_class_mapping(data, tmp_path):
    base = ["--backbone", "colorstats", "--image-size", "16", "--no-progress", "--C", "0.1", "1.0"]
    out = tmp_path / "lin"
    argv = ["linear", "--train", str(data), "--val", str(data), "--test", str(data), "--output-dir", str(out)]
    assert main(argv + base + ["--n-boot", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["classifiers"] == ["Linear Probing"] and m["params"]["Linear Probing"][0]["C"] in (0.1, 1.0)
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"red": "red", "green": "green"}))  # blue unmapped
    out2 = tmp_path / "cross"
    argv = ["linear", "--train", str(data), "--test", str(data), "--output-dir", str(out2)]
    assert main(argv + base + ["--class-mapping", str(mapping), "--n-boot", "0"]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["protocol"] == "cross_dataset" and m2["class_names"] == ["green", "red"]
    assert m2["info"]["source_classes_dropped"] == ["blue"]


def test_umap_and_attention(data, tmp_path, vit_ckpt):
    out = tmp_path / "u"
    argv = [
        "umap",
        "--backbone",
        "pixels:2",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--image-size",
        "16",
    ]
    assert main(argv + ["--n-neighbors", "5", "--thumbnails", "9", "--no-progress"]) == 0
    for f in ("umap.png", "umap_thumbnails.png", "umap_coords.csv"):
        assert (out / f).is_file()
    att = tmp_path / "att"
    imgs = [str(data / "red" / "red0.png"), str(data / "blue" / "blue1.png")]
    argv = [
        "attention",
        "--backbone",
        vit_ckpt,
        "--images",
        *imgs,
        "--output-dir",
        str(att),
        "--image-size",
        "16",
    ]
    assert main(argv) == 0
    maps = np.load(att / "red0_attention.npy")
    assert maps.shape == (3, 2, 2, 2)  # CLS + 2 registers, 2 heads, 2x2 patches
    assert (att / "blue1_attention.png").is_file()
    att2 = tmp_path / "att2"
    argv = ["attention", "--backbone", vit_ckpt, "--data", str(data), "--n-images", "1", "--image-size", "16"]
    assert main(argv + ["--output-dir", str(att2)]) == 0
    assert len(list(att2.glob("*_attention.png"))) == 3  # one image per class


def test_clear_errors(data, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert (
        _exit_code(["cv", "--backbone", str(tmp_path / "nope.pth"), "--data", str(data), "--output-dir", out])
        == 2
    )
    assert "nope.pth" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(flat / f"x{i}.png")
    assert _exit_code(["cv", "--backbone", "colorstats", "--data", str(flat), "--output-dir", out]) == 2
    assert "needs labels" in capsys.readouterr().err
    argv = ["cv", "--backbone", "colorstats", "--data", str(data), "--output-dir", out, "--folds", "7"]
    assert _exit_code(argv + ["--image-size", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at least 7 samples" in err and "blue (6)" in err
    assert _exit_code(["cv", "--data", str(data), "--output-dir", out]) == 2
    assert "--backbone" in capsys.readouterr().err
    assert (
        _exit_code(
            [
                "attention",
                "--backbone",
                "colorstats",
                "--images",
                str(data / "red" / "red0.png"),
                "--output-dir",
                out,
            ]
        )
        == 2
    )
    assert "not a ViT" in capsys.readouterr().err
