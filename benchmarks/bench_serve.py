"""Start-up time and request latency of `dinov2-serve`, measured from outside like a user sees them.

    python benchmarks/bench_serve.py                                  # ViT-S/14 reg4 at 126 px, 2 threads
    python benchmarks/bench_serve.py --arch vit_small --image-size 224
    python benchmarks/bench_serve.py --model demo_output/classifier/run/best.pth

Builds a classifier checkpoint (a random-init backbone of --arch with a linear head over the 8
synthetic cell classes: the weights do not change the cost) unless --model is given, and a
reference set of synthetic 128 px cells. Then, for a cold start (empty feature cache: the
reference set is embedded at start-up) and a warm one (cache filled), it starts the real command
(`python -m dinov2.run.serve`) and measures:

- time to ready: process start until /api/health answers;
- time to first prediction: process start until the answer to one 128 px image arrives;

and on the warm server the latency of POST /api/predict (the full answer: probabilities,
attention overlays as PNG data URLs, 8 neighbours) for one 128 px image and for a batch of 32,
median and 90th percentile over --repeats requests. The 1-minute load average is printed
alongside: on a shared machine the numbers move with it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: F401 (imported for its effect: this checkout's dinov2 first on sys.path)
import httpx
import torch

from dinov2.data.synthetic import PBC_CLASSES, generate_synthetic_cells
from dinov2.models.vision_transformer import ARCHS
from dinov2.transfer.classifier import (
    BackboneClassifier,
    classifier_checkpoint,
    preprocessing_for,
)
from dinov2.utils.files import atomic_torch_save


def make_checkpoint(args, path: Path) -> Path:
    torch.manual_seed(0)
    backbone = ARCHS[args.arch](
        patch_size=args.patch,
        img_size=args.image_size,
        num_register_tokens=args.registers,
        init_values=1e-5,
        block_chunks=0,
    )
    model = BackboneClassifier(backbone, len(PBC_CLASSES), pooling="cls+avgpool", freeze_backbone=True)
    atomic_torch_save(classifier_checkpoint(model, PBC_CLASSES, preprocessing_for(args.image_size)), path)
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, files: list[Path]) -> float:
    """Seconds for one POST /api/predict of ``files`` (fails loudly on a non-200 answer)."""
    payload = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files]
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/api/predict", files=payload, timeout=600)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    if any(item["error"] for item in r.json()):
        raise RuntimeError(f"unexpected errors: {[item['error'] for item in r.json()]}")
    return seconds


def start_and_measure(model: Path, reference: Path, cache: Path, images: list[Path], args, timed: bool):
    """Start the server, return (seconds to ready, seconds to first prediction, latencies or None)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dinov2.run.serve", "--model", str(model), "--reference", str(reference)]
    cmd += ["--cache-dir", str(cache), "--port", str(port), "--threads", str(args.threads), "--no-progress"]
    cmd += ["--device", args.device]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"dinov2-serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/api/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        ready = time.perf_counter() - t0
        post(url, images[:1])
        first = time.perf_counter() - t0
        latencies = None
        if timed:
            for _ in range(args.warmup):
                post(url, images[:1])
            one = [post(url, images[1 + i % 8 : 2 + i % 8]) for i in range(args.repeats)]
            batch = [post(url, images[:32]) for _ in range(max(3, args.repeats // 4))]
            latencies = {"one": one, "batch32": batch}
        return ready, first, latencies
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(times: list[float]) -> str:
    times = sorted(times)
    p90 = times[min(len(times) - 1, round(0.9 * (len(times) - 1)))]
    return f"median {1000 * statistics.median(times):7.1f} ms, p90 {1000 * p90:7.1f} ms (n={len(times)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="serve this best.pth instead of a built one")
    p.add_argument("--arch", default="vit_small", choices=sorted(ARCHS))
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--registers", type=int, default=4)
    p.add_argument("--image-size", type=int, default=126, help="model input side (128 px files resized)")
    p.add_argument("--reference-per-class", type=int, default=25, help="synthetic reference cells per class")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    reference = generate_synthetic_cells(
        work / "reference", args.reference_per_class, size=128, progress=False
    )
    queries = generate_synthetic_cells(work / "queries", 4, size=128, seed=1, progress=False)
    images = sorted(queries.rglob("*.jpg"))  # 32 images of 128 px
    model = args.model or make_checkpoint(args, work / "best.pth")
    what = (
        str(args.model)
        if args.model
        else f"{args.arch}/{args.patch} reg{args.registers} at {args.image_size} px"
    )
    print(f"dinov2-serve: {what}, {args.threads} threads, {len(PBC_CLASSES) * args.reference_per_class} refs")
    cache = work / "cache"
    cold_ready, cold_first, _ = start_and_measure(model, reference, cache, images, args, timed=False)
    print(f"cold start (reference embedded): ready {cold_ready:.2f} s, first prediction {cold_first:.2f} s")
    warm_ready, warm_first, lat = start_and_measure(model, reference, cache, images, args, timed=True)
    print(f"warm start (feature cache hit):  ready {warm_ready:.2f} s, first prediction {warm_first:.2f} s")
    per_image = 1000 * statistics.median(lat["batch32"]) / 32
    print(f"one 128 px image: {summary(lat['one'])}")
    print(f"batch of 32:      {summary(lat['batch32'])}, {per_image:.1f} ms per image")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
