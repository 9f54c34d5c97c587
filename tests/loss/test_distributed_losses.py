"""Two gloo processes must give the same teacher targets and centers as one process on the full batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov2.loss import DINOLoss, iBOTPatchLoss


def _full_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


def _worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cls_scores, patch_scores = _full_batch()
        # CLS: 4 rows per rank. Patches: uneven split (3 masked tokens on rank 0, 5 on rank 1).
        cls_local = cls_scores[rank * 4 : (rank + 1) * 4]
        patch_local = patch_scores[:3] if rank == 0 else patch_scores[3:]

        dino = DINOLoss(6)
        got = dino.sinkhorn_knopp_teacher(cls_local, teacher_temp=0.1)
        ref = _reference_sinkhorn(cls_scores, 0.1)[rank * 4 : (rank + 1) * 4]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)

        dino.update_center(cls_local)
        dino.apply_center_update()
        torch.testing.assert_close(dino.center, 0.1 * cls_scores.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
        # a discarded update (a step whose loss was not finite) finishes its all_reduce on every
        # rank and leaves the centre as it was; the next collective update still lines up
        dino.update_center(torch.full_like(cls_local, float("nan")))
        dino.center_update.discard()
        dino.apply_center_update()
        torch.testing.assert_close(dino.center, 0.1 * cls_scores.mean(0, keepdim=True), rtol=1e-5, atol=1e-6)

        ibot = iBOTPatchLoss(6)
        n_local = torch.tensor([len(patch_local)])
        got = ibot.sinkhorn_knopp_teacher(patch_local, 0.1, n_local)
        assert n_local.item() == len(patch_local), "caller's count must not be all-reduced in place"
        full = _reference_sinkhorn(patch_scores, 0.1)
        torch.testing.assert_close(got, full[:3] if rank == 0 else full[3:], rtol=1e-5, atol=1e-6)

        # iBOT center: mean over this rank's masked tokens, averaged over ranks (DINOv2's semantics)
        ibot.update_center(patch_local.unsqueeze(0))
        ibot.apply_center_update()
        expected = 0.1 * (patch_scores[:3].mean(0) + patch_scores[3:].mean(0)) / 2
        torch.testing.assert_close(ibot.center.reshape(-1), expected, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def _reference_sinkhorn(scores, temp, n_iter=3):
    """Single-process SwAV algorithm on the full batch (float64)."""
    q = torch.exp(scores.double() / temp).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(1, keepdim=True) * k
        q /= q.sum(0, keepdim=True) * b
    return (q * b).t().float()


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store")), nprocs=2, join=True)
