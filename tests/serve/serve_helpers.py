"""Helpers of the web-app tests: the test classifier's layout, a running `dinov2-serve` process,
and the files the tests upload (good cells, broken files, a decompression bomb). The `trained`
fixture itself is in conftest.py."""

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from dinov2.models.vision_transformer import DinoVisionTransformer

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


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def decompression_bomb_png(side: int = 10_000) -> bytes:
    """A valid 8-bit grayscale PNG of ``side`` x ``side`` black pixels: ~100 KB on disk for the
    default 100 megapixels (over Pillow's 89.5 MP limit), 100 MB once decoded."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte 0, then the pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def truncated(data: bytes, keep: int = 60) -> bytes:
    """The first ``keep`` bytes of an image file: a header without its pixel data."""
    return data[:keep]
