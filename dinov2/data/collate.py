"""Batch multi-crop samples and draw the iBOT masks of the global crops (DINOv2's collate function).

Crops are stacked crop-major: global crop 0 of every image, then global crop 1 of every image (and
the same for local crops), so ``tensor.chunk(n_crops)`` recovers one crop index per chunk.

Of the 2 * B global crops, ``int(2 * B * mask_probability)`` get a mask; their mask ratios are spread
evenly over ``mask_ratio_tuple`` (the i-th masked crop draws its ratio uniformly in the i-th of that
many equal sub-ranges) and the masks are shuffled across crops. ``upperbound`` is a bound on the total
number of masked patches that depends only on the batch layout, so heads can run on fixed-size buffers.

Example::

    gen = MaskingGenerator(16, max_num_patches=128)
    collate = partial(collate_data_and_cast, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
                      dtype=torch.half, n_tokens=256, mask_generator=gen)
    loader = DataLoader(dataset, batch_size=64, collate_fn=collate)
"""

import random
from collections.abc import Mapping, Sequence

import torch

from dinov2.data.masking import MaskingGenerator


def _sample_dict(sample) -> Mapping:
    """A dataset item is (crops_dict, target) as in DINOv2; a bare crops dict is accepted too."""
    if isinstance(sample, Mapping):
        return sample
    if isinstance(sample, Sequence) and len(sample) > 0 and isinstance(sample[0], Mapping):
        return sample[0]
    raise ValueError(
        f"each sample must be a dict of crops or a (dict, target) pair, got {type(sample).__name__}"
    )


def _stack_crop_major(dicts: Sequence[Mapping], key: str) -> torch.Tensor:
    n_crops = len(dicts[0][key])
    for i, d in enumerate(dicts):
        if len(d[key]) != n_crops:
            raise ValueError(f"sample {i} has {len(d[key])} {key}, sample 0 has {n_crops}")
    if n_crops == 0:
        return torch.empty(0)
    return torch.stack([d[key][c] for c in range(n_crops) for d in dicts])


def collate_data_and_cast(
    samples_list: Sequence,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
) -> dict:
    """Collate multi-crop samples and draw iBOT masks.

    Args:
        samples_list: B items, each ``(dict, target)`` (or a dict) with ``global_crops`` (list of
            [C, H, W]) and ``local_crops`` (list of [C, h, w], possibly empty).
        mask_ratio_tuple: (min, max) share of patches masked in a masked crop, 0 <= min <= max <= 1.
        mask_probability: share of the global crops that get a mask.
        dtype: dtype of the returned image tensors.
        n_tokens: patches per global crop N (default: the generator's grid size).
        mask_generator: callable ``n -> bool [h, w]`` with h * w == N; required when masking.

    Returns:
        dict with ``collated_global_crops`` [n_global * B, C, H, W], ``collated_local_crops``
        [n_local * B, C, h, w] (an empty tensor without local crops), ``collated_masks`` bool
        [n_global * B, N], ``mask_indices_list`` long [M] (flat indices of the masked patches in
        ``collated_masks``), ``masks_weight`` [M] (1 / masked patches of the token's crop),
        ``upperbound`` int >= M, ``n_masked_patches`` long [1] holding M.
    """
    if len(samples_list) == 0:
        raise ValueError("samples_list is empty: cannot collate a batch of 0 images")
    lo, hi = float(mask_ratio_tuple[0]), float(mask_ratio_tuple[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask_ratio_tuple must satisfy 0 <= min <= max <= 1, got {tuple(mask_ratio_tuple)}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if mask_generator is None:
        raise ValueError("mask_generator is required (it also yields the all-False masks of unmasked crops)")
    if n_tokens is None:
        n_tokens = getattr(mask_generator, "num_patches", None)
        if n_tokens is None:
            raise ValueError("n_tokens is required when the mask generator has no num_patches attribute")
    grid_patches = getattr(mask_generator, "num_patches", n_tokens)
    if grid_patches != n_tokens:
        raise ValueError(f"n_tokens={n_tokens} but the mask generator's grid has {grid_patches} patches")

    dicts = [_sample_dict(s) for s in samples_list]
    collated_global_crops = _stack_crop_major(dicts, "global_crops")
    collated_local_crops = _stack_crop_major(dicts, "local_crops")

    rng = getattr(mask_generator, "rng", random)
    n_crops = len(collated_global_crops)
    n_samples_masked = int(n_crops * mask_probability)
    # float32 like DINOv2, so upperbound matches its value bit for bit
    probs = torch.linspace(lo, hi, n_samples_masked + 1).tolist()
    upperbound = 0
    masks_list = []
    for i in range(n_samples_masked):
        n_masked = int(n_tokens * rng.uniform(probs[i], probs[i + 1]))
        masks_list.append(torch.as_tensor(mask_generator(n_masked), dtype=torch.bool))
        upperbound += int(n_tokens * probs[i + 1])
    for _ in range(n_samples_masked, n_crops):
        masks_list.append(torch.as_tensor(mask_generator(0), dtype=torch.bool))
    rng.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    return {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
