"""Serve a trained cell classifier as a local web app (`dinov2-serve`).

Loads a ``best.pth`` written by `dinov2-finetune` (the checkpoint `dinov2-infer` reads) and,
optionally, a labeled reference set whose embeddings are computed once and cached (by default in
a ``feature_cache/`` folder beside the checkpoint, where `dinov2-finetune --cache-features` keeps
its own: serving a linear probe with its training split as the reference reuses them). Then it
serves the page and the JSON API (see `dinov2.serve.app`) with uvicorn, on 127.0.0.1 unless told
otherwise, and prints the URL.

Exit status: 0 after a clean stop (Ctrl+C), 2 when the model or reference cannot be loaded.

Example::

    dinov2-serve --model runs/linear/best.pth --reference split/TRN
    curl -F files=@cell1.png -F files=@cell2.png http://127.0.0.1:8000/api/predict
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def default_cache_dir(model_path: str | os.PathLike) -> Path:
    """``feature_cache/`` beside the checkpoint when that folder is writable, else
    ``$DINOV2_CACHE_DIR/serve`` (default ``~/.cache/dinov2-cells/serve``)."""
    beside = Path(model_path).resolve().parent
    if os.access(beside, os.W_OK):
        return beside / "feature_cache"
    base = os.environ.get("DINOV2_CACHE_DIR")
    return Path(base) / "serve" if base else Path.home() / ".cache" / "dinov2-cells" / "serve"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "dinov2-serve",
        description="Serve a dinov2-finetune classifier as a local web app: drop cell images, see the "
        "class probabilities, the CLS and register attention and the most similar reference cells.",
        add_help=add_help,
    )
    p.add_argument("--model", required=True, help="best.pth written by dinov2-finetune")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument(
        "--reference", help="labeled class-folder tree (e.g. the training split) for similar-cell search"
    )
    ref.add_argument(
        "--reference-features", help="a saved feature file (.npz from the feature cache) instead of a folder"
    )
    p.add_argument(
        "--reference-max-per-class",
        type=int,
        default=None,
        help="embed at most this many seeded images per reference class (default: all)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache for --reference (default: feature_cache/ beside --model)",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest accepted file in MB (default: 20)"
    )
    p.add_argument("--max-files", type=int, default=256, help="most files in one request (default: 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar for --reference")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port must be in 1..65535, got {args.port}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        from dinov2.serve.app import create_app
        from dinov2.serve.service import ClassifierService

        print(f"dinov2-serve: loading {args.model}", file=sys.stderr, flush=True)
        service = ClassifierService.from_checkpoint(
            args.model,
            device=args.device,
            reference=args.reference,
            reference_features=args.reference_features,
            cache_dir=args.cache_dir or (default_cache_dir(args.model) if args.reference else None),
            reference_max_per_class=args.reference_max_per_class,
            batch_size=args.batch_size,
            progress=args.progress,
        )
        app = create_app(service, max_upload_mb=args.max_upload_mb, max_files=args.max_files)
    except (ValueError, FileNotFoundError) as e:
        print(f"dinov2-serve: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    info = service.health()
    print(
        f"dinov2-serve: {len(info['classes'])} classes, {info['backbone']}, on {info['device']}; "
        f"{info['reference_size']} reference cells; loaded in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    if args.host not in LOOPBACK_HOSTS:
        print(
            f"dinov2-serve: warning: binding {args.host} exposes the app (no authentication) to the network",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"dinov2-serve: open http://{host}:{args.port}/ (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
