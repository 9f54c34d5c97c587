"""Training configuration: defaults + user YAML + `key=value` overrides, validated once at start-up.

Order of precedence (last wins): dinov2/configs/ssl_default_config.yaml, the `--config-file` YAML,
the trailing `key=value` command-line options, then `--output-dir`. Every key a user sets must exist
in the defaults (unknown keys are rejected with the closest valid dotted key), must have the type of
its default, and must hold a possible value (crop sizes divisible by the patch size, ...). All
problems are reported together in one `ConfigError` whose lines each start with the dotted key.

Usage:
    cfg = setup_config(args)          # args from dinov2.train.train.get_args_parser()
    cfg.optim.lr                      # already scaled by the batch-size rule
"""

import argparse
import difflib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dinov2.configs import load_config, load_default_config

logger = logging.getLogger("dinov2")

MISSING = "???"

# Keys whose value must be one of a fixed set of strings.
CHOICES: dict[str, tuple[str, ...]] = {
    "train.centering": ("centering", "sinkhorn_knopp"),
    "train.distributed": ("ddp", "fsdp"),
    "student.arch": ("vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.ffn_layer": ("mlp", "swiglu", "swiglufused", "identity"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_1024", "none"),
}
SHARDING_STRATEGIES = ("NO_SHARD", "SHARD_GRAD_OP", "FULL_SHARD")
PRECISIONS = ("fp32", "fp16", "bf16")

# Keys that accept more than the type of their default: dotted key -> (description, checker).
_UNION_TYPES: dict[str, tuple[str, Any]] = {
    "train.dataset_path": (
        "a folder path or a list of folder paths",
        lambda v: isinstance(v, str) or (_is_list(v) and len(v) > 0 and all(isinstance(x, str) for x in v)),
    ),
    "train.dataset_ignore_fraction": (
        "a float or a list of floats (one per dataset_path)",
        lambda v: _is_number(v) or (_is_list(v) and all(_is_number(x) for x in v)),
    ),
    "train.max_iterations": ("null or an integer", lambda v: v is None or _is_int(v)),
    "student.layerscale": ("null or a float", lambda v: v is None or _is_number(v)),
    "student.embed_dim": ("null or an integer", lambda v: v is None or _is_int(v)),
    "student.depth": ("null or an integer", lambda v: v is None or _is_int(v)),
    "student.num_heads": ("null or an integer", lambda v: v is None or _is_int(v)),
}


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every problem, one dotted key per line."""


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple | ListConfig)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Plain nested dict -> {dotted key: leaf value}; lists are leaves."""
    out: dict[str, Any] = {}
    if isinstance(node, dict) and node:
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = node
    return out


def _all_dotted_keys(node: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, inner nodes included."""
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_all_dotted_keys(value, dotted))
    return keys


def closest_key(key: str, valid_keys: Sequence[str]) -> str | None:
    """The valid dotted key most like `key`: same last component first, else difflib's best match."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid_keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0)[0]
    matches = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.6)
    if matches:
        return matches[0]
    leaf_matches = difflib.get_close_matches(
        leaf, [k.rsplit(".", 1)[-1] for k in valid_keys], n=1, cutoff=0.6
    )
    if leaf_matches:
        return next(k for k in valid_keys if k.rsplit(".", 1)[-1] == leaf_matches[0])
    return None


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def check_keys_and_types(defaults: dict, user: dict, source: str) -> list[str]:
    """Problems with `user` (a plain nested dict) against `defaults`: unknown keys and wrong types.

    `source` names where the values came from (a file path or "command line") for the messages.
    """
    problems: list[str] = []
    valid_keys = _all_dotted_keys(defaults)

    def walk(default_node: Any, user_node: Any, prefix: str) -> None:
        for key, value in user_node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if not isinstance(default_node, dict) or key not in default_node:
                hint = closest_key(dotted, valid_keys)
                suggestion = f"; did you mean '{hint}'?" if hint else ""
                problems.append(f"{dotted}: unknown config key (from {source}){suggestion}")
                continue
            expected = default_node[key]
            if isinstance(expected, dict):
                if not isinstance(value, dict):
                    problems.append(
                        f"{dotted}: expected a section with keys {sorted(expected)}, "
                        f"got {value!r} (from {source})"
                    )
                else:
                    walk(expected, value, dotted)
                continue
            problem = _type_problem(dotted, expected, value)
            if problem:
                problems.append(f"{problem} (from {source})")

    walk(defaults, user, "")
    return problems


def _type_problem(dotted: str, expected: Any, value: Any) -> str | None:
    """A message when `value` cannot stand where the default is `expected`, else None."""
    if value == MISSING:
        return None  # reported as missing after the merge
    if dotted in _UNION_TYPES:
        description, ok = _UNION_TYPES[dotted]
        return None if ok(value) else f"{dotted}: expected {description}, got {value!r} ({_type_name(value)})"
    if expected is None or expected == MISSING:
        return None
    if isinstance(expected, bool):
        good, want = isinstance(value, bool), "a boolean (true/false)"
    elif isinstance(expected, int):
        good, want = _is_int(value), "an integer"
    elif isinstance(expected, float):
        good, want = _is_number(value), "a number"
    elif isinstance(expected, str):
        good, want = isinstance(value, str), "a string"
    elif _is_list(expected):
        good, want = _is_list(value), f"a list like {list(expected)}"
        if good and expected and all(_is_number(x) for x in expected):
            good, want = all(_is_number(x) for x in value), f"a list of numbers like {list(expected)}"
    else:
        return None
    return None if good else f"{dotted}: expected {want}, got {value!r} ({_type_name(value)})"


def _as_list(v: Any) -> list:
    return list(v) if _is_list(v) else [v]


def check_values(cfg: DictConfig) -> list[str]:
    """Problems with the values of a merged config (types already checked): one message per key."""
    problems: list[str] = []
    c = OmegaConf.to_container(cfg, resolve=True)

    def get(dotted: str) -> Any:
        node = c
        for part in dotted.split("."):
            node = node[part]
        return node

    def need(dotted: str, ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"{dotted}: {what}, got {get(dotted)!r}")

    for dotted, value in _flatten(c).items():
        if value == MISSING:
            problems.append(f"{dotted}: required but not set (give it in the config file or as {dotted}=...)")
    if problems:
        return problems

    for dotted, choices in CHOICES.items():
        need(dotted, get(dotted) in choices, f"must be one of {list(choices)}")
    for who in ("student", "teacher"):
        for part in ("backbone", "dino_head", "ibot_head"):
            base = f"compute_precision.{who}.{part}"
            need(f"{base}.sharding_strategy", get(f"{base}.sharding_strategy") in SHARDING_STRATEGIES,
                 f"must be one of {list(SHARDING_STRATEGIES)}")  # fmt: skip
            for name in ("param_dtype", "reduce_dtype", "buffer_dtype"):
                key = f"{base}.mixed_precision.{name}"
                need(key, get(key) in PRECISIONS, f"must be one of {list(PRECISIONS)}")
    if get("train.distributed") == "fsdp":
        # The EMA pairs each teacher part with its student part: both sharded, or both not.
        for part in ("backbone", "dino_head", "ibot_head"):
            student, teacher = (
                get(f"compute_precision.{w}.{part}.sharding_strategy") for w in ("student", "teacher")
            )
            need(f"compute_precision.teacher.{part}.sharding_strategy",
                 (student == "NO_SHARD") == (teacher == "NO_SHARD"),
                 f"must be NO_SHARD exactly when compute_precision.student.{part}.sharding_strategy is "
                 f"(it is {student!r}): the teacher's EMA pairs its tensors with the student's")  # fmt: skip

    # Integers with lower bounds.
    for dotted, low in {
        "train.batch_size_per_gpu": 1,
        "train.num_workers": 0,
        "train.OFFICIAL_EPOCH_LENGTH": 1,
        "train.checkpoint_period_iterations": 1,
        "train.checkpoint_keep": 1,
        "train.log_period_iterations": 1,
        "train.collapse_check_period_iterations": 0,
        "train.collapse_stop_after_warnings": 0,
        "train.seed": 0,
        "student.patch_size": 1,
        "student.num_register_tokens": 0,
        "student.block_chunks": 0,
        "student.head_warmup_iterations": 0,
        "crops.local_crops_number": 0,
        "crops.global_crops_size": 1,
        "crops.local_crops_size": 1,
        "optim.epochs": 1,
        "dino.head_n_prototypes": 1,
        "dino.head_bottleneck_dim": 1,
        "dino.head_nlayers": 1,
        "dino.head_hidden_dim": 1,
        "ibot.head_n_prototypes": 1,
        "ibot.head_bottleneck_dim": 1,
        "ibot.head_nlayers": 1,
        "ibot.head_hidden_dim": 1,
        "evaluation.eval_period_iterations": 0,
        "evaluation.knn_period_iterations": 0,
        "evaluation.knn_max_images": 2,
    }.items():
        need(dotted, get(dotted) >= low, f"must be >= {low}")
    max_it = get("train.max_iterations")
    need("train.max_iterations", max_it is None or max_it >= 1, "must be null or >= 1")

    # Non-negative numbers.
    for dotted in (
        "optim.warmup_epochs", "optim.freeze_last_layer_epochs", "optim.base_lr", "optim.lr",
        "optim.min_lr", "optim.weight_decay", "optim.weight_decay_end", "optim.clip_grad",
        "optim.patch_embed_lr_mult", "teacher.warmup_teacher_temp_epochs", "dino.loss_weight",
        "dino.koleo_loss_weight", "ibot.loss_weight", "crops.stain_jitter",
        "crops.color_augmentation.brightness", "crops.color_augmentation.contrast",
        "crops.color_augmentation.saturation",
    ):  # fmt: skip
        need(dotted, get(dotted) >= 0, "must be >= 0")
    for dotted in ("teacher.warmup_teacher_temp", "teacher.teacher_temp", "train.collective_timeout_minutes"):
        need(dotted, get(dotted) > 0, "must be > 0")
    for dotted in ("teacher.momentum_teacher", "teacher.final_momentum_teacher",
                   "ibot.mask_sample_probability", "train.max_failed_fraction",
                   "crops.color_augmentation.prob", "crops.color_augmentation.grayscale_prob",
                   "crops.color_augmentation.solarize_prob"):  # fmt: skip
        need(dotted, 0 <= get(dotted) <= 1, "must be in [0, 1]")
    for dotted in ("optim.adamw_beta1", "optim.adamw_beta2", "student.drop_path_rate"):
        need(dotted, 0 <= get(dotted) < 1, "must be in [0, 1)")
    need(
        "crops.color_augmentation.hue", 0 <= get("crops.color_augmentation.hue") <= 0.5, "must be in [0, 0.5]"
    )
    blur = get("crops.blur_prob")
    need("crops.blur_prob", len(blur) == 3 and all(0 <= p <= 1 for p in blur),
         "must be 3 probabilities [global crop 1, global crop 2, local crops]")  # fmt: skip
    need("optim.layerwise_decay", 0 < get("optim.layerwise_decay") <= 1, "must be in (0, 1]")
    need("optim.warmup_epochs", get("optim.warmup_epochs") <= get("optim.epochs"),
         f"must be <= optim.epochs ({get('optim.epochs')})")  # fmt: skip
    for dotted in ("student.embed_dim", "student.depth", "student.num_heads"):
        need(dotted, get(dotted) is None or get(dotted) >= 1, "must be null or >= 1")
    width, heads = get("student.embed_dim"), get("student.num_heads")
    if width is not None and heads is not None and heads >= 1 and width % heads:
        problems.append(f"student.embed_dim: must be divisible by student.num_heads ({heads}), got {width}")
    layerscale = get("student.layerscale")
    need("student.layerscale", layerscale is None or layerscale >= 0, "must be null or >= 0")

    # Crops: sizes divisible by the patch size, scales ordered in (0, 1].
    patch = get("student.patch_size")
    for dotted in ("crops.global_crops_size", "crops.local_crops_size"):
        size = get(dotted)
        if patch >= 1 and size % patch:
            low, high = (size // patch) * patch, (size // patch + 1) * patch
            problems.append(
                f"{dotted}: must be a multiple of student.patch_size ({patch}), got {size} "
                f"(nearest: {low if low else high} or {high})"
            )
    for dotted in ("crops.global_crops_scale", "crops.local_crops_scale", "ibot.mask_ratio_min_max"):
        v = get(dotted)
        low_ok = 0 <= v[0] if dotted == "ibot.mask_ratio_min_max" else 0 < v[0]
        need(
            dotted,
            len(v) == 2 and low_ok and v[0] <= v[1] <= 1,
            "must be [low, high] with 0 < low <= high <= 1",
        )

    # Data.
    paths = _as_list(get("train.dataset_path"))
    for p in paths:
        if not Path(str(p)).expanduser().is_dir():
            problems.append(f"train.dataset_path: folder not found: {p!r}")
    fractions = _as_list(get("train.dataset_ignore_fraction"))
    if _is_list(get("train.dataset_ignore_fraction")) and len(fractions) != len(paths):
        problems.append(
            f"train.dataset_ignore_fraction: has {len(fractions)} values but train.dataset_path has "
            f"{len(paths)} folders (give one value per folder, or a single float)"
        )
    need("train.dataset_ignore_fraction", all(0 <= f < 1 for f in fractions), "must be in [0, 1)")

    weights = get("student.pretrained_weights")
    if weights and not Path(weights).expanduser().is_file():
        problems.append(f"student.pretrained_weights: file not found: {weights!r}")
    knn_path, knn_period = get("evaluation.knn_dataset_path"), get("evaluation.knn_period_iterations")
    if knn_period > 0 and not knn_path:
        problems.append("evaluation.knn_dataset_path: required when evaluation.knn_period_iterations > 0")
    if knn_path and not Path(knn_path).expanduser().is_dir():
        problems.append(f"evaluation.knn_dataset_path: folder not found: {knn_path!r}")
    return problems


def _parse_opts(opts: Iterable[str]) -> DictConfig:
    """`key=value` strings -> a DictConfig (values parsed as YAML), rejecting malformed items."""
    opts = list(opts or [])
    bad = [o for o in opts if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"command-line overrides must look like key=value (e.g. train.seed=1), got {bad}")
    try:
        return OmegaConf.from_dotlist(opts)
    except Exception as e:  # omegaconf's grammar errors name the item but not as a ValueError
        raise ConfigError(f"could not parse command-line overrides {opts}: {e}") from e


def build_config(
    config_file: str | Path | None = None,
    opts: Sequence[str] = (),
    output_dir: str | Path | None = None,
    check_paths: bool = True,
) -> DictConfig:
    """Merge defaults, `config_file`, `opts` and `output_dir`; validate; return the merged config.

    Args:
        config_file: a YAML path or a packaged config name (e.g. "train/vit_tiny_cpu"); None = defaults.
        opts: `key=value` overrides (dotted keys of the defaults).
        output_dir: overrides train.output_dir when given.
        check_paths: when False, do not require train.dataset_path / output_dir to exist or be set
            (used by tools such as the benchmark that feed synthetic batches).
    Raises:
        ConfigError listing every unknown key (with the closest valid one), wrong type and impossible value.
    """
    defaults = load_default_config()
    plain_defaults = OmegaConf.to_container(defaults, resolve=False)
    layers = []
    problems: list[str] = []
    if config_file is not None:
        try:
            user = load_config(str(config_file))
        except ValueError as e:  # a bad or cyclic _base_ chain
            raise ConfigError(str(e)) from None
        problems += check_keys_and_types(plain_defaults, OmegaConf.to_container(user), str(config_file))
        layers.append(user)
    cli = _parse_opts(opts)
    problems += check_keys_and_types(plain_defaults, OmegaConf.to_container(cli), "command line")
    layers.append(cli)
    if output_dir is not None:
        layers.append(OmegaConf.create({"train": {"output_dir": str(output_dir)}}))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    cfg = OmegaConf.merge(defaults, *layers)
    if not check_paths:
        for key in ("dataset_path", "output_dir"):
            if OmegaConf.is_missing(cfg.train, key):
                cfg.train[key] = ""
    value_problems = check_values(cfg)
    if not check_paths:
        value_problems = [
            p for p in value_problems if not p.startswith("train.dataset_path: folder not found")
        ]
    if value_problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(value_problems))
    return cfg


def apply_scaling_rules_to_cfg(cfg: DictConfig, world_size: int) -> DictConfig:
    """Set optim.lr from optim.base_lr (given for a total batch of 1024) and the total batch size."""
    total_batch = cfg.train.batch_size_per_gpu * world_size
    rule = cfg.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        cfg.optim.lr = cfg.optim.base_lr * math.sqrt(total_batch / 1024.0)
    elif rule == "linear_wrt_1024":
        cfg.optim.lr = cfg.optim.base_lr * total_batch / 1024.0
    else:
        cfg.optim.lr = cfg.optim.base_lr
    return cfg


def write_config(cfg: DictConfig, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Save the merged config as YAML (atomically) and return its path."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.tmp.{os.getpid()}")
    tmp.write_text(OmegaConf.to_yaml(cfg))
    os.replace(tmp, path)
    return path


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_cfg_from_args(args: argparse.Namespace, check_paths: bool = True) -> DictConfig:
    """The validated config for parsed CLI args (`config_file`, `opts`, optional `output_dir`)."""
    return build_config(
        getattr(args, "config_file", None) or None,
        getattr(args, "opts", None) or [],
        getattr(args, "output_dir", None) or None,
        check_paths=check_paths,
    )


def setup_config(args: argparse.Namespace) -> DictConfig:
    """Build and validate the config, apply the lr scaling rule, save it to <output_dir>/config.yaml.

    The world size for the scaling rule is read from torch.distributed when initialised, else from
    the WORLD_SIZE environment variable. Only the main process writes config.yaml.
    """
    cfg = get_cfg_from_args(args)
    world_size = _world_size()
    apply_scaling_rules_to_cfg(cfg, world_size)
    rank = int(os.environ.get("RANK", "0"))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    if rank == 0:
        path = write_config(cfg, cfg.train.output_dir)
        logger.info("merged config saved to %s", path)
    return cfg
