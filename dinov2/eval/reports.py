"""Write an evaluation's results: metrics.json, Markdown / CSV / LaTeX tables, per-class reports,
confusion-matrix PNGs and per-sample predictions, all in one output folder.

The Markdown table reproduces the DINOv2 cell fork's layout (pandas ``to_markdown``): rows
``1-NN``, ``20-NN``, ``Linear Probing``; columns ``f1_score``, ``recall``, ``precision``,
``balanced_accuracy``; cells ``86.6 (+/- 0.7)`` = mean (+/- std over folds) in percent. The fork's
recall column equals accuracy and differs from its balanced accuracy, so its f1/recall/precision
are support-weighted averages; :data:`TABLE_COLUMNS` maps them to ``*_weighted`` here.
Single-split results show ``91.6`` or, with a bootstrap interval, ``91.6 [90.1, 92.9]``.

Figures are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot state), so
they work headless and in threads.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov2.eval.metrics import METRIC_NAMES, confusion_matrix, per_class_report
from dinov2.utils.files import atomic_path, atomic_write

#: Display column -> metric key (see module doc for why the weighted averages).
TABLE_COLUMNS: dict[str, str] = {
    "f1_score": "f1_weighted",
    "recall": "recall_weighted",
    "precision": "precision_weighted",
    "balanced_accuracy": "balanced_accuracy",
}


def slug(name: str) -> str:
    """File-name-safe form of a row name: ``"20-NN (weighted)" -> "20-NN_weighted"``."""
    s = re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")
    return s or "classifier"


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON (numpy values converted), atomically."""
    path = Path(path)
    atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def format_cell(entry: Mapping[str, float | None], decimals: int = 1, pm: str = " (+/- {std})") -> str:
    """``{"mean": .866, "std": .007} -> "86.6 (+/- 0.7)"``; with ``low``/``high`` and no std
    ``"86.6 [85.1, 88.0]"``; otherwise ``"86.6"``. ``pm`` formats the std part."""
    mean = 100 * float(entry["mean"])
    text = f"{mean:.{decimals}f}"
    if entry.get("std") is not None:
        return text + pm.format(std=f"{100 * float(entry['std']):.{decimals}f}")
    if entry.get("low") is not None and entry.get("high") is not None:
        return f"{text} [{100 * float(entry['low']):.{decimals}f}, {100 * float(entry['high']):.{decimals}f}]"
    return text


def table_cells(
    summary: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    columns: Mapping[str, str] = TABLE_COLUMNS,
    decimals: int = 1,
    pm: str = " (+/- {std})",
) -> tuple[list[str], list[str], list[list[str]]]:
    """(row names, column names, cell strings) of a summary ``row -> metric -> {mean, std, ...}``."""
    rows = list(summary)
    cols = list(columns)
    cells = [[format_cell(summary[r][columns[c]], decimals, pm) for c in cols] for r in rows]
    return rows, cols, cells


def markdown_table(
    summary: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    columns: Mapping[str, str] = TABLE_COLUMNS,
    decimals: int = 1,
) -> str:
    """The fork's Markdown table: left-aligned pipe table, every column padded to its widest cell."""
    rows, cols, cells = table_cells(summary, columns, decimals)
    header = [""] + cols
    body = [[r] + c for r, c in zip(rows, cells)]
    # Like tabulate (behind pandas' to_markdown): headers get 2 extra characters of minimum width.
    widths = [max([len(header[j]) + 2] + [len(b[j]) for b in body]) for j in range(len(header))]

    def line(values: Sequence[str]) -> str:
        return "|" + "|".join(f" {v.ljust(w)} " for v, w in zip(values, widths)) + "|"

    sep = "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(b) for b in body]) + "\n"


def _latex_escape(s: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", s)


def latex_table(
    summary: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    columns: Mapping[str, str] = TABLE_COLUMNS,
    decimals: int = 1,
    caption: str | None = None,
) -> str:
    """A booktabs ``table`` with ``mean $\\pm$ std`` cells (or ``mean [low, high]``)."""
    rows, cols, cells = table_cells(summary, columns, decimals, pm=" $\\pm$ {std}")
    out = ["\\begin{table}[ht]", "\\centering", "\\begin{tabular}{l" + "c" * len(cols) + "}", "\\toprule"]
    out.append(" & ".join(["Classifier"] + [_latex_escape(c) for c in cols]) + " \\\\")
    out.append("\\midrule")
    for r, row in zip(rows, cells):
        out.append(" & ".join([_latex_escape(r)] + row) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        out.append(f"\\caption{{{_latex_escape(caption)}}}")
    out.append("\\end{table}")
    return "\n".join(out) + "\n"


def summary_csv_rows(summary: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> list[dict[str, Any]]:
    """One CSV row per classifier: ``classifier``, ``<metric>_mean``, ``_std`` (and ``_low``, ``_high``)."""
    out = []
    for name, metrics in summary.items():
        row: dict[str, Any] = {"classifier": name}
        for m in METRIC_NAMES:
            e = metrics[m]
            row[f"{m}_mean"] = e["mean"]
            row[f"{m}_std"] = e.get("std")
            if "low" in e:
                row[f"{m}_low"], row[f"{m}_high"] = e["low"], e["high"]
        out.append(row)
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write dict rows as CSV (columns: union of keys in first-seen order; None -> empty)."""
    path = Path(path)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write(path, buf.getvalue())
    return path


def per_class_text(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """A fixed-width per-class table (precision, recall, f1, support) like sklearn's report."""
    width = max([len("class")] + [len(str(r["class"])) for r in rows])
    head = f"{'class'.ljust(width)}  precision  recall  f1-score  support  predicted"
    lines = ([title] if title else []) + [head]
    for r in rows:
        lines.append(
            f"{str(r['class']).ljust(width)}  {r['precision']:9.4f}  {r['recall']:6.4f}  {r['f1']:8.4f}"
            f"  {r['support']:7d}  {r['predicted']:9d}"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def plot_confusion_matrix(
    cm: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    *,
    normalize: bool = False,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Save a confusion-matrix heat map (rows true, columns predicted) as PNG.

    Args:
        cm: counts [C, C].
        class_names: C tick labels.
        path: output .png.
        normalize: divide each row by its total (recall on the diagonal); empty rows stay 0.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    if normalize:
        totals = cm.sum(axis=1, keepdims=True).astype(np.float64)
        values = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)
    else:
        values = cm.astype(np.float64)
    c = len(class_names)
    size = max(4.0, 0.6 * c + 2.5)
    fig = Figure(figsize=(size, size), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(1.0, values.max()))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix (counts)"))
    if c <= 30:
        threshold = (1.0 if normalize else max(1.0, values.max())) / 2
        for i in range(c):
            for j in range(c):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if values[i, j] > threshold else "black",
                )
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    return path


def write_classification_outputs(
    y_true,
    y_pred,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    prefix: str = "",
    title: str = "",
) -> dict[str, Path]:
    """Per-class report (.txt and .csv) and both confusion-matrix PNGs for one set of predictions.

    Files: ``{prefix}per_class.txt``, ``{prefix}per_class.csv``, ``{prefix}confusion_counts.png``,
    ``{prefix}confusion_normalized.png`` in ``out_dir``. Returns name -> path.
    """
    out = Path(out_dir)
    rows = per_class_report(y_true, y_pred, class_names)
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    paths = {
        "per_class_txt": out / f"{prefix}per_class.txt",
        "per_class_csv": out / f"{prefix}per_class.csv",
        "confusion_counts": out / f"{prefix}confusion_counts.png",
        "confusion_normalized": out / f"{prefix}confusion_normalized.png",
    }
    atomic_write(paths["per_class_txt"], per_class_text(rows, title))
    write_csv(rows, paths["per_class_csv"])
    plot_confusion_matrix(
        cm, class_names, paths["confusion_counts"], title=f"{title} (counts)" if title else None
    )
    plot_confusion_matrix(
        cm,
        class_names,
        paths["confusion_normalized"],
        normalize=True,
        title=f"{title} (row-normalised)" if title else None,
    )
    return paths


def write_report(
    result,
    out_dir: str | Path,
    *,
    paths: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    caption: str | None = None,
) -> dict[str, Path]:
    """Write every output of an :class:`~dinov2.eval.protocols.EvalResult` into ``out_dir``.

    Files: ``metrics.json`` (summary, per-split metrics, chosen hyper-parameters, intervals,
    info and ``extra``), ``results.md`` (the fork's table), ``results.csv``, ``results.tex``,
    ``<row>/per_class.{txt,csv}``, ``<row>/confusion_{counts,normalized}.png`` per classifier,
    and ``predictions.csv`` (one line per scored sample; its image path when ``paths`` — the
    evaluated feature set's paths — is given).

    Returns:
        name -> path of everything written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    metrics = result.to_dict()
    if extra:
        metrics["extra"] = dict(extra)
    written = {"metrics_json": write_json(metrics, out / "metrics.json")}
    written["results_md"] = out / "results.md"
    atomic_write(written["results_md"], markdown_table(summary))
    written["results_csv"] = write_csv(summary_csv_rows(summary), out / "results.csv")
    written["results_tex"] = out / "results.tex"
    atomic_write(written["results_tex"], latex_table(summary, caption=caption))
    for name in result.classifiers:
        files = write_classification_outputs(
            result.y_true, result.predictions[name], result.class_names, out / slug(name), title=name
        )
        written.update({f"{slug(name)}/{k}": v for k, v in files.items()})
    pred_rows = []
    for j, (i, t) in enumerate(zip(result.sample_index, result.y_true)):
        row: dict[str, Any] = {"index": int(i)}
        if paths is not None:
            row["path"] = paths[int(i)]
        row["true"] = result.class_names[int(t)]
        for name in result.classifiers:
            row[name] = result.class_names[int(result.predictions[name][j])]
        pred_rows.append(row)
    written["predictions_csv"] = write_csv(pred_rows, out / "predictions.csv")
    return written
