"""Tests of dinov2/utils/device.py: one device resolver for every tool."""

import contextlib
import warnings

import pytest
import torch

from dinov2.utils import device as device_mod
from dinov2.utils.device import autocast_for, resolve_device


def test_auto_and_none_agree_and_follow_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    # rank 3 on a 2-GPU machine wraps around: 3 % 2 = 1
    assert resolve_device(None) == resolve_device("auto") == torch.device("cuda", 1)


def test_explicit_devices_are_parsed_and_checked(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(device_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")


def test_autocast_only_on_cuda():
    assert isinstance(autocast_for(torch.device("cpu")), contextlib.nullcontext)
    with autocast_for(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with warnings.catch_warnings():  # without CUDA torch warns that it disables the autocast
        warnings.simplefilter("ignore", UserWarning)
        ctx = autocast_for(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
