"""EMA teacher update: m * teacher + (1 - m) * student for every parameter, with foreach kernels."""

import pytest
import torch
from torch import nn

from dinov2.train.ema import paired_parameters, update_ema


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
    return teacher, student


@pytest.mark.parametrize("m", [0.0, 0.992, 1.0])
def test_every_parameter_equals_formula(m):
    teacher, student = _pair()
    before_t = [p.detach().clone() for p in teacher.parameters()]
    before_s = [p.detach().clone() for p in student.parameters()]
    update_ema(*paired_parameters(teacher, student), momentum=m)
    for t_new, t_old, s_new, s_old in zip(teacher.parameters(), before_t, student.parameters(), before_s):
        torch.testing.assert_close(t_new, m * t_old + (1 - m) * s_old, rtol=1e-6, atol=1e-7)
        assert torch.equal(s_new, s_old)


def test_uses_one_foreach_call_for_all_parameters(monkeypatch):
    calls = []
    real_lerp = torch._foreach_lerp_
    monkeypatch.setattr(
        torch, "_foreach_lerp_", lambda ts, ss, w: (calls.append(("lerp", len(ts), w)), real_lerp(ts, ss, w))
    )
    teacher, student = _pair()
    update_ema(*paired_parameters(teacher, student), momentum=0.9)
    n = len(list(student.parameters()))
    assert calls == [("lerp", n, pytest.approx(0.1))]


def test_momentum_one_keeps_the_teacher_and_zero_copies_the_student_exactly():
    teacher, student = _pair()
    before = [p.detach().clone() for p in teacher.parameters()]
    update_ema(*paired_parameters(teacher, student), momentum=1.0)
    assert all(torch.equal(t, b) for t, b in zip(teacher.parameters(), before))
    update_ema(*paired_parameters(teacher, student), momentum=0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))


def test_teacher_without_grad_is_not_tracked_by_autograd():
    teacher, student = _pair()
    for p in teacher.parameters():
        p.requires_grad_(False)
    update_ema(list(teacher.parameters()), list(student.parameters()), 0.5)
    assert all(p.grad_fn is None for p in teacher.parameters())


def test_mismatches_raise():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="momentum"):
        update_ema(list(teacher.parameters()), list(student.parameters()), 1.5)
    with pytest.raises(ValueError, match="teacher tensors"):
        update_ema(list(teacher.parameters())[:-1], list(student.parameters()), 0.5)
    with pytest.raises(ValueError, match="shape"):
        update_ema([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="teacher only"):
        paired_parameters(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
