"""Compute precision per device: bf16 -> fp16 + grad scaler before Ampere, fp16 on CPU rejected."""

import logging

import pytest
import torch

from dinov2.train.precision import apply_device_precision, resolve_compute_dtype
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
