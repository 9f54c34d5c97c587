"""Package attributes imported on first access, so ``import dinov2.<stage>`` stays cheap.

A package lists which module defines each public name; `lazy_attributes` returns the module
``__getattr__`` and ``__dir__`` (PEP 562) that import that module only when the name is used.

Example (in a package's ``__init__.py``)::

    _LAZY = by_module({"dinov2.eval.features": ("FeatureSet", "extract_features"),
                       "dinov2.eval.knn": ("knn_predict",)})
    __all__ = sorted(_LAZY)
    __getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from typing import Any


def lazy_attributes(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package`` exporting ``names`` (name -> defining module)."""
    table = dict(names)

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__


def by_module(modules: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """{module: names it defines} -> {name: module}; a name listed under two modules is an error."""
    table: dict[str, str] = {}
    for module, names in modules.items():
        if isinstance(names, str):
            raise TypeError(f"names of {module!r} must be a sequence of names, got the string {names!r}")
        for name in names:
            if name in table:
                raise ValueError(f"{name!r} is listed under both {table[name]!r} and {module!r}")
            table[name] = module
    return table
