"""Package attributes imported on first access, so ``import dinov2.<stage>`` stays cheap.

A package lists which module defines each public name; `lazy_attributes` returns the module
``__getattr__`` and ``__dir__`` (PEP 562) that import that module only when the name is used.

Example (in a package's ``__init__.py``)::

    _LAZY = {"extract_features": "dinov2.eval.features", "knn_predict": "dinov2.eval.knn"}
    __all__ = sorted(_LAZY)
    __getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
