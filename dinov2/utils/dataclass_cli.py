"""Command-line flags generated from a config dataclass, so a tool's options are written once.

Each field becomes ``--field-name`` with the field's type and default; its help is the field's
docstring (the string literal under it, as torchtitan writes configs). A boolean field becomes a
switch: ``--name`` when it defaults to False, ``--no-name`` (clearing it) when it defaults to True.
A field without a default is a required flag. Field metadata refines the flag:

- ``choices``: the allowed values;
- ``cli_default``: the flag's default when it differs from the Python default (or there is none).

Example::

    @dataclass
    class Config:
        data: str
        \"\"\"Input folder.\"\"\"
        epochs: int = 10
        \"\"\"Passes over the data.\"\"\"

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Config)
    config = Config(**vars(parser.parse_args()))
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under the field in ``cls``'s source ({} without source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # source not shipped (a frozen install): flags keep working, help is bare
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one flag per field of the dataclass ``cls`` to ``parser`` (see the module docstring).

    ``vars(parser.parse_args())`` then holds exactly ``cls``'s field names, so
    ``cls(**vars(args))`` builds the config.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = docs.get(f.name, "").replace("``", "")  # reST literals read badly in a terminal
        has_default = f.default is not dataclasses.MISSING or "cli_default" in f.metadata
        default: Any = f.metadata.get("cli_default", f.default)
        if kind is bool:
            if default:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_false",
                    help=f"turn off: {help_text}" if help_text else None,
                )
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text or None)
            continue
        if kind not in (str, int, float):
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {kind!r}")
        kwargs: dict[str, Any] = {"dest": f.name, "type": kind, "choices": f.metadata.get("choices")}
        if has_default:
            kwargs["default"] = default
            help_text = f"{help_text} (default: {default})".strip()
        else:
            kwargs["required"] = True
        parser.add_argument(flag, help=help_text or None, **kwargs)
    return parser
