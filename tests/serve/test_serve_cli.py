"""`dinov2-serve` (dinov2/run/serve.py) as a user runs it: a real uvicorn process on 127.0.0.1."""

import os
import signal

import httpx
import pytest
from serve_helpers import running_server

from dinov2.run.serve import default_cache_dir, main


def test_serves_a_checkpoint_and_stops_cleanly_on_ctrl_c(trained, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model", str(trained.model), "--reference", str(trained.reference), "--cache-dir", str(cache)]
    with running_server(*args) as (url, proc, log):
        health = httpx.get(f"{url}/api/health").json()
        assert health["reference_size"] == 18 and health["classes"] == [
            "eosinophil",
            "lymphocyte",
            "platelet",
        ]
        good = trained.images(1)[0]
        files = [("files", (good.name, good.read_bytes())), ("files", ("bad.png", b"\x89PNG broken"))]
        results = httpx.post(f"{url}/api/predict", files=files, timeout=60).json()
        assert results[0]["predicted_class"] in health["classes"] and "not_an_image" in results[1]["error"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        log.seek(0)
        output = log.read()
    assert f"open {url}/ (Ctrl+C stops)" in output
    assert "18 reference cells" in output
    assert list(cache.glob("features-*.npz")), "the reference embeddings are cached"


def test_bad_arguments_exit_with_2_and_say_why(trained, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing.pth")]) == 2
    assert "classifier checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["--model", str(tmp_path / "junk.pth")]) == 2
    assert "cannot read classifier checkpoint" in capsys.readouterr().err
    assert main(["--model", str(trained.model), "--reference", str(tmp_path / "nowhere")]) == 2
    assert "reference folder not found" in capsys.readouterr().err
    assert main(["--model", str(trained.model), "--port", "70000"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: one reference source only
        main(["--model", "m.pth", "--reference", "a", "--reference-features", "b.npz"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_and_default_cache_dir(trained, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("usage: dinov2-serve")
    assert default_cache_dir(trained.model) == trained.model.parent / "feature_cache"
    read_only = tmp_path / "ro"
    read_only.mkdir()
    (read_only / "best.pth").write_bytes(b"")
    monkeypatch.setenv("DINOV2_CACHE_DIR", str(tmp_path / "home-cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: pretend not
    assert default_cache_dir(read_only / "best.pth") == tmp_path / "home-cache" / "serve"
