"""DINOLoss against hand computations of DINOv2's formulas."""

import math

import numpy as np
import pytest
import torch

from dinov2.loss import DINOLoss


def _ce_by_hand(t_row, s_row, temp):
    """-sum_k t_k log softmax(s / temp)_k for one row, with Python floats."""
    z = [v / temp for v in s_row]
    m = max(z)
    log_norm = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(tk * (zk - log_norm) for tk, zk in zip(t_row, z))


def test_softmax_center_teacher_matches_formula():
    loss = DINOLoss(out_dim=5)
    loss.center.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.0, 0.5]]))
    t = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    out = loss.softmax_center_teacher(t, teacher_temp=0.07)
    for i in range(4):
        z = [(t[i, k].item() - loss.center[0, k].item()) / 0.07 for k in range(5)]
        m = max(z)
        denom = sum(math.exp(v - m) for v in z)
        expected = [math.exp(v - m) / denom for v in z]
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_forward_sums_all_pairs_of_batch_means():
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(3, 4, generator=g) for _ in range(3)]
    teachers = [torch.softmax(torch.randn(3, 4, generator=g), dim=-1) for _ in range(2)]
    loss = DINOLoss(out_dim=4, student_temp=0.1)
    expected = 0.0
    for s in students:
        for t in teachers:
            expected += sum(_ce_by_hand(t[b].tolist(), s[b].tolist(), 0.1) for b in range(3)) / 3
    assert loss(students, teachers).item() == pytest.approx(expected, rel=1e-5)
    # a stacked [n_crops, B, K] teacher tensor iterates as its crops
    assert loss(students, torch.stack(teachers)).item() == pytest.approx(expected, rel=1e-5)


def test_forward_gradient_is_softmax_minus_target():
    # d/ds H(t, s) = (softmax(s / T) - t) / T for one row; batch mean divides by B.
    s = torch.randn(2, 6, requires_grad=True)
    t = torch.softmax(torch.randn(2, 6), dim=-1)
    DINOLoss(out_dim=6, student_temp=0.2)([s], [t]).backward()
    expected = (torch.softmax(s.detach() / 0.2, dim=-1) - t) / 0.2 / 2
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_lazy_center_update():
    loss = DINOLoss(out_dim=3, center_momentum=0.9)
    batch1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss.update_center(batch1)
    assert torch.equal(loss.center, torch.zeros(1, 3)), "update must wait for the next centering"
    out = loss.softmax_center_teacher(torch.zeros(1, 3), teacher_temp=1.0)
    c1 = 0.1 * torch.tensor([[2.0, 2.0, 2.0]])
    torch.testing.assert_close(loss.center, c1)
    torch.testing.assert_close(out, torch.full((1, 3), 1 / 3))  # uniform center -> uniform target
    batch2 = torch.tensor([[0.0, 4.0, -1.0]])
    loss.update_center(batch2)
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * batch2)
    loss.apply_center_update()  # no pending update: no change
    torch.testing.assert_close(loss.center, 0.9 * c1 + 0.1 * batch2)


def test_state_dict_flushes_pending_center_update():
    loss = DINOLoss(out_dim=2)
    loss.update_center(torch.tensor([[10.0, -10.0]]))
    sd = loss.state_dict()
    torch.testing.assert_close(sd["center"], torch.tensor([[1.0, -1.0]]))
    fresh = DINOLoss(out_dim=2)
    fresh.load_state_dict(sd)
    t = torch.tensor([[0.3, 0.1]])
    torch.testing.assert_close(fresh.softmax_center_teacher(t, 0.5), loss.softmax_center_teacher(t, 0.5))


def _sinkhorn_by_hand(scores, temp, n_iter):
    """SwAV's algorithm written with numpy, step by step."""
    q = np.exp(scores.astype(np.float64) / temp).T  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


@pytest.mark.parametrize("n_iter", [1, 3])
def test_sinkhorn_knopp_matches_hand_algorithm(n_iter):
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    out = DINOLoss(out_dim=4).sinkhorn_knopp_teacher(scores, teacher_temp=0.5, n_iterations=n_iter)
    np.testing.assert_allclose(out.numpy(), _sinkhorn_by_hand(scores.numpy(), 0.5, n_iter), rtol=1e-5)
    np.testing.assert_allclose(out.sum(dim=1).numpy(), np.ones(6), rtol=1e-5)


def test_sinkhorn_knopp_converges_to_equipartition():
    scores = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    out = DINOLoss(out_dim=4).sinkhorn_knopp_teacher(scores, teacher_temp=0.1, n_iterations=300)
    # every sample is a distribution, every prototype gets B / K of the mass
    torch.testing.assert_close(out.sum(dim=1), torch.ones(8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.sum(dim=0), torch.full((4,), 2.0), rtol=1e-3, atol=1e-3)


def test_sinkhorn_knopp_stable_on_extreme_logits():
    # logits / 0.04 span about +-250: exp() overflows float32, and a sample whose scores all sit far
    # below another's underflows to 0 / 0 in a plain float32 implementation. float64 still copes.
    scores = torch.randn(8, 4, generator=torch.Generator().manual_seed(4)) * 3
    out = DINOLoss(out_dim=4).sinkhorn_knopp_teacher(scores, teacher_temp=0.04, n_iterations=3)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), _sinkhorn_by_hand(scores.numpy(), 0.04, 3), rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    loss = DINOLoss(out_dim=4)
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(out_dim=0)
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(out_dim=4, student_temp=0.0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        loss.softmax_center_teacher(torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss.softmax_center_teacher(torch.zeros(2, 4), 0.0)
    with pytest.raises(ValueError, match="does not match"):
        loss([torch.zeros(2, 4)], [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match="at least one"):
        loss([], [torch.zeros(3, 4)])


def test_loss_module_with_pending_update_is_picklable(tmp_path):
    loss = DINOLoss(out_dim=2)
    loss.update_center(torch.tensor([[2.0, 0.0]]))
    torch.save(loss, tmp_path / "loss.pt")
    restored = torch.load(tmp_path / "loss.pt", weights_only=False)
    restored.apply_center_update()
    torch.testing.assert_close(restored.center, torch.tensor([[0.2, 0.0]]))
