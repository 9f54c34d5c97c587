"""Per-sample seeded loading (dinov2/data/loaders.py): batches depend only on (seed, stream position),
not on the number of workers, restarts or the caller's RNG, and the caller's RNG is left untouched;
workers are stopped on demand, even a stuck one."""

import random
import signal
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from dinov2.data.loaders import (
    SeededCollate,
    SeededSampleDataset,
    derive_seed,
    make_data_loader,
    next_batch,
    seeded_rngs,
    stop_workers,
)
from dinov2.data.samplers import ShardedInfiniteSampler


class RandomTransformDataset(Dataset):
    """Item i = (i, draws from python, numpy and torch global RNGs), like a random augmentation."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i), random.random(), float(np.random.rand()), torch.rand(()).item()])


def collate_with_random_mask(samples):
    # Like collate_data_and_cast, draws masks from python's RNG.
    return {"x": torch.stack(samples), "mask": torch.tensor([random.random() for _ in samples])}


def _batches(num_workers, start_position=0, n=5, world_size=1, rank=0, batch_size=4):
    sampler = ShardedInfiniteSampler(10, batch_size, world_size, rank, seed=7, start_position=start_position)
    loader = make_data_loader(
        RandomTransformDataset(), sampler, collate_with_random_mask, num_workers, seed=7
    )
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(torch.equal(x["x"], y["x"]) and torch.equal(x["mask"], y["mask"]) for x, y in zip(a, b))


def test_batches_do_not_depend_on_workers():
    assert _equal(_batches(0), _batches(2))


def test_restart_at_a_position_continues_the_same_batches():
    full = _batches(0, n=5)
    resumed = _batches(1, start_position=2 * 4, n=3)  # after 2 iterations of 4 samples
    assert _equal(full[2:], resumed)


def test_sample_augmentation_is_world_size_independent():
    one = _batches(0, n=2, batch_size=4)
    two = [_batches(0, n=2, world_size=2, rank=r, batch_size=2) for r in range(2)]
    for it in range(2):
        merged = torch.cat([two[0][it]["x"], two[1][it]["x"]])
        assert torch.equal(merged, one[it]["x"])  # every sample's draws are the same


def test_positions_give_distinct_draws_even_for_the_same_image():
    batches = _batches(0, n=3)  # 12 positions over a 10-image dataset: images repeat
    rows = torch.cat([b["x"] for b in batches])
    assert len({tuple(r[1:].tolist()) for r in rows}) == len(rows)


def test_main_process_loading_leaves_caller_rng_untouched():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    _batches(0, n=3)
    assert torch.equal(torch.rand(2), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


def test_seeded_rngs_and_derive_seed():
    assert derive_seed(0, "sample", 5) == derive_seed(0, "sample", 5)
    assert len({derive_seed(0, "sample", p) for p in range(1000)}) == 1000
    assert derive_seed(0, "sample", 5) != derive_seed(1, "sample", 5) != derive_seed(0, "batch", 5)
    with seeded_rngs(123):
        a = (torch.rand(3), random.random(), np.random.rand())
    with seeded_rngs(123):
        b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_wrappers_pass_values_through():
    ds = SeededSampleDataset(RandomTransformDataset(), seed=0)
    sample, position = ds[(3, 17)]
    assert position == 17 and sample[0].item() == 3.0
    batch = SeededCollate(collate_with_random_mask, seed=0)([(sample, 17), (sample, 18)])
    assert batch["x"].shape == (2, 4)


class StuckAfterDataset(RandomTransformDataset):
    """Loads indices below `limit` at once; a worker asked for any other index hangs (a dead NFS mount)."""

    def __init__(self, limit):
        self.limit = limit

    def __getitem__(self, i):
        if i >= self.limit:
            time.sleep(3600)
        return super().__getitem__(i)


def _workers_after_one_batch(dataset, num_workers):
    sampler = ShardedInfiniteSampler(10, 2, 1, 0, seed=7, shuffle=False)
    batches = iter(make_data_loader(dataset, sampler, collate_with_random_mask, num_workers, seed=7))
    next(batches)
    workers = list(batches._workers)
    assert len(workers) == num_workers and all(w.is_alive() for w in workers)
    return batches, workers


def test_stop_workers_ends_idle_workers_at_once():
    batches, workers = _workers_after_one_batch(RandomTransformDataset(), 2)
    start = time.monotonic()
    stop_workers(batches)
    assert time.monotonic() - start < 5
    assert [w.exitcode for w in workers] == [0, 0]  # they quit on their own
    stop_workers(batches)  # a second call is harmless


def test_stop_workers_kills_a_stuck_worker():
    # The worker ignores SIGTERM (training_worker_init), so torch's own shutdown cannot end it.
    batches, (worker,) = _workers_after_one_batch(StuckAfterDataset(limit=2), 1)
    time.sleep(0.5)  # the worker is now stuck prefetching index 2
    start = time.monotonic()
    stop_workers(batches)
    assert time.monotonic() - start < 20
    assert worker.exitcode == -signal.SIGKILL


class _FailingHandover:
    """A DataLoader iterator stand-in whose batch hand-over fails as a dying worker's does."""

    def __init__(self, workers, error):
        self._workers, self.error = workers, error

    def __next__(self):
        raise self.error


def _ended_process(how: str):
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=time.sleep, args=(60,) if how == "kill" else (0,))
    proc.start()
    if how == "kill":
        proc.kill()
    proc.join(timeout=30)
    return proc


def test_next_batch_names_a_worker_that_died_during_the_handover():
    killed = _ended_process("kill")
    with pytest.raises(
        RuntimeError, match=rf"^DataLoader worker \(pid {killed.pid}\) is killed by signal: Killed$"
    ):
        next_batch(_FailingHandover([killed], ConnectionResetError(104, "Connection reset by peer")))
    exited = _ended_process("exit")
    with pytest.raises(
        RuntimeError, match=rf"\(pid\(s\) {exited.pid}\) exited unexpectedly with exit code 0"
    ):
        next_batch(_FailingHandover([exited], EOFError()))
    # No dead worker: the error is not about a worker, and passes through unchanged.
    with pytest.raises(ConnectionResetError):
        next_batch(_FailingHandover([], ConnectionResetError(104, "Connection reset by peer")))
    assert next_batch(iter([7])) == 7
