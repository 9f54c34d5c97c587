"""Config merging and start-up validation (dinov2/utils/config.py, dinov2/configs/__init__.py)."""

import argparse
import math

import pytest
from omegaconf import OmegaConf

from dinov2.configs import (
    default_config_path,
    load_and_merge_config,
    packaged_config_names,
    resolve_config_path,
)
from dinov2.utils.config import (
    ConfigError,
    apply_scaling_rules_to_cfg,
    build_config,
    closest_key,
    setup_config,
)


@pytest.fixture()
def dirs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return data, tmp_path / "out"


def _write(tmp_path, text, name="user.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(*args, **kwargs)
    return str(info.value)


def test_precedence_defaults_file_overrides_output_dir(tmp_path, dirs):
    data, out = dirs
    user = _write(
        tmp_path, f"train:\n  dataset_path: {data}\n  output_dir: /nowhere\n  batch_size_per_gpu: 8\n"
    )
    cfg = build_config(user, ["train.batch_size_per_gpu=4", "optim.epochs=30"], output_dir=out)
    assert cfg.train.batch_size_per_gpu == 4  # override beats file
    assert cfg.optim.epochs == 30
    assert cfg.train.output_dir == str(out)  # --output-dir beats everything
    defaults = OmegaConf.load(default_config_path())
    assert cfg.dino.head_n_prototypes == defaults.dino.head_n_prototypes  # untouched default
    assert cfg.train.dataset_path == str(data)


def test_minimal_config_is_dataset_and_output(tmp_path, dirs):
    data, out = dirs
    user = _write(tmp_path, f"train:\n  dataset_path: {data}\n  output_dir: {out}\n")
    cfg = build_config(user)
    assert cfg.train.output_dir == str(out)


def test_dataset_path_may_be_a_list(tmp_path, dirs):
    data, out = dirs
    other = tmp_path / "other"
    other.mkdir()
    cfg = build_config(
        None, [f"train.dataset_path=[{data},{other}]", "train.dataset_ignore_fraction=[0.1,0.0]"], out
    )
    assert list(cfg.train.dataset_path) == [str(data), str(other)]
    msg = _error(None, [f"train.dataset_path=[{data},{other}]", "train.dataset_ignore_fraction=[0.1]"], out)
    assert "train.dataset_ignore_fraction" in msg and "2 folders" in msg


def test_unknown_keys_suggest_closest_full_key(tmp_path, dirs):
    data, out = dirs
    user = _write(
        tmp_path, f"train:\n  dataset_path: {data}\n  batch_size: 4\nstudent:\n  num_registers: 4\n"
    )
    msg = _error(user, ["optim.lrr=0.1", "batch_size_per_gpu=3"], out)
    assert "train.batch_size: unknown config key" in msg
    assert "did you mean 'train.batch_size_per_gpu'" in msg
    assert "student.num_registers" in msg and "'student.num_register_tokens'" in msg
    assert "optim.lrr" in msg and "'optim.lr'" in msg
    # A key given at the wrong level is matched by its last component.
    assert (
        "batch_size_per_gpu: unknown config key (from command line); did you mean 'train.batch_size_per_gpu'"
        in msg
    )
    assert str(user) in msg  # the source is named


def test_closest_key_prefers_same_leaf():
    keys = ["train.seed", "train.batch_size_per_gpu", "crops.local_crops_size", "crops.global_crops_size"]
    assert closest_key("seed", keys) == "train.seed"
    assert closest_key("crops.local_crop_size", keys) == "crops.local_crops_size"
    assert closest_key("zzzzqqq", keys) is None


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu", "must be >= 1"),
        ("train.batch_size_per_gpu=abc", "train.batch_size_per_gpu", "expected an integer"),
        ("train.batch_size_per_gpu=2.5", "train.batch_size_per_gpu", "expected an integer"),
        ("crops.local_crops_number=-1", "crops.local_crops_number", "must be >= 0"),
        ("crops.global_crops_size=100", "crops.global_crops_size", "multiple of student.patch_size (16)"),
        ("train.centering=mean", "train.centering", "['centering', 'sinkhorn_knopp']"),
        ("train.distributed=horovod", "train.distributed", "['ddp', 'fsdp']"),
        ("train.compile=maybe", "train.compile", "expected a boolean"),
        ("crops.global_crops_scale=[0.5,0.2]", "crops.global_crops_scale", "0 < low <= high <= 1"),
        ("teacher.teacher_temp=0", "teacher.teacher_temp", "must be > 0"),
        ("optim.warmup_epochs=200", "optim.warmup_epochs", "must be <= optim.epochs"),
        ("student.arch=vit_huge", "student.arch", "vit_large"),
        ("student.pretrained_weights=/no/such.pth", "student.pretrained_weights", "file not found"),
        ("evaluation.knn_period_iterations=5", "evaluation.knn_dataset_path", "required"),
        (
            "compute_precision.student.backbone.mixed_precision.param_dtype=fp8",
            "compute_precision.student.backbone.mixed_precision.param_dtype",
            "fp32",
        ),  # fmt: skip
        ("dino=3", "dino", "expected a section"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(dirs, override, key, fragment):
    data, out = dirs
    msg = _error(None, [f"train.dataset_path={data}", override], out)
    line = next((ln for ln in msg.splitlines() if ln.strip().startswith(key + ":")), None)
    assert line is not None, msg
    assert fragment in line


def test_crop_size_message_gives_nearest_valid_sizes(dirs):
    data, out = dirs
    msg = _error(
        None, [f"train.dataset_path={data}", "student.patch_size=14", "crops.local_crops_size=96"], out
    )
    assert (
        "crops.local_crops_size: must be a multiple of student.patch_size (14), got 96 (nearest: 84 or 98)"
        in msg
    )


def test_missing_required_and_missing_folder(tmp_path):
    msg = _error(None, [], None)
    assert "train.dataset_path: required but not set" in msg
    assert "train.output_dir: required but not set" in msg
    msg = _error(None, [f"train.dataset_path={tmp_path / 'absent'}"], tmp_path)
    assert "train.dataset_path: folder not found" in msg and "absent" in msg


def test_all_problems_reported_at_once(dirs):
    data, out = dirs
    msg = _error(
        None, [f"train.dataset_path={data}", "train.batch_size_per_gpu=0", "crops.local_crops_number=-2"], out
    )
    assert "train.batch_size_per_gpu" in msg and "crops.local_crops_number" in msg


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        build_config(None, ["train.seed"])


def test_scaling_rules(dirs):
    data, out = dirs
    cfg = build_config(
        None, [f"train.dataset_path={data}", "train.batch_size_per_gpu=32", "optim.base_lr=0.004"], out
    )
    apply_scaling_rules_to_cfg(cfg, world_size=2)
    assert math.isclose(cfg.optim.lr, 0.004 * math.sqrt(64 / 1024))
    cfg.optim.scaling_rule = "linear_wrt_1024"
    apply_scaling_rules_to_cfg(cfg, world_size=4)
    assert math.isclose(cfg.optim.lr, 0.004 * 128 / 1024)


def test_setup_config_writes_merged_config(dirs, monkeypatch):
    data, out = dirs
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    args = argparse.Namespace(
        config_file=None, output_dir=str(out), opts=[f"train.dataset_path={data}", "train.seed=7"]
    )
    cfg = setup_config(args)
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.train.seed == 7 and saved.train.output_dir == str(out)
    assert math.isclose(saved.optim.lr, cfg.optim.base_lr * math.sqrt(cfg.train.batch_size_per_gpu / 1024))
    # The saved file is itself a valid config that reproduces the run.
    again = build_config(out / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(saved)


@pytest.mark.parametrize("name", ["train/vit_tiny_cpu", "train/vitl_cellsim_register"])
def test_packaged_configs_are_valid(dirs, name):
    data, out = dirs
    assert name in packaged_config_names()
    cfg = build_config(name, [f"train.dataset_path={data}"], out)
    patch = cfg.student.patch_size
    assert cfg.crops.global_crops_size % patch == 0 and cfg.crops.local_crops_size % patch == 0


def test_vitl_register_config_matches_meta_reg_backbones(dirs):
    data, out = dirs
    cfg = build_config("train/vitl_cellsim_register", [f"train.dataset_path={data}"], out)
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.num_register_tokens) == ("vit_large", 14, 4)
    assert cfg.student.interpolate_antialias is True and cfg.student.interpolate_offset == 0.0
    assert (cfg.crops.global_crops_size, cfg.crops.local_crops_size) == (224, 98)


def test_resolve_config_path_accepts_paths_and_names(tmp_path):
    by_name = resolve_config_path("train/vit_tiny_cpu")
    assert by_name.resolve() == resolve_config_path("dinov2/configs/train/vit_tiny_cpu.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="no_such_config"):
        resolve_config_path("no_such_config")
    merged = load_and_merge_config("train/vitl_cellsim_register")
    assert merged.student.arch == "vit_large"


def test_top_level_configs_are_valid(repo_root, dirs):
    data, out = dirs
    files = sorted((repo_root / "configs").glob("*.yaml"))
    assert files, "configs/ holds the user-facing experiment configs"
    for path in files:
        extra = []
        if OmegaConf.load(path).get("student", {}).get("pretrained_weights"):
            weights = out.parent / "weights.pth"
            weights.write_bytes(b"")
            extra = [f"student.pretrained_weights={weights}"]
        build_config(path, [f"train.dataset_path={data}", *extra], out)


def test_pbc_config_is_the_tiny_config(repo_root, dirs):
    data, out = dirs
    tiny = OmegaConf.to_container(build_config("train/vit_tiny_cpu", [f"train.dataset_path={data}"], out))
    pbc = OmegaConf.to_container(build_config(repo_root / "configs" / "pbc_vit_tiny_cpu.yaml",
                                              [f"train.dataset_path={data}"], out))  # fmt: skip
    assert pbc["optim"].pop("epochs") == 5
    tiny["optim"].pop("epochs")
    assert pbc == tiny


def test_base_chain_merges_relative_and_packaged_bases(tmp_path, dirs):
    data, out = dirs
    _write(tmp_path, "_base_: train/vit_tiny_cpu\noptim:\n  epochs: 9\n  base_lr: 0.002\n", "mid.yaml")
    sub = tmp_path / "sub"
    sub.mkdir()
    leaf = _write(
        sub, "_base_: ../mid.yaml\noptim:\n  base_lr: 0.001\nstudent:\n  patch_size: 8\n", "leaf.yaml"
    )
    cfg = build_config(leaf, [f"train.dataset_path={data}"], out)
    tiny = build_config("train/vit_tiny_cpu", [f"train.dataset_path={data}"], out)
    assert cfg.optim.epochs == 9  # from the middle file
    assert cfg.optim.base_lr == 0.001  # the leaf wins over its base
    assert cfg.student.patch_size == 8
    assert cfg.student.embed_dim == tiny.student.embed_dim == 128  # from the packaged root
    assert "_base_" not in cfg


def test_base_errors_name_the_file(tmp_path, dirs):
    data, out = dirs
    missing = _write(tmp_path, "_base_: nowhere.yaml\n", "missing.yaml")
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml: _base_ 'nowhere\.yaml' not found"):
        build_config(missing, [f"train.dataset_path={data}"], out)
    _write(tmp_path, "_base_: b.yaml\n", "a.yaml")
    _write(tmp_path, "_base_: a.yaml\n", "b.yaml")
    assert "cycle" in _error(tmp_path / "a.yaml", [f"train.dataset_path={data}"], out)
    typo = _write(tmp_path, "_base_: train/vit_tiny_cpu\noptim:\n  epoch: 3\n", "typo.yaml")
    assert "optim.epochs" in _error(typo, [f"train.dataset_path={data}"], out)  # unknown keys still caught


def test_pbc_configs_are_small_overrides(repo_root):
    """The PBC configs name their base instead of copying it (a few lines each)."""
    for name in ("pbc_vit_tiny_cpu.yaml", "pbc_cpu_recipe.yaml"):
        text = (repo_root / "configs" / name).read_text()
        assert "_base_:" in text
        keys = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(keys) <= 30, f"{name} has {len(keys)} key lines"


def test_colour_augmentation_keys_are_validated(dirs):
    data, out = dirs
    bad = [
        "crops.color_augmentation.hue=0.7",
        "crops.blur_prob=[1.0,0.5]",
        "crops.color_augmentation.grayscale_prob=2",
    ]
    msg = _error(None, [f"train.dataset_path={data}", *bad], out)
    assert "crops.color_augmentation.hue: must be in [0, 0.5]" in msg
    assert "crops.blur_prob: must be 3 probabilities" in msg
    assert "crops.color_augmentation.grayscale_prob: must be in [0, 1]" in msg
    typo = _error(None, [f"train.dataset_path={data}", "crops.color_augmentation.hues=0"], out)
    assert "crops.color_augmentation.hue" in typo


def test_fail_fast_keys_defaults_and_validation(dirs):
    data, out = dirs
    cfg = build_config(None, [f"train.dataset_path={data}"], out)
    assert cfg.train.collective_timeout_minutes == 10.0 and cfg.train.collapse_stop_after_warnings == 0
    tiny = build_config("train/vit_tiny_cpu", [f"train.dataset_path={data}"], out)
    assert tiny.train.collapse_stop_after_warnings == 3  # the CPU configs stop on a collapse
    bad = ["train.collective_timeout_minutes=0", "train.collapse_stop_after_warnings=-1"]
    msg = _error(None, [f"train.dataset_path={data}", *bad], out)
    assert "train.collective_timeout_minutes: must be > 0, got 0" in msg
    assert "train.collapse_stop_after_warnings: must be >= 0, got -1" in msg
    assert "expected an integer" in _error(
        None, [f"train.dataset_path={data}", "train.collapse_stop_after_warnings=2.5"], out
    )


def test_fsdp_rejects_a_teacher_part_sharded_differently_from_its_student_part(dirs):
    data, out = dirs
    base = [f"train.dataset_path={data}", "train.distributed=fsdp"]
    no_shard = "compute_precision.student.dino_head.sharding_strategy=NO_SHARD"
    msg = _error(None, [*base, no_shard], out)
    key = "compute_precision.teacher.dino_head.sharding_strategy"
    assert any(
        ln.strip().startswith(key + ":") and "NO_SHARD exactly when" in ln for ln in msg.splitlines()
    ), msg
    # Both unsharded is accepted (their gradients then go through the ddp gradient sync).
    build_config(None, [*base, no_shard, key + "=NO_SHARD"], out)
    # In ddp mode the sharding keys play no part.
    build_config(None, [f"train.dataset_path={data}", no_shard], out)
