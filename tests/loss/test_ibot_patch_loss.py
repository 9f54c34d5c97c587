"""iBOTPatchLoss (dense and masked forms, centering, Sinkhorn-Knopp) against hand computations."""

import math

import pytest
import torch

from dinov2.loss import iBOTPatchLoss


def _ce(t_row, s_row, temp):
    z = [v / temp for v in s_row]
    m = max(z)
    log_norm = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(tk * (zk - log_norm) for tk, zk in zip(t_row, z))


def _example(seed=0, b=3, n=5, k=4):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, k, generator=g)
    t = torch.softmax(torch.randn(b, n, k, generator=g), dim=-1)
    masks = torch.tensor([[True, False, True, True, False], [False] * 5, [False, True, False, False, False]])[
        :b
    ]
    return s, t, masks


def _hand_loss(s, t, masks, temp):
    per_image = []
    for i in range(s.shape[0]):
        idx = [j for j in range(s.shape[1]) if masks[i, j]]
        total = sum(_ce(t[i, j].tolist(), s[i, j].tolist(), temp) for j in idx)
        per_image.append(total / max(len(idx), 1))
    return sum(per_image) / len(per_image)


def test_dense_forward_matches_hand_computation():
    s, t, masks = _example()
    expected = _hand_loss(s, t, masks, 0.1)
    assert iBOTPatchLoss(4)(s, t, masks).item() == pytest.approx(expected, rel=1e-5)


def test_forward_masked_equals_dense_form_with_and_without_padding():
    s, t, masks = _example(seed=1)
    loss = iBOTPatchLoss(4)
    expected = _hand_loss(s, t, masks, 0.1)
    s_m, t_m = s[masks], t[masks]  # [M, K], M = 4
    assert loss.forward_masked(s_m, t_m, masks).item() == pytest.approx(expected, rel=1e-5)
    # DINOv2 pads to an upper bound; the padding rows must be ignored through n_masked_patches
    s_pad = torch.cat([s_m, torch.randn(3, 4)])
    t_pad = torch.cat([t_m, torch.softmax(torch.randn(3, 4), -1)])
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])  # image 0 has 3 masked patches, image 2 has 1
    got = loss.forward_masked(s_pad, t_pad, masks, n_masked_patches=4, masks_weight=weights)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="n_masked_patches"):
        loss.forward_masked(s_pad, t_pad, masks)


def test_softmax_center_and_lazy_center_update():
    loss = iBOTPatchLoss(3, center_momentum=0.9)
    masked = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]])  # [1, M=2, K]
    loss.update_center(masked)
    assert torch.equal(loss.center, torch.zeros(1, 1, 3))
    t = torch.tensor([[0.5, 0.2, -0.1]])
    out = loss.softmax_center_teacher(t, teacher_temp=0.2)
    c = 0.1 * torch.tensor([[[2.0, 1.0, 1.0]]])
    torch.testing.assert_close(loss.center, c)
    expected = torch.tensor([[math.exp((t[0, k] - c[0, 0, k]) / 0.2) for k in range(3)]])
    torch.testing.assert_close(out, expected / expected.sum(), rtol=1e-5, atol=1e-7)
    # several groups: mean over tokens, then mean over groups
    loss.update_center(torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 4.0, 0.0]]]))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.9 * c + 0.1 * torch.tensor([[[1.0, 2.0, 0.0]]]))


def test_center_update_with_no_masked_token_keeps_center():
    loss = iBOTPatchLoss(2)
    loss.center.fill_(0.5)
    loss.update_center(torch.zeros(1, 0, 2))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, torch.full((1, 1, 2), 0.5))


def test_sinkhorn_without_process_group_and_caller_tensor_untouched():
    scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    n = torch.tensor([6])
    out = iBOTPatchLoss(3).sinkhorn_knopp_teacher(scores, 0.1, n, n_iterations=100)
    assert n.item() == 6
    torch.testing.assert_close(out.sum(1), torch.ones(6), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.sum(0), torch.full((3,), 2.0), rtol=1e-3, atol=1e-3)
    # one iteration, by hand: Q = exp(S/T)^T / sum; rows /= rowsum * K; cols /= colsum * B; Q *= B
    q = torch.exp(scores.double() / 0.1).t()
    q = q / q.sum()
    q = q / q.sum(1, keepdim=True) / 3
    q = q / q.sum(0, keepdim=True) / 6
    one = iBOTPatchLoss(3).sinkhorn_knopp_teacher(scores, 0.1, 6, n_iterations=1)
    torch.testing.assert_close(one.double(), (q * 6).t(), rtol=1e-5, atol=1e-7)


def test_bad_shapes_raise():
    loss = iBOTPatchLoss(4)
    s, t, masks = _example()
    with pytest.raises(ValueError, match="student_masks_flat"):
        loss(s, t, masks[:, :4])
    with pytest.raises(ValueError, match="same shape"):
        loss.forward_masked(s[masks], t[masks][:2], masks)
    with pytest.raises(ValueError, match=r"\[n, P, K\]"):
        loss.update_center(torch.zeros(3, 4))


def test_sinkhorn_with_the_count_as_a_tensor_never_reads_it_on_the_host(monkeypatch):
    # The collate function's n_masked_patches tensor stays on the device: no .item() / .tolist().
    scores = torch.randn(7, 5, generator=torch.Generator().manual_seed(5))
    loss = iBOTPatchLoss(patch_out_dim=5)
    expected = loss.sinkhorn_knopp_teacher(scores, 0.1, 7)
    for name in ("item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: pytest.fail(f"Tensor.{_n} called"))
    got = loss.sinkhorn_knopp_teacher(scores, 0.1, torch.tensor([7]))
    monkeypatch.undo()
    assert torch.equal(got, expected)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(7))  # every patch's target is a distribution
