"""Collapse monitor: is the teacher still producing diverse, confident outputs?

Three numbers computed on one batch of teacher outputs:
- `teacher_entropy`: mean over samples of H(p_i) = -sum_k p_ik log p_ik, where p_i is the teacher's
  centred, sharpened softmax over K prototypes. log K means every sample is uniform ("flat" collapse).
- `teacher_kl_to_uniform`: KL(mean_i p_i || U_K) = log K - H(mean_i p_i). log K means every sample
  puts its mass on the same prototype ("dominant-prototype" collapse); ~0 means prototypes are used evenly.
- `cls_std`: std over the batch of the L2-normalised CLS embeddings, averaged over dimensions; 0 means
  every image has the same embedding. Random unit vectors in D dims give about 1/sqrt(D), so the
  warning compares `cls_std * sqrt(D)` with a threshold.
Entropy and KL are also reported divided by log K (`*_frac`), which makes thresholds size-free.

`CollapseStreak` counts consecutive checks that warned, so that a run can stop itself after N of them
(`train.collapse_stop_after_warnings`) instead of training a collapsed model to the end.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CollapseThresholds:
    """When to warn. Fractions are of log K; the std ratio is of 1/sqrt(D)."""

    max_entropy_frac: float = 0.95
    """warn when mean per-sample entropy exceeds this share of log K (outputs flat)."""
    max_kl_frac: float = 0.9
    """warn when KL(mean output || uniform) exceeds this share of log K (one prototype wins)."""
    min_cls_std_ratio: float = 0.05
    """warn when cls_std * sqrt(D) falls below this (embeddings identical across images)."""


def mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean per-row entropy (nats) of row-stochastic `probs` [B, K]; 0 log 0 counts as 0."""
    p = probs.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(dim=-1).mean()


def kl_to_uniform(probs: torch.Tensor) -> torch.Tensor:
    """KL(mean_i probs_i || uniform over K) in nats, for `probs` [B, K]."""
    mean = probs.double().mean(dim=0, keepdim=True)
    return math.log(probs.shape[-1]) - mean_entropy(mean)


def cls_embedding_std(cls_tokens: torch.Tensor) -> torch.Tensor:
    """Std over the batch (unbiased) of L2-normalised rows of `cls_tokens` [B, D], averaged over D."""
    z = torch.nn.functional.normalize(cls_tokens.double(), dim=-1)
    return z.std(dim=0).mean()


def collapse_metrics(teacher_probs: torch.Tensor, cls_tokens: torch.Tensor) -> dict[str, float]:
    """The monitor's numbers for teacher probabilities [B, K] and teacher CLS embeddings [B, D]."""
    if teacher_probs.ndim != 2 or cls_tokens.ndim != 2 or teacher_probs.shape[0] < 2:
        raise ValueError(
            f"need teacher_probs [B, K] and cls_tokens [B, D] with B >= 2, got "
            f"{tuple(teacher_probs.shape)} and {tuple(cls_tokens.shape)}"
        )
    log_k = math.log(teacher_probs.shape[-1])
    entropy = mean_entropy(teacher_probs).item()
    kl = kl_to_uniform(teacher_probs).item()
    std = cls_embedding_std(cls_tokens).item()
    return {
        "teacher_entropy": entropy,
        "teacher_entropy_frac": entropy / log_k if log_k > 0 else 0.0,
        "teacher_kl_to_uniform": kl,
        "teacher_kl_frac": kl / log_k if log_k > 0 else 0.0,
        "cls_std": std,
        "cls_std_ratio": std * math.sqrt(cls_tokens.shape[-1]),
    }


def _percent_digits(fraction: float) -> int:
    """Decimals needed to print `fraction` as an exact percentage (0.995 -> 1: "99.5")."""
    for digits in range(6):
        if abs(round(fraction * 100, digits) - fraction * 100) < 1e-9:
            return digits
    return 6


def _percentages(value: float, threshold: float) -> tuple[str, str]:
    """(value, threshold) as percentages; the value gets one more decimal than the threshold needs,
    so that a value just over a threshold never prints as the threshold itself."""
    digits = _percent_digits(threshold)
    return f"{value * 100:.{max(1, digits + 1)}f}%", f"{threshold * 100:.{digits}f}%"


def collapse_warnings_by_metric(
    metrics: dict[str, float], thresholds: CollapseThresholds = CollapseThresholds()
) -> dict[str, str]:
    """{metric name: human-readable reason} for each metric past its threshold (empty when healthy).

    The names are the keys of `collapse_metrics` that are compared: "teacher_entropy_frac",
    "teacher_kl_frac" and "cls_std_ratio".
    """
    reasons = {}
    if metrics["teacher_entropy_frac"] > thresholds.max_entropy_frac:
        value, limit = _percentages(metrics["teacher_entropy_frac"], thresholds.max_entropy_frac)
        reasons["teacher_entropy_frac"] = (
            f"teacher outputs are nearly uniform: entropy {metrics['teacher_entropy']:.3f} nats = "
            f"{value} of log K (threshold {limit})"
        )
    if metrics["teacher_kl_frac"] > thresholds.max_kl_frac:
        value, limit = _percentages(metrics["teacher_kl_frac"], thresholds.max_kl_frac)
        reasons["teacher_kl_frac"] = (
            "one prototype dominates: KL(mean teacher output || uniform) "
            f"{metrics['teacher_kl_to_uniform']:.3f} nats = {value} of log K (threshold {limit})"
        )
    if metrics["cls_std_ratio"] < thresholds.min_cls_std_ratio:
        reasons["cls_std_ratio"] = (
            f"CLS embeddings barely differ across images: std {metrics['cls_std']:.2e} = "
            f"{metrics['cls_std_ratio']:.3f}/sqrt(D) (threshold {thresholds.min_cls_std_ratio}/sqrt(D))"
        )
    return reasons


def collapse_warnings(
    metrics: dict[str, float], thresholds: CollapseThresholds = CollapseThresholds()
) -> list[str]:
    """Human-readable reasons the metrics indicate collapse (empty when healthy)."""
    return list(collapse_warnings_by_metric(metrics, thresholds).values())


class CollapseStreak:
    """Consecutive collapse checks that warned, and whether the run should stop.

    Args:
        stop_after: stop once this many consecutive checks warned; 0 never stops.

    Usage (at every collapse check):
        if streak.update(iteration, warned_metric_names):
            raise SystemExit(f"collapse: {streak.describe()}")
    """

    def __init__(self, stop_after: int) -> None:
        if stop_after < 0:
            raise ValueError(f"stop_after must be >= 0 (0: never stop), got {stop_after}")
        self.stop_after = stop_after
        self.iterations: list[int] = []
        """iterations of the checks in the current streak (empty: the last check was healthy)."""
        self.metrics: list[str] = []
        """names of the metrics that warned during the streak, in order of first appearance."""

    def update(self, iteration: int, warned: Sequence[str]) -> bool:
        """Record the check at `iteration` (`warned`: names of the metrics that warned, empty when
        healthy); True when the run should stop now."""
        if not warned:
            self.iterations, self.metrics = [], []
            return False
        self.iterations.append(iteration)
        self.metrics += [m for m in warned if m not in self.metrics]
        return self.stop_after > 0 and len(self.iterations) >= self.stop_after

    @property
    def started(self) -> bool:
        """True while the last check warned."""
        return bool(self.iterations)

    def describe(self) -> str:
        """e.g. "3 consecutive checks warned (iterations 150, 200, 250) on cls_std_ratio"."""
        its = ", ".join(str(i) for i in self.iterations)
        return (
            f"{len(self.iterations)} consecutive checks warned (iterations {its}) on "
            f"{', '.join(self.metrics)}"
        )
