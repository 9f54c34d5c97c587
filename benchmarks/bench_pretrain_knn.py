"""How good is a pretraining run? 20-NN balanced accuracy of its teacher on a labeled cell dataset.

Extracts CLS features of a stratified subset of a class-folder dataset (e.g. PBC) with the run's
teacher export, and compares, in the same run and on the same images and folds:
  - the same architecture at random initialisation (what pretraining starts from);
  - raw pixels (the images downscaled to the training resolution, flattened).
Scores: cosine k-NN (majority vote, scikit-learn), stratified k-fold cross-validation, balanced
accuracy mean +/- std over folds.

    python benchmarks/bench_pretrain_knn.py --run-dir /tmp/pbc_tiny --data ../shared/data/pbc_128 --n 3000
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import latest_teacher_export, random_init_teacher
from omegaconf import OmegaConf
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from dinov2.data.datasets import CellImageDataset
from dinov2.data.transforms import make_classification_eval_transform
from dinov2.models.weights import load_backbone


def stratified_subset(targets: np.ndarray, n: int, seed: int) -> np.ndarray:
    """About `n` indices with the class proportions of `targets`."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        keep.append(rng.choice(idx, size=max(1, round(n * len(idx) / len(targets))), replace=False))
    return np.sort(np.concatenate(keep))


@torch.no_grad()
def features(backbone: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    backbone.eval()
    return torch.cat([backbone(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()


def knn_cv(x: np.ndarray, y: np.ndarray, k: int, folds: int, seed: int) -> tuple[float, float]:
    """Mean and std over stratified folds of the balanced accuracy of a cosine k-NN."""
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(x[train], y[train])
        scores.append(balanced_accuracy_score(y[test], clf.predict(x[test])))
    return float(np.mean(scores)), float(np.std(scores))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run-dir", required=True, type=Path, help="training output dir (config.yaml, eval/)"
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="teacher export (default: the newest)")
    parser.add_argument("--data", required=True, help="labeled class-folder dataset")
    parser.add_argument("--n", type=int, default=3000, help="images in the stratified subset")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    checkpoint = args.checkpoint or latest_teacher_export(args.run_dir)
    size = cfg.crops.global_crops_size
    transform = make_classification_eval_transform(resize_size=size, crop_size=size)
    dataset = CellImageDataset(args.data, transform=transform, labeled=True)
    targets = np.asarray(dataset.targets)
    subset = stratified_subset(targets, args.n, args.seed)
    t0 = time.perf_counter()
    images = torch.stack([dataset[int(i)][0] for i in subset])
    y = targets[subset]
    print(f"{len(subset)} images of {len(dataset)} ({len(dataset.classes)} classes) at {size} px, "
          f"loaded in {time.perf_counter() - t0:.0f} s; teacher {checkpoint}")  # fmt: skip

    trained = load_backbone(checkpoint)
    random_init = random_init_teacher(cfg, args.seed)
    rows = {
        "pretrained teacher": features(trained, images),
        "same net, random init": features(random_init, images),
        f"raw pixels ({size}x{size})": images.flatten(1).numpy(),
    }
    results = {}
    print(f"{args.k}-NN balanced accuracy, {args.folds}-fold stratified CV (mean +/- std):")
    for name, x in rows.items():
        mean, std = knn_cv(x, y, args.k, args.folds, args.seed)
        results[name] = (mean, std)
        print(f"  {name:28s} {100 * mean:5.1f} +/- {100 * std:.1f}")
    return results


if __name__ == "__main__":
    main()
