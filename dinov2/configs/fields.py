"""Typed config fields that carry their own rules, and the checks that read them.

A config section is a dataclass deriving from `Section`; each field is declared with `option(...)`,
which states the rules its value obeys next to its type (bounds, allowed strings, a custom rule, a
path that must exist). The defaults are not repeated here: they live in ssl_default_config.yaml, so
every field's dataclass default is OmegaConf's "???" (filled by merging that file).

Three checks, each returning one "dotted.key: problem" line per problem so that all of them can be
reported together:
- `layer_problems(schema, layer, source)`: a user layer (YAML file or command line, a plain dict)
  before merging: unknown keys (with the closest valid dotted key) and values of the wrong type.
- `Section.problems()`: the merged values, field by field, then each section's `check` for rules
  that tie several fields together.
- `Section.path_problems()`: files and folders named by the config exist.

Usage:
    @dataclass
    class Train(Section):
        batch_size_per_gpu: int = option(ge=1)
"""

import difflib
import types
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, ListConfig


def option(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[str] | None = None,
    rule: tuple[Callable[[Any], bool], str] | None = None,
    accepts: Any = None,
    described: str | None = None,
    exists: str | None = None,
) -> Any:
    """A config field whose default comes from the default YAML, with the rules its value obeys.

    Args:
        ge, gt, le, lt: bounds (>=, >, <=, <); a list value must meet them item by item.
        choices: the allowed strings.
        rule: (predicate, "must be ...") for a rule the bounds cannot state; the text is the message.
        accepts: the type the value must have when OmegaConf cannot hold it (a value-or-list union);
            the annotation is then `Any` and this type is checked instead.
        described: how to name `accepts` in a wrong-type message ("a folder path or a list of ...").
        exists: "file" or "folder": the (non-empty) value names a path that must exist.
    """
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None,
                "rule": rule, "accepts": accepts, "described": described, "exists": exists}  # fmt: skip
    return field(default=MISSING, metadata={k: v for k, v in metadata.items() if v is not None})


def section(cls: type) -> Any:
    """A field holding a nested section."""
    return field(default_factory=cls)


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple | ListConfig)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if get_origin(tp) in (Union, types.UnionType):
        return get_args(tp)
    return None


def _matches(tp: Any, v: Any) -> bool:
    """Whether `v` (a plain YAML value) can stand for the type annotation `tp`."""
    if tp is Any:
        return True
    if tp is type(None):
        return v is None
    if (members := _union_args(tp)) is not None:
        return any(_matches(m, v) for m in members)
    if get_origin(tp) is list:
        (item,) = get_args(tp) or (Any,)
        return _is_list(v) and all(_matches(item, x) for x in v)
    checks = {bool: lambda: isinstance(v, bool), int: lambda: _is_int(v), float: lambda: _is_number(v),
              str: lambda: isinstance(v, str)}  # fmt: skip
    if tp in checks:
        return checks[tp]()
    raise TypeError(f"config fields cannot be typed {tp!r}")


_NAMES = {bool: ("a boolean (true/false)", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings")}  # fmt: skip


def describe(tp: Any) -> str:
    """How a wrong-type message names the annotation `tp`: "null or an integer", "a list of numbers"."""
    if (members := _union_args(tp)) is not None:
        rest = [m for m in members if m is not type(None)]
        text = " or ".join(describe(m) for m in rest)
        return f"null or {text}" if len(rest) < len(members) else text
    if get_origin(tp) is list:
        (item,) = get_args(tp) or (Any,)
        return f"a list of {_NAMES[item][1]}" if item in _NAMES else "a list"
    return _NAMES[tp][0] if tp in _NAMES else str(tp)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _dotted(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _fields_and_types(cls: type) -> list[tuple[Field, Any]]:
    hints = get_type_hints(cls)
    return [(f, f.metadata.get("accepts", hints[f.name])) for f in fields(cls)]


def dotted_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections included: ["MODEL", "MODEL.WEIGHTS", ...]."""
    keys = []
    for f, tp in _fields_and_types(schema):
        dotted = _dotted(prefix, f.name)
        keys.append(dotted)
        if is_dataclass(tp):
            keys.extend(dotted_keys(tp, dotted))
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


def layer_problems(schema: type, layer: dict, source: str) -> list[str]:
    """Problems with one config layer (a plain nested dict) against `schema`: unknown keys and
    wrong types. `source` names where the values came from (a file path or "command line")."""
    problems: list[str] = []
    valid_keys = dotted_keys(schema)

    def walk(cls: type, node: dict, prefix: str) -> None:
        by_name = {f.name: (f, tp) for f, tp in _fields_and_types(cls)}
        for key, value in node.items():
            dotted = _dotted(prefix, key)
            if key not in by_name:
                hint = closest_key(dotted, valid_keys)
                suggestion = f"; did you mean '{hint}'?" if hint else ""
                problems.append(f"{dotted}: unknown config key (from {source}){suggestion}")
                continue
            f, tp = by_name[key]
            if is_dataclass(tp):
                if isinstance(value, dict):
                    walk(tp, value, dotted)
                else:
                    names = sorted(f.name for f in fields(tp))
                    problems.append(
                        f"{dotted}: expected a section with keys {names}, got {value!r} (from {source})"
                    )
            elif value != MISSING and not _matches(tp, value):
                want = f.metadata.get("described") or describe(tp)
                problems.append(
                    f"{dotted}: expected {want}, got {value!r} ({_type_name(value)}) (from {source})"
                )

    walk(schema, layer, "")
    return problems


def _bounds_text(meta: dict) -> str | None:
    low = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    high = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f"must be in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"must be {'<=' if high[0] == ']' else '<'} {high[1]}"
    return None


def _within_bounds(meta: dict, x: Any) -> bool:
    return (
        ("ge" not in meta or x >= meta["ge"])
        and ("gt" not in meta or x > meta["gt"])
        and ("le" not in meta or x <= meta["le"])
        and ("lt" not in meta or x < meta["lt"])
    )


def field_problems(dotted: str, value: Any, meta: dict, nullable: bool) -> list[str]:
    """Problems with one merged, well-typed value against its field's rules (null always passes
    where the field accepts null)."""
    if value is None:
        return []
    problems = []
    if "choices" in meta and value not in meta["choices"]:
        problems.append(f"{dotted}: must be one of {list(meta['choices'])}, got {value!r}")
    bounds = _bounds_text(meta)
    if bounds and not all(_within_bounds(meta, x) for x in (value if _is_list(value) else [value])):
        if nullable:
            bounds = bounds.replace("must be ", "must be null or ", 1)
        problems.append(f"{dotted}: {bounds}, got {value!r}")
    if "rule" in meta and not meta["rule"][0](value):
        problems.append(f"{dotted}: {meta['rule'][1]}, got {value!r}")
    return problems


def problem(dotted: str, ok: bool, what: str, value: Any) -> list[str]:
    """[] when `ok`, else the one line "dotted: what, got value" (for `Section.check` rules)."""
    return [] if ok else [f"{dotted}: {what}, got {value!r}"]


@dataclass
class Section:
    """Base of the config sections: field rules from `option`, cross-field rules in `check`."""

    def check(self, prefix: str) -> list[str]:
        """Rules that tie several fields of this section together (override in a section)."""
        return []

    def problems(self, prefix: str = "") -> list[str]:
        """Every rule broken by this section's values and those of its sub-sections."""
        out: list[str] = []
        for f, tp in _fields_and_types(type(self)):
            value, dotted = getattr(self, f.name), _dotted(prefix, f.name)
            if isinstance(value, Section):
                out += value.problems(dotted)
            else:
                nullable = tp is not Any and _matches(tp, None)
                out += field_problems(dotted, value, dict(f.metadata), nullable)
        return out + self.check(prefix)

    def path_problems(self, prefix: str = "", skip: Sequence[str] = ()) -> list[str]:
        """A line per file or folder named by a field with `exists` that is not there (empty = unset);
        keys in `skip` are not looked at."""
        out: list[str] = []
        for f in fields(self):
            value, dotted = getattr(self, f.name), _dotted(prefix, f.name)
            if isinstance(value, Section):
                out += value.path_problems(dotted, skip)
                continue
            kind = f.metadata.get("exists")
            if kind is None or dotted in skip or not value:
                continue
            for p in value if _is_list(value) else [value]:
                path = Path(str(p)).expanduser()
                if not (path.is_dir() if kind == "folder" else path.is_file()):
                    out.append(f"{dotted}: {kind} not found: {p!r}")
        return out
