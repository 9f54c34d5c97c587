"""What matters in the PBC CPU recipe: one knob changed per row, at a fixed shorter budget.

Each row trains `--config` (default configs/pbc_cpu_recipe.yaml) plus the row's overrides for the
first `--iterations` of the recipe's schedule (`train.max_iterations`), then scores the final
teacher on the same stratified subset and folds: 20-NN and the
linear probe of `dinov2-eval cv` (balanced accuracy, %). Runs live in OUT/<row>/ and a finished row
is not trained again, so the table can be filled over several sessions (`--rows` picks rows).
Writes OUT/ablation.csv and OUT/ablation.md and prints the table with the wall time of each row.

    nice python benchmarks/bench_ablation.py --data ../shared/data/pbc_128 --output-dir /tmp/ablation \\
        --iterations 500 --max-per-class 200
    python benchmarks/bench_ablation.py ... --rows recipe,patch16 --list
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, append_jsonl, cv_scores, print_status, read_jsonl, teacher_exports, training_records

# (row name, what changes, overrides). The first row is the recipe itself.
ROWS: list[tuple[str, str, list[str]]] = [
    ("recipe", "configs/pbc_cpu_recipe.yaml as is", []),
    ("patch16", "patch 16 (4 x 4 patches per global crop)", ["student.patch_size=16"]),
    ("global_scale_0.14", "global crop scale [0.14, 1]", ["crops.global_crops_scale=[0.14,1.0]"]),
    ("no_local_crops", "no local crops", ["crops.local_crops_number=0"]),
    ("no_ibot", "iBOT off", ["ibot.loss_weight=0"]),
    ("no_koleo", "KoLeo off", ["dino.koleo_loss_weight=0"]),
    ("no_registers", "0 registers (recipe: 4)", ["student.num_register_tokens=0"]),
    ("sinkhorn", "Sinkhorn-Knopp centering", ["train.centering=sinkhorn_knopp"]),
    (
        "prototypes_1024",
        "1024 prototypes (recipe: 256)",
        ["dino.head_n_prototypes=1024", "ibot.head_n_prototypes=1024"],
    ),  # fmt: skip
    ("momentum_0.95", "teacher momentum 0.95 (the tiny config's)", ["teacher.momentum_teacher=0.95"]),
    (
        "teacher_temp_0.07",
        "teacher temperature 0.04 -> 0.07 over the first half",
        ["teacher.teacher_temp=0.07", "teacher.warmup_teacher_temp_epochs=3"],
    ),  # fmt: skip
    (
        "dinov2_colour",
        "DINOv2's colour jitter (hue 0.1, saturation 0.2, grayscale 0.2)",
        [
            "crops.color_augmentation.hue=0.1",
            "crops.color_augmentation.saturation=0.2",
            "crops.color_augmentation.grayscale_prob=0.2",
        ],
    ),  # fmt: skip
    ("lr_0.008", "base lr 0.008 (the tiny config's)", ["optim.base_lr=0.008"]),
]


def schedule_overrides(iterations: int) -> list[str]:
    """Stop every row after the first `iterations` of the recipe's own schedule.

    A compressed copy of the schedule (shorter epochs) also compresses the teacher's EMA ramp to 1
    and the warm-up; at 600 iterations its teacher stayed flat (entropy ~93 % of log K) and learned
    little, so rows are compared on the recipe's real schedule, stopped early (and the `recipe` row
    equals the full run's export at that iteration).
    """
    return [f"train.max_iterations={iterations}", f"train.checkpoint_period_iterations={iterations}"]


def train_row(config: Path, data: str, run_dir: Path, overrides: list[str], threads: int) -> float:
    """Train one row in a subprocess (its own RNG and thread settings); return wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(REPO / "dinov2" / "train" / "train.py"), "--config-file", str(config),
           "--output-dir", str(run_dir), f"train.dataset_path={data}", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"training failed (exit {code}); see {run_dir.parent / (run_dir.name + '.log')}")
    return time.perf_counter() - t0


def score_row(run_dir: Path, data: str, max_per_class: int | None, folds: int, seed: int) -> dict:
    """20-NN and linear probe of the row's last teacher export (the learning curve's scorer)."""
    from omegaconf import OmegaConf

    from dinov2.eval.features import extract_features

    iteration, export = teacher_exports(run_dir)[-1]
    size = int(OmegaConf.load(run_dir / "config.yaml").crops.global_crops_size)
    fs = extract_features(str(export), data, image_size=size, max_images_per_class=max_per_class,
                          seed=seed, cache_dir=run_dir / "feature_cache", progress=False)  # fmt: skip
    scores = cv_scores(fs, folds, seed, k=20, linear=True, progress=False)
    return {"iteration": iteration, "knn20": scores["knn_balanced_accuracy"],
            "linear": scores["linear_balanced_accuracy"]}  # fmt: skip


def teacher_entropy_trace(run_dir: Path, every: int = 100) -> list[float]:
    """The teacher's output entropy as a fraction of log K every `every` iterations: flat (near 1) is
    the failure the recipe's diagnosis found, a fall is the teacher sharpening on the data."""
    trace = {}
    for r in training_records(run_dir):
        if "teacher_entropy_frac" in r and r["iteration"] % every == 0:
            trace[r["iteration"]] = r["teacher_entropy_frac"]  # a resumed run rewrites the same iteration
    return [trace[i] for i in sorted(trace)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "pbc_cpu_recipe.yaml")
    p.add_argument("--data", required=True, help="PBC-style class-folder dataset (training ignores labels)")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--iterations", type=int, default=500, help="budget of every row (default 500)")
    p.add_argument("--max-per-class", type=int, default=200, help="evaluation subset (default 200 per class)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training run")
    p.add_argument("--rows", default=None, help="comma-separated row names, run in that order (default: all)")
    p.add_argument("--list", action="store_true", help="list the rows and exit")
    args = p.parse_args(argv)

    if args.list:
        for name, what, overrides in ROWS:
            print(f"{name:>20}  {what}  {' '.join(overrides)}")
        return
    wanted = args.rows.split(",") if args.rows else [r[0] for r in ROWS]
    unknown = sorted(set(wanted) - {r[0] for r in ROWS})
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; --list shows them")
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    schedule = schedule_overrides(args.iterations)
    results_path = out / "results.jsonl"
    done = {r["row"]: r for r in read_jsonl(results_path)}
    print(f"{args.config.name}, {args.iterations} iterations per row, {args.folds}-fold CV on <= "
          f"{args.max_per_class} images per class, balanced accuracy (%)", flush=True)  # fmt: skip
    by_name = {r[0]: r for r in ROWS}
    for name, what, overrides in (by_name[n] for n in wanted):  # in the order asked for
        if name in done:
            continue
        run_dir = out / name
        print_status(f"{name}: {what} ...")
        try:
            seconds = train_row(args.config, args.data, run_dir, [*schedule, *overrides], args.threads)
            scores = score_row(run_dir, args.data, args.max_per_class, args.folds, args.seed)
        except Exception as error:  # one broken row must not lose the others
            print(f"  {name} failed: {error}", flush=True)
            continue
        record = {
            "row": name,
            "change": what,
            "overrides": overrides,
            "train_minutes": seconds / 60,
            "teacher_entropy_frac": teacher_entropy_trace(run_dir),
            **scores,
        }
        append_jsonl(results_path, record)
        done[name] = record
        print(
            f"  20-NN {scores['knn20']:.1f}  linear {scores['linear']:.1f}  ({seconds / 60:.1f} min)",
            flush=True,
        )

    rows = [done[r[0]] for r in ROWS if r[0] in done]
    base = done.get("recipe")
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["row", "change", "knn20", "linear", "train_minutes", "iteration"])
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in w.fieldnames})
    header = "| row | change | 20-NN | linear | teacher entropy / log K | train min |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        delta = ""
        if base is not None and r is not base:
            delta = f" ({r['knn20'] - base['knn20']:+.1f} / {r['linear'] - base['linear']:+.1f})"
        entropy = " -> ".join(f"{e:.2f}" for e in r.get("teacher_entropy_frac", []))
        lines.append(f"| {r['row']} | {r['change']}{delta} | {r['knn20']:.1f} | {r['linear']:.1f} | "
                     f"{entropy} | {r['train_minutes']:.1f} |")  # fmt: skip
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
