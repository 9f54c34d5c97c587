"""Schedules against DINOv2's formulas worked by hand."""

import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.train.schedules import (
    CosineScheduler,
    apply_optim_scheduler,
    build_schedulers,
    peak_lr,
    scaled_lr,
)


def test_cosine_scheduler_freeze_warmup_cosine_and_past_end():
    s = CosineScheduler(1.0, 0.2, total_iters=10, warmup_iters=2, start_warmup_value=0.5, freeze_iters=3)
    cos = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    expected = [0.0, 0.0, 0.0, 0.5, 1.0] + cos
    assert [s[i] for i in range(10)] == pytest.approx(expected)
    assert s[10] == 0.2 and s[10**6] == 0.2
    assert len(s) == 10 and isinstance(s[4], float)


def test_cosine_scheduler_edge_cases_and_errors():
    flat = CosineScheduler(0.07, 0.07, total_iters=4, warmup_iters=4, start_warmup_value=0.04)
    assert [flat[i] for i in range(5)] == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07])
    empty = CosineScheduler(0.07, 0.07, total_iters=0)
    assert empty[0] == 0.07
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineScheduler(1, 0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(ValueError, match=">= 0"):
        CosineScheduler(1, 0, total_iters=5)[-1]


def _cfg(**optim_overrides):
    cfg = OmegaConf.create(
        {
            "train": {"OFFICIAL_EPOCH_LENGTH": 10, "batch_size_per_gpu": 64},
            "optim": {
                "epochs": 5,
                "warmup_epochs": 1,
                "base_lr": 0.004,
                "lr": 0.0,
                "min_lr": 1e-6,
                "scaling_rule": "sqrt_wrt_1024",
                "weight_decay": 0.04,
                "weight_decay_end": 0.4,
                "freeze_last_layer_epochs": 1,
            },
            "teacher": {
                "momentum_teacher": 0.992,
                "final_momentum_teacher": 1.0,
                "warmup_teacher_temp": 0.04,
                "teacher_temp": 0.07,
                "warmup_teacher_temp_epochs": 2,
            },
        }
    )
    cfg.optim.update(optim_overrides)
    return cfg


def test_build_schedulers_by_hand():
    lr, wd, momentum, temp, last = build_schedulers(_cfg(), world_size=4)
    peak = 0.004 * math.sqrt(64 * 4 / 1024)  # = 0.002
    assert peak == pytest.approx(0.002)
    # lr: linear 0 -> peak over 10 iterations (both ends included), then cosine over 40 to min_lr
    assert lr[0] == 0.0 and lr[9] == pytest.approx(peak) and lr[5] == pytest.approx(peak * 5 / 9)
    assert lr[10] == pytest.approx(peak)
    assert lr[30] == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lr[50] == 1e-6
    # last layer: same as lr but zero for the first epoch
    assert all(last[i] == 0.0 for i in range(10))
    assert all(last[i] == lr[i] for i in range(10, 60))
    # weight decay and momentum: cosine over all 50 iterations
    assert wd[0] == pytest.approx(0.04) and wd[25] == pytest.approx(0.22) and wd[50] == 0.4
    assert (
        momentum[0] == pytest.approx(0.992) and momentum[25] == pytest.approx(0.996) and momentum[99] == 1.0
    )
    # teacher temperature: linear 0.04 -> 0.07 over 20 iterations, then constant
    assert temp[0] == pytest.approx(0.04) and temp[19] == pytest.approx(0.07)
    assert temp[10] == pytest.approx(0.04 + 0.03 * 10 / 19)
    assert temp[20] == 0.07 and temp[10**5] == 0.07


def test_peak_lr_uses_preset_lr_and_scaling_rules():
    assert peak_lr(_cfg(lr=0.123), world_size=8) == 0.123
    assert peak_lr(_cfg(), world_size=1) == pytest.approx(0.004 * math.sqrt(64 / 1024))
    assert scaled_lr(0.004, "linear_wrt_1024", 2048) == pytest.approx(0.008)
    assert scaled_lr(0.004, "none", 2048) == 0.004
    with pytest.raises(ValueError, match="scaling_rule 'cubic'"):
        scaled_lr(0.004, "cubic", 64)
    with pytest.raises(ValueError, match="OFFICIAL_EPOCH_LENGTH"):
        build_schedulers(OmegaConf.merge(_cfg(), {"train": {"OFFICIAL_EPOCH_LENGTH": 0}}), world_size=1)


def test_apply_optim_scheduler_honours_multipliers_and_last_layer():
    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW(
        [
            {"params": [p[0]], "lr_multiplier": 0.5, "wd_multiplier": 0.0, "is_last_layer": False},
            {"params": [p[1]], "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": True},
            {"params": [p[2]]},
        ]
    )
    apply_optim_scheduler(opt, lr=0.1, wd=0.3, last_layer_lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.01, 0.1])
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.0, 0.3, 0.3])


def test_cosine_scheduler_lazily_reexported_from_utils():
    from dinov2.utils.utils import CosineScheduler as reexported

    assert reexported is CosineScheduler
    code = "import sys, dinov2.utils.utils as u; assert 'dinov2.train' not in sys.modules; u.CosineScheduler"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_fix_random_seeds_makes_all_generators_repeat():
    import random

    import numpy as np

    from dinov2.utils.utils import fix_random_seeds

    fix_random_seeds(7)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    fix_random_seeds(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    with pytest.raises(ValueError, match="seed"):
        fix_random_seeds(-1)
