"""configs/pbc_cpu_recipe.yaml: it loads over its base, feeds its settings to the data pipeline and
trains for real (a few iterations on synthetic cells; the long run is benchmarks/README.md's)."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.models.weights import load_backbone
from dinov2.train.train import build_data, main
from dinov2.utils.config import build_config
from dinov2.utils.distributed import DistributedInfo


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    return generate_synthetic_cells(root / "train", per_class=2, size=128, seed=1, progress=False)


def test_recipe_builds_on_the_tiny_config(repo_root, cells, tmp_path):
    recipe = build_config(
        repo_root / "configs" / "pbc_cpu_recipe.yaml", [f"train.dataset_path={cells}"], tmp_path
    )
    tiny = build_config("train/vit_tiny_cpu", [f"train.dataset_path={cells}"], tmp_path)
    raw = OmegaConf.load(repo_root / "configs" / "pbc_cpu_recipe.yaml")
    assert raw["_base_"].endswith("vit_tiny_cpu.yaml")
    # Everything the recipe does not set comes from the tiny config.
    assert recipe.dino.head_hidden_dim == tiny.dino.head_hidden_dim
    assert recipe.crops.global_crops_size == tiny.crops.global_crops_size == 64
    assert recipe.student.patch_size == 8 and tiny.student.patch_size == 16
    # ... and the data pipeline receives the recipe's colour settings.
    info = DistributedInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    dataset, _, _ = build_data(recipe, info, 0)
    aug = dataset.transform
    for crop in aug.recipes:
        assert (crop.hue, crop.saturation, crop.grayscale_p) == (
            recipe.crops.color_augmentation.hue,
            recipe.crops.color_augmentation.saturation,
            recipe.crops.color_augmentation.grayscale_prob,
        )
    assert [r.blur_p for r in aug.recipes[:3]] == list(recipe.crops.blur_prob)


def test_recipe_trains_a_few_iterations(repo_root, cells, tmp_path):
    out = tmp_path / "run"
    torch.manual_seed(0)
    result = main([
        "--config-file", str(repo_root / "configs" / "pbc_cpu_recipe.yaml"), "--output-dir", str(out),
        f"train.dataset_path={cells}", "train.batch_size_per_gpu=8", "train.num_workers=0",
        "train.max_iterations=3", "train.log_period_iterations=1",
    ])  # fmt: skip
    assert result.status == "completed" and result.iteration == 3
    records = [json.loads(line) for line in (out / "training_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["total_loss"]) for r in records)
    assert records[-1]["lr"] > records[0]["lr"]  # inside the warm-up: the lr rises
    teacher = load_backbone(out / "eval" / "3" / "teacher_checkpoint.pth")
    assert teacher.patch_size == 8 and teacher.num_register_tokens == 4
    with torch.no_grad():
        assert teacher(torch.randn(2, 3, 64, 64)).shape == (2, 128)
