"""Compute precision per device: bf16 -> fp16 + grad scaler before Ampere, fp16 on CPU rejected."""

import logging

import pytest
import torch

from dinov2.train.precision import apply_device_precision, crop_transfer_dtype, resolve_compute_dtype
from dinov2.train.train import main, model_uses_fp16
from dinov2.utils.config import ConfigError, build_config


@pytest.mark.parametrize(
    "requested, device_type, capability, expected",
    [
        ("bf16", "cuda", (7, 0), "fp16"),  # V100: no bf16 tensor cores
        ("bf16", "cuda", (7, 5), "fp16"),  # T4
        ("bf16", "cuda", (8, 0), "bf16"),  # A100
        ("bf16", "cuda", (9, 0), "bf16"),  # H100
        ("fp16", "cuda", (7, 0), "fp16"),
        ("fp32", "cuda", (6, 1), "fp32"),
        ("bf16", "cpu", None, "bf16"),  # CPU autocast is off: runs in fp32, as before
        ("fp32", "cpu", None, "fp32"),
    ],
)
def test_resolve_compute_dtype(requested, device_type, capability, expected):
    assert resolve_compute_dtype(requested, device_type, capability) == expected


def test_fp16_without_a_gpu_is_rejected():
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU, this process runs on cpu"):
        resolve_compute_dtype("fp16", "cpu", None)


def test_pre_ampere_gpu_switches_every_part_to_fp16_with_the_grad_scaler(caplog):
    cfg = build_config(None, ["compute_precision.grad_scaler=false"], "/tmp/x", check_paths=False)  # bf16
    assert not model_uses_fp16(cfg)
    with caplog.at_level(logging.INFO, logger="dinov2"):
        assert apply_device_precision(cfg, torch.device("cuda", 0), capability=(7, 0)) is True
    for who in ("student", "teacher"):
        # The bf16 backbones become fp16; the heads compute in fp32 by default and stay so.
        for part, expected in (("backbone", "fp16"), ("dino_head", "fp32"), ("ibot_head", "fp32")):
            mp = cfg.compute_precision[who][part].mixed_precision
            assert (mp.param_dtype, mp.reduce_dtype) == (expected, "fp32")
    assert cfg.compute_precision.grad_scaler is True and model_uses_fp16(cfg)
    lines = [r.getMessage() for r in caplog.records if "bf16 tensor cores" in r.getMessage()]
    assert lines == [
        "GPU cuda:0 (compute capability 7.0) has no bf16 tensor cores: computing in fp16 with the grad "
        "scaler (param_dtype bf16 -> fp16 for 2 parts, compute_precision.grad_scaler=true)"
    ]


def test_ampere_gpu_and_cpu_keep_the_configured_precision():
    for device, capability in ((torch.device("cuda", 0), (8, 6)), (torch.device("cpu"), None)):
        cfg = build_config(None, [], "/tmp/x", check_paths=False)  # the bf16 defaults
        assert apply_device_precision(cfg, device, capability) is False
        assert cfg.compute_precision.student.backbone.mixed_precision.param_dtype == "bf16"


def test_training_with_fp16_on_cpu_is_rejected_at_startup_naming_the_key(tmp_path):
    key = "compute_precision.student.dino_head.mixed_precision.param_dtype"
    argv = ["--config-file", "train/vit_tiny_cpu", "--output-dir", str(tmp_path),
            f"train.dataset_path={tmp_path}", f"{key}=fp16"]  # fmt: skip
    with pytest.raises(ConfigError) as info:
        main(argv)
    assert str(info.value) == (
        "compute_precision.student.dino_head.mixed_precision.param_dtype=fp16: fp16 needs a CUDA GPU, "
        "this process runs on cpu; use bf16 or fp32"
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "device_type, student, teacher, expected",
    [
        ("cuda", "bf16", "bf16", torch.bfloat16),  # half the host-to-device bytes of fp32
        ("cuda", "fp16", "fp16", torch.float16),  # pre-Ampere after the bf16 -> fp16 switch
        ("cuda", "bf16", "fp32", torch.float32),  # an fp32 teacher must see the crops unrounded
        ("cuda", "fp32", "fp32", torch.float32),
        ("cpu", "bf16", "bf16", torch.float32),  # no autocast on the CPU: the model computes in fp32
    ],
)
def test_crops_are_collated_in_the_backbones_compute_dtype(device_type, student, teacher, expected):
    cfg = build_config(None, [
        f"compute_precision.student.backbone.mixed_precision.param_dtype={student}",
        f"compute_precision.teacher.backbone.mixed_precision.param_dtype={teacher}",
    ], check_paths=False)  # fmt: skip
    assert crop_transfer_dtype(cfg.compute_precision, device_type) == expected


@pytest.mark.parametrize("separate_head", [False, True])
def test_bf16_collated_crops_give_the_bit_identical_bf16_step(separate_head):
    """The autocast step casts the crops to bf16 in its first op: collating them in bf16 changes nothing."""
    from test_ssl_meta_arch import _arch, _batch

    grads, losses = [], []
    for crop_dtype in (torch.float32, torch.bfloat16):
        arch = _arch(separate_head=separate_head)
        assert arch.autocast_dtype == torch.bfloat16
        arch.autocast_devices = ("cuda", "cpu")  # run the GPU's autocast path on the CPU
        batch = _batch(3)
        for key in ("collated_global_crops", "collated_local_crops"):
            batch[key] = batch[key].to(crop_dtype)
        losses.append(arch.forward_backward(batch, teacher_temp=0.05))
        grads.append([p.grad.clone() for p in arch.student.parameters() if p.grad is not None])
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    # ...and the rounding is real: the crops themselves differ between the two dtypes.
    crops = _batch(3)["collated_global_crops"]
    assert not torch.equal(crops, crops.to(torch.bfloat16).float())
