"""The JSON API and the page of dinov2/serve/app.py through FastAPI's TestClient: predictions agree
with dinov2-infer (classes and CSV, row for row), bad input gets the documented status codes."""

import base64
import csv
import io
import re
import shutil
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import decompression_bomb_png, truncated

from dinov2.serve.app import STATIC_DIR, create_app
from dinov2.serve.service import ClassifierService
from dinov2.transfer.infer import main as infer_main
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


@pytest.fixture(scope="module")
def client(service) -> TestClient:
    with TestClient(create_app(service)) as c:
        yield c


def _files(items) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx multipart list for (name, bytes) pairs, all in the field "files"."""
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def _read(paths) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


def test_health(client, service, trained):
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == str(trained.model)
    assert body["classes"] == ["eosinophil", "lymphocyte", "platelet"]
    assert body["device"] == "cpu"
    assert body["reference_size"] == len(list(trained.reference.rglob("*.jpg"))) == 18
    assert body["backbone"].startswith("ViT/8 (width 32, depth 2, 2 registers")
    assert body["max_upload_mb"] == 20 and body["max_files"] == 256


def test_predict_agrees_with_dinov2_infer(client, trained):
    files = trained.images(5)
    r = client.post("/api/predict", files=_files(_read(files)))
    assert r.status_code == 200
    results = r.json()
    expected = infer_predict(trained.model, files, device="cpu", progress=False)
    assert [x["filename"] for x in results] == [p.name for p in files]
    for got, want in zip(results, expected):
        assert set(got) >= {
            "filename",
            "predicted_class",
            "probabilities",
            "error",
            "attention",
            "neighbours",
        }
        assert got["error"] is None
        assert sum(got["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert (
            got["predicted_class"]
            == want.predicted_class
            == max(got["probabilities"], key=got["probabilities"].get)
        )
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
        assert len(got["attention"]["registers"]) == 2
        image = Image.open(io.BytesIO(base64.b64decode(got["attention"]["cls"].split(",", 1)[1])))
        assert image.format == "PNG" and image.size == (64, 64)
        sims = [n["similarity"] for n in got["neighbours"]]
        assert (
            len(sims) == 8 and sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 + 1e-6 for s in sims)
        )
        assert {n["class"] for n in got["neighbours"]} <= set(got["probabilities"])


def test_a_broken_file_gets_an_error_and_the_batch_survives(client, trained):
    good = trained.images(2)
    items = [
        (good[0].name, good[0].read_bytes()),
        ("broken.jpg", truncated(good[1].read_bytes())),
        ("bomb.png", decompression_bomb_png()),
        (good[1].name, good[1].read_bytes()),
    ]
    r = client.post("/api/predict", files=_files(items))
    assert r.status_code == 200
    results = r.json()
    assert [x["filename"] for x in results] == [name for name, _ in items]
    assert results[1]["error"].startswith("ImageDecodeError: broken.jpg: truncated")
    assert results[2]["error"].startswith("ImageDecodeError: bomb.png: too_large")
    for bad in results[1:3]:
        assert bad["predicted_class"] is None and bad["probabilities"] is None and bad["neighbours"] == []
    assert results[0]["predicted_class"] and results[3]["predicted_class"]
    assert client.get("/api/health").status_code == 200  # still serving


def test_csv_equals_dinov2_infer_csv_row_for_row(client, trained, tmp_path, monkeypatch):
    folder = tmp_path / "upload"
    folder.mkdir()
    for p in trained.images(4):
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(truncated(trained.images(1)[0].read_bytes()))
    (folder / "notes, draft.txt").write_text("a comma in the name: the CSV must quote it")
    names = sorted(p.name for p in folder.iterdir())
    monkeypatch.chdir(folder)  # dinov2-infer then writes the bare names the browser uploads
    assert infer_main(["--model", str(trained.model), "--csv", "infer.csv", "--no-progress", *names]) == 0
    expected = (folder / "infer.csv").read_bytes().decode("utf-8")
    r = client.post("/api/predict.csv", files=_files((n, (folder / n).read_bytes()) for n in names))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert 'filename="predictions.csv"' in r.headers["content-disposition"]
    got_rows = list(csv.reader(io.StringIO(r.text)))
    want_rows = list(csv.reader(io.StringIO(expected)))
    assert got_rows[0] == ["path", "predicted_class", "probability"] + [
        f"prob_{c}" for c in ("eosinophil", "lymphocyte", "platelet")
    ] + ["error"]
    assert len(got_rows) == len(names) + 1
    for got, want in zip(got_rows, want_rows):
        assert got == want
    assert r.text == expected  # byte for byte, line endings included


def test_a_file_over_the_limit_is_a_413(service, trained):
    with TestClient(create_app(service)) as client:  # the default limit: 20 MB
        big = b"\0" * (20 * 1024 * 1024 + 1)
        r = client.post(
            "/api/predict",
            files=_files([("small.jpg", trained.images(1)[0].read_bytes()), ("huge.tif", big)]),
        )
        assert r.status_code == 413
        assert "huge.tif" in r.json()["detail"] and "20 MB limit" in r.json()["detail"]
        just_fits = b"\0" * (20 * 1024 * 1024)
        r = client.post("/api/predict", files=_files([("zeros.tif", just_fits)]))
        assert r.status_code == 200 and "zeros.tif: " in r.json()[0]["error"]
    with TestClient(create_app(service, max_upload_mb=0.01, max_request_mb=0.05)) as client:
        r = client.post("/api/predict.csv", files=_files([("a.jpg", b"\0" * 20_000)]))
        assert r.status_code == 413 and "0.01 MB limit" in r.json()["detail"]
        r = client.post("/api/predict", files=_files([(f"{i}.jpg", b"\0" * 9_000) for i in range(8)]))
        assert r.status_code == 413 and "request of" in r.json()["detail"]  # refused before reading


def test_an_empty_upload_is_a_400(client):
    for kwargs in ({}, {"data": {"note": "no file"}}, {"files": [("other", ("a.jpg", b"x", "image/jpeg"))]}):
        r = client.post("/api/predict", **kwargs)
        assert r.status_code == 400, kwargs
        assert "no files uploaded" in r.json()["detail"]
    r = client.post("/api/predict", data={"files": "text instead of a file"})
    assert r.status_code == 400 and "must hold files" in r.json()["detail"]
    r = client.post("/api/predict.csv", files=[("files", ("", b"", "application/octet-stream"))])
    assert r.status_code == 400  # an empty file chooser
    chunked = client.post(
        "/api/predict",
        content=iter([b"--x--\r\n"]),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert chunked.status_code == 411  # no Content-Length: the size cannot be checked before reading


def test_concurrent_requests_get_their_own_answers(client, trained):
    files = trained.images(6)
    alone = [client.post("/api/predict", files=_files(_read([p]))).json()[0] for p in files]
    answers: list = [None] * len(files)

    def ask(i):
        answers[i] = client.post("/api/predict", files=_files(_read([files[i]]))).json()[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(answers, alone):
        assert got["filename"] == want["filename"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert got["attention"] == want["attention"]


def test_reference_thumbnails(client):
    r = client.get("/api/reference/0/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert client.get("/api/reference/999/thumbnail").status_code == 404
    assert client.get("/api/reference/-1/thumbnail").status_code == 404


def test_page_and_assets_are_served_by_the_app_itself(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert asset.startswith("/static/"), asset
        assert client.get(asset).status_code == 200
    for path in STATIC_DIR.iterdir():  # no CDN, no font service, no analytics: nothing external
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text()), path.name
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load a CDN
