"""benchmarks/common.py: the set-up the benchmark scripts share (timing, run folders, configs, batches)."""

import importlib.util
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.models import build_model_from_cfg


@pytest.fixture(scope="module")
def common(repo_root):
    """benchmarks/common.py loaded from its file (benchmarks/ is a folder of scripts, not a package);
    the sys.path entry it adds for the scripts is taken out again."""
    saved = list(sys.path)
    spec = importlib.util.spec_from_file_location("benchmarks_common", repo_root / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


class FakeClock:
    """A clock that only moves when a fake workload advances it."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def workload(clock: FakeClock, costs: list[float], calls: list[str], name: str):
    """A runner that takes costs[0], costs[1], ... seconds on its successive calls."""
    remaining = iter(costs)

    def run():
        calls.append(name)
        clock.now += next(remaining)

    return run


def test_time_step_reads_the_clock_around_one_call(common):
    clock, calls = FakeClock(), []
    assert common.time_step(workload(clock, [0.25], calls, "a"), clock=clock) == pytest.approx(0.25)
    assert calls == ["a"]


def test_time_interleaved_skips_warmup_and_rotates_the_order(common):
    clock, calls = FakeClock(), []
    runners = {
        "a": workload(clock, [9.0, 1.0, 4.0, 2.0], calls, "a"),  # the first call is the warm-up
        "b": workload(clock, [7.0, 0.5, 0.5, 3.5], calls, "b"),
        "c": workload(clock, [8.0, 0.1, 0.2, 0.3], calls, "c"),
    }
    times = common.time_interleaved(runners, iters=3, warmup=1, clock=clock)
    assert times["a"] == pytest.approx([1.0, 4.0, 2.0])
    assert times["b"] == pytest.approx([0.5, 0.5, 3.5])
    assert times["c"] == pytest.approx([0.1, 0.2, 0.3])
    # By hand: median of a is 2.0 and of b 0.5; a warm-up of 9 s or 7 s would have moved neither.
    assert sorted(times["a"])[1] == pytest.approx(2.0) and sorted(times["b"])[1] == pytest.approx(0.5)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"]


def test_time_interleaved_keeps_the_order_without_rotation(common):
    clock, calls = FakeClock(), []
    runners = {name: workload(clock, [1.0] * 3, calls, name) for name in ("ssl", "baseline")}
    times = common.time_interleaved(runners, iters=3, rotate=False, clock=clock)
    assert calls == ["ssl", "baseline"] * 3
    assert times == {"ssl": [1.0] * 3, "baseline": [1.0] * 3}


def test_print_status_stamps_the_time(common, capsys):
    common.print_status("timing ref, ours ...")
    assert re.fullmatch(r"\[\d\d:\d\d:\d\d\] timing ref, ours \.\.\.\n", capsys.readouterr().out)


def test_jsonl_round_trip_and_a_cut_last_line(common, tmp_path):
    path = tmp_path / "results.jsonl"
    assert common.read_jsonl(path) == []
    common.append_jsonl(path, {"row": "recipe", "knn20": 64.2})
    common.append_jsonl(path, {"row": "patch16", "knn20": 58.0})
    with open(path, "a") as f:
        f.write('{"row": "no_ib')  # a writer killed mid-line
    assert common.read_jsonl(path) == [{"row": "recipe", "knn20": 64.2}, {"row": "patch16", "knn20": 58.0}]
    assert path.read_text().count("\n") == 2


def test_training_records_of_a_run(common, tmp_path):
    assert common.training_records(tmp_path) == []
    (tmp_path / "training_metrics.jsonl").write_text('{"iteration": 1}\n{"iteration": 2}\n{"itera')
    assert [r["iteration"] for r in common.training_records(tmp_path)] == [1, 2]


def test_latest_teacher_export_orders_iterations_as_numbers(common, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        common.latest_teacher_export(tmp_path)
    for name in ("2", "10", "9", "final"):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "teacher_checkpoint.pth").write_bytes(b"")
    assert [i for i, _ in common.teacher_exports(tmp_path)] == [2, 9, 10]
    assert common.latest_teacher_export(tmp_path) == tmp_path / "eval" / "10" / "teacher_checkpoint.pth"


def test_build_bench_config_applies_overrides_and_leaves_no_folder(common):
    cfg = common.build_bench_config("train/vit_tiny_cpu", ["train.batch_size_per_gpu=3"])
    assert cfg.train.batch_size_per_gpu == 3 and cfg.student.embed_dim == 128
    assert not Path(cfg.train.output_dir).exists()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_teacher_is_seeded_and_leaves_the_rng_alone(common):
    cfg = common.build_bench_config("train/vit_tiny_cpu", [])
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = common.random_init_teacher(cfg, seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = common.random_init_teacher(cfg, seed=0)
    c = common.random_init_teacher(cfg, seed=1)
    assert not a.training and a.embed_dim == 128 and len(a.blocks) == 4
    assert _same_weights(a, b) and not _same_weights(a, c)


def test_random_init_teacher_of_a_plain_arch_is_the_teacher_of_a_full_build(common):
    # Without size overrides the teacher comes from build_model_from_cfg; bench_learning_curve built
    # student and teacher and kept the teacher, bench_pretrain_knn built the teacher alone: the same
    # weights, since the teacher is built first.
    cfg = common.build_bench_config(
        "train/vit_tiny_cpu", ["student.embed_dim=null", "student.depth=null", "student.num_heads=null"]
    )
    torch.manual_seed(5)
    _, teacher, _ = build_model_from_cfg(cfg)
    got = common.random_init_teacher(cfg, seed=5)
    assert got.embed_dim == 384  # vit_small
    assert _same_weights(got, teacher)


def test_make_batch_shapes_and_seed(common):
    cfg = common.build_bench_config("train/vit_tiny_cpu", ["train.batch_size_per_gpu=3"])

    def batch(seed=7):
        # `seed` fixes the source images; the augmentation and masks draw from the global generators.
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        return common.make_batch(cfg, image_size=96, seed=seed)

    a, b, other_images = batch(), batch(), batch(seed=8)
    # 2 global crops of 64 px and 4 local crops of 32 px per image, 4 x 4 patch grid for the masks.
    assert a["collated_global_crops"].shape == (2 * 3, 3, 64, 64)
    assert a["collated_local_crops"].shape == (4 * 3, 3, 32, 32)
    assert a["collated_masks"].shape == (2 * 3, 16)
    assert torch.equal(a["collated_global_crops"], b["collated_global_crops"])
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert not torch.equal(a["collated_global_crops"], other_images["collated_global_crops"])
