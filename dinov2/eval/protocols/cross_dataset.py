"""Protocol (d): fit on one labeled dataset, test on another, through a class-name mapping.

The mapping sends each *source* class name to a *target* class name (several source classes may
share one target class, e.g. ``{"ig": "neutrophil"}``). Source samples of unmapped classes are
left out of training; target samples of classes no source class maps to are left out of scoring
(both listed in ``info``). Classifiers are trained directly in the target label space, so they
choose only among target classes. Without a mapping, classes are matched by identical name.

Mapping files: JSON (``{"source": "target", ...}``) or text with one ``source,target`` pair per
line (also ``source<TAB>target`` or ``source -> target``; ``#`` starts a comment).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dinov2.eval.metrics import per_class_report
from dinov2.eval.protocols.bootstrap import add_bootstrap
from dinov2.eval.protocols.classifiers import ClassifierConfig, fit_predict, labeled_arrays
from dinov2.eval.protocols.result import EvalResult

_PAIR = re.compile(r"^\s*(.+?)\s*(?:->|,|\t)\s*(.+?)\s*$")


def load_class_mapping(spec: str | Path | Mapping[str, str] | None) -> dict[str, str] | None:
    """Read a source -> target class-name mapping from a dict, a JSON file or a pairs file."""
    if spec is None or isinstance(spec, Mapping):
        return None if spec is None else {str(k): str(v) for k, v in spec.items()}
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"class mapping file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"class mapping {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"class mapping {path} must be a JSON object of source -> target names")
        return {str(k): v for k, v in data.items()}
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PAIR.match(line)
        if m is None:
            raise ValueError(
                f"{path}:{lineno}: expected 'source,target', 'source<TAB>target' or 'a -> b', got {line!r}"
            )
        src, dst = m.group(1), m.group(2)
        if src in mapping and mapping[src] != dst:
            raise ValueError(
                f"{path}:{lineno}: source class {src!r} mapped twice ({mapping[src]!r}, {dst!r})"
            )
        mapping[src] = dst
    if not mapping:
        raise ValueError(f"class mapping {path} holds no pairs")
    return mapping


def _unknown(names: Sequence[str], known: Sequence[str], what: str) -> None:
    bad = [n for n in names if n not in known]
    if bad:
        hints = "; ".join(
            f"{b!r} (did you mean {difflib.get_close_matches(b, known, n=1)[0]!r}?)"
            if difflib.get_close_matches(b, known, n=1)
            else repr(b)
            for b in bad
        )
        raise ValueError(
            f"class mapping names {what} classes that do not exist: {hints}. Known: {list(known)}"
        )


def relabel(
    labels: np.ndarray, from_names: Sequence[str], to_names: Sequence[str], mapping: Mapping[str, str]
):
    """Map label indices of ``from_names`` to indices of ``to_names`` through ``mapping`` (names).

    Returns ``(new_labels, keep_mask)``; samples whose class is not mapped get -1 and keep False.
    """
    to_idx = {n: i for i, n in enumerate(to_names)}
    lut = np.array([to_idx.get(mapping.get(n, ""), -1) for n in from_names], dtype=np.int64)
    new = lut[np.asarray(labels, dtype=np.int64)]
    return new, new >= 0


def cross_dataset_eval(
    source,
    target,
    *,
    mapping: str | Path | Mapping[str, str] | None = None,
    classifiers: ClassifierConfig | None = None,
    n_boot: int = 0,
    seed: int = 0,
) -> EvalResult:
    """Train on ``source`` (relabelled through ``mapping``) and score on ``target``.

    Args:
        source, target: labeled feature sets (``features``, ``labels``, ``class_names``) from the
            same backbone and preprocessing.
        mapping: source -> target class names (dict or file); default identical names.
        classifiers: rows to evaluate (default 1-NN, 20-NN, Linear Probing).
        n_boot: bootstrap resamples for 95 % intervals on the target (0: none).
        seed: bootstrap seed.

    Returns:
        :class:`EvalResult` over the target classes that receive a mapping; per-class recall of
        every classifier is in ``info["per_class_recall"]``.
    """
    cfg = classifiers or ClassifierConfig()
    xs, ys, src_names = labeled_arrays(source)
    xt, yt, tgt_names = labeled_arrays(target)
    if xs.shape[1] != xt.shape[1]:
        raise ValueError(f"source and target features differ in dimension ({xs.shape[1]} vs {xt.shape[1]})")
    mapping = load_class_mapping(mapping)
    if mapping is None:
        mapping = {n: n for n in src_names if n in tgt_names}
        if not mapping:
            raise ValueError(
                f"source classes {src_names} and target classes {tgt_names} share no name; "
                "pass a class mapping"
            )
    _unknown(list(mapping), src_names, "source")
    _unknown(sorted(set(mapping.values())), tgt_names, "target")
    label_space = [n for n in tgt_names if n in set(mapping.values())]
    if len(label_space) < 2:
        raise ValueError(
            f"the class mapping reaches only {label_space}; a classifier needs at least 2 target classes"
        )
    ys2, keep_s = relabel(ys, src_names, label_space, mapping)
    yt2, keep_t = relabel(yt, tgt_names, label_space, {n: n for n in label_space})
    train_x, train_y = xs[keep_s], ys2[keep_s]
    test_idx = np.flatnonzero(keep_t)
    test_x, test_y = xt[test_idx], yt2[test_idx]
    preds, params = fit_predict(train_x, train_y, test_x, cfg, num_classes=len(label_space))
    rows = cfg.names()
    result = EvalResult.single_split(
        "cross_dataset",
        label_space,
        rows,
        test_y,
        preds,
        test_idx,
        params,
        info={
            "mapping": mapping,
            "source_classes_dropped": [n for n in src_names if n not in mapping],
            "target_classes_dropped": [n for n in tgt_names if n not in label_space],
            "n_train": int(len(train_y)),
            "n_test": int(len(test_y)),
            "per_class_recall": {
                r: {row["class"]: row["recall"] for row in per_class_report(test_y, preds[r], label_space)}
                for r in rows
            },
        },
    )
    if n_boot:
        add_bootstrap(result, n_boot=n_boot, seed=seed)
    return result
