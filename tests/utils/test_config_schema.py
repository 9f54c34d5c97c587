"""Typed config sections (dinov2/configs/schema.py, dinov2/configs/fields.py) as build_config uses them."""

import argparse
import math
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from dinov2.configs import default_config_path
from dinov2.configs.fields import Section, describe, dotted_keys, layer_problems, option, section
from dinov2.configs.schema import Crops, Optim, SSLConfig, Student, Train
from dinov2.utils.config import ConfigError, build_config, setup_config


@pytest.fixture()
def dirs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return data, tmp_path / "out"


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else key
        out.update(_leaves(value, dotted) if isinstance(value, dict) else {dotted: value})
    return out


def _error_lines(*args, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config(*args, **kwargs)
    header, *lines = str(info.value).splitlines()
    assert header == "invalid configuration:"
    return [ln.strip() for ln in lines]


def test_schema_and_default_yaml_name_the_same_keys():
    """Defaults are stated once (the YAML); the schema holds a typed field for each of them."""
    defaults = _leaves(OmegaConf.to_container(OmegaConf.load(default_config_path())))
    schema_keys = set(dotted_keys(SSLConfig))
    leaf_keys = {k for k in schema_keys if not any(other.startswith(k + ".") for other in schema_keys)}
    assert set(defaults) == leaf_keys
    assert {k for k, v in defaults.items() if v == "???"} == {"train.dataset_path", "train.output_dir"}
    assert layer_problems(SSLConfig, OmegaConf.to_container(OmegaConf.load(default_config_path())), "d") == []


def test_the_returned_config_is_a_typed_dictconfig(dirs):
    data, out = dirs
    cfg = build_config(None, [f"train.dataset_path={data}", "optim.base_lr=1"], out)
    assert OmegaConf.get_type(cfg.optim) is Optim and OmegaConf.get_type(cfg.crops) is Crops
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)  # an int given for a float
    cfg.optim.lr = 0.25  # computed values can be stored ...
    assert cfg.optim.lr == 0.25
    with pytest.raises(ValidationError):
        cfg.optim.lr = "fast"  # ... but only with the field's type
    assert cfg.compute_precision["student"]["backbone"].mixed_precision.param_dtype == "bf16"


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["MODEL.WEIGHTS=1"], "MODEL.WEIGHTS", "expected a string"),
        (["compute_precision.grad_scaler=3"], "compute_precision.grad_scaler", "expected a boolean"),
        (["compute_precision.teacher.ibot_head.sharding_strategy=HALF"],
         "compute_precision.teacher.ibot_head.sharding_strategy",
         "must be one of ['NO_SHARD', 'SHARD_GRAD_OP', 'FULL_SHARD']"),
        (["compute_precision.student.dino_head.mixed_precision.buffer_dtype=int8"],
         "compute_precision.student.dino_head.mixed_precision.buffer_dtype",
         "must be one of ['fp32', 'fp16', 'bf16']"),
        (["dino.head_nlayers=0"], "dino.head_nlayers", "must be >= 1, got 0"),
        (["dino.koleo_loss_weight=-0.5"], "dino.koleo_loss_weight", "must be >= 0, got -0.5"),
        (["ibot.mask_sample_probability=1.5"], "ibot.mask_sample_probability", "must be in [0, 1], got 1.5"),
        (["ibot.mask_ratio_min_max=[0.6,0.5]"], "ibot.mask_ratio_min_max", "[low, high]"),
        (["ibot.separate_head=1"], "ibot.separate_head", "expected a boolean"),
        (["train.max_iterations=0"], "train.max_iterations", "must be null or >= 1, got 0"),
        (["train.max_iterations=2.5"], "train.max_iterations", "expected null or an integer"),
        (["train.dataset_ignore_fraction=[1.5]"], "train.dataset_ignore_fraction", "must be in [0, 1)"),
        (["train.dataset_ignore_fraction=x"], "train.dataset_ignore_fraction", "a float or a list of floats"),
        (["train.collapse_thresholds.max_kl_frac=abc"], "train.collapse_thresholds.max_kl_frac",
         "expected a number"),
        (["train.collapse_thresholds.max_kl=0.5"], "train.collapse_thresholds.max_kl",
         "did you mean 'train.collapse_thresholds.max_kl_frac'"),
        (["student.embed_dim=100", "student.num_heads=3"], "student.embed_dim",
         "must be divisible by student.num_heads (3), got 100"),
        (["student.layerscale=-1"], "student.layerscale", "must be null or >= 0"),
        (["student.ffn_layer=conv"], "student.ffn_layer", "'swiglufused'"),
        (["teacher.momentum_teacher=1.5"], "teacher.momentum_teacher", "must be in [0, 1]"),
        (["teacher.warmup_teacher_temp_epochs=1.5"], "teacher.warmup_teacher_temp_epochs",
         "expected an integer"),
        (["optim.layerwise_decay=0"], "optim.layerwise_decay", "must be in (0, 1]"),
        (["optim.adamw_beta2=1"], "optim.adamw_beta2", "must be in [0, 1)"),
        (["optim.scaling_rule=cubic"], "optim.scaling_rule", "'sqrt_wrt_1024'"),
        (["crops.local_crops_scale=[0.5]"], "crops.local_crops_scale", "must be [low, high]"),
        (["crops.global_crops_scale=[0.0,1.0]"], "crops.global_crops_scale", "0 < low"),
        (["crops.color_augmentation.prob=-0.1"], "crops.color_augmentation.prob", "must be in [0, 1]"),
        (["evaluation.knn_max_images=1"], "evaluation.knn_max_images", "must be >= 2, got 1"),
        (["evaluation.knn_dataset_path=/no/such/folder"], "evaluation.knn_dataset_path", "folder not found"),
    ],
)  # fmt: skip
def test_a_bad_value_in_each_section_names_its_dotted_key(dirs, overrides, key, fragment):
    data, out = dirs
    lines = _error_lines(None, [f"train.dataset_path={data}", *overrides], out)
    assert any(ln.startswith(key + ":") and fragment in ln for ln in lines), lines


def test_problems_from_file_command_line_and_values_come_in_one_error(tmp_path, dirs):
    data, out = dirs
    user = tmp_path / "user.yaml"
    user.write_text("dino:\n  head_nlayers: two\nstudent:\n  arhc: vit_small\n")
    lines = _error_lines(user, [f"train.dataset_path={data}", "optim.epochs=x"], out)
    assert lines == [
        f"dino.head_nlayers: expected an integer, got 'two' (str) (from {user})",
        f"student.arhc: unknown config key (from {user}); did you mean 'student.arch'?",
        "optim.epochs: expected an integer, got 'x' (str) (from command line)",
    ]
    # Value problems (after the types pass) are gathered across sections too.
    lines = _error_lines(None, [f"train.dataset_path={data}", "dino.head_nlayers=0", "optim.epochs=0",
                                "crops.local_crops_size=90", "optim.warmup_epochs=2"], out)  # fmt: skip
    keys = [ln.split(":", 1)[0] for ln in lines]
    assert sorted(keys) == sorted(
        ["dino.head_nlayers", "optim.epochs", "optim.warmup_epochs", "crops.local_crops_size"]
    )


def test_check_paths_false_skips_only_the_dataset_folder(tmp_path):
    cfg = build_config(None, [], tmp_path, check_paths=False)
    assert cfg.train.dataset_path == ""
    cfg = build_config(None, [f"train.dataset_path={tmp_path / 'absent'}"], tmp_path, check_paths=False)
    assert cfg.train.dataset_path == str(tmp_path / "absent")
    lines = _error_lines(
        None, [f"student.pretrained_weights={tmp_path / 'w.pth'}"], tmp_path, check_paths=False
    )
    assert lines == [f"student.pretrained_weights: file not found: {str(tmp_path / 'w.pth')!r}"]


def test_setup_config_reads_world_size_and_rank_from_the_environment(dirs, monkeypatch):
    data, out = dirs
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    args = argparse.Namespace(config_file=None, output_dir=str(out),
                              opts=[f"train.dataset_path={data}", "train.batch_size_per_gpu=32"])  # fmt: skip
    cfg = setup_config(args)
    assert math.isclose(cfg.optim.lr, cfg.optim.base_lr * math.sqrt(32 * 4 / 1024))
    assert not (out / "config.yaml").exists()  # only rank 0 writes it
    monkeypatch.setenv("RANK", "0")
    setup_config(args)
    assert OmegaConf.load(out / "config.yaml").optim.lr == cfg.optim.lr


# The field machinery on a small schema of its own, against hand-written expectations.


@dataclass
class _Inner(Section):
    ratio: float = option(gt=0, le=1)


@dataclass
class _Toy(Section):
    count: int = option(ge=2)
    width: int | None = option(ge=1)
    mode: str = option(choices=("a", "b"))
    pair: list[float] = option(rule=(lambda v: len(v) == 2, "must hold 2 numbers"))
    some: float | list[float] = option(lt=1)
    inner: _Inner = section(_Inner)

    def check(self, prefix: str) -> list[str]:
        return [f"{prefix}.count: must exceed the pair's length"] if self.count <= len(self.pair) else []


def test_field_rules_and_section_checks_on_a_toy_schema():
    good = _Toy(count=3, width=None, mode="a", pair=[0.0, 1.0], some=[0.5, 0.9], inner=_Inner(ratio=1.0))
    assert good.problems("toy") == []
    bad = _Toy(count=2, width=0, mode="c", pair=[1.0, 2.0, 3.0], some=[0.5, 1.0], inner=_Inner(ratio=0.0))
    assert bad.problems("toy") == [
        "toy.width: must be null or >= 1, got 0",
        "toy.mode: must be one of ['a', 'b'], got 'c'",
        "toy.pair: must hold 2 numbers, got [1.0, 2.0, 3.0]",
        "toy.some: must be < 1, got [0.5, 1.0]",
        "toy.inner.ratio: must be in (0, 1], got 0.0",
        "toy.count: must exceed the pair's length",
    ]


def test_layer_problems_and_type_descriptions_on_a_toy_schema():
    layer = {"count": True, "width": None, "mode": 3, "pair": [1, "x"], "inner": 5, "extra": 1, "some": 0.5}
    assert layer_problems(_Toy, layer, "f.yaml") == [
        "count: expected an integer, got True (bool) (from f.yaml)",
        "mode: expected a string, got 3 (int) (from f.yaml)",
        "pair: expected a list of numbers, got [1, 'x'] (list) (from f.yaml)",
        "inner: expected a section with keys ['ratio'], got 5 (from f.yaml)",
        "extra: unknown config key (from f.yaml)",
    ]
    assert describe(int | None) == "null or an integer"
    assert describe(float | list[float]) == "a number or a list of numbers"
    assert describe(list[str]) == "a list of strings"
    assert dotted_keys(_Toy)[-2:] == ["inner", "inner.ratio"]


def test_sections_are_importable_by_the_components_that_read_them():
    # Each section is a plain dataclass a component can be given on its own.
    assert {"batch_size_per_gpu", "dataset_path", "collapse_thresholds"} <= set(Train.__dataclass_fields__)
    assert "num_register_tokens" in Student.__dataclass_fields__
