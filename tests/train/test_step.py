"""train_step: one host-device synchronisation per step, losses read on request, agreed stop, timing."""

import signal

import pytest
import torch
from test_ssl_meta_arch import _arch, _batch

from dinov2.train.preemption import PreemptionFlag
from dinov2.train.schedules import build_schedulers
from dinov2.train.step import NonFiniteLossError, StepContext, build_optimizer, train_step

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.fixture
def setup():
    arch = _arch()
    cfg = _cfg_for(arch)
    optimizer = build_optimizer(arch, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return arch, optimizer, scaler, build_schedulers(cfg, world_size=1), cfg


def _cfg_for(arch):
    from test_ssl_meta_arch import _cfg

    cfg = _cfg()
    cfg.optim.lr = 1e-3
    cfg.train.OFFICIAL_EPOCH_LENGTH = 4
    cfg.optim.epochs = 2
    cfg.optim.warmup_epochs = 1
    return cfg


def _count_reads(monkeypatch) -> dict:
    """Count every way a tensor's value reaches Python (each is a host-device sync on a GPU)."""
    counts = {name: 0 for name in READS}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_a_step_reads_the_device_once_and_the_losses_on_request(setup, monkeypatch):
    arch, optimizer, scaler, schedules, cfg = setup
    batch = _batch(1)
    counts = _count_reads(monkeypatch)
    out = train_step(arch, optimizer, scaler, StepContext(), batch, schedules, 0, cfg)
    assert sum(counts.values()) == 1 and counts["tolist"] == 1, counts
    values = out.loss_values()
    assert sum(counts.values()) == 2
    monkeypatch.undo()
    # The values are the step's losses: the same step again from the same state gives them.
    assert set(values) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss",
                           "total_loss"}  # fmt: skip
    parts = values["dino_local_crops_loss"] + values["dino_global_crops_loss"]
    assert values["total_loss"] == pytest.approx(
        parts + 2 * values["koleo_loss"] + 0.7 * 2 * values["ibot_loss"]
    )
    assert not out.stop and out.times == {}


def test_a_caught_signal_stops_the_step_and_timing_splits_it(setup):
    arch, optimizer, scaler, schedules, cfg = setup
    flag = PreemptionFlag(signals=(signal.SIGUSR2,), install=False)
    ctx = StepContext(preemption=flag, timed=True)
    assert not train_step(arch, optimizer, scaler, ctx, _batch(1), schedules, 0, cfg).stop
    flag._record(signal.SIGUSR2)
    out = train_step(arch, optimizer, scaler, ctx, _batch(2), schedules, 1, cfg)
    assert out.stop
    assert set(out.times) == {"forward_backward_time", "grad_sync_time", "optimizer_time"}
    assert all(t > 0 for t in out.times.values())


def test_merge_flags_answers_from_the_reduced_values_only():
    flag = PreemptionFlag(signals=(signal.SIGUSR2, signal.SIGTERM), install=False)
    flag._record(signal.SIGTERM)  # caught here after the flags were taken: counts next time
    assert flag.merge_flags([0.0, 0.0]) is False
    assert flag.merge_flags([1.0, 0.0]) is True and signal.SIGUSR2 in flag.received
    with pytest.raises(ValueError, match="2 reduced flags"):
        flag.merge_flags([1.0])


def test_non_finite_loss_names_the_term_and_changes_nothing(setup):
    arch, optimizer, scaler, schedules, cfg = setup
    before = {k: v.clone() for k, v in arch.state_dict().items()}
    batch = _batch(1)
    batch["collated_global_crops"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 0: .*total_loss=nan"):
        train_step(arch, optimizer, scaler, StepContext(), batch, schedules, 0, cfg)
    for k, v in arch.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k


def test_a_non_finite_step_applies_the_previous_centre_update_and_discards_its_own(setup):
    arch, optimizer, scaler, schedules, cfg = setup
    good = _batch(1)
    with torch.no_grad():  # the teacher's CLS logits of step 0, before step 0 moves the teacher
        out = arch.teacher["backbone"].forward_features(good["collated_global_crops"])
        logits0 = arch.teacher["dino_head"](out["x_norm_clstoken"])
    train_step(arch, optimizer, scaler, StepContext(), good, schedules, 0, cfg)
    assert all(center.pending for center in arch.centers()), "step 0's update waits for step 1"
    bad = _batch(2)
    bad["collated_global_crops"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError):
        train_step(arch, optimizer, scaler, StepContext(), bad, schedules, 1, cfg)
    assert not any(center.pending for center in arch.centers())
    # step 0's batch is in the centre (applied by step 1's centering), step 1's NaNs are not
    torch.testing.assert_close(
        arch.dino_loss.center, 0.1 * logits0.mean(0, keepdim=True), rtol=1e-5, atol=1e-7
    )
    assert torch.isfinite(arch.ibot_patch_loss.center).all()
