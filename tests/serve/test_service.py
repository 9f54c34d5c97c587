"""Tests of dinov2/serve/service.py, retrieval.py and overlay.py against independent computations:
dinov2-infer's predictions, the backbone's own `get_last_self_attention`, brute-force cosine
similarity and hand-computed colour blends."""

import base64
import contextlib
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import decompression_bomb_png, truncated

from dinov2.eval.attention_maps import compute_attention_maps
from dinov2.eval.features import FeatureSet
from dinov2.serve.overlay import (
    attention_overlays,
    blend_heatmap,
    colour_table,
    scale_to_unit,
    token_heatmaps,
)
from dinov2.serve.retrieval import ReferenceIndex
from dinov2.serve.service import ClassifierService, Upload
from dinov2.transfer.classifier import load_classifier
from dinov2.transfer.infer import predict as infer_predict


@pytest.fixture(scope="module")
def service(trained) -> ClassifierService:
    return ClassifierService.from_checkpoint(
        trained.model,
        device="cpu",
        reference=trained.reference,
        cache_dir=trained.root / "cache",
        progress=False,
    )


def _uploads(paths) -> list[Upload]:
    return [Upload(p.name, p.read_bytes()) for p in paths]


def _decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_predictions_equal_dinov2_infer(service, trained):
    files = trained.images(6)
    expected = infer_predict(trained.model, files, device="cpu", progress=False)
    results = service.predict(_uploads(files))
    assert [r.prediction.path for r in results] == [p.name for p in files]
    for got, want in zip(results, expected):
        assert got.prediction.error is None
        assert got.prediction.predicted_class == want.predicted_class
        for c in service.classes:
            assert got.prediction.probabilities[c] == pytest.approx(want.probabilities[c], abs=1e-6)
        assert sum(got.prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def test_one_pass_attention_equals_get_last_self_attention(service, trained):
    images = torch.stack([service._transform(Image.open(p).convert("RGB")) for p in trained.images(3)])
    probs, embeddings, maps = service._run_model(images)
    expected_maps = compute_attention_maps(service.model.backbone, images)
    assert maps.shape == (3, 1 + 2, 2, 8, 8)  # 2 registers, 2 heads, 64 px / 8 px patches
    torch.testing.assert_close(maps, expected_maps, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected_probs = torch.softmax(service.model(images), dim=1).numpy()
        expected_embeddings = service.model.features(images)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(embeddings, expected_embeddings)


def test_broken_files_get_their_own_error_and_the_rest_is_kept(service, trained):
    good = trained.images(2)
    uploads = [
        Upload("truncated.jpg", truncated(good[0].read_bytes())),
        Upload(good[0].name, good[0].read_bytes()),
        Upload("notes.txt", b"not an image at all"),
        Upload("empty.png", b""),
        Upload("bomb.png", decompression_bomb_png()),
        Upload(good[1].name, good[1].read_bytes()),
    ]
    results = service.predict(uploads)
    assert [r.prediction.path for r in results] == [u.filename for u in uploads]
    errors = {r.prediction.path: r.prediction.error for r in results}
    assert "truncated.jpg: truncated" in errors["truncated.jpg"]
    assert "notes.txt: not_an_image" in errors["notes.txt"]
    assert "empty.png: zero_bytes" in errors["empty.png"]
    assert "bomb.png: too_large" in errors["bomb.png"]
    assert "dinov2-serve-" not in " ".join(e for e in errors.values() if e)  # no temporary paths leak
    for r in (results[1], results[5]):
        assert r.prediction.error is None and r.attention is not None and len(r.neighbours) == 8
    for r in (results[0], results[2], results[3], results[4]):
        assert r.prediction.probabilities is None and r.attention is None and r.neighbours == []
    singles = [service.predict([uploads[i]])[0] for i in (1, 5)]  # batch neighbours change nothing
    for batched, alone in zip((results[1], results[5]), singles):
        assert batched.prediction.predicted_class == alone.prediction.predicted_class
        for c in service.classes:
            assert batched.prediction.probabilities[c] == pytest.approx(
                alone.prediction.probabilities[c], abs=1e-6
            )


def test_model_runs_without_gradients_and_one_request_at_a_time(service, trained):
    seen, active, peak = [], [0], [0]
    counter = threading.Lock()

    def before(_module, _inputs):
        with counter:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        time.sleep(0.05)  # widen the window in which a second request could slip in

    def after(_module, _inputs, _output):
        with counter:
            active[0] -= 1

    uploads = _uploads(trained.images(2))
    serial = service.predict(uploads)
    outputs: list = [None] * 4

    def work(i):
        try:
            outputs[i] = service.predict(uploads)
        except RuntimeError as e:  # without the lock, requests see each other's hooked tensors
            outputs[i] = e

    def run_concurrently() -> int:
        peak[0] = active[0] = 0
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return peak[0]

    handles = [
        service.model.backbone.blocks[0].register_forward_pre_hook(before),
        service.model.backbone.blocks[-1].register_forward_hook(after),
    ]
    lock = service._lock
    try:
        service._lock = contextlib.nullcontext()  # the probe does see overlap when nothing serialises
        assert run_concurrently() > 1
        seen.clear()
        service._lock = lock
        assert run_concurrently() == 1
    finally:
        service._lock = lock
        for h in handles:
            h.remove()
    assert seen and all(grad is False and inference for grad, inference in seen)
    for out in outputs:
        assert [r.prediction.probabilities for r in out] == [r.prediction.probabilities for r in serial]
    assert all(p.grad is None for p in service.model.parameters())


def test_attention_overlays_are_pngs_of_the_crop(service, trained):
    (result,) = service.predict(_uploads(trained.images(1)))
    assert set(result.attention) == {"cls", "registers"} and len(result.attention["registers"]) == 2
    for url in [result.attention["cls"], *result.attention["registers"]]:
        image = _decode_data_url(url)
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"


def test_neighbours_match_brute_force_cosine_similarity(service, trained):
    files = trained.images(3)
    results = service.predict(_uploads(files))
    fs = service.reference.features
    model, _, prep = load_classifier(trained.model)
    tf = prep.transform()
    with torch.no_grad():
        queries = model.features(torch.stack([tf(Image.open(p).convert("RGB")) for p in files])).numpy()
    ref = fs.features / np.linalg.norm(fs.features, axis=1, keepdims=True)
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ ref.T
    for r, row in zip(results, sims):
        got = [n.index for n in r.neighbours]
        assert got == list(np.argsort(-row, kind="stable")[:8])
        np.testing.assert_allclose([n.similarity for n in r.neighbours], row[got], atol=1e-5)
        assert [n.class_name for n in r.neighbours] == [fs.class_names[fs.labels[i]] for i in got]


def test_a_reference_image_finds_itself_first(service):
    fs = service.reference.features
    path = fs.paths[5]
    with open(path, "rb") as f:
        (result,) = service.predict([Upload("query.jpg", f.read())])
    assert result.neighbours[0].index == 5 and result.neighbours[0].path == path
    assert result.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_reference_index_checks_its_input(service, tmp_path):
    fs = service.reference.features
    with pytest.raises(ValueError, match="dimensions"):
        ReferenceIndex(fs, expected_dim=fs.features.shape[1] + 1)
    unlabeled = FeatureSet(fs.features, np.full(len(fs), -1), [], fs.paths)
    with pytest.raises(ValueError, match="labeled"):
        ReferenceIndex(unlabeled)
    other = FeatureSet(fs.features, fs.labels, fs.class_names, fs.paths, meta={"pooling": "avgpool"})
    with pytest.raises(ValueError, match="'avgpool' features but the classifier pools 'cls\\+avgpool'"):
        ReferenceIndex.from_file(other.save(tmp_path / "other.npz"), service.model)
    same = ReferenceIndex.from_file(fs.save(tmp_path / "same.npz"), service.model)
    assert len(same) == len(fs)
    ties = FeatureSet(np.ones((3, 2), np.float32), [0, 1, 0], ["a", "b"], ["x", "y", "z"])
    assert [n.index for n in ReferenceIndex(ties).search(np.ones((1, 2)), k=5)[0]] == [0, 1, 2]


def test_reference_thumbnails(service):
    png = service.reference_thumbnail(0, size=20)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and max(image.size) == 20  # the 64 px cell, shrunk
    with pytest.raises(LookupError):
        service.reference_thumbnail(len(service.reference))


def test_blend_heatmap_hand_computation():
    image = np.full((2, 2, 3), 100, np.uint8)
    heat = np.array([[0.0, 1.0], [0.5, 0.0]], np.float32)
    lut = colour_table("inferno")
    out = blend_heatmap(image, heat, alpha=0.25)
    assert out[0, 0].tolist() == np.rint(0.75 * 100 + 0.25 * lut[0]).astype(int).tolist()
    assert out[0, 1].tolist() == np.rint(0.75 * 100 + 0.25 * lut[255]).astype(int).tolist()
    assert out[1, 0].tolist() == np.rint(0.75 * 100 + 0.25 * lut[128]).astype(int).tolist()
    assert (blend_heatmap(image, heat, alpha=0.0) == image).all()
    assert scale_to_unit(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert scale_to_unit(np.full(3, 7.0)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="does not match"):
        blend_heatmap(image, np.zeros((3, 3)))


def test_token_heatmaps_average_heads_and_keep_the_hot_patch():
    maps = torch.zeros(3, 2, 4, 4)
    maps[0, 0, 1, 2] = 1.0  # CLS, head 0 only: the mean over heads keeps the same peak
    maps[2, :, 3, 0] = 0.5
    heat = token_heatmaps(maps, (32, 32))
    assert heat.shape == (3, 32, 32)
    assert np.unravel_index(heat[0].argmax(), (32, 32))[0] // 8 == 1
    assert np.unravel_index(heat[0].argmax(), (32, 32))[1] // 8 == 2
    assert heat[1].max() == 0.0  # a flat map stays flat
    assert heat[0].min() == 0.0 and heat[0].max() == pytest.approx(1.0)
    urls = attention_overlays(np.zeros((32, 32, 3), np.uint8), maps)
    assert len(urls["registers"]) == 2
