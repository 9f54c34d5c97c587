"""An infinite, seeded, rank-sharded batch sampler whose stream survives restarts and resharding.

Semantics (what makes resume exact and world-size independent):
- The *global stream* is an endless sequence of dataset indices: pass 0 is a permutation of
  range(sample_count) drawn from a generator seeded with (seed, 0), pass 1 from (seed, 1), ...
  It does not depend on the number of processes.
- Training consumes the stream in *global batches* of `batch_size * world_size` consecutive
  positions; rank r takes positions [r * batch_size, (r + 1) * batch_size) of each global batch.
- `position` is the number of global-stream samples consumed so far. A checkpoint stores it, and a
  restart (with any world size) continues from that position.

Each yielded element is a `StreamSample(index, position)`: the dataset index plus its position in the
global stream, so per-sample augmentation can be seeded from (seed, position) and stay identical
whatever the number of workers or processes (see dinov2.data.loaders).
"""

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler


class StreamSample(NamedTuple):
    """One element of the global stream: dataset index and its position in the stream."""

    index: int
    position: int


def _pass_permutation(sample_count: int, seed: int, pass_index: int, shuffle: bool) -> torch.Tensor:
    """Indices of stream pass `pass_index`: a seeded permutation (or range when not shuffling)."""
    if not shuffle:
        return torch.arange(sample_count)
    generator = torch.Generator()
    # Mix seed and pass so neighbouring seeds do not produce shifted copies of each other's passes.
    generator.manual_seed((seed * 1_000_003 + pass_index * 7919 + 12345) % (2**63 - 1))
    return torch.randperm(sample_count, generator=generator)


class ShardedInfiniteSampler(Sampler[list[StreamSample]]):
    """Batch sampler over an endless seeded stream; rank `rank` takes its slice of each global batch.

    Args:
        sample_count: dataset length (>= 1).
        batch_size: samples per process per batch (>= 1).
        world_size: number of processes sharing each global batch.
        rank: this process's rank in [0, world_size).
        seed: stream seed; the same seed gives the same stream.
        shuffle: permute each pass (False: 0, 1, ..., n-1 repeated).
        start_position: global-stream samples already consumed (from a checkpoint); must be a
            multiple of nothing in particular, the stream simply restarts there.
    Yields:
        lists of `batch_size` StreamSample for this rank, forever.
    """

    def __init__(
        self,
        sample_count: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        start_position: int = 0,
    ):
        if sample_count < 1:
            raise ValueError(f"sample_count must be >= 1, got {sample_count} (is the dataset empty?)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {start_position}")
        self.sample_count = sample_count
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.start_position = start_position

    @property
    def global_batch_size(self) -> int:
        """Samples consumed from the stream per iteration, over all processes."""
        return self.batch_size * self.world_size

    def stream(self, start: int, count: int) -> list[StreamSample]:
        """`count` consecutive global-stream samples from position `start`."""
        out: list[StreamSample] = []
        position = start
        while len(out) < count:
            pass_index, offset = divmod(position, self.sample_count)
            perm = _pass_permutation(self.sample_count, self.seed, pass_index, self.shuffle)
            take = min(count - len(out), self.sample_count - offset)
            out.extend(StreamSample(int(i), position + k) for k, i in enumerate(perm[offset : offset + take]))
            position += take
        return out

    def __iter__(self) -> Iterator[list[StreamSample]]:
        position = self.start_position + self.rank * self.batch_size
        pass_index, perm = -1, None
        while True:
            batch = []
            for p in range(position, position + self.batch_size):
                p_pass, offset = divmod(p, self.sample_count)
                if p_pass != pass_index:
                    pass_index = p_pass
                    perm = _pass_permutation(self.sample_count, self.seed, pass_index, self.shuffle)
                batch.append(StreamSample(int(perm[offset]), p))
            yield batch
            position += self.global_batch_size

    def position_after(self, iterations: int) -> int:
        """Global-stream position once `iterations` batches have been consumed from the start."""
        return self.start_position + iterations * self.global_batch_size

    def state_dict(self, iterations_consumed: int) -> dict:
        """What a checkpoint stores: the position reached after `iterations_consumed` batches."""
        return {
            "position": self.position_after(iterations_consumed),
            "seed": self.seed,
            "sample_count": self.sample_count,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream at `state["position"]`; refuse a different seed or dataset size."""
        if state["seed"] != self.seed or state["sample_count"] != self.sample_count:
            raise ValueError(
                f"cannot resume the sample stream: checkpoint has seed={state['seed']}, "
                f"sample_count={state['sample_count']} but this run has seed={self.seed}, "
                f"sample_count={self.sample_count} (did train.seed or the dataset change?)"
            )
        self.start_position = int(state["position"])
