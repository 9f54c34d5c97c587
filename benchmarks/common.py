"""Set-up the benchmark scripts share: the repository on sys.path, timing, status lines, run folders
(training_metrics.jsonl, teacher exports, the random-init floor, the k-NN / linear-probe scorer), and
the throwaway configs and batches of the training-step benchmarks.

The scripts import it as `common`: a script's own folder comes first on sys.path when it runs as
`python benchmarks/<name>.py`. torch and dinov2 are imported inside the functions, so a script can
still set OMP_NUM_THREADS before torch loads, and a script that needs neither (the scan) loads neither.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The scripts run from a checkout, installed or not: its dinov2 is the one they measure.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------------------- host
def host_summary() -> str:
    """ "<processor>, <n> CPUs visible": what the timings were taken on."""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible"


def print_status(message: str) -> None:
    """A progress line stamped with the wall-clock time, flushed at once (long runs go to logs)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------- timing
def synchronize(device: Any) -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so that a clock reading covers it."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_step(
    step: Callable[[], Any], device: Any = None, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Seconds of one call of `step`, the GPU synchronised before and after."""
    synchronize(device)
    start = clock()
    step()
    synchronize(device)
    return clock() - start


def time_interleaved(
    runners: dict[str, Callable[[], Any]],
    iters: int,
    device: Any = None,
    warmup: int = 0,
    rotate: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of every runner over `iters` rounds of one timed call each, after `warmup` untimed
    calls of each.

    Within a round the runners take turns, so that load from other processes on a shared machine
    hits all of them alike; with `rotate` the first of a round moves by one every round (so no
    runner always runs right after a particular other one), else the order stays the dict's.
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        shift = i % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            times[name].append(time_step(runners[name], device, clock))
    return times


# ---------------------------------------------------------------------------------- run folders
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, in order: none when it does not exist, and a line that does
    not parse (cut by a killed writer) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: Path, record: dict) -> None:
    """Add one record as a line, so results written before a crash stay."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def training_records(run_dir: Path) -> list[dict]:
    """The records of a run's training_metrics.jsonl (none when it has no log yet)."""
    return read_jsonl(run_dir / "training_metrics.jsonl")


def teacher_exports(run_dir: Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every teacher export of the run, in iteration order."""
    from dinov2.train.checkpointing import list_teacher_exports

    return list_teacher_exports(run_dir)


def latest_teacher_export(run_dir: Path) -> Path:
    """The run's newest teacher export; FileNotFoundError naming the folder when it has none."""
    exports = teacher_exports(run_dir)
    if not exports:
        raise FileNotFoundError(f"no eval/<iteration>/teacher_checkpoint.pth under {run_dir}")
    return exports[-1][1]


def random_init_teacher(cfg: Any, seed: int):
    """The run's teacher backbone with fresh weights from `seed` (what pretraining started from),
    in eval mode; the caller's random state is left as it was."""
    import torch

    from dinov2.models import build_model_from_cfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The builder makes the teacher first, so these are the weights training started from.
        teacher = build_model_from_cfg(cfg, only_teacher=True)[0]
    return teacher.eval()


def cv_scores(features, folds: int, seed: int, k: int, linear: bool, progress: bool) -> dict[str, float]:
    """k-NN (and linear probe) cross-validated balanced accuracy and macro F1, in percent, under
    the keys knn_balanced_accuracy, knn_f1_macro (linear_... with `linear`)."""
    from dinov2.eval.linear import LogisticRegressionConfig
    from dinov2.eval.protocols import ClassifierConfig, cross_validate

    cfg = ClassifierConfig(
        ks=(k,), linear="sklearn" if linear else "none", logreg=LogisticRegressionConfig(seed=seed)
    )
    result = cross_validate(features, n_folds=folds, seed=seed, classifiers=cfg, progress=progress)
    out = {}
    for row, stats in result.summary().items():
        key = "linear" if row == "Linear Probing" else "knn"
        out[f"{key}_balanced_accuracy"] = 100.0 * stats["balanced_accuracy"]["mean"]
        out[f"{key}_f1_macro"] = 100.0 * stats["f1_macro"]["mean"]
    return out


# ------------------------------------------------------------------------- training-step set-up
def build_bench_config(config: str | Path, opts: Iterable[str]):
    """A training config (file or packaged name plus key=value overrides) for a benchmark that
    writes nothing: the output folder it names is a temporary one, gone on return."""
    from dinov2.utils.config import build_config

    with tempfile.TemporaryDirectory() as tmp:
        return build_config(config, list(opts), output_dir=tmp, check_paths=False)


def make_batch(cfg, image_size: int, seed: int) -> dict:
    """One collated multi-crop batch of `train.batch_size_per_gpu` random RGB images."""
    import torch

    from dinov2.data.augmentations import DataAugmentationDINO
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    aug = DataAugmentationDINO.from_config(cfg.crops)  # the config's multi-crop and colour recipe
    samples = [
        (aug(torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8, generator=g)), -1)
        for _ in range(cfg.train.batch_size_per_gpu)
    ]
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    return collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=int(0.5 * grid * grid)),
    )
