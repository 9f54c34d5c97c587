"""Collapse-monitor metrics against hand computations, its messages and its stop rule
(dinov2/train/collapse.py)."""

import math

import pytest
import torch

from dinov2.train.collapse import (
    CollapseStreak,
    CollapseThresholds,
    cls_embedding_std,
    collapse_metrics,
    collapse_warnings,
    collapse_warnings_by_metric,
    kl_to_uniform,
    mean_entropy,
)


def test_uniform_outputs_have_max_entropy_and_zero_kl():
    k = 64
    probs = torch.full((5, k), 1.0 / k)
    assert mean_entropy(probs).item() == pytest.approx(math.log(k))
    assert kl_to_uniform(probs).item() == pytest.approx(0.0, abs=1e-12)


def test_same_one_hot_for_everyone_is_zero_entropy_and_max_kl():
    k = 10
    probs = torch.zeros(4, k)
    probs[:, 3] = 1.0
    assert mean_entropy(probs).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_to_uniform(probs).item() == pytest.approx(math.log(k))


def test_distinct_one_hots_spread_evenly_have_zero_kl():
    k = 4
    probs = torch.eye(k)  # every prototype used once
    assert mean_entropy(probs).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_to_uniform(probs).item() == pytest.approx(0.0, abs=1e-12)


def test_entropy_and_kl_match_hand_computation():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    h1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h2 = -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.7 * math.log(0.7))
    assert mean_entropy(probs).item() == pytest.approx((h1 + h2) / 2)
    mean = [0.3, 0.225, 0.475]
    kl = sum(m * math.log(m * 3) for m in mean)
    assert kl_to_uniform(probs).item() == pytest.approx(kl)


def test_cls_std_zero_for_identical_and_scale_invariant():
    same = torch.randn(1, 16).repeat(8, 1) * torch.arange(1, 9).view(8, 1)  # same direction, other norms
    assert cls_embedding_std(same).item() == pytest.approx(0.0, abs=1e-7)  # float32 rounding of the scaling
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # normalised: (0.6, 0.8), (0, 1)
    # unbiased std over 2 rows of each dim: |a - b| / sqrt(2)
    expected = (abs(0.6 - 0.0) / math.sqrt(2) + abs(0.8 - 1.0) / math.sqrt(2)) / 2
    assert cls_embedding_std(x).item() == pytest.approx(expected)


def test_random_directions_give_std_ratio_near_one():
    torch.manual_seed(0)
    m = collapse_metrics(torch.softmax(torch.randn(4096, 32), -1), torch.randn(4096, 64))
    assert m["cls_std_ratio"] == pytest.approx(1.0, abs=0.05)


def test_warnings_fire_for_each_collapse_mode_and_not_when_healthy():
    torch.manual_seed(0)
    b, k, d = 32, 100, 16
    healthy_probs = torch.softmax(torch.randn(b, k) * 5, dim=-1)
    healthy_cls = torch.randn(b, d)
    assert collapse_warnings(collapse_metrics(healthy_probs, healthy_cls)) == []

    flat = collapse_warnings(collapse_metrics(torch.full((b, k), 1.0 / k), healthy_cls))
    assert len(flat) == 1 and "nearly uniform" in flat[0] and "threshold 95%" in flat[0]

    one_hot = torch.zeros(b, k)
    one_hot[:, 0] = 1
    dominant = collapse_warnings(collapse_metrics(one_hot, healthy_cls))
    assert len(dominant) == 1 and "one prototype dominates" in dominant[0]

    same = collapse_warnings(collapse_metrics(healthy_probs, torch.ones(b, d)))
    assert len(same) == 1 and "barely differ" in same[0]

    strict = CollapseThresholds(max_entropy_frac=0.0)
    assert any(
        "nearly uniform" in w for w in collapse_warnings(collapse_metrics(healthy_probs, healthy_cls), strict)
    )


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="B >= 2"):
        collapse_metrics(torch.ones(1, 4) / 4, torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        collapse_metrics(torch.ones(4), torch.ones(4, 3))


def _metrics(entropy_frac=0.5, kl_frac=0.1, cls_std_ratio=1.0, k=256, d=128):
    log_k = math.log(k)
    return {
        "teacher_entropy": entropy_frac * log_k,
        "teacher_entropy_frac": entropy_frac,
        "teacher_kl_to_uniform": kl_frac * log_k,
        "teacher_kl_frac": kl_frac,
        "cls_std": cls_std_ratio / math.sqrt(d),
        "cls_std_ratio": cls_std_ratio,
    }


def test_thresholds_print_with_the_digits_they_have():
    # The tiny configs warn above 99.5 % of log K: the message used to say "99.8% ... (threshold 100%)".
    thresholds = CollapseThresholds(max_entropy_frac=0.995, max_kl_frac=0.9, min_cls_std_ratio=0.05)
    (reason,) = collapse_warnings(_metrics(entropy_frac=0.998), thresholds)
    assert "= 99.80% of log K (threshold 99.5%)" in reason
    assert f"entropy {0.998 * math.log(256):.3f} nats" in reason
    # Just past the threshold, the value still prints differently from it.
    (reason,) = collapse_warnings(_metrics(entropy_frac=0.9951), thresholds)
    assert "99.51% of log K (threshold 99.5%)" in reason
    (reason,) = collapse_warnings(_metrics(kl_frac=0.9312), thresholds)
    assert "93.1% of log K (threshold 90%)" in reason
    fine = CollapseThresholds(max_kl_frac=0.12345)
    (reason,) = collapse_warnings(_metrics(kl_frac=0.2), fine)
    assert "(threshold 12.345%)" in reason and "20.0000%" in reason


def test_warnings_are_named_by_metric():
    everything = _metrics(entropy_frac=0.99, kl_frac=0.95, cls_std_ratio=0.01)
    assert list(collapse_warnings_by_metric(everything)) == [
        "teacher_entropy_frac",
        "teacher_kl_frac",
        "cls_std_ratio",
    ]
    assert collapse_warnings_by_metric(_metrics()) == {}


def test_streak_stops_after_n_consecutive_warning_checks():
    streak = CollapseStreak(stop_after=3)
    assert not streak.update(100, ["teacher_entropy_frac"])
    assert not streak.update(150, ["teacher_entropy_frac", "cls_std_ratio"])
    assert not streak.update(200, [])  # a healthy check ends the streak
    assert not streak.started and streak.iterations == []
    assert not streak.update(250, ["cls_std_ratio"])
    assert not streak.update(300, ["teacher_kl_frac"])
    assert streak.update(350, ["cls_std_ratio"])
    assert streak.describe() == (
        "3 consecutive checks warned (iterations 250, 300, 350) on cls_std_ratio, teacher_kl_frac"
    )
    never = CollapseStreak(stop_after=0)
    assert not any(never.update(i, ["cls_std_ratio"]) for i in range(100))
    with pytest.raises(ValueError, match="stop_after must be >= 0"):
        CollapseStreak(stop_after=-1)
