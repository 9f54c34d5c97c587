"""A small trained classifier for the web-app tests, built in seconds on 2 CPU cores.

Synthetic stained cells (`dinov2.data.synthetic`) of three classes at 64 px, split 60/40 into
TRN/VAL, and a linear head (cached features) trained on a random-init ViT with 2 registers. The
accuracy does not matter; what matters is a real `best.pth` written by `dinov2-finetune`.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.eval.finetune import FinetuneConfig, train_classifier
from dinov2.eval.split import split_dataset
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.models.weights import export_backbone

CLASSES = ("eosinophil", "lymphocyte", "platelet")


@dataclass(frozen=True)
class TrainedClassifier:
    root: Path
    model: Path
    """best.pth."""
    reference: Path
    """The training split (labeled class folders)."""
    val: Path
    """Validation images, one folder per class."""

    def images(self, n: int) -> list[Path]:
        """``n`` validation images, classes interleaved, in a fixed order."""
        per_class = [sorted((self.val / c).glob("*.jpg")) for c in CLASSES]
        mixed = [p for group in zip(*per_class) for p in group]
        if len(mixed) < n:
            raise ValueError(f"only {len(mixed)} validation images")
        return mixed[:n]


def tiny_vit_with_registers(seed: int = 0) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    return DinoVisionTransformer(
        img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        num_register_tokens=2, block_chunks=0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedClassifier:
    root = tmp_path_factory.mktemp("serve")
    generate_synthetic_cells(root / "cells", per_class=10, size=64, seed=0, classes=CLASSES, progress=False)
    split_dataset(root / "cells", root / "split", (0.6, 0.4, 0.0), seed=0, mode="copy")
    export_backbone(tiny_vit_with_registers(), root / "backbone.safetensors")
    cfg = FinetuneConfig(
        data=str(root / "split"), backbone=str(root / "backbone.safetensors"), output_dir=str(root / "run"),
        mode="linear", head="cls+avgpool", epochs=10, batch_size=6, lr=0.05, image_size=64,
        warmup_epochs=0.0, cache_features=True, num_workers=0, progress=False, device="cpu",
    )  # fmt: skip
    result = train_classifier(cfg)
    return TrainedClassifier(root, result.best_checkpoint, root / "split" / "TRN", root / "split" / "VAL")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 120.0):
    """Start `python -m dinov2.run.serve ARGS --port <free>` and wait until /api/health answers.

    Yields (base URL, the process, its stdout file). Stops the server with SIGINT (uvicorn's
    graceful shutdown) at the end, and kills it only if it does not stop within 20 s.
    """
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "dinov2.run.serve", *args, "--port", str(port), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"dinov2-serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dinov2-serve did not answer within {timeout:.0f} s")
            time.sleep(0.2)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
