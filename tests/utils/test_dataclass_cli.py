"""Tests of dinov2/utils/dataclass_cli.py: flags generated from a config dataclass."""

import argparse
from dataclasses import dataclass, field

import pytest

from dinov2.utils.dataclass_cli import add_dataclass_arguments, field_docs


@dataclass
class _Config:
    data: str
    """Input folder."""
    out: str = field(metadata={"cli_default": "out_dir"})
    """Where results go."""
    kind: str = field(default="a", metadata={"choices": ("a", "b")})
    """Which kind.
    Spread over two lines."""
    steps: int = 10
    ratio: float = 0.5
    """A ratio."""
    cache: bool = False
    """Cache things."""
    progress: bool = True
    """Show progress."""


def _parser() -> argparse.ArgumentParser:
    return add_dataclass_arguments(argparse.ArgumentParser("t", add_help=False), _Config)


def test_field_docs_reads_the_docstring_under_each_field():
    assert field_docs(_Config) == {
        "data": "Input folder.",
        "out": "Where results go.",
        "kind": "Which kind. Spread over two lines.",
        "ratio": "A ratio.",
        "cache": "Cache things.",
        "progress": "Show progress.",
    }  # "steps" has no docstring


def test_defaults_types_switches_and_required_flags():
    args = vars(_parser().parse_args(["--data", "x"]))
    assert args == {
        "data": "x",
        "out": "out_dir",
        "kind": "a",
        "steps": 10,
        "ratio": 0.5,
        "cache": False,
        "progress": True,
    }
    args = vars(
        _parser().parse_args(["--data", "x", "--steps", "3", "--ratio", "1e-1", "--cache", "--no-progress"])
    )
    assert (args["steps"], args["ratio"], args["cache"], args["progress"]) == (3, 0.1, True, False)
    assert type(args["steps"]) is int and type(args["ratio"]) is float
    with pytest.raises(SystemExit):
        _parser().parse_args([])  # --data is required: the field has no default
    with pytest.raises(SystemExit):
        _parser().parse_args(["--data", "x", "--kind", "c"])
    assert _Config(**args).kind == "a"


def test_help_is_the_docstring_with_the_default():
    text = " ".join(_parser().format_help().split())
    assert "--ratio RATIO A ratio. (default: 0.5)" in text
    assert "--no-progress turn off: Show progress." in text


def test_unsupported_field_type_is_refused():
    @dataclass
    class Bad:
        sizes: list = field(default_factory=list)

    with pytest.raises(TypeError, match="Bad.sizes"):
        add_dataclass_arguments(argparse.ArgumentParser(), Bad)
