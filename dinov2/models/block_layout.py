"""The two state-dict layouts of a ViT's blocks and the conversion between them.

DINOv2 groups blocks into chunks (one FSDP unit each) when ``block_chunks > 0``; a chunked model's
keys are ``blocks.{chunk}.{i}.*`` (each block keeps its global index ``i``), a flat model's are
``blocks.{i}.*``. Checkpoints of either layout load into a model of either layout through
`convert_block_layout`.

Example::

    flat = convert_block_layout(chunked_state_dict, 0)             # blocks.1.5.* -> blocks.5.*
    chunked = convert_block_layout(flat, block_chunk_size(12, 4))  # blocks.5.* -> blocks.1.5.*
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch


def block_chunk_size(depth: int, block_chunks: int) -> int:
    """Blocks per chunk, DINOv2's rule depth // block_chunks (0 chunks means no chunking)."""
    if block_chunks <= 0:
        return 0
    if block_chunks > depth:
        raise ValueError(f"block_chunks ({block_chunks}) cannot exceed depth ({depth})")
    return depth // block_chunks


_CHUNKED_KEY = re.compile(r"^(?P<pre>(?:.*\.)?blocks)\.(?P<chunk>\d+)\.(?P<idx>\d+)\.(?P<rest>.+)$")
_FLAT_KEY = re.compile(r"^(?P<pre>(?:.*\.)?blocks)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def convert_block_layout(state_dict: Mapping[str, torch.Tensor], chunk_size: int) -> dict[str, torch.Tensor]:
    """Rewrite block keys to the chunked layout `blocks.{i // chunk_size}.{i}.` (chunk_size > 0) or
    the flat layout `blocks.{i}.` (chunk_size == 0), whichever layout the keys are in now.

    Keys without a block index are kept as they are. Works under any prefix (`backbone.blocks...`).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _CHUNKED_KEY.match(key)
        if m is not None:
            idx = int(m["idx"])
        else:
            m = _FLAT_KEY.match(key)
            if m is None:
                out[key] = value
                continue
            idx = int(m["idx"])
        if chunk_size > 0:
            key = f"{m['pre']}.{idx // chunk_size}.{idx}.{m['rest']}"
        else:
            key = f"{m['pre']}.{idx}.{m['rest']}"
        out[key] = value
    return out
