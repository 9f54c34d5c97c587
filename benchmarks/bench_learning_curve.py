"""Learning curve of a pretraining run: every teacher export scored with the same folds.

For each `eval/<iteration>/teacher_checkpoint.pth` of a run, extracts features of a labeled
class-folder dataset (e.g. PBC) and scores them with stratified k-fold cross-validation (k-NN and
the scikit-learn linear probe of `dinov2-eval cv`, balanced accuracy mean over folds). The same
folds score two floors in the same run: six colour statistics and the run's own architecture at
random initialisation (iteration 0 of the curve when the run has no export there).

Writes `learning_curve.csv` (one row per checkpoint and baseline) and `learning_curve.png`
(accuracy vs iteration and vs wall-clock minutes of training, floors as horizontal lines) to
`--output-dir` (default: `<run-dir>/learning_curve`). Features are cached, so re-running after
more exports only computes the new ones.

    python benchmarks/bench_learning_curve.py --run-dir D --data ../shared/data/pbc_128
    python benchmarks/bench_learning_curve.py --run-dir D --data ../shared/data/pbc_128 \\
        --max-per-class 200 --linear-pooling cls+avgpool --linear-n-last-blocks 4
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import append_jsonl, cv_scores, random_init_teacher, read_jsonl, teacher_exports, training_records
from omegaconf import OmegaConf

from dinov2.eval.features import extract_features

CSV_FIELDS = ("name", "iteration", "minutes", "knn_k", "knn_balanced_accuracy", "knn_f1_macro",
              "linear_balanced_accuracy", "linear_f1_macro", "knn_features", "linear_features")  # fmt: skip


@dataclass
class CurvePoint:
    name: str
    """'teacher', 'random init' or 'colour statistics'."""
    iteration: int | None
    minutes: float | None
    knn_k: int
    knn_balanced_accuracy: float
    knn_f1_macro: float
    linear_balanced_accuracy: float
    linear_f1_macro: float
    knn_features: str
    linear_features: str


def training_minutes(run_dir: Path) -> dict[int, float]:
    """Wall-clock minutes of training at each logged iteration (from training_metrics.jsonl).

    Uses the `wall_time` field (seconds since the epoch) when present, relative to the run's start
    (config.yaml's modification time, written just before the first iteration).
    """
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    start = config.stat().st_mtime
    out = {}
    for record in training_records(run_dir):
        if "wall_time" in record:
            out[int(record["iteration"])] = (record["wall_time"] - start) / 60.0
    return out


def minutes_at(
    iteration: int, export: Path | None, logged: dict[int, float], start: float | None
) -> float | None:
    if iteration in logged:
        return logged[iteration]
    if export is not None and start is not None:
        return (export.stat().st_mtime - start) / 60.0  # runs logged before wall_time existed
    return None


def main(argv: list[str] | None = None) -> list[CurvePoint]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, type=Path, help="training output folder (has eval/ exports)")
    p.add_argument("--data", required=True, nargs="+", help="labeled class-folder dataset(s)")
    p.add_argument("--output-dir", type=Path, default=None, help="default: RUN_DIR/learning_curve")
    p.add_argument(
        "--max-per-class", type=int, default=None, help="seeded subsample of each class (default: all)"
    )
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--k", type=int, default=20, help="k of the k-NN row (default 20)")
    p.add_argument("--image-size", type=int, default=None, help="default: the run's global crop size")
    p.add_argument("--pooling", default="cls", help="k-NN features: cls | avgpool | cls+avgpool")
    p.add_argument("--n-last-blocks", type=int, default=1)
    p.add_argument("--linear-pooling", default=None, help="linear-probe features (default: as k-NN)")
    p.add_argument("--linear-n-last-blocks", type=int, default=None)
    p.add_argument("--every", type=int, default=1, help="score every n-th export (the last is always scored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    run_dir = args.run_dir
    if not (run_dir / "config.yaml").is_file():
        raise SystemExit(f"error: {run_dir} is not a training run folder (no config.yaml)")
    exports = teacher_exports(run_dir)
    if not exports:
        raise SystemExit(f"error: no eval/<iteration>/teacher_checkpoint.pth under {run_dir}")
    exports = [e for i, e in enumerate(exports) if i % args.every == 0 or i == len(exports) - 1]
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    image_size = args.image_size or int(run_cfg.crops.global_crops_size)
    out_dir = args.output_dir or run_dir / "learning_curve"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "feature_cache"
    lin_pool = args.linear_pooling or args.pooling
    lin_blocks = args.linear_n_last_blocks or args.n_last_blocks
    same = (lin_pool, lin_blocks) == (args.pooling, args.n_last_blocks)
    progress = not args.no_progress
    common = dict(image_size=image_size, cache_dir=cache, max_images_per_class=args.max_per_class,
                  seed=args.seed, batch_size=args.batch_size, progress=progress)  # fmt: skip
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    # Scores already computed with these settings are reused, so re-running the script while a run
    # goes on only scores its new exports.
    names = ("data", "max_per_class", "folds", "k", "pooling", "n_last_blocks", "linear_pooling",
             "linear_n_last_blocks", "seed")  # fmt: skip
    settings = {k: getattr(args, k) for k in names}
    settings["image_size"] = image_size
    scored_path = out_dir / "scored.jsonl"
    scored = {entry["key"]: entry["point"] for entry in read_jsonl(scored_path)}

    def evaluate(name, backbone, iteration, minutes, baseline=False) -> CurvePoint:
        stamp = os.stat(backbone).st_mtime if isinstance(backbone, str) and os.path.isfile(backbone) else None
        key = json.dumps([name, iteration, stamp, settings], sort_keys=True, default=str)
        if key in scored:
            point = CurvePoint(**{**scored[key], "minutes": minutes})
            print(f"{name:>18} it {iteration!s:>6}  {args.k}-NN {point.knn_balanced_accuracy:5.1f}  "
                  f"linear {point.linear_balanced_accuracy:5.1f}  (scored before)", flush=True)  # fmt: skip
            return point
        point = _evaluate(name, backbone, iteration, minutes, baseline)
        append_jsonl(scored_path, {"key": key, "point": point.__dict__})
        return point

    def _evaluate(name, backbone, iteration, minutes, baseline=False) -> CurvePoint:
        t0 = time.perf_counter()
        knn_desc = "colorstats" if baseline else f"{args.pooling} x{args.n_last_blocks}"
        lin_desc = "colorstats" if baseline else f"{lin_pool} x{lin_blocks}"
        if baseline or same:
            fs = extract_features(
                backbone, args.data, pooling=args.pooling, n_last_blocks=args.n_last_blocks, **common
            )
            scores = cv_scores(fs, args.folds, args.seed, args.k, True, progress)
        else:
            fs = extract_features(
                backbone, args.data, pooling=args.pooling, n_last_blocks=args.n_last_blocks, **common
            )
            knn = cv_scores(fs, args.folds, args.seed, args.k, False, progress)
            fs_lin = extract_features(
                backbone, args.data, pooling=lin_pool, n_last_blocks=lin_blocks, **common
            )
            lin = cv_scores(fs_lin, args.folds, args.seed, args.k, True, progress)
            scores = {**{k: v for k, v in knn.items() if k.startswith("knn")},
                      **{k: v for k, v in lin.items() if k.startswith("linear")}}  # fmt: skip
        point = CurvePoint(
            name, iteration, minutes, args.k, knn_features=knn_desc, linear_features=lin_desc, **scores
        )
        it = "-" if iteration is None else iteration
        seconds = time.perf_counter() - t0
        print(f"{name:>18} it {it!s:>6}  {args.k}-NN {point.knn_balanced_accuracy:5.1f}  "
              f"linear {point.linear_balanced_accuracy:5.1f}  ({seconds:.0f} s)", flush=True)  # fmt: skip
        return point

    n_images = "all" if args.max_per_class is None else f"<= {args.max_per_class} per class"
    print(f"{run_dir}: {len(exports)} exports, {n_images} images, {args.folds}-fold CV, {image_size} px, "
          f"balanced accuracy (%)", flush=True)  # fmt: skip
    points = [
        evaluate("colour statistics", "colorstats", None, None, baseline=True),
        evaluate("random init", random_init_teacher(run_cfg, args.seed), 0, 0.0),
    ]
    logged = training_minutes(run_dir)
    start = (run_dir / "config.yaml").stat().st_mtime
    for iteration, path in exports:
        points.append(evaluate("teacher", str(path), iteration, minutes_at(iteration, path, logged, start)))

    with open(out_dir / "learning_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for pt in points:
            writer.writerow({k: getattr(pt, k) for k in CSV_FIELDS})
    plot(points, out_dir / "learning_curve.png", title=f"{run_dir.name}: {n_images}, {args.folds}-fold CV")
    print(f"wrote {out_dir / 'learning_curve.csv'} and {out_dir / 'learning_curve.png'}")
    falling = [(a.iteration, b.iteration) for a, b in zip(points[2:], points[3:])
               if b.knn_balanced_accuracy < a.knn_balanced_accuracy - 2.0]  # fmt: skip
    if falling:
        print(f"warning: the {args.k}-NN curve falls by more than 2 points between iterations {falling}")
    return points


def plot(points: list[CurvePoint], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = [p for p in points if p.name == "teacher"]
    floors = {p.name: p for p in points if p.name != "teacher"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x_of, xlabel in (
        (axes[0], lambda p: p.iteration, "iteration"),
        (axes[1], lambda p: p.minutes, "training wall-clock (minutes)"),
    ):
        pts = [p for p in teacher if x_of(p) is not None]
        xs = [x_of(p) for p in pts]
        ax.plot(
            xs,
            [p.knn_balanced_accuracy for p in pts],
            "o-",
            color="tab:blue",
            label=f"teacher {pts[0].knn_k if pts else ''}-NN",
        )
        ax.plot(
            xs,
            [p.linear_balanced_accuracy for p in pts],
            "s-",
            color="tab:orange",
            label="teacher linear probe",
        )
        for name, style in (("colour statistics", ":"), ("random init", "--")):
            if name in floors:
                ax.axhline(floors[name].knn_balanced_accuracy, color="tab:blue", ls=style, lw=1,
                           label=f"{name} {floors[name].knn_k}-NN")  # fmt: skip
                ax.axhline(floors[name].linear_balanced_accuracy, color="tab:orange", ls=style, lw=1,
                           label=f"{name} linear")  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("balanced accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
