"""Training data loader whose every random draw is a function of (seed, stream position).

DataLoader workers each own an RNG whose state depends on which worker got which batch and on
when the workers were started, so a restarted run (or one with another `num_workers`) would draw
different crops. Here each sample's augmentation runs under RNGs seeded from (seed, its position
in the global stream, see dinov2.data.samplers) and each batch's collate (iBOT masks) under RNGs
seeded from (seed, the position of its first sample). The caller's RNG states are restored after
each call, so loading in the main process (num_workers=0) does not perturb training randomness.

Workers ignore SIGTERM, SIGUSR2 and SIGINT (the training loop decides when to stop, see
dinov2.utils.signals), so the loop must stop them itself with `stop_workers` when it ends, on every
path: multiprocessing's exit handler would send them SIGTERM and then wait for them forever.

Usage:
    sampler = ShardedInfiniteSampler(len(ds), batch_size, world_size, rank, seed, start_position=pos)
    loader = make_data_loader(ds, sampler, collate_fn, num_workers=2, seed=seed)
    batches = iter(loader)
    try:
        batch = next(batches) ...
    finally:
        stop_workers(batches)
"""

import contextlib
import hashlib
import logging
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinov2.data.datasets import CellImageDataset
from dinov2.data.samplers import ShardedInfiniteSampler, StreamSample
from dinov2.utils.signals import training_worker_init
from dinov2.utils.utils import seed_host_rngs

logger = logging.getLogger("dinov2")


def derive_seed(seed: int, tag: str, position: int) -> int:
    """A 63-bit seed that depends on (seed, tag, position) only; neighbours are decorrelated."""
    digest = hashlib.blake2b(f"{seed}:{tag}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python `random`, numpy's global RNG and torch's CPU RNG; restore their states on exit."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_host_rngs(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededSampleDataset(Dataset):
    """`ds[StreamSample(index, position)] -> (dataset[index], position)`, augmented under seeded RNGs.

    Args:
        dataset: a map-style dataset whose transform draws from random/numpy/torch global RNGs.
        seed: run seed; the draws for a sample depend on (seed, position) only.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: StreamSample) -> tuple[Any, int]:
        index, position = key
        with seeded_rngs(derive_seed(self.seed, "sample", position)):
            sample = self.dataset[index]
        return sample, position


class SeededCollate:
    """Collate `(sample, position)` pairs with `collate_fn` under RNGs seeded from the first position.

    Args:
        collate_fn: e.g. functools.partial(dinov2.data.collate.collate_data_and_cast, ...).
        seed: run seed.
    """

    def __init__(self, collate_fn: Callable[[list], Any], seed: int):
        self.collate_fn = collate_fn
        self.seed = seed

    def __call__(self, items: Sequence[tuple[Any, int]]) -> Any:
        samples = [sample for sample, _ in items]
        with seeded_rngs(derive_seed(self.seed, "batch", items[0][1])):
            return self.collate_fn(samples)


def make_train_dataset(train_cfg: Any, transform: Callable | None) -> CellImageDataset:
    """The unlabeled training set of `cfg.train` (dataset_path, dataset_ignore_fraction, ...)."""
    paths = train_cfg.dataset_path
    paths = [str(p) for p in paths] if not isinstance(paths, str) else paths
    fractions = train_cfg.dataset_ignore_fraction
    fractions = [float(f) for f in fractions] if not isinstance(fractions, int | float) else float(fractions)
    return CellImageDataset(
        paths,
        transform=transform,
        ignore_fraction=fractions,
        seed=int(train_cfg.seed),
        check_corrupted=bool(train_cfg.check_corrupted),
        max_failed_fraction=float(train_cfg.max_failed_fraction),
    )


def make_data_loader(
    dataset: Dataset,
    sampler: ShardedInfiniteSampler,
    collate_fn: Callable[[list], Any],
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader over `sampler`'s batches with per-sample seeded augmentation.

    The loader gets its own torch.Generator: creating its iterator must not consume the global
    torch RNG, or a resumed run would diverge from an uninterrupted one.
    """
    return DataLoader(
        SeededSampleDataset(dataset, seed),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=SeededCollate(collate_fn, seed),
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=training_worker_init,
    )


def next_batch(batches: Any) -> Any:
    """`next(batches)`, naming the DataLoader worker when one dies while handing a batch over.

    A worker killed just as the main process receives its batch (the tensors travel as shared-memory
    handles fetched from the worker over a socket) makes the receive fail with a ConnectionError or
    EOFError from multiprocessing, before torch's own check can say which worker died. Then this
    raises torch's RuntimeError wording instead, naming the dead workers and how they ended.
    """
    try:
        return next(batches)
    except (ConnectionError, EOFError) as error:
        dead = [w for w in getattr(batches, "_workers", ()) if w.exitcode is not None]
        if not dead:
            raise
        raise RuntimeError("; ".join(_describe_dead_worker(w) for w in dead)) from error


def _describe_dead_worker(worker: Any) -> str:
    if worker.exitcode < 0:
        how = signal.strsignal(-worker.exitcode)  # "Killed" for SIGKILL, as torch words it
        return f"DataLoader worker (pid {worker.pid}) is killed by signal: {how}"
    return f"DataLoader worker (pid(s) {worker.pid}) exited unexpectedly with exit code {worker.exitcode}"


def stop_workers(batches: Any) -> None:
    """Stop the worker processes behind the DataLoader iterator `batches` now, on any path.

    torch's own shutdown (what the iterator does when garbage-collected, but not once the
    interpreter is exiting) sends every worker its stop message and waits for it: an idle worker
    quits at once, a busy one after its current batch. A worker still alive after that (stuck, up
    to 10 s) is killed. Safe to call twice, and with the iterator of a loader without workers.
    """
    workers = list(getattr(batches, "_workers", ()))
    shutdown = getattr(batches, "_shutdown_workers", None)
    try:
        if shutdown is not None:
            shutdown()
    except RuntimeError as e:
        # torch's SIGCHLD handler repeats a worker's death while the others exit: it was reported
        # when it happened, and the clean-up must go on.
        logger.warning("while stopping DataLoader workers: %s", e)
    finally:
        for worker in workers:
            if worker.is_alive():
                logger.warning("DataLoader worker (pid %s) did not stop: killing it", worker.pid)
                worker.kill()
                worker.join(timeout=5)
