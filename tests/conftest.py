"""Shared fixtures. Tests assume at most 2 CPU cores and no GPU."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("DINOV2_TEST_THREADS", "2")))

REPO_ROOT = Path(__file__).resolve().parents[1]
PBC_ROOT = Path(os.environ.get("DINOV2_PBC_ROOT", REPO_ROOT.parent / "shared" / "data" / "pbc_128"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def pbc_root() -> Path:
    """The real PBC dataset at 128 px, or a clean skip where ../shared is absent."""
    if not PBC_ROOT.is_dir():
        pytest.skip(f"PBC dataset not found at {PBC_ROOT} (set DINOV2_PBC_ROOT)")
    return PBC_ROOT


@pytest.fixture(autouse=True)
def _private_scan_cache(tmp_path_factory, monkeypatch):
    """Scan caches of tests go to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("DINOV2_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dinov2-cache"))
