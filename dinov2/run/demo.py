"""The main job end to end on one CPU machine: `make demo` (or `dinov2-demo`).

Stages, each announced on one status line and each reused on a second run unless `--force`:
  1. data      synthetic stained cells (or `--data DIR`, a labeled class-folder dataset such as PBC)
  2. scan      full-decode corruption check of the data
  3. pretrain  the first `--iterations` of the PBC CPU recipe (configs/pbc_cpu_recipe.yaml),
               single process
  4. export    the EMA teacher backbone (Meta's key format, .pth and .safetensors)
  5. evaluate  the teacher against the same network at random initialisation and against six
               colour statistics: 5-fold CV tables (1-NN, 20-NN, linear probe), confusion matrices
  6. pictures  UMAP coloured by class and with thumbnails; CLS / register attention maps
  7. report    report.md embedding the tables and pictures, with data, model, time and hardware
  8. classify  a linear head on the teacher (cached features) and the `dinov2-serve` command for it
Everything lands in `--output-dir` (default demo_output/).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dinov2.utils.files import atomic_write

# The recipe that learns cells on a CPU (issue 13); it lives beside the package in the repository.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pbc_cpu_recipe.yaml"
SYNTHETIC_SIZE = 128


@dataclass
class DemoSettings:
    """What the demo runs on and for how long."""

    output_dir: Path
    data: Path | None = None
    """Labeled class-folder dataset; None generates synthetic cells."""
    force: bool = False
    """Redo every stage instead of reusing what exists."""
    synthetic_per_class: int = 150
    """Synthetic images per class when no `data` is given."""
    iterations: int = 500
    """Pretraining length: the first iterations of the recipe's schedule (train.max_iterations)."""
    max_per_class: int = 200
    """Images per class used by the evaluation (seeded subsample; keeps PBC runs short)."""
    eval_image_size: int = 64
    """Evaluation crop side: the recipe's global crop size."""
    attention_image_size: int = 128
    """Side of the crops shown in attention maps (16 x 16 patches of 8 px)."""
    attention_images: int = 4
    seed: int = 0
    num_workers: int = 2
    overrides: list[str] = field(default_factory=list)
    """Extra key=value overrides of the pretraining config."""


def status(stage: str, message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {stage:<9} {message}", flush=True)


def prepare_data(settings: DemoSettings) -> Path:
    """The labeled dataset to use: `--data`, or synthetic cells generated once."""
    from dinov2.data.synthetic import generate_synthetic_cells

    if settings.data is not None:
        if not settings.data.is_dir():
            raise FileNotFoundError(f"--data folder not found: {settings.data}")
        status("data", f"using {settings.data}")
        return settings.data
    root = settings.output_dir / "data" / "synthetic_cells"
    done = root.parent / ".synthetic_cells_complete"  # outside the root: not a data file
    if done.exists() and not settings.force:
        status("data", f"reusing synthetic cells in {root}")
        return root
    if root.exists():
        shutil.rmtree(root)
    n = settings.synthetic_per_class
    status("data", f"generating {8 * n} synthetic cells ({SYNTHETIC_SIZE} px) in {root}")
    generate_synthetic_cells(root, n, size=SYNTHETIC_SIZE, seed=settings.seed)
    atomic_write(done, "ok\n")
    return root


def scan_data(root: Path, settings: DemoSettings) -> dict:
    from dinov2.data.scan import scan_images

    status("scan", f"decoding every image of {root} (cached per root)")
    cache = settings.output_dir / "cache"
    report = scan_images([str(root)], workers=2, cache_dir=cache)
    print(report.summary(max_paths=10), flush=True)
    return {"files": report.n_files, "broken": report.n_broken, "cached": report.n_cached}


def pretrain(root: Path, settings: DemoSettings) -> tuple[Path, dict]:
    """Train (or resume, or reuse) the recipe; returns the final teacher export."""
    from dinov2.train.train import main as train_main

    train_dir = settings.output_dir / "train"
    if settings.force and train_dir.exists():
        shutil.rmtree(train_dir)
    if not DEFAULT_CONFIG.is_file():
        raise FileNotFoundError(f"the demo's pretraining config is missing: {DEFAULT_CONFIG}")
    # The first `iterations` of the recipe's own schedule (not a compressed copy): a compressed one
    # also compresses the teacher's EMA ramp to 1 and the warm-up, and then the teacher stays flat
    # (benchmarks/README.md); the recipe's curve shows what its first iterations reach.
    argv = [
        "--config-file",
        str(DEFAULT_CONFIG),
        "--output-dir",
        str(train_dir),
        f"train.dataset_path={root}",
        f"train.max_iterations={settings.iterations}",
        f"train.num_workers={settings.num_workers}",
        f"train.seed={settings.seed}",
        *settings.overrides,
    ]
    status("pretrain", "dinov2-train " + " ".join(argv))
    start = time.perf_counter()
    result = train_main(argv)
    seconds = time.perf_counter() - start
    from dinov2.train.checkpointing import list_teacher_exports

    exports = [path for _, path in list_teacher_exports(train_dir)]
    if not exports:
        raise RuntimeError(f"training finished but wrote no teacher export under {train_dir / 'eval'}")
    status("pretrain", f"{result.status} at iteration {result.iteration} ({seconds / 60:.1f} min this run)")
    return exports[-1], {"iterations": result.iteration, "seconds_this_run": seconds}


def export_teacher(teacher_path: Path, settings: DemoSettings):
    from dinov2.models.weights import export_backbone, load_backbone

    backbone = load_backbone(teacher_path)
    out = settings.output_dir / "teacher_backbone.safetensors"
    export_backbone(backbone, out)
    status("export", f"teacher backbone -> {teacher_path} and {out}")
    return backbone


def random_init_like(backbone, seed: int):
    """The same architecture with fresh DINOv2 initialisation (the 'before pretraining' baseline)."""
    from dinov2.models.vision_transformer import DinoVisionTransformer
    from dinov2.models.weights import backbone_config

    torch.manual_seed(seed)
    return DinoVisionTransformer(**backbone_config(backbone)).eval()


def evaluate(backbones: dict, root: Path, settings: DemoSettings) -> dict:
    """5-fold CV of every backbone; returns name -> (summary, feature set, report folder)."""
    from dinov2.eval import cross_validate, extract_features, write_report

    results = {}
    for name, backbone in backbones.items():
        status("evaluate", f"{name}: features and 5-fold CV (1-NN, 20-NN, linear probe)")
        features = extract_features(
            backbone,
            str(root),
            image_size=settings.eval_image_size,
            resize_size=settings.eval_image_size,
            max_images_per_class=settings.max_per_class,
            cache_dir=settings.output_dir / "cache" / name,
            seed=settings.seed,
            batch_size=128,
        )
        result = cross_validate(features, n_folds=5, seed=settings.seed)
        out = settings.output_dir / "eval" / name
        write_report(result, out, paths=features.paths, caption=f"{name}, 5-fold CV")
        results[name] = {"summary": result.summary(), "features": features, "dir": out}
    return results


def pictures(backbone, features, root: Path, settings: DemoSettings) -> dict:
    from dinov2.eval import (
        plot_umap,
        plot_umap_thumbnails,
        save_attention_grids,
        save_coords_csv,
        umap_embedding,
    )

    out = settings.output_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    status("pictures", "UMAP of the teacher's embeddings")
    coords = umap_embedding(features.features, seed=settings.seed)
    umap_png = plot_umap(coords, features.labels, features.class_names, out / "umap.png", title="Teacher CLS")
    thumbs_png = plot_umap_thumbnails(
        coords,
        features.paths,
        out / "umap_thumbnails.png",
        labels=features.labels,
        class_names=features.class_names,
    )
    save_coords_csv(
        coords,
        out / "umap_coords.csv",
        paths=features.paths,
        labels=features.labels,
        class_names=features.class_names,
    )
    status("pictures", "CLS and register attention maps")
    first_of_class = {}
    for path, label in zip(features.paths, features.labels):
        first_of_class.setdefault(int(label), path)
    chosen = [first_of_class[c] for c in sorted(first_of_class)][: settings.attention_images]
    attention = save_attention_grids(
        backbone, chosen, out / "attention", image_size=settings.attention_image_size, seed=settings.seed
    )
    return {"umap": umap_png, "umap_thumbnails": thumbs_png, "attention": attention}


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, {versions}"


def _table(summary: dict) -> str:
    from dinov2.eval import markdown_table

    return markdown_table(summary)


def write_markdown_report(settings: DemoSettings, info: dict, evals: dict, figures: dict) -> Path:
    from dinov2.eval.reports import slug

    out = settings.output_dir
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731 - paths in the report are relative to it
    confusion = evals["pretrained"]["dir"] / slug("Linear Probing") / "confusion_normalized.png"
    trained, baseline = evals["pretrained"]["summary"], evals["random_init"]["summary"]
    colour = evals["colorstats"]["summary"]

    def gain(reference: dict) -> str:
        points = {row: 100 * (trained[row]["balanced_accuracy"]["mean"] - ref["balanced_accuracy"]["mean"])
                  for row, ref in reference.items()}  # fmt: skip
        return ", ".join(f"{row} {value:+.1f}" for row, value in points.items())

    lines = [
        "# dinov2-cells demo report",
        "",
        f"- **Data**: {info['data']} ({info['scan']['files']} images, {info['scan']['broken']} broken; "
        f"evaluation uses at most {settings.max_per_class} images per class, seeded).",
        f"- **Model**: small DINOv2 ViT (`{DEFAULT_CONFIG.name}`: {info['model']}), pretrained for "
        f"{info['train']['iterations']} iterations on one process.",
        f"- **Time**: {info['total_minutes']:.1f} min for this run of the demo "
        f"(pretraining {info['train']['seconds_this_run'] / 60:.1f} min of it).",
        f"- **Hardware**: {info['hardware']}.",
        "",
        "## Pretrained teacher (5-fold CV, mean (+/- std), %)",
        "",
        _table(trained),
        "",
        "## Same network at random initialisation",
        "",
        _table(baseline),
        "",
        "## Six colour statistics (per-channel mean and std: the floor a cell embedding must beat)",
        "",
        _table(colour),
        "",
        f"Balanced-accuracy points of the pretrained teacher over random init: {gain(baseline)}; "
        f"over colour statistics: {gain(colour)}.",
        "",
        "## Confusion matrix (pretrained teacher, Linear Probing, row-normalised)",
        "",
        f"![confusion]({rel(confusion)})",
        "",
        "## UMAP of the teacher's CLS embeddings",
        "",
        f"![umap]({rel(figures['umap'])})",
        "",
        f"![umap thumbnails]({rel(figures['umap_thumbnails'])})",
        "",
        "## Attention of the CLS and register tokens (last block)",
        "",
        *[f"![attention]({rel(p)})" for p in figures["attention"]],
        "",
        "Full outputs: `eval/<model>/` (metrics.json, results.md/.csv/.tex, per-class reports, "
        "confusion matrices), `figures/`, `train/` (training_metrics.jsonl, checkpoints, teacher exports).",
        "",
    ]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path


def run_demo(settings: DemoSettings) -> Path:
    start = time.perf_counter()
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    root = prepare_data(settings)
    scan = scan_data(root, settings)
    teacher_path, train_info = pretrain(root, settings)
    teacher = export_teacher(teacher_path, settings)
    baseline = random_init_like(teacher, settings.seed)
    evals = evaluate(
        {"pretrained": teacher, "random_init": baseline, "colorstats": "colorstats"}, root, settings
    )
    figures = pictures(teacher, evals["pretrained"]["features"], root, settings)
    n_params = sum(p.numel() for p in teacher.parameters())
    info = {
        "data": str(root) if settings.data is not None else f"synthetic cells ({root})",
        "scan": scan,
        "train": train_info,
        "model": f"embed {teacher.embed_dim}, depth {teacher.n_blocks}, patch {teacher.patch_size}, "
        f"{teacher.num_register_tokens} registers, {n_params / 1e6:.2f} M parameters",
        "hardware": hardware(),
        "total_minutes": (time.perf_counter() - start) / 60,
    }
    report = write_markdown_report(settings, info, evals, figures)
    summary = {name: e["summary"] for name, e in evals.items()}
    atomic_write(
        settings.output_dir / "demo_summary.json",
        json.dumps({"info": info, "summary": summary}, indent=2, default=str),
    )
    status("report", f"{report} ({info['total_minutes']:.1f} min)")
    for name, s in summary.items():
        row = "20-NN"
        print(f"  {name:<12} 20-NN balanced accuracy {100 * s[row]['balanced_accuracy']['mean']:.1f} %")
    from dinov2.run.demo_classifier import train_demo_classifier

    servable = train_demo_classifier(
        root,
        settings.output_dir / "teacher_backbone.safetensors",
        settings.output_dir / "classifier",
        image_size=settings.eval_image_size,
        max_per_class=settings.max_per_class,
        seed=settings.seed,
        force=settings.force,
        log=lambda message: status("classify", message),
    )
    status("serve", f"the web app: {servable.command}   (or: make serve)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dinov2-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("demo_output"))
    parser.add_argument(
        "--data", type=Path, default=None, help="labeled class-folder dataset (default: synthetic)"
    )
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument(
        "--iterations", type=int, default=DemoSettings.iterations, help="pretraining iterations (about)"
    )
    parser.add_argument("--max-per-class", type=int, default=DemoSettings.max_per_class)
    parser.add_argument("--synthetic-per-class", type=int, default=DemoSettings.synthetic_per_class)
    parser.add_argument("--num-workers", type=int, default=DemoSettings.num_workers)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the pretraining config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = DemoSettings(
        output_dir=args.output_dir,
        data=args.data,
        force=args.force,
        synthetic_per_class=args.synthetic_per_class,
        iterations=args.iterations,
        max_per_class=args.max_per_class,
        num_workers=args.num_workers,
        overrides=list(args.overrides),
    )
    try:
        run_demo(settings)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dinov2-demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
