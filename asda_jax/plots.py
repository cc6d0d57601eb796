"""The pictures a person looks at before reading numbers: a run's curves, a classifier's
per-class scores and confusion matrix, a recording's spectrogram with its labels over
time. Each function draws one PNG (matplotlib, no display needed) and returns its path.

Class names stay legible: up to ``MAX_NAMED`` classes are drawn by name; a larger set
shows its ``MAX_NAMED // 2`` best and worst classes, and says so in the title.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI

import matplotlib.pyplot as plt
import numpy as np

MAX_NAMED = 50
DPI = 100
# what a run's curves show, panel by panel: the metrics.jsonl keys drawn in it
CURVE_PANELS = (
    ("loss", ("loss", "frame_loss", "utterance_loss")),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("clips/s", ("clips_per_s",)),
)
VALIDATION_PREFIX = "val/"


def run_curves(rows: Sequence[Mapping[str, float]], path: str | os.PathLike) -> str:
    """The run's metrics (``metrics.jsonl`` rows) against its step: one panel per
    quantity that the run logged, the validation metrics (``val/...``) in their own."""
    panels = [
        (title, [k for k in keys if any(k in r for r in rows)]) for title, keys in CURVE_PANELS
    ]
    validation = sorted({k for r in rows for k in r if k.startswith(VALIDATION_PREFIX)})
    panels = [(t, keys) for t, keys in panels if keys]
    if validation:
        panels.append(("validation", validation))
    if not panels:
        raise ValueError("metrics.jsonl holds none of the quantities a run's curves show")
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), sharex=True,
                             squeeze=False)  # fmt: skip
    for ax, (title, keys) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            steps = [r["step"] for r in rows if key in r]
            ax.plot(
                steps,
                [r[key] for r in rows if key in r],
                label=key,
                marker="." if len(steps) < 30 else None,
            )
        ax.set_ylabel(title)
        values = [r[k] for r in rows for k in keys if k in r]
        if title == "loss" and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")  # the terms span decades (pretraining's)
        if len(keys) > 1:
            ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    return _saved(fig, path)


def shown_classes(values: np.ndarray) -> tuple[np.ndarray, str]:
    """(the classes to draw, ordered best first; a note for the title) of per-class
    ``values`` (NaN: undefined, e.g. no clip of the class): all where at most
    ``MAX_NAMED``, else the best and the worst ``MAX_NAMED // 2``."""
    defined = np.flatnonzero(~np.isnan(values))
    order = defined[np.argsort(-values[defined], kind="stable")]
    if order.size <= MAX_NAMED:
        return order, ""
    half = MAX_NAMED // 2
    return np.r_[order[:half], order[-half:]], f" (best and worst {half} of {order.size})"


def per_class_scores(
    names: Sequence[str], scores: Mapping[str, np.ndarray], ranked_by: str, path
) -> str:
    """Horizontal bars of each per-class score (precision, recall, F1; or AP), one row
    per class, ordered by ``ranked_by``."""
    rows, note = shown_classes(np.asarray(scores[ranked_by], np.float64))
    height = 0.8 / len(scores)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * len(rows) * max(1, len(scores) / 2)))
    place = np.arange(len(rows))
    for i, (name, values) in enumerate(scores.items()):
        ax.barh(place + i * height, np.asarray(values)[rows], height, label=name)
    ax.set_yticks(place + height * (len(scores) - 1) / 2, [names[c] for c in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the best at the top, no empty rows
    ax.set_xlim(0, 1)
    ax.set_title(f"per-class scores, by {ranked_by}{note}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _saved(fig, path)


def confusion_matrix(matrix: np.ndarray, names: Sequence[str], path) -> str:
    """The (true, predicted) counts, each true class's row as shares of its clips and
    printed as counts where the matrix is small enough to read them; a larger set
    shows the classes of the best and worst recall (their rows then sum to less than
    one where clips went to classes not shown)."""
    counts = np.asarray(matrix, np.float64)
    totals = counts.sum(axis=1)
    recall = np.where(totals > 0, np.diag(counts) / np.maximum(totals, 1), np.nan)
    classes, note = shown_classes(recall)
    classes = np.sort(classes)
    shown = counts[np.ix_(classes, classes)]
    share = shown / np.maximum(totals[classes, None], 1)  # of all the class's clips
    size = max(6.0, 2.5 + 0.3 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    labels = [names[c] for c in classes]
    ax.set_xticks(range(len(classes)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), labels, fontsize=7)
    if len(classes) <= 20:
        for (i, j), n in np.ndenumerate(shown):
            if n:
                colour = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, f"{n:.0f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix, each row a share of the true class's clips{note}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _saved(fig, path)


def recording(
    spectrogram: np.ndarray,  # (columns, mel bins), log-mel
    seconds: float,
    times: np.ndarray,  # (W,) window centres in seconds
    scores: np.ndarray,  # (W, C)
    names: Sequence[str],
    events: Sequence[tuple[float, float, str]],  # (start, end, label)
    path,
    top: int = 5,
) -> str:
    """A recording at a glance: its log-mel spectrogram, the ``top`` classes' scores
    over time (the classes of the highest scores anywhere in it), and the merged events
    under them, on one time axis."""
    peak = scores.max(axis=0)
    classes = np.argsort(-peak, kind="stable")[:top]
    fig, (spec_ax, score_ax, event_ax) = plt.subplots(
        3, 1, figsize=(12, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2.5, 1.2]}
    )
    spec_ax.imshow(spectrogram.T, origin="lower", aspect="auto", cmap="magma",
                   extent=(0, seconds, 0, spectrogram.shape[1]))  # fmt: skip
    spec_ax.set_ylabel("mel bin")
    spec_ax.set_title("log-mel spectrogram")
    colours = {}  # an event takes its class's colour in the scores above it
    for c in classes:
        (line,) = score_ax.plot(times, scores[:, c], label=names[c])
        colours[names[c]] = line.get_color()
    score_ax.set_ylim(0, 1)
    score_ax.set_ylabel("score")
    score_ax.legend(fontsize=8, loc="upper right", ncol=min(top, 3))
    score_ax.grid(alpha=0.3)
    labels = sorted({label for _, _, label in events})
    for start, end, label in events:
        colour = colours.get(label, "grey")
        event_ax.barh(labels.index(label), end - start, left=start, height=0.6, color=colour)
    event_ax.set_yticks(range(len(labels)), labels, fontsize=8)
    event_ax.set_ylim(-0.5, max(len(labels), 1) - 0.5)
    event_ax.set_title("events" if events else "events: none above the threshold", fontsize=9)
    event_ax.set_xlabel("seconds")
    event_ax.set_xlim(0, seconds)
    return _saved(fig, path)


def _saved(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=DPI)
    plt.close(fig)
    return os.fspath(path)
