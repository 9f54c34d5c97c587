"""Exponential moving average of the student into the teacher (the "momentum teacher" of DINO).

teacher <- m * teacher + (1 - m) * student, for every parameter, in one fused ``_foreach_lerp_``
kernel (teacher + (1 - m) * (student - teacher): one launch for the whole model instead of one per
parameter, and one pass over the teacher instead of a multiply and an add). Works on plain tensors and on
FSDP2-sharded DTensors (the teacher and student shards then line up).

Example::

    update_ema(list(teacher.parameters()), list(student.parameters()), momentum=0.996)
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def update_ema(teacher_params: Sequence[Tensor], student_params: Sequence[Tensor], momentum: float) -> None:
    """In place: teacher = momentum * teacher + (1 - momentum) * student.

    Args:
        teacher_params: teacher tensors, updated in place.
        student_params: matching student tensors (same order, shapes and dtypes).
        momentum: in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher_params, student_params = list(teacher_params), list(student_params)
    if len(teacher_params) != len(student_params):
        raise ValueError(f"{len(teacher_params)} teacher tensors but {len(student_params)} student tensors")
    for i, (t, s) in enumerate(zip(teacher_params, student_params)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
    if not teacher_params:
        return
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


def paired_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """Teacher and student parameters matched by name; raises ValueError naming any name mismatch."""
    t_named = dict(teacher.named_parameters())
    s_named = dict(student.named_parameters())
    if t_named.keys() != s_named.keys():
        only_t = sorted(t_named.keys() - s_named.keys())[:5]
        only_s = sorted(s_named.keys() - t_named.keys())[:5]
        raise ValueError(
            f"teacher and student parameters differ: teacher only {only_t}, student only {only_s}"
        )
    names = list(s_named)
    return [t_named[n] for n in names], [s_named[n] for n in names]
