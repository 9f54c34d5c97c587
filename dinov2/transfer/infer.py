"""Predict cell classes with a trained classifier checkpoint (`dinov2-infer`).

Input: a ``best.pth`` written by `dinov2-finetune` and image files and/or folders (searched
recursively for the same extensions the datasets read; hidden files skipped). Output: a printed
table (path and top-k classes with probabilities) or a CSV with one row per file (the layout of
`dinov2.transfer.predictions`).

A file that cannot be decoded never stops the run: its row has an empty prediction and the
reason in ``error`` (CSV) or is listed under "errors" (table). The exit status is 0 in that case
too, so one broken file in a batch job does not look like a failed job; it is 2 when the model
file or an input path is missing, or no image is found at all.

Example::

    dinov2-infer --model runs/linear/best.pth new_cells/ extra.png --csv predictions.csv
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov2.eval.features import Preprocessing
from dinov2.transfer.classifier import BackboneClassifier, load_classifier, make_eval_transform
from dinov2.transfer.predictions import Prediction, write_predictions_csv
from dinov2.utils.device import autocast_for, resolve_device


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Files to predict: files as given, folders searched recursively for image files.

    Folders are searched with the datasets' own `find_images` (sorted; hidden files and folders
    skipped; only `IMAGE_EXTENSIONS`, any case). An explicitly named file is kept whatever its
    extension (the user asked for it; if it is not an image, its row reports the error).

    Raises:
        FileNotFoundError: an input path does not exist.
    """
    from dinov2.data.datasets import find_images

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += find_images(path)
        elif path.exists():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return files


class _InferenceImages(Dataset):
    """(image tensor or None, index, error message or None) per file; decoding errors are caught."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from dinov2.data.image_io import load_rgb

        try:
            return self.transform(load_rgb(self.paths[i])), i, None
        except (ValueError, OSError) as e:  # ImageDecodeError is a ValueError; OSError: unreadable file
            return None, i, f"{type(e).__name__}: {e}"


def _collate(batch):
    good = [(x, i) for x, i, err in batch if err is None]
    errors = [(i, err) for x, i, err in batch if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], errors


def predict(
    model_path: str | os.PathLike,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> list[Prediction]:
    """Classify every image of ``inputs`` (files and/or folders) with the checkpoint ``model_path``.

    Returns one `Prediction` per file, in `expand_inputs` order; unreadable files get ``error``.

    Raises:
        FileNotFoundError: missing model or input path. ValueError: not a classifier checkpoint.
    """
    dev = resolve_device(device)
    model, classes, prep = load_classifier(model_path, dev)
    return predict_with_model(model, classes, prep, inputs, batch_size, num_workers, progress)


@torch.no_grad()
def predict_with_model(
    model: BackboneClassifier,
    classes: Sequence[str],
    prep: Preprocessing,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> list[Prediction]:
    """`predict` with an already loaded model (see `load_classifier`); runs on the model's device."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    dev = next(model.parameters()).device
    model.eval()
    paths = expand_inputs(inputs)
    results: list[Prediction | None] = [None] * len(paths)
    loader = DataLoader(
        _InferenceImages(paths, make_eval_transform(prep)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    for images, indices, errors in tqdm(loader, desc="predict", disable=not progress, dynamic_ncols=True):
        for i, err in errors:
            results[i] = Prediction(paths[i], None, None, None, error=err)
        if images is None:
            continue
        with autocast_for(dev):
            logits = model(images.to(dev))
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        for i, row in zip(indices, probs):
            results[i] = Prediction.from_probs(paths[i], row, classes)
    return [r for r in results if r is not None]


def format_table(predictions: Sequence[Prediction], topk: int = 3) -> str:
    """Aligned text table (path, top-k "class (probability)") plus an "errors" section."""
    ok = [p for p in predictions if p.error is None]
    bad = [p for p in predictions if p.error is not None]
    lines = []
    if ok:
        rows = [["path"] + [f"top{k + 1}" for k in range(topk)]]
        rows += [[p.path] + [f"{c} ({q:.3f})" for c, q in p.topk(topk)] for p in ok]
        ncol = max(len(r) for r in rows)
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(ncol)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if bad:
        lines.append(f"errors ({len(bad)} file(s) could not be read):")
        lines += [f"  {p.path}: {p.error}" for p in bad]
    return "\n".join(lines)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "dinov2-infer",
        description="Predict classes of images with a dinov2-finetune checkpoint. Unreadable images are "
        "reported as errors (exit status stays 0); a missing model or input path exits with 2.",
        add_help=add_help,
    )
    p.add_argument("--model", required=True, help="best.pth written by dinov2-finetune")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--csv", help="write predictions to this CSV instead of printing a table")
    p.add_argument("--topk", type=int, default=3, help="classes shown per image in the table (default: 3)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: 0 when every input was processed (even unreadable files), 2 on bad inputs."""
    args = get_args_parser().parse_args(argv)
    try:
        if args.topk < 1:
            raise ValueError(f"--topk must be >= 1, got {args.topk}")
        model, classes, prep = load_classifier(args.model, resolve_device(args.device))
        predictions = predict_with_model(
            model, classes, prep, args.inputs, args.batch_size, args.num_workers, args.progress
        )
        if not predictions:
            raise ValueError(f"no image files found in {args.inputs}")
    except (ValueError, FileNotFoundError) as e:
        print(f"dinov2-infer: error: {e}", file=sys.stderr)
        return 2
    n_err = sum(p.error is not None for p in predictions)
    if args.csv:
        write_predictions_csv(args.csv, predictions, classes)
        print(f"wrote {len(predictions)} rows to {args.csv}" + (f" ({n_err} unreadable)" if n_err else ""))
    else:
        print(format_table(predictions, args.topk))
    if n_err:
        print(f"dinov2-infer: {n_err} of {len(predictions)} file(s) could not be read", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
