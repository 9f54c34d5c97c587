"""Linear probes on frozen features: scikit-learn logistic regression and a torch linear head.

Both standardise the features (mean 0, variance 1 per dimension, statistics from the training
set) and choose their regularisation on held-out data:

- :func:`logistic_regression_probe`: multinomial logistic regression (L-BFGS) over a grid of
  inverse regularisation strengths ``C``, chosen on a given validation set or by inner
  stratified k-fold CV on the training set, then refitted on all training (+ validation) data.
- :func:`torch_linear_probe`: for feature sets too large for scikit-learn. One linear head per
  (learning rate, weight decay) pair, all trained at once (a single batched matmul; the summed
  loss keeps their gradients independent) with AdamW or SGD, full-batch or minibatch; the best
  pair on validation data is refitted on train + validation.

Example::

    probe = logistic_regression_probe(x_train, y_train)          # C by 3-fold inner CV
    y_hat = probe.predict(x_test)
    head = torch_linear_probe(x_train, y_train, x_val=x_val, y_val=y_val)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from dinov2.eval.folds import stratified_kfold_indices, stratified_split
from dinov2.eval.metrics import classification_metrics
from dinov2.utils.device import resolve_device

SCORINGS = ("accuracy", "balanced_accuracy", "f1_macro", "f1_weighted")


@dataclass(frozen=True)
class LogisticRegressionConfig:
    """Options of :func:`logistic_regression_probe`."""

    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    """Grid of inverse regularisation strengths (a single value skips the search)."""
    inner_folds: int = 3
    """Folds of the inner stratified CV used when no validation set is given."""
    scoring: str = "balanced_accuracy"
    """Metric maximised by the search (one of SCORINGS)."""
    max_iter: int = 1000
    """L-BFGS iterations; standardised features converge well within this."""
    seed: int = 0
    """Seed of the inner CV split."""


@dataclass
class LinearProbe:
    """A fitted probe: ``predict(x) -> labels``, ``predict_proba(x) -> [N, C]``, and its search."""

    model: Pipeline
    params: dict[str, float]
    search: dict[str, float] = field(default_factory=dict)

    def predict(self, x) -> np.ndarray:
        return np.asarray(self.model.predict(np.asarray(x, dtype=np.float32))).astype(np.int64)

    def predict_proba(self, x) -> np.ndarray:
        return self.model.predict_proba(np.asarray(x, dtype=np.float32))


def _check_xy(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if y.min() < 0:
        raise ValueError(f"{name}: labels contain negative (unlabeled) entries")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    if name == "training set" and len(np.unique(y)) < 2:
        raise ValueError(f"{name}: a linear probe needs at least 2 classes, got only class {int(y[0])}")
    return x, y


def _score(y_true, y_pred, scoring: str) -> float:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    return classification_metrics(y_true, y_pred)[scoring]


def fit_logistic_regression(x, y, C: float, *, max_iter: int = 1000, seed: int = 0) -> Pipeline:
    """Standardise + multinomial L-BFGS logistic regression with inverse regularisation ``C``."""
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    )
    with warnings.catch_warnings():
        # A few non-converged fits at tiny C are harmless for model selection; not worth a warning each.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model


def _inner_splits(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return stratified_kfold_indices(y, n_folds=folds, seed=seed)


def logistic_regression_probe(
    x,
    y,
    *,
    x_val=None,
    y_val=None,
    config: LogisticRegressionConfig = LogisticRegressionConfig(),
    refit_on_val: bool = True,
) -> LinearProbe:
    """Logistic-regression probe with ``C`` chosen on (x_val, y_val) or by inner stratified CV.

    Args:
        x, y: training features [N, D] and labels [N].
        x_val, y_val: optional validation set; when given, each C is fitted on the training set and
            scored on it; otherwise each C is scored by ``config.inner_folds``-fold CV on (x, y).
        config: grid, scoring and solver options.
        refit_on_val: refit the chosen C on train + validation (else on train only).

    Returns:
        :class:`LinearProbe` with ``params={"C": best}`` and ``search={str(C): score}``.
    """
    x, y = _check_xy(x, y, "training set")
    Cs = tuple(float(c) for c in config.Cs)
    if not Cs or min(Cs) <= 0:
        raise ValueError(f"Cs must be a non-empty list of positive numbers, got {config.Cs}")
    has_val = x_val is not None or y_val is not None
    if has_val:
        x_val, y_val = _check_xy(x_val, y_val, "validation set")
    search: dict[str, float] = {}
    if len(Cs) == 1:
        best_c = Cs[0]
    else:
        if has_val:
            for c in Cs:
                model = fit_logistic_regression(x, y, c, max_iter=config.max_iter, seed=config.seed)
                search[repr(c)] = _score(y_val, model.predict(x_val), config.scoring)
        else:
            splits = _inner_splits(y, config.inner_folds, config.seed)
            for c in Cs:
                fold_scores = []
                for tr, va in splits:
                    model = fit_logistic_regression(
                        x[tr], y[tr], c, max_iter=config.max_iter, seed=config.seed
                    )
                    fold_scores.append(_score(y[va], model.predict(x[va]), config.scoring))
                search[repr(c)] = float(np.mean(fold_scores))
        # Ties go to the stronger regularisation (smaller C): the simpler model.
        best_c = max(Cs, key=lambda c: (search[repr(c)], -c))
    if has_val and refit_on_val:
        x_fit, y_fit = np.concatenate([x, x_val]), np.concatenate([y, y_val])
    else:
        x_fit, y_fit = x, y
    model = fit_logistic_regression(x_fit, y_fit, best_c, max_iter=config.max_iter, seed=config.seed)
    return LinearProbe(model=model, params={"C": best_c}, search=search)


# --------------------------------------------------------------------------------------------
# Torch linear head
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchLinearConfig:
    """Options of :func:`torch_linear_probe`."""

    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    """Learning-rate grid."""
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-2)
    """Weight-decay grid (decoupled for AdamW, L2 for SGD)."""
    epochs: int = 100
    """Passes over the training set (full-batch: optimiser steps)."""
    batch_size: int | None = None
    """Minibatch size; None trains full-batch."""
    optimizer: str = "adamw"
    """``"adamw"`` or ``"sgd"`` (momentum 0.9)."""
    val_fraction: float = 0.2
    """Held-out fraction of the training set used for the search when no validation set is given."""
    scoring: str = "balanced_accuracy"
    """Metric maximised by the search (one of SCORINGS)."""
    seed: int = 0
    """Seed of the initialisation, the shuffles and the validation split."""
    device: str | None = None
    """Default CUDA when available, else CPU."""


class _Standardiser:
    """Per-dimension standardisation with statistics of the training features."""

    def __init__(self, x: torch.Tensor):
        self.mean = x.mean(0, keepdim=True)
        self.std = x.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class TorchLinearProbe:
    """A trained torch linear head; ``predict(x)`` / ``predict_proba(x)`` take raw features."""

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    params: dict[str, float]
    search: dict[str, float] = field(default_factory=dict)

    def logits(self, x) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x) -> np.ndarray:
        return self.logits(x).argmax(1).numpy().astype(np.int64)

    def predict_proba(self, x) -> np.ndarray:
        return self.logits(x).softmax(1).numpy()


def _train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    grid: list[tuple[float, float]],
    cfg: TorchLinearConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one head per (lr, wd) in ``grid`` on standardised x; returns weights [G, D, C], biases [G, C]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n, d = x.shape
    dev = x.device
    weights = [torch.nn.Parameter((torch.randn(d, num_classes, generator=gen) * 0.01).to(dev)) for _ in grid]
    biases = [torch.nn.Parameter(torch.zeros(num_classes, device=dev)) for _ in grid]
    groups = [
        {"params": [w, b], "lr": lr, "weight_decay": wd} for (lr, wd), w, b in zip(grid, weights, biases)
    ]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
    bs = n if cfg.batch_size is None else int(cfg.batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    steps_per_epoch = math.ceil(n / bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(dev) if bs < n else torch.arange(n, device=dev)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            logits = torch.einsum("nd,gdc->gnc", x[idx], torch.stack(weights)) + torch.stack(biases)[:, None]
            target = y[idx].expand(len(grid), -1)
            # Summed over heads, so each head's gradient is the one of its own mean loss.
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            loss = loss.view(len(grid), -1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return torch.stack(weights).detach(), torch.stack(biases).detach()


def torch_linear_probe(
    x,
    y,
    *,
    x_val=None,
    y_val=None,
    num_classes: int | None = None,
    config: TorchLinearConfig = TorchLinearConfig(),
    refit_on_val: bool = True,
) -> TorchLinearProbe:
    """Linear softmax head trained with a (lr, weight decay) grid search.

    Args:
        x, y: training features [N, D] and labels [N].
        x_val, y_val: validation set for the search; default a stratified ``config.val_fraction``
            of the training set (then the refit uses all of it).
        num_classes: default ``max(label) + 1``.
        config: grids and optimiser options.
        refit_on_val: retrain the best pair on train + validation (else keep the head trained on train).

    Returns:
        :class:`TorchLinearProbe` (on the CPU) with ``params={"lr", "weight_decay"}`` and the search scores.
    """
    x, y = _check_xy(x, y, "training set")
    if x_val is None and y_val is None:
        tr, va = stratified_split(y, config.val_fraction, seed=config.seed)
        x, x_val, y, y_val = x[tr], x[va], y[tr], y[va]
    else:
        x_val, y_val = _check_xy(x_val, y_val, "validation set")
    num_classes = int(max(y.max(), y_val.max())) + 1 if num_classes is None else int(num_classes)
    grid = [(float(lr), float(wd)) for lr in config.lrs for wd in config.weight_decays]
    if not grid:
        raise ValueError("the lr and weight-decay grids must not be empty")
    dev = resolve_device(config.device)
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    xv = torch.from_numpy(x_val).to(dev)
    std = _Standardiser(xt)
    w, b = _train_heads(std(xt), yt, num_classes, grid, config)
    val_logits = torch.einsum("nd,gdc->gnc", std(xv), w) + b[:, None]
    val_pred = val_logits.argmax(-1).cpu().numpy()
    scores = [_score(y_val, val_pred[g], config.scoring) for g in range(len(grid))]
    search = {f"lr={lr:g},wd={wd:g}": s for (lr, wd), s in zip(grid, scores)}
    # First best in grid order (lrs ascending as given): deterministic.
    best = int(np.argmax(scores))
    if refit_on_val:
        xa = torch.cat([xt, xv])
        ya = torch.cat([yt, torch.from_numpy(y_val).to(dev)])
        std = _Standardiser(xa)
        w, b = _train_heads(std(xa), ya, num_classes, [grid[best]], config)
        w, b = w[0], b[0]
    else:
        w, b = w[best], b[best]
    return TorchLinearProbe(
        weight=w.cpu(),
        bias=b.cpu(),
        mean=std.mean.cpu(),
        std=std.std.cpu(),
        params={"lr": grid[best][0], "weight_decay": grid[best][1]},
        search=search,
    )


def fit_linear_probe(
    x,
    y,
    *,
    kind: str = "sklearn",
    x_val=None,
    y_val=None,
    sklearn_config: LogisticRegressionConfig = LogisticRegressionConfig(),
    torch_config: TorchLinearConfig = TorchLinearConfig(),
    num_classes: int | None = None,
) -> LinearProbe | TorchLinearProbe:
    """Dispatch to :func:`logistic_regression_probe` (``kind="sklearn"``) or :func:`torch_linear_probe`."""
    if kind == "sklearn":
        return logistic_regression_probe(x, y, x_val=x_val, y_val=y_val, config=sklearn_config)
    if kind == "torch":
        return torch_linear_probe(
            x, y, x_val=x_val, y_val=y_val, num_classes=num_classes, config=torch_config
        )
    raise ValueError(f"linear probe kind must be 'sklearn' or 'torch', got {kind!r}")


__all__: Sequence[str] = (
    "LogisticRegressionConfig",
    "LinearProbe",
    "TorchLinearConfig",
    "TorchLinearProbe",
    "fit_logistic_regression",
    "logistic_regression_probe",
    "torch_linear_probe",
    "fit_linear_probe",
)
