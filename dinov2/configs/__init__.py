"""Packaged YAML configs: the training defaults and the shipped train/*.yaml files.

`load_config("ssl_default_config")` and `load_and_merge_config("train/vit_tiny_cpu")` keep the names
of Meta's DINOv2 helpers; `resolve_config_path` lets a user pass either a file path or the name of a
packaged config (with or without `.yaml`), so `--config-file train/vitl_cellsim_register` works from
any directory.

A config file may name the file it builds on with a top-level `_base_:` key (a path relative to the
file, a path, or a packaged name); the base is loaded first (recursively) and the file's own keys are
merged over it, so an override file holds only what differs. `_base_` never reaches the merged config.

The types and rules of every key live in `dinov2.configs.schema` (one dataclass per section);
`dinov2.utils.config.build_config` merges and validates against them.
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIGS_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_NAME = "ssl_default_config"


def packaged_config_names() -> list[str]:
    """Names of the packaged configs, e.g. ["ssl_default_config", "train/vit_tiny_cpu", ...]."""
    return sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """Return the YAML file for `name_or_path`: an existing file path, else a packaged config name.

    Raises FileNotFoundError naming the argument and listing the packaged configs.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    # Accept the repo-relative spelling of a packaged file from another working directory.
    for prefix in ("dinov2/configs/", "configs/"):
        if name.startswith(prefix) and (CONFIGS_DIR / name[len(prefix) :]).is_file():
            return CONFIGS_DIR / name[len(prefix) :]
    for candidate in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config file not found: {name_or_path!r} (neither a file nor a packaged config; "
        f"packaged configs: {', '.join(packaged_config_names())})"
    )


BASE_KEY = "_base_"


def _resolve_base(base: str, including_file: Path) -> Path:
    """A `_base_` value: relative to the file that names it first, then a path or packaged name."""
    relative = (including_file.parent / base).expanduser()
    for candidate in (relative, relative.with_name(relative.name + ".yaml")):
        if candidate.is_file():
            return candidate
    try:
        return resolve_config_path(base)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{including_file}: {BASE_KEY} {base!r} not found (looked next to the file, as a path and "
            f"as a packaged config; packaged configs: {', '.join(packaged_config_names())})"
        ) from None


def load_config(config_name: str | Path) -> DictConfig:
    """Load one YAML config (path or packaged name), with its `_base_` chain merged in, without
    merging it over the defaults."""
    return _load_with_bases(resolve_config_path(config_name), chain=())


def _load_with_bases(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ValueError(f"{BASE_KEY} cycle in config files: {cycle}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig) or BASE_KEY not in cfg:
        return cfg
    base = cfg.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: {BASE_KEY} must be a config path or packaged name, got {base!r}")
    return OmegaConf.merge(_load_with_bases(_resolve_base(base, path), (*chain, path)), cfg)


def default_config_path() -> Path:
    """Path of dinov2/configs/ssl_default_config.yaml (every training key and its default)."""
    return CONFIGS_DIR / f"{DEFAULT_CONFIG_NAME}.yaml"


def load_default_config() -> DictConfig:
    """A fresh copy of the training defaults (callers may mutate it)."""
    return OmegaConf.load(default_config_path())


def load_and_merge_config(config_name: str) -> DictConfig:
    """The defaults with one config merged over them (no validation; see dinov2.utils.config)."""
    return OmegaConf.merge(load_default_config(), load_config(config_name))
