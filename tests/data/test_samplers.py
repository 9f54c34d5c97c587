"""The infinite sharded sampler: seeded passes, rank slices, resume and world-size independence."""

import itertools

import pytest

from dinov2.data.samplers import ShardedInfiniteSampler, StreamSample


def _take(sampler, n_batches):
    return list(itertools.islice(iter(sampler), n_batches))


def test_each_pass_is_a_permutation_and_passes_differ():
    s = ShardedInfiniteSampler(sample_count=10, batch_size=5, seed=3)
    batches = _take(s, 4)  # 20 samples = 2 passes
    flat = [x.index for b in batches for x in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert [x.position for b in batches for x in b] == list(range(20))


def test_seed_determines_stream():
    a = _take(ShardedInfiniteSampler(50, 8, seed=1), 5)
    b = _take(ShardedInfiniteSampler(50, 8, seed=1), 5)
    c = _take(ShardedInfiniteSampler(50, 8, seed=2), 5)
    assert a == b and a != c


def test_no_shuffle_is_range():
    s = ShardedInfiniteSampler(4, 3, shuffle=False)
    assert [x.index for b in _take(s, 3) for x in b] == [0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_ranks_take_disjoint_slices_of_each_global_batch():
    n, bs, world = 23, 3, 4
    single = ShardedInfiniteSampler(n, bs * world, seed=5)
    ranks = [ShardedInfiniteSampler(n, bs, world_size=world, rank=r, seed=5) for r in range(world)]
    for global_batch, *per_rank in zip(_take(single, 6), *[_take(r, 6) for r in ranks]):
        # Rank r's batch is the r-th slice of the global batch, so the union is the global batch.
        assert [x for b in per_rank for x in b] == global_batch


def test_stream_is_world_size_independent_and_resumes_on_another_world_size():
    n, seed = 17, 9
    reference = ShardedInfiniteSampler(n, 1, seed=seed).stream(0, 60)
    # 2 processes x batch 3 for 4 iterations, then resume with 1 process x batch 6.
    two = [ShardedInfiniteSampler(n, 3, world_size=2, rank=r, seed=seed) for r in range(2)]
    consumed = [x for it in zip(*[_take(s, 4) for s in two]) for b in it for x in b]
    state = two[0].state_dict(iterations_consumed=4)
    assert state["position"] == 24
    one = ShardedInfiniteSampler(n, 6, world_size=1, rank=0, seed=seed)
    one.load_state_dict(state)
    resumed = [x for b in _take(one, 6) for x in b]
    assert consumed + resumed == reference
    assert [x.position for x in consumed + resumed] == list(range(60))


def test_position_after_and_start_position():
    s = ShardedInfiniteSampler(10, 4, world_size=2, rank=1, seed=0, start_position=7)
    first = next(iter(s))
    assert [x.position for x in first] == [11, 12, 13, 14]
    assert s.position_after(3) == 7 + 3 * 8


def test_resume_refuses_changed_seed_or_dataset():
    s = ShardedInfiniteSampler(10, 2, seed=0)
    with pytest.raises(ValueError, match="train.seed or the dataset"):
        s.load_state_dict({"position": 4, "seed": 1, "sample_count": 10, "shuffle": True})
    with pytest.raises(ValueError, match="sample_count"):
        s.load_state_dict({"position": 4, "seed": 0, "sample_count": 11, "shuffle": True})


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"sample_count": 0, "batch_size": 1}, "sample_count"),
        ({"sample_count": 5, "batch_size": 0}, "batch_size"),
        ({"sample_count": 5, "batch_size": 1, "world_size": 2, "rank": 2}, "rank"),
        ({"sample_count": 5, "batch_size": 1, "start_position": -1}, "start_position"),
    ],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ShardedInfiniteSampler(**kwargs)


def test_batch_smaller_dataset_wraps_around_passes():
    s = ShardedInfiniteSampler(3, 7, seed=4)
    batch = next(iter(s))
    assert len(batch) == 7 and all(isinstance(x, StreamSample) for x in batch)
    assert sorted(x.index for x in batch[:3]) == [0, 1, 2]
    assert [x.position for x in batch] == list(range(7))
