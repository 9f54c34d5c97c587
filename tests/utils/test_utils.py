"""Tests of dinov2/utils/utils.py: the one seeding function."""

import random

import numpy as np
import pytest
import torch

from dinov2.utils.utils import fix_random_seeds


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_same_seed_same_draws_different_seed_different_draws():
    fix_random_seeds(7)
    a = _draw()
    fix_random_seeds(7)
    assert _draw() == a
    fix_random_seeds(8)
    assert _draw() != a


def test_each_generator_gets_the_documented_seed():
    seed = 2**40 + 5  # a per-epoch seed: above numpy's 32-bit range
    fix_random_seeds(seed)
    got = _draw()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    assert got == _draw()


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_out_of_range_seed_is_rejected(bad):
    with pytest.raises(ValueError, match="seed must be in"):
        fix_random_seeds(bad)
