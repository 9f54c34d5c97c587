"""The one precision-name -> torch dtype table."""

import pytest
import torch

from dinov2.utils.dtypes import DTYPES, dtype_from_name


def test_names_map_to_the_torch_dtypes_of_their_width():
    assert dtype_from_name("fp32") is torch.float32
    assert dtype_from_name("fp16") is torch.float16
    assert dtype_from_name("bf16") is torch.bfloat16
    assert {name: DTYPES[name].itemsize * 8 for name in DTYPES} == {"fp32": 32, "fp16": 16, "bf16": 16}


def test_unknown_name_is_named_with_the_choices_and_the_table_is_read_only():
    with pytest.raises(ValueError, match=r"param_dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'fp8'"):
        dtype_from_name("fp8", "param_dtype")
    with pytest.raises(TypeError):
        DTYPES["fp64"] = torch.float64
