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
"""

import math
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


def collapse_warnings(
    metrics: dict[str, float], thresholds: CollapseThresholds = CollapseThresholds()
) -> list[str]:
    """Human-readable reasons the metrics indicate collapse (empty when healthy)."""
    reasons = []
    if metrics["teacher_entropy_frac"] > thresholds.max_entropy_frac:
        reasons.append(
            f"teacher outputs are nearly uniform: entropy {metrics['teacher_entropy']:.3f} nats = "
            f"{metrics['teacher_entropy_frac']:.1%} of log K (threshold {thresholds.max_entropy_frac:.0%})"
        )
    if metrics["teacher_kl_frac"] > thresholds.max_kl_frac:
        reasons.append(
            "one prototype dominates: KL(mean teacher output || uniform) "
            f"{metrics['teacher_kl_to_uniform']:.3f} nats = {metrics['teacher_kl_frac']:.1%} of log K "
            f"(threshold {thresholds.max_kl_frac:.0%})"
        )
    if metrics["cls_std_ratio"] < thresholds.min_cls_std_ratio:
        reasons.append(
            f"CLS embeddings barely differ across images: std {metrics['cls_std']:.2e} = "
            f"{metrics['cls_std_ratio']:.3f}/sqrt(D) (threshold {thresholds.min_cls_std_ratio}/sqrt(D))"
        )
    return reasons
