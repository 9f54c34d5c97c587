"""Block-wise masks for iBOT's masked-image modelling (BEiT-style blocks, DINOv2's MaskingGenerator).

A mask is built from random rectangles of patches: each block has a random area (at least
``min_num_patches``, at most the number still missing and ``max_num_patches``) and a log-uniform aspect
ratio in [min_aspect, max_aspect]. Blocks may overlap; only newly covered patches count. DINOv2 stops
when ten draws in a row add nothing, which can leave a mask a few patches short of the request; with
``fill_remainder=True`` (default) the missing patches are then added next to the existing blocks so the
mask holds exactly the requested count (the collate function's ``upperbound`` relies on never
exceeding it, which holds either way).

Example::

    gen = MaskingGenerator(input_size=(16, 16), max_num_patches=128)
    mask = gen(40)  # numpy bool [16, 16] with mask.sum() == 40
"""

import math
import random

import numpy as np


class MaskingGenerator:
    """Random block-wise boolean masks over a grid of patches.

    Args:
        input_size: patch grid (height, width), or one int for a square grid.
        num_masking_patches: default for ``max_num_patches`` (DINOv2 compatibility); not a default for
            the call, which masks nothing unless given a count.
        min_num_patches: smallest area of a block draw.
        max_num_patches: largest area of one block; defaults to ``num_masking_patches``, else the grid.
        min_aspect: smallest height/width ratio of a block.
        max_aspect: largest ratio; defaults to 1 / min_aspect.
        fill_remainder: top a short mask up to the exact count (see module doc); False reproduces
            DINOv2's behaviour exactly.
        rng: a ``random.Random``; defaults to the global ``random`` module (seeded per data worker).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        *,
        fill_remainder: bool = True,
        rng: random.Random | None = None,
    ):
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be a positive int or (height, width), got {input_size!r}")
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
        self.max_num_patches = max_num_patches
        if not min_aspect > 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1 / min_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect ({max_aspect}) must be >= min_aspect ({min_aspect})")
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.fill_remainder = fill_remainder
        self.rng = rng if rng is not None else random

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, blocks of {self.min_num_patches}-"
            f"{self.max_num_patches} patches, log aspect {self.log_aspect_ratio}, "
            f"fill_remainder={self.fill_remainder})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """Add one random block covering 1..max_mask_patches new patches (in place); return how many.

        Up to ten draws; a draw is rejected when the block does not fit strictly inside the grid, adds
        nothing new, or adds more than ``max_mask_patches``. Returns 0 when all ten are rejected.
        """
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    return new
        return 0

    def _fill(self, mask: np.ndarray, missing: int) -> None:
        """Mask ``missing`` more patches, each drawn among the unmasked neighbours of the mask (any
        unmasked patch when the mask is empty or has no free neighbour), so blocks grow contiguously."""
        for _ in range(missing):
            grown = np.zeros_like(mask)
            grown[1:, :] |= mask[:-1, :]
            grown[:-1, :] |= mask[1:, :]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grown & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[candidates[self.rng.randrange(candidates.size)]] = True

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """A [height, width] numpy bool mask with ``num_masking_patches`` True patches (at most that
        many when ``fill_remainder`` is False)."""
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches must be in [0, {self.num_patches}] for a {self.height}x{self.width} "
                f"grid, got {num_masking_patches}"
            )
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget)
            if delta == 0:
                break
            count += delta
        if self.fill_remainder and count < num_masking_patches:
            self._fill(mask, num_masking_patches - count)
        return mask
