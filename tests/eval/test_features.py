"""Feature extraction: poolings against the ViT's own outputs, baselines by hand, the on-disk
cache (hit without any forward pass, miss when data changes), subsampling, sharding, errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval import features as F
from dinov2.eval.features import (
    FeatureSet,
    extract_features,
    load_eval_backbone,
    merge_shards,
    shard_indices,
    subsample_per_class,
)
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import export_backbone

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture
def labeled_root(tmp_path):
    """3 class folders x 4 random 32x32 PNGs (distinct per image)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            arr[..., c] = 200 + 10 * i  # class colour cue
            Image.fromarray(arr).save(root / name / f"img{i}.png")
    return root


def _tiny_vit():
    torch.manual_seed(0)
    return DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_register_tokens=1, block_chunks=0
    ).eval()


@pytest.fixture
def tiny_ckpt(tmp_path):
    # safetensors keeps the architecture (head count) in its metadata.
    return export_backbone(_tiny_vit(), tmp_path / "tiny.safetensors")


def _inputs(root):
    """Hand preprocessing at 32 px (no resize needed): [N, 3, 32, 32] in dataset order."""
    paths = sorted(str(p) for p in root.rglob("*.png"))
    arr = np.stack([(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255 - MEAN) / STD for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2), paths


def test_poolings_match_vit_outputs(labeled_root, tiny_ckpt, tmp_path):
    model = _tiny_vit()
    x, paths = _inputs(labeled_root)
    with torch.no_grad():
        ref = model.forward_features(x)
        layers = model.get_intermediate_layers(x, 2, return_class_token=True)
    fs = extract_features(tiny_ckpt, labeled_root, image_size=32, batch_size=5, progress=False)
    assert fs.features.shape == (12, 16) and fs.features.dtype == np.float32
    np.testing.assert_allclose(fs.features, ref["x_norm_clstoken"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(fs.labels, np.repeat([0, 1, 2], 4))
    assert fs.class_names == CLASSES and fs.paths == paths
    avg = extract_features(tiny_ckpt, labeled_root, image_size=32, pooling="avgpool", progress=False)
    np.testing.assert_allclose(avg.features, ref["x_norm_patchtokens"].mean(1).numpy(), rtol=1e-4, atol=1e-5)
    both = extract_features(
        tiny_ckpt, labeled_root, image_size=32, pooling="cls+avgpool", n_last_blocks=2, progress=False
    )
    expected = torch.cat([layers[0][1], layers[1][1], layers[0][0].mean(1), layers[1][0].mean(1)], dim=1)
    np.testing.assert_allclose(both.features, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_batch_normalisation_equals_per_image_transform():
    # extract_features crops per image and normalises per batch; finetune/infer use transform().
    prep = F.Preprocessing(image_size=28, resize_size=32, interpolation="bicubic")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + i, 37, 3), dtype=np.uint8)) for i in range(3)]
    per_image = torch.stack([prep.transform()(im) for im in images])
    batch = prep.normalize_batch(torch.stack([F.image_to_uint8_hwc(prep.crop()(im)) for im in images]))
    assert batch.shape == (3, 3, 28, 28)
    torch.testing.assert_close(batch, per_image, rtol=0, atol=1e-6)


def test_baselines_by_hand(labeled_root):
    x, _ = _inputs(labeled_root)
    px = extract_features("pixels:4", labeled_root, image_size=32, progress=False)
    blocks = x.numpy().reshape(12, 3, 4, 8, 4, 8).mean(axis=(3, 5)).reshape(12, -1)  # 8x8 block means
    np.testing.assert_allclose(px.features, blocks, rtol=1e-5, atol=1e-5)
    cs = extract_features("colorstats", labeled_root, image_size=32, progress=False)
    flat = x.numpy().reshape(12, 3, -1)
    np.testing.assert_allclose(
        cs.features, np.concatenate([flat.mean(2), flat.std(2)], 1), rtol=1e-4, atol=1e-4
    )


def test_cache_hit_runs_no_forward(labeled_root, tmp_path, monkeypatch):
    model = _tiny_vit()
    calls = []
    model.patch_embed.register_forward_pre_hook(lambda *a: calls.append(1))
    cache = tmp_path / "cache"
    first = extract_features(
        model, labeled_root, image_size=32, batch_size=4, cache_dir=cache, progress=False
    )
    assert len(calls) == 3 and first.meta["cache"]["hit"] is False
    assert len(list(cache.glob("features-*.npz"))) == 1
    second = extract_features(
        model, labeled_root, image_size=32, batch_size=4, cache_dir=cache, progress=False
    )
    assert len(calls) == 3  # no forward pass on the second call
    assert second.meta["cache"]["hit"] is True
    np.testing.assert_array_equal(first.features, second.features)
    assert second.paths == first.paths and second.class_names == first.class_names
    # Different pooling or changed weights: a new key.
    extract_features(model, labeled_root, image_size=32, pooling="avgpool", cache_dir=cache, progress=False)
    assert len(calls) == 4
    with torch.no_grad():
        model.norm.weight.mul_(2)
    extract_features(model, labeled_root, image_size=32, batch_size=4, cache_dir=cache, progress=False)
    assert len(calls) == 7


def test_cache_by_checkpoint_never_loads_model_and_tracks_data(
    labeled_root, tiny_ckpt, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    kw = dict(image_size=32, cache_dir=cache, progress=False)
    first = extract_features(tiny_ckpt, labeled_root, **kw)

    def boom(*a, **k):
        raise AssertionError("model loaded on a cache hit")

    monkeypatch.setattr(F, "load_eval_backbone", boom)
    second = extract_features(tiny_ckpt, labeled_root, **kw)
    np.testing.assert_array_equal(first.features, second.features)
    # Rewriting an image (new size / mtime) invalidates the cache.
    p = labeled_root / "beta" / "img0.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(p)
    os.utime(p, ns=(1, 1))
    with pytest.raises(AssertionError, match="cache hit"):
        extract_features(tiny_ckpt, labeled_root, **kw)


def test_feature_set_roundtrip_and_subset(labeled_root, tmp_path):
    fs = extract_features("colorstats", labeled_root, image_size=32, progress=False)
    path = fs.save(tmp_path / "f.npz")
    back = FeatureSet.load(path)
    np.testing.assert_array_equal(back.features, fs.features)
    assert back.class_names == fs.class_names and back.paths == fs.paths and back.meta == fs.meta
    sub = fs.subset(fs.labels == 1)
    assert len(sub) == 4 and sub.paths == fs.paths[4:8]
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        FeatureSet.load(tmp_path / "nothere.npz")


def test_max_images_per_class(labeled_root):
    fs = extract_features(
        "colorstats", labeled_root, image_size=32, max_images_per_class=2, seed=1, progress=False
    )
    assert np.bincount(fs.labels).tolist() == [2, 2, 2]
    again = extract_features(
        "colorstats", labeled_root, image_size=32, max_images_per_class=2, seed=1, progress=False
    )
    assert again.paths == fs.paths
    idx = subsample_per_class([0] * 10 + [1] * 3, 4, seed=0)
    assert len(idx) == 7 and set(range(10, 13)) <= set(idx.tolist()) and list(idx) == sorted(idx)


def test_random_init_is_seeded_and_leaves_global_rng_alone(monkeypatch):
    import dinov2.models.weights as W

    built = []

    def fake_load_backbone(spec, device="cpu", **overrides):
        # Stands in for the ViT-S build (seconds on CPU): random init from the global torch RNG.
        built.append((spec, overrides))
        return _random_vit()

    monkeypatch.setattr(W, "load_backbone", fake_load_backbone)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = load_eval_backbone("dinov2_vits14_reg", seed=0, img_size=28)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = load_eval_backbone("dinov2_vits14_reg", seed=0)
    c = load_eval_backbone("dinov2_vits14_reg", seed=1)
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert built[0] == ("dinov2_vits14_reg", {"img_size": 28})


def _random_vit():
    return DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, block_chunks=0
    )


def test_shard_and_merge():
    n, world = 11, 3
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    rows = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
    per_rank = -(-n // world)
    padded = []
    for s in shards:
        t = torch.full((per_rank, 2), -1.0)
        t[: len(s)] = rows[s]
        padded.append(t)
    assert torch.equal(merge_shards(padded, n), rows)
    with pytest.raises(ValueError, match="rank"):
        shard_indices(5, 3, 3)


def _dist_worker(rank, world, root, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fs = extract_features("pixels:2", root, image_size=32, batch_size=2, device="cpu", progress=False)
        np.save(f"{out}_{rank}.npy", fs.features)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_extraction_equals_single_process(labeled_root, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "feat")
    # fork: the children reuse the parent's imports (spawn would re-import torch twice, ~10 s).
    mp.start_processes(
        _dist_worker, args=(2, str(labeled_root), port, out), nprocs=2, join=True, start_method="fork"
    )
    single = extract_features("pixels:2", labeled_root, image_size=32, progress=False).features
    for r in range(2):
        np.testing.assert_allclose(np.load(f"{out}_{r}.npy"), single, rtol=1e-6)


def test_clear_errors(labeled_root, tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        extract_features(str(tmp_path / "missing.pth"), labeled_root, progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(flat / f"{i}.png")
    with pytest.raises(ValueError, match="needs labels"):
        extract_features("colorstats", flat, progress=False)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        extract_features(tiny_ckpt, labeled_root, image_size=30, progress=False)
    with pytest.raises(ValueError, match="pooling"):
        extract_features(tiny_ckpt, labeled_root, pooling="max", progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        extract_features("colorstats", tmp_path / "nowhere", progress=False)
    with pytest.raises(ValueError, match="pixels:S"):
        extract_features("pixels:x", labeled_root, progress=False)


def test_undecodable_image_is_dropped_not_replaced(labeled_root):
    clean = extract_features("colorstats", labeled_root, image_size=32, progress=False)
    broken = labeled_root / "beta" / "img9.png"
    broken.write_bytes(b"not an image at all")
    fs = extract_features("colorstats", labeled_root, image_size=32, progress=False)
    assert len(fs) == 12 and str(broken) not in fs.paths
    assert fs.meta["skipped_undecodable"] == [str(broken)]
    # The other images keep their own labels and features (no neighbour substituted).
    assert fs.paths == clean.paths
    np.testing.assert_array_equal(fs.labels, clean.labels)
    np.testing.assert_allclose(fs.features, clean.features)


def test_auto_detected_labels_are_kept(labeled_root, tmp_path):
    """labeled=None (what `dinov2-eval umap` and `features` use) detects class folders; only
    labeled=False drops them."""
    auto = extract_features("colorstats", labeled_root, image_size=32, labeled=None, progress=False)
    required = extract_features("colorstats", labeled_root, image_size=32, labeled=True, progress=False)
    assert auto.class_names == required.class_names and len(auto.class_names) > 1
    np.testing.assert_array_equal(auto.labels, required.labels)
    assert (auto.labels >= 0).all()
    plain = extract_features("colorstats", labeled_root, image_size=32, labeled=False, progress=False)
    assert (plain.labels == -1).all()
