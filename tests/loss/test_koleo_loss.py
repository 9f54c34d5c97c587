"""KoLeoLoss against a brute-force nearest-neighbour computation."""

import math

import pytest
import torch

from dinov2.loss import KoLeoLoss


def test_matches_brute_force_nearest_neighbour():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 3
    xn = x / x.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(7):
        d = min((xn[i] - xn[j]).norm().item() for j in range(7) if j != i)
        expected -= math.log(d + 1e-8) / 7
    assert KoLeoLoss()(x).item() == pytest.approx(expected, rel=1e-5)


def test_nearest_neighbour_indices_skip_self():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2]]), dim=1)
    assert KoLeoLoss().pairwise_NNs_inner(x).tolist() == [
        1,
        0,
        3,
        2,
    ]  # (0, 1) is closer to (-1, 0.2) than to (0.9, 0.1)


def test_finite_on_duplicate_heavy_batch():
    base = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    x = base[torch.tensor([0] * 10 + [1] * 5 + [2])].clone().requires_grad_(True)  # 16 rows, 3 distinct
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # a duplicate's neighbour distance is PairwiseDistance's eps * sqrt(D)
    expected_dup = -math.log(1e-8 * math.sqrt(16) + 1e-8)
    assert loss.item() == pytest.approx(expected_dup * 15 / 16 + _single_term(x.detach(), 15) / 16, rel=1e-4)


def _single_term(x, i):
    xn = torch.nn.functional.normalize(x, dim=1)
    d = min((xn[i] - xn[j]).norm().item() for j in range(len(x)) if not torch.equal(xn[j], xn[i]))
    return -math.log(d + 1e-8)


def test_spread_batch_has_lower_loss_than_clustered_one():
    spread = torch.eye(4)
    clustered = torch.eye(4) * 0.01 + 1.0
    assert KoLeoLoss()(spread) < KoLeoLoss()(clustered)


def test_scale_invariant_and_fp32_under_lower_precision_input():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    ref = KoLeoLoss()(x)
    torch.testing.assert_close(KoLeoLoss()(x * 7.0), ref)
    out = KoLeoLoss()(x.bfloat16())
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(KoLeoLoss()(x.bfloat16().float()).item(), rel=1e-6)


def test_degenerate_and_bad_inputs():
    x = torch.randn(1, 4, requires_grad=True)
    out = KoLeoLoss()(x)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        KoLeoLoss()(torch.randn(2, 3, 4))
