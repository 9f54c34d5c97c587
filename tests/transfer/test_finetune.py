"""Tests of dinov2/transfer/ (finetune, config, loop, outputs, classifier) on tiny ViTs on CPU."""

import csv
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_class_weight

import dinov2.transfer.finetune as finetune
from dinov2.data.split import split_dataset
from dinov2.eval.metrics import classification_metrics
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import export_backbone
from dinov2.transfer.classifier import (
    BackboneClassifier,
    LinearClassifierHead,
    balanced_class_weights,
    classifier_param_groups,
    load_classifier,
    preprocessing_for,
    vit_layer_id,
)
from dinov2.transfer.finetune import FinetuneConfig, get_args_parser, train_classifier
from dinov2.transfer.loop import epoch_seed, make_optimizer, make_train_loader, run_epoch, warmup_cosine
from dinov2.utils.utils import fix_random_seeds

CLASSES = ("blue", "green", "red")
COLORS = {"blue": (40, 60, 200), "green": (40, 190, 60), "red": (210, 50, 50)}


def tiny_vit(seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    return DinoVisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, block_chunks=0
    )


def make_split(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Class-coloured noisy 32 px PNGs split 0.5/0.25/0.25 into root/split."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        (root / "src" / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(COLORS[cls]) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "src" / cls / f"{cls}_{i:02d}.png")
    split_dataset(root / "src", root / "split", (0.5, 0.25, 0.25), seed=0, mode="copy")
    return root / "split"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = make_split(root)
    # safetensors keeps the architecture (e.g. 2 heads of width 16) beside the weights
    export_backbone(tiny_vit(), root / "backbone.safetensors")
    return data, root / "backbone.safetensors"


def config(data, backbone, out, **kw) -> FinetuneConfig:
    base = dict(
        data=str(data), backbone=str(backbone), output_dir=str(out), image_size=28, batch_size=6,
        epochs=1, warmup_epochs=0.0, num_workers=0, progress=False, lr=1e-2, device="cpu",
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def backbone_state(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


# ----------------------------------------------------------------------------------------------
# Components against independent expectations
# ----------------------------------------------------------------------------------------------


def test_linear_head_matches_logistic_regression():
    """On fixed features, the head trained by our loop is as accurate as scikit-learn's LR."""
    rng = np.random.default_rng(0)
    n_classes, dim = 4, 16
    means = rng.normal(0, 1.0, (n_classes, dim))

    def sample(n):
        y = rng.integers(0, n_classes, n)
        return (means[y] + rng.normal(0, 1.2, (n, dim))).astype(np.float32), y

    x_train, y_train = sample(600)
    x_test, y_test = sample(2000)
    sk_acc = LogisticRegression(max_iter=2000).fit(x_train, y_train).score(x_test, y_test)
    assert 0.55 < sk_acc < 0.97  # the task is neither trivial nor hopeless, so the comparison means something
    # The classifier's own loop (as `train_classifier` runs it on cached features): the head alone,
    # AdamW + warm-up/cosine, re-seeded every epoch.
    epochs, cpu = 40, torch.device("cpu")
    features, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    fix_random_seeds(0)
    head = LinearClassifierHead(dim, n_classes)
    generator = torch.Generator()
    loader = make_train_loader(
        torch.utils.data.TensorDataset(features, labels),
        labels.tolist(),
        n_classes,
        128,
        "none",
        0,
        generator,
        cpu,
    )
    params = [
        {"params": [head.linear.weight], "lr": 2e-2, "weight_decay": 1e-4},
        {"params": [head.linear.bias], "lr": 2e-2, "weight_decay": 0.0},
    ]
    optimizer, scheduler = make_optimizer(params, epochs * len(loader), 0)
    for epoch in range(epochs):
        fix_random_seeds(epoch_seed(0, epoch))
        generator.manual_seed(epoch_seed(0, epoch))
        run_epoch(head, loader, torch.nn.CrossEntropyLoss(), cpu, optimizer, scheduler, progress=False)
    head.eval()
    with torch.no_grad():
        ours = head(torch.from_numpy(x_test)).argmax(1).numpy()
    assert abs(np.mean(ours == y_test) - sk_acc) <= 0.02


def test_balanced_class_weights_match_sklearn():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(balanced_class_weights(y, 3).numpy(), expected, rtol=1e-6)
    # a class missing from the targets gets weight 0 (it cannot contribute to the loss anyway)
    np.testing.assert_allclose(balanced_class_weights([0, 1, 1], 3).numpy(), [1.5, 0.75, 0.0])


def test_balanced_sampler_draws_classes_equally():
    targets = [0] * 80 + [1] * 15 + [2] * 5
    gen = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.zeros(100, 1), torch.tensor(targets))
    loader = make_train_loader(ds, targets, 3, 100, "sampler", 0, gen, torch.device("cpu"))
    drawn = torch.cat([torch.cat([y for _, y in loader]) for _ in range(30)])
    freq = torch.bincount(drawn, minlength=3).float() / len(drawn)
    # 3000 draws with p = 1/3 each: std ~ 0.009, so 0.04 is > 4 sigma
    assert torch.allclose(freq, torch.full((3,), 1 / 3), atol=0.04)


def test_warmup_cosine_hand_values():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0)


def test_layer_decay_param_groups():
    model = BackboneClassifier(tiny_vit(), num_classes=3, pooling="cls+avgpool")
    groups = classifier_param_groups(model, lr=1.0, weight_decay=0.05, backbone_lr_mult=0.1, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(lr_of) == len(params)  # every trainable parameter exactly once
    # depth 2: embeddings are layer 0, blocks.i layer i+1, final norm layer 3 -> lr * 0.1 * 0.5**(3 - layer)
    expected = {
        "backbone.patch_embed.proj.weight": (0.1 * 0.5**3, 0.05),
        "backbone.pos_embed": (0.1 * 0.5**3, 0.0),
        "backbone.cls_token": (0.1 * 0.5**3, 0.0),
        "backbone.blocks.0.attn.qkv.weight": (0.1 * 0.5**2, 0.05),
        "backbone.blocks.1.mlp.fc1.weight": (0.1 * 0.5, 0.05),
        "backbone.blocks.1.norm1.weight": (0.1 * 0.5, 0.0),
        "backbone.norm.weight": (0.1, 0.0),
        "head.linear.weight": (1.0, 0.05),
        "head.linear.bias": (1.0, 0.0),
    }
    for name, (lr, wd) in expected.items():
        got_lr, got_wd = lr_of[id(params[name])]
        assert got_lr == pytest.approx(lr) and got_wd == wd, name
    assert vit_layer_id("blocks.0.5.attn.qkv.weight", 12) == 6  # chunked layout: blocks.<chunk>.<index>
    frozen = BackboneClassifier(tiny_vit(), num_classes=3, freeze_backbone=True)
    groups = classifier_param_groups(frozen, lr=1.0, weight_decay=0.0)
    assert sum(len(g["params"]) for g in groups) == 2  # only the head


def test_preprocessing_and_pooling_shapes():
    prep = preprocessing_for(28, 0.875)
    assert (prep.image_size, prep.resize_size) == (28, 32)
    assert preprocessing_for(112).resize_size == 112
    model = BackboneClassifier(tiny_vit(), num_classes=3, pooling="cls+avgpool")
    x = torch.randn(2, 3, 28, 28)
    out = model.backbone.forward_features(x)
    feats = model.features(x)
    expected = torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=1)
    torch.testing.assert_close(feats, expected)
    assert model(x).shape == (2, 3)
    with pytest.raises(ValueError, match="pooling"):
        BackboneClassifier(tiny_vit(), num_classes=3, pooling="gem")


# ----------------------------------------------------------------------------------------------
# train_classifier end to end
# ----------------------------------------------------------------------------------------------


def test_linear_mode_keeps_backbone_and_writes_outputs(setup, tmp_path):
    data, backbone_path = setup
    original = load_file(backbone_path)
    result = train_classifier(config(data, backbone_path, tmp_path / "lin", mode="linear", epochs=2))
    for name in ("best.pth", "last.pth"):
        state = backbone_state(tmp_path / "lin" / name)
        assert state.keys() == original.keys()
        assert all(torch.equal(state[k], original[k]) for k in original), name
    lines = (tmp_path / "lin" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_balanced_accuracy"} <= set(
        records[0]
    )
    assert Image.open(tmp_path / "lin" / "learning_curves.png").size[0] > 100
    # best.pth is the epoch with the highest val balanced accuracy (first one on ties)
    best_epoch = max(records, key=lambda r: (r["val_balanced_accuracy"], -r["epoch"]))["epoch"]
    assert result.best_epoch == best_epoch
    # test report: metrics equal a recomputation from the written per-image predictions
    rows = list(csv.DictReader(open(tmp_path / "lin" / "test" / "test_predictions.csv")))
    assert len(rows) == 3 * 3
    y_true = [CLASSES.index(r["true_class"]) for r in rows]
    y_pred = [CLASSES.index(r["predicted_class"]) for r in rows]
    expected = classification_metrics(y_true, y_pred, 3)
    saved = json.loads((tmp_path / "lin" / "test" / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(expected["accuracy"])
    assert saved["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert result.test_metrics["accuracy"] == pytest.approx(expected["accuracy"])
    model, classes, prep = load_classifier(tmp_path / "lin" / "best.pth")
    assert classes == list(CLASSES) and prep.image_size == 28


def test_finetune_mode_changes_backbone(setup, tmp_path):
    data, backbone_path = setup
    original = load_file(backbone_path)
    train_classifier(config(data, backbone_path, tmp_path / "ft", mode="finetune", head="cls+avgpool"))
    state = backbone_state(tmp_path / "ft" / "best.pth")
    changed = [k for k in original if not torch.equal(state[k], original[k])]
    # every trainable weight moved (mask_token gets no gradient: it is only used by masked SSL training)
    assert set(original) - set(changed) <= {"mask_token"}
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed


def test_resume_continues_and_matches_uninterrupted_run(setup, tmp_path, monkeypatch):
    data, backbone_path = setup
    kw = dict(mode="finetune", epochs=2, warmup_epochs=0.5, seed=3)
    full = train_classifier(config(data, backbone_path, tmp_path / "full", **kw))
    assert (full.start_epoch, full.epochs_run) == (0, 2)

    real_run_epoch = finetune.run_epoch
    calls = {"train": 0}

    def crash_in_second_epoch(*args, **kwargs):
        if inspect.signature(real_run_epoch).bind(*args, **kwargs).arguments.get("optimizer") is not None:
            calls["train"] += 1
            if calls["train"] == 2:
                raise KeyboardInterrupt("simulated interruption")
        return real_run_epoch(*args, **kwargs)

    monkeypatch.setattr(finetune, "run_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(config(data, backbone_path, tmp_path / "resumed", **kw))
    monkeypatch.setattr(finetune, "run_epoch", real_run_epoch)
    assert torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["epoch"] == 1
    resumed = train_classifier(config(data, backbone_path, tmp_path / "resumed", **kw))
    assert (resumed.start_epoch, resumed.epochs_run) == (1, 1)
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0, msg=k)
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    assert b["history"][1]["train_loss"] == pytest.approx(a["history"][1]["train_loss"], abs=0)

    # a re-run of a finished training does not train again
    again = train_classifier(config(data, backbone_path, tmp_path / "resumed", **kw))
    assert again.epochs_run == 0
    # different settings in the same folder are refused, naming the difference
    with pytest.raises(ValueError, match="lr"):
        train_classifier(config(data, backbone_path, tmp_path / "resumed", **{**kw, "lr": 0.5}))


def test_cached_features_mode_and_balance(setup, tmp_path):
    data, backbone_path = setup
    result = train_classifier(
        config(
            data, backbone_path, tmp_path / "cache", cache_features=True, epochs=3, balance="weighted-loss"
        )
    )
    assert len(result.history) == 3
    original = load_file(backbone_path)
    state = backbone_state(tmp_path / "cache" / "best.pth")
    assert all(torch.equal(state[k], original[k]) for k in original)


def test_config_and_cli_errors(setup, tmp_path, capsys):
    data, backbone_path = setup
    with pytest.raises(ValueError, match="cache_features"):
        train_classifier(config(data, backbone_path, tmp_path / "x", mode="finetune", cache_features=True))
    with pytest.raises(ValueError, match="multiple of the backbone's patch size"):
        train_classifier(config(data, backbone_path, tmp_path / "x", image_size=30))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "last.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot resume"):
        train_classifier(config(data, backbone_path, tmp_path / "junk"))
    assert (tmp_path / "junk" / "last.pth").read_bytes() == b"not a checkpoint"  # never overwritten
    with pytest.raises(FileNotFoundError, match="TRN"):
        train_classifier(config(tmp_path / "nowhere", backbone_path, tmp_path / "x"))
    argv = [
        "--data",
        str(tmp_path / "nowhere"),
        "--backbone",
        str(backbone_path),
        "--output-dir",
        str(tmp_path),
    ]
    assert finetune.main(argv) == 2
    assert "TRN" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        finetune.main(["--data", str(data), "--backbone", str(backbone_path), "--mode", "probe"])
    assert e.value.code == 2


def test_cli_flags_come_from_the_config_fields():
    """Every FinetuneConfig field is a flag with its docstring as help; the historical flags parse."""
    parser = get_args_parser()
    args = parser.parse_args(["--data", "d", "--backbone", "b"])
    defaults = FinetuneConfig(data="d", backbone="b", output_dir="finetune_output")
    assert FinetuneConfig(**vars(args)) == defaults
    argv = [
        "--data",
        "d",
        "--backbone",
        "b",
        "--output-dir",
        "o",
        "--mode",
        "finetune",
        "--head",
        "cls+avgpool",
        "--epochs",
        "3",
        "--batch-size",
        "5",
        "--lr",
        "0.5",
        "--backbone-lr-mult",
        "0.2",
        "--layer-decay",
        "0.9",
        "--weight-decay",
        "0.01",
        "--warmup-epochs",
        "1.5",
        "--balance",
        "sampler",
        "--image-size",
        "28",
        "--crop-pct",
        "0.875",
        "--crop-scale-min",
        "0.5",
        "--color-jitter",
        "0",
        "--cache-features",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--seed",
        "7",
        "--no-resume",
        "--no-progress",
    ]
    expected = FinetuneConfig(
        data="d",
        backbone="b",
        output_dir="o",
        mode="finetune",
        head="cls+avgpool",
        epochs=3,
        batch_size=5,
        lr=0.5,
        backbone_lr_mult=0.2,
        layer_decay=0.9,
        weight_decay=0.01,
        warmup_epochs=1.5,
        balance="sampler",
        image_size=28,
        crop_pct=0.875,
        crop_scale_min=0.5,
        color_jitter=0.0,
        cache_features=True,
        device="cpu",
        num_workers=0,
        seed=7,
        resume=False,
        progress=False,
    )
    assert FinetuneConfig(**vars(parser.parse_args(argv))) == expected
    help_text = " ".join(parser.format_help().split())
    # the field's docstring, written once in config.py, is the flag's help
    assert "Number of passes over TRN." in help_text
    assert "Data-loading worker processes. (default: 4)" in help_text
    for bad in (["--mode", "probe"], ["--balance", "oversample"], ["--head", "avg"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--data", "d", "--backbone", "b", *bad])
