"""Strip outputs from Jupyter notebooks so they are committed clean.

Used by the pre-commit hook (`python -m dinov2.utils.notebooks --strip FILES...`) and by
`--check`, which fails when a notebook still carries outputs or execution counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dinov2.utils.files import atomic_write


def strip_notebook(nb: dict) -> bool:
    """Remove outputs, execution counts and volatile metadata in place. Returns True if changed."""
    changed = False
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            cell["outputs"] = []
            changed = True
        if cell.get("execution_count") is not None:
            cell["execution_count"] = None
            changed = True
        for key in ("execution", "collapsed", "scrolled"):
            if key in cell.get("metadata", {}):
                del cell["metadata"][key]
                changed = True
    if "widgets" in nb.get("metadata", {}):
        del nb["metadata"]["widgets"]
        changed = True
    return changed


def has_outputs(nb: dict) -> bool:
    """True when any code cell carries outputs or an execution count."""
    return any(
        cell.get("outputs") or cell.get("execution_count") is not None
        for cell in nb.get("cells", [])
        if cell.get("cell_type") == "code"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--strip", action="store_true", help="rewrite notebooks without outputs")
    mode.add_argument("--check", action="store_true", help="fail if a notebook has outputs")
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    dirty = []
    for path in args.paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if args.check:
            if has_outputs(nb):
                dirty.append(path)
        elif strip_notebook(nb):
            atomic_write(path, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            dirty.append(path)
    for path in dirty:
        print(f"{'has outputs' if args.check else 'stripped'}: {path}")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
