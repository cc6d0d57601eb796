"""A run's report, ``<workdir>/report/``: the pictures of ``asda_jax/plots.py`` and one
page, ``report.md``, that shows them with the numbers they were drawn from.

Any run has curves (from ``metrics.jsonl``). A classifier's final evaluation also
leaves ``<workdir>/predictions.csv`` (one row per evaluated clip: its true classes, the
top predicted class and every class's score), from which the report computes
per-class scores: precision, recall and F1 where every clip has one class
(single-label), average precision where clips have any number; and, single-label, the
confusion matrix. A class with no clip in the split has no recall (NaN, said on the
page), and the averages are over the classes present.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from etils import epath

from asda_jax import metrics, plots, storage

REPORT_DIR = "report"
PAGE = "report.md"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.jsonl"  # the training loop's (train_lib.MetricsLog)
EVAL_FILE = "eval.json"  # a fine-tuning run's final metrics (evaluation.final_evaluation)


# ---------------------------------------------------------------------------- predictions


def write_predictions(path, scores: np.ndarray, targets: np.ndarray, names: Sequence[str]):
    """``predictions.csv`` of (N, C) ``scores`` and 0/1 ``targets``: clip, true (class
    names joined by ";"), predicted (the top class), then one score column per class."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["clip", "true", "predicted", *names])
    for i, (row, target) in enumerate(zip(scores, targets, strict=True)):
        true = ";".join(names[c] for c in np.flatnonzero(target > 0.5))
        writer.writerow([i, true, names[int(row.argmax())], *(f"{s:.6g}" for s in row)])
    storage.path(path).write_text(text.getvalue())


def read_predictions(path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """((N, C) scores, (N, C) 0/1 targets, class names) of a ``predictions.csv``."""
    rows = list(csv.reader(io.StringIO(storage.path(path).read_text())))
    names = rows[0][3:]
    index = {name: c for c, name in enumerate(names)}
    scores = np.array([[float(s) for s in r[3:]] for r in rows[1:]], np.float64)
    targets = np.zeros_like(scores)
    for i, row in enumerate(rows[1:]):
        for name in filter(None, row[1].split(";")):
            targets[i, index[name]] = 1.0
    return scores.reshape(-1, len(names)), targets.reshape(-1, len(names)), names


# ---------------------------------------------------------------------------- per class


def is_single_label(targets: np.ndarray) -> bool:
    return bool(np.all(targets.sum(axis=1) == 1))


def confusion(true: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(C, C) counts: row the true class, column the predicted one."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def single_label_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per class of a confusion matrix: precision (0 where never predicted), recall and
    F1 (NaN where the class has no clip), and its clips."""
    hits = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.where(predicted > 0, hits / np.maximum(predicted, 1), 0.0)
    recall = np.where(support > 0, hits / np.maximum(support, 1), np.nan)
    both = precision + recall
    f1 = np.where(both > 0, 2 * precision * recall / np.where(both > 0, both, 1), 0.0)
    f1 = np.where(support > 0, f1, np.nan)
    return {"precision": precision, "recall": recall, "F1": f1, "clips": support}


def multi_label_scores(scores: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per class: average precision (NaN where the class has no positive clip) and its
    positive clips."""
    positives = targets.sum(axis=0)
    ap = [
        metrics.average_precision(scores[:, c], targets[:, c]) if positives[c] else np.nan
        for c in range(targets.shape[1])
    ]
    return {"AP": np.asarray(ap), "clips": positives}


def per_class(scores: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The per-class scores the report shows for these predictions."""
    if is_single_label(targets):
        true, predicted = targets.argmax(axis=1), scores.argmax(axis=1)
        return single_label_scores(confusion(true, predicted, targets.shape[1]))
    return multi_label_scores(scores, targets)


# ---------------------------------------------------------------------------- the report


def write(workdir: str | os.PathLike) -> epath.Path:
    """Draws ``<workdir>/report/`` from what the run left: its curves, and where it has
    predictions, its per-class scores (``per_class.csv`` too) and confusion matrix.
    Returns the page's path. Raises FileNotFoundError for a folder that is not a run."""
    workdir = storage.path(workdir)
    rows = _metrics_rows(workdir / METRICS_FILE)
    has_predictions = (workdir / PREDICTIONS_FILE).is_file()
    if not rows and not has_predictions:
        raise FileNotFoundError(f"{workdir} holds neither {METRICS_FILE} nor {PREDICTIONS_FILE}")
    with tempfile.TemporaryDirectory(prefix="asda-jax-report-") as local:
        local = epath.Path(local)
        page = ["# Report of " + str(workdir), ""]
        if rows:
            plots.run_curves(rows, local / "curves.png")
            last = rows[-1]
            page += ["## Training", "", f"{len(rows)} logged steps, the last step {last['step']}.",
                     "", "![curves](curves.png)", ""]  # fmt: skip
        if (workdir / EVAL_FILE).is_file():
            results = json.loads((workdir / EVAL_FILE).read_text())
            rows_ = [(k, _number(v)) for k, v in sorted(results.items())]
            page += ["## Evaluation", "", _table(["metric", "value"], rows_), ""]
        if has_predictions:
            page += _classifier_section(workdir / PREDICTIONS_FILE, local)
        (local / PAGE).write_text("\n".join(page))
        storage.copy_tree(local, workdir / REPORT_DIR, last=(PAGE,))
    return workdir / REPORT_DIR / PAGE


def _classifier_section(predictions: epath.Path, local: epath.Path) -> list[str]:
    scores, targets, names = read_predictions(predictions)
    found = per_class(scores, targets)
    ranked_by = "F1" if "F1" in found else "AP"
    shown = {k: v for k, v in found.items() if k != "clips"}
    plots.per_class_scores(names, shown, ranked_by, local / "per_class.png")
    _write_per_class_csv(local / "per_class.csv", names, found)
    absent = [names[c] for c in np.flatnonzero(found["clips"] == 0)]
    lines = ["## Per class", "",
             f"{scores.shape[0]} clips, {len(names)} classes; "
             f"{'single-label' if ranked_by == 'F1' else 'multi-label'}; "
             f"mean {ranked_by} over the {len(names) - len(absent)} classes present "
             f"{np.nanmean(found[ranked_by]):.3f}.", ""]  # fmt: skip
    if absent:
        lines += [f"No clip of {len(absent)} classes in this split: {', '.join(absent)}.", ""]
    lines += ["![per-class scores](per_class.png)", ""]
    if ranked_by == "F1":
        true, predicted = targets.argmax(axis=1), scores.argmax(axis=1)
        plots.confusion_matrix(confusion(true, predicted, len(names)), names,
                               local / "confusion.png")  # fmt: skip
        lines += ["![confusion matrix](confusion.png)", ""]
    order, _ = plots.shown_classes(np.asarray(found[ranked_by], np.float64))
    header = ["class", *found]
    body = [[names[c], *(_number(found[k][c]) for k in found)] for c in order]
    lines += [_table(header, body), "", "Every class: `per_class.csv`; every clip: "
              f"`../{PREDICTIONS_FILE}`.", ""]  # fmt: skip
    return lines


def _write_per_class_csv(path: epath.Path, names, found: dict[str, np.ndarray]) -> None:
    text = io.StringIO()  # full precision; "nan" where undefined
    writer = csv.writer(text)
    writer.writerow(["class", *found])
    for c, name in enumerate(names):
        writer.writerow([name, *(repr(float(found[k][c])) for k in found)])
    path.write_text(text.getvalue())


def _metrics_rows(path: epath.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _number(value) -> str:
    return "n/a" if np.isnan(value) else f"{float(value):.4g}"


def _table(header: Sequence[str], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
