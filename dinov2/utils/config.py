"""Training configuration: defaults + user YAML + `key=value` overrides, validated once at start-up.

Order of precedence (last wins): dinov2/configs/ssl_default_config.yaml, the `--config-file` YAML,
the trailing `key=value` command-line options, then `--output-dir`. The merge happens over the typed
sections of dinov2/configs/schema.py (one dataclass per section; each field states its type and its
rules). Every key a user sets must be a field there (unknown keys are rejected with the closest valid
dotted key), must have the field's type, and must hold a possible value (crop sizes divisible by the
patch size, ...). All problems are reported together in one `ConfigError` whose lines each start with
the dotted key. The returned config is a structured `DictConfig`: attribute access as before, and
assignments (cfg.optim.lr = ...) are checked against the field's type.

Usage:
    cfg = setup_config(args)          # args from dinov2.train.train.get_args_parser()
    cfg.optim.lr                      # already scaled by the batch-size rule
"""

import argparse
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.configs import load_config, load_default_config
from dinov2.configs.fields import closest_key, layer_problems
from dinov2.configs.schema import SSLConfig
from dinov2.utils import distributed
from dinov2.utils.files import atomic_write

__all__ = [
    "ConfigError",
    "apply_scaling_rules_to_cfg",
    "build_config",
    "closest_key",
    "get_cfg_from_args",
    "setup_config",
    "write_config",
]

logger = logging.getLogger("dinov2")


class ConfigError(ValueError):
    """A configuration is invalid; the message lists every problem, one dotted key per line."""


def _invalid(problems: Sequence[str]) -> ConfigError:
    return ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of `node` still holding OmegaConf's "???" (required values nobody set)."""
    keys = []
    for key in node:
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            keys.append(dotted)
        elif isinstance(node[key], DictConfig):
            keys.extend(_missing_keys(node[key], dotted))
    return keys


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
    layers = []
    # The defaults file is checked like any layer: a key it lacks in the schema is a bug, named here.
    problems = layer_problems(SSLConfig, OmegaConf.to_container(defaults), "the defaults file")
    if config_file is not None:
        try:
            user = load_config(str(config_file))
        except ValueError as e:  # a bad or cyclic _base_ chain
            raise ConfigError(str(e)) from None
        problems += layer_problems(SSLConfig, OmegaConf.to_container(user), str(config_file))
        layers.append(user)
    cli = _parse_opts(opts)
    problems += layer_problems(SSLConfig, OmegaConf.to_container(cli), "command line")
    layers.append(cli)
    if output_dir is not None:
        layers.append(OmegaConf.create({"train": {"output_dir": str(output_dir)}}))
    if problems:
        raise _invalid(problems)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SSLConfig), defaults, *layers)
    except OmegaConfBaseException as e:  # e.g. an interpolation; the types were checked above
        raise ConfigError(f"invalid configuration: {e}") from None
    if not check_paths:
        for key in ("dataset_path", "output_dir"):
            if OmegaConf.is_missing(cfg.train, key):
                cfg.train[key] = ""
    missing = _missing_keys(cfg)
    if missing:
        raise _invalid(
            [f"{key}: required but not set (give it in the config file or as {key}=...)" for key in missing]
        )
    try:
        sections: SSLConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid configuration: {e}") from None
    skip = () if check_paths else ("train.dataset_path",)
    problems = sections.problems() + sections.path_problems(skip=skip)
    if problems:
        raise _invalid(problems)
    return cfg


def scaled_lr(base_lr: float, scaling_rule: str, total_batch_size: int) -> float:
    """Peak learning rate for a total batch size; ``base_lr`` is the value for a batch of 1024.

    ``sqrt_wrt_1024`` (DINOv2's rule): base_lr * sqrt(batch / 1024); ``linear_wrt_1024``:
    base_lr * batch / 1024; ``none``: base_lr.
    """
    if total_batch_size < 1:
        raise ValueError(f"total_batch_size must be >= 1, got {total_batch_size}")
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if scaling_rule == "linear_wrt_1024":
        return base_lr * total_batch_size / 1024.0
    if scaling_rule == "none":
        return base_lr
    raise ValueError(
        f"unknown optim.scaling_rule {scaling_rule!r}; expected 'sqrt_wrt_1024', 'linear_wrt_1024' or 'none'"
    )


def apply_scaling_rules_to_cfg(cfg: DictConfig, world_size: int) -> DictConfig:
    """Set optim.lr from optim.base_lr (given for a total batch of 1024) and the total batch size."""
    total_batch = cfg.train.batch_size_per_gpu * world_size
    cfg.optim.lr = scaled_lr(cfg.optim.base_lr, cfg.optim.scaling_rule, total_batch)
    return cfg


def write_config(cfg: DictConfig, output_dir: str | Path, name: str = "config.yaml") -> Path:
    """Save the merged config as YAML (atomically) and return its path."""
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, OmegaConf.to_yaml(cfg))


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
    apply_scaling_rules_to_cfg(cfg, distributed.env_world_size())
    rank = distributed.get_global_rank() if distributed.is_enabled() else distributed.env_rank()
    if rank == 0:
        path = write_config(cfg, cfg.train.output_dir)
        logger.info("merged config saved to %s", path)
    return cfg
