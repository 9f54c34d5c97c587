"""collate_data_and_cast against a hand-worked batch."""

import random

import numpy as np
import pytest
import torch

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator


class RecordingMasks:
    """Masks the first k patches in raster order and remembers every requested k."""

    def __init__(self, side: int, seed: int = 0):
        self.num_patches = side * side
        self.side = side
        self.rng = random.Random(seed)
        self.requests = []

    def __call__(self, k: int = 0):
        self.requests.append(k)
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[:k] = True
        return mask.reshape(self.side, self.side)


def _samples(b=3, n_local=2):
    """Crop c of image i is filled with 10 * i + c (globals) or 100 + 10 * i + c (locals)."""
    out = []
    for i in range(b):
        d = {
            "global_crops": [torch.full((3, 8, 8), 10.0 * i + c) for c in range(2)],
            "local_crops": [torch.full((3, 4, 4), 100.0 + 10 * i + c) for c in range(n_local)],
        }
        out.append((d, -1))
    return out


def test_crop_major_stacking_and_dtype():
    out = collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float16, 16, RecordingMasks(4))
    g, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert g.dtype == torch.float16 and g.shape == (6, 3, 8, 8) and loc.shape == (6, 3, 4, 4)
    # crop 0 of images 0,1,2 then crop 1 of images 0,1,2
    assert g[:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert loc[:, 0, 0, 0].tolist() == [100, 110, 120, 101, 111, 121]


def test_mask_counts_weights_indices_and_upperbound_by_hand():
    gen = RecordingMasks(4, seed=5)
    out = collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, 16, gen)
    # 6 global crops, int(6 * 0.5) = 3 masked. Ratio sub-ranges: [0.1, 7/30], [7/30, 11/30], [11/30, 0.5]
    # -> counts in [1, 3], [3, 5], [5, 8]; upperbound = int(16*7/30) + int(16*11/30) + int(16*0.5) = 3+5+8
    assert out["upperbound"] == 16
    masked_requests = gen.requests[:3]
    assert gen.requests[3:] == [0, 0, 0]
    for k, (a, b) in zip(masked_requests, [(1, 3), (3, 5), (5, 8)]):
        assert a <= k <= b
    masks = out["collated_masks"]
    assert masks.shape == (6, 16) and masks.dtype == torch.bool
    counts = masks.sum(1).tolist()
    assert sorted(counts) == sorted(masked_requests + [0, 0, 0])
    m = sum(masked_requests)
    assert out["n_masked_patches"].tolist() == [m] and out["n_masked_patches"].dtype == torch.long
    # flat indices in row-major order of the [6, 16] mask, each masked crop's first k patches
    expected_idx = [16 * crop + p for crop in range(6) for p in range(counts[crop])]
    assert out["mask_indices_list"].tolist() == expected_idx
    expected_w = [1.0 / counts[crop] for crop in range(6) for _ in range(counts[crop])]
    np.testing.assert_allclose(out["masks_weight"].numpy(), expected_w, rtol=1e-6)
    assert m <= out["upperbound"]


def test_masks_are_shuffled_across_crops():
    positions = set()
    for seed in range(20):
        out = collate_data_and_cast(_samples(), (0.4, 0.5), 0.5, torch.float32, 16, RecordingMasks(4, seed))
        positions.add(tuple(out["collated_masks"].any(1).tolist()))
    assert len(positions) > 3


def test_with_real_generator_and_without_masking_or_local_crops():
    random.seed(0)
    gen = MaskingGenerator(4, max_num_patches=8)
    out = collate_data_and_cast(_samples(b=4, n_local=0), (0.0, 0.5), 0.0, torch.float32, None, gen)
    assert out["collated_local_crops"].numel() == 0
    assert not out["collated_masks"].any() and out["upperbound"] == 0
    assert out["mask_indices_list"].numel() == 0 and out["n_masked_patches"].item() == 0
    full = collate_data_and_cast(_samples(b=4), (0.5, 0.5), 1.0, torch.float32, 16, gen)
    # every crop masked at ratio 0.5 -> 8 patches each with the exact-count generator
    assert full["collated_masks"].sum(1).tolist() == [8] * 8
    assert full["upperbound"] == 64 and full["n_masked_patches"].item() == 64


def test_bad_inputs_raise():
    gen = RecordingMasks(4)
    with pytest.raises(ValueError, match="mask_ratio_tuple"):
        collate_data_and_cast(_samples(), (0.6, 0.5), 0.5, torch.float32, 16, gen)
    with pytest.raises(ValueError, match="mask_probability"):
        collate_data_and_cast(_samples(), (0.1, 0.5), 1.5, torch.float32, 16, gen)
    with pytest.raises(ValueError, match="n_tokens=9"):
        collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, 9, gen)
    with pytest.raises(ValueError, match="empty"):
        collate_data_and_cast([], (0.1, 0.5), 0.5, torch.float32, 16, gen)
    with pytest.raises(ValueError, match="mask_generator"):
        collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, 16, None)
    bad = _samples()
    bad[1][0]["local_crops"].pop()
    with pytest.raises(ValueError, match="sample 1 has 1 local_crops"):
        collate_data_and_cast(bad, (0.1, 0.5), 0.5, torch.float32, 16, gen)
