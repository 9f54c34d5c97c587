"""The precision names of the config (``fp32``, ``fp16``, ``bf16``) and the torch dtypes they mean.

``compute_precision.<student|teacher>.<part>.mixed_precision.{param,reduce,buffer}_dtype`` name a
precision; the training step's autocast and FSDP2's mixed-precision policy need the dtype.

Example::

    dtype = dtype_from_name(cfg.mixed_precision.param_dtype, "param_dtype")  # torch.bfloat16
"""

from collections.abc import Mapping
from types import MappingProxyType

import torch

# Read-only: a shared table that a caller could extend would be module-level mutable state.
DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
)


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype named `name`; ValueError naming `what`, the bad value and the choices otherwise."""
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}") from None
