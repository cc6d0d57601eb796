"""Evaluation metrics of the fine-tuning tasks, on whole splits of host NumPy arrays.

AudioSet reports mAP (average precision per class over the classes that have a
positive, averaged) and d-prime (from the mean ROC AUC, as AST/PANNs report it);
single-label tasks report accuracy (argmax of scores vs argmax of the label vector).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision–recall step curve of one class; (N,) scores, (N,) 0/1.

    Tied scores form one threshold, as in scikit-learn: Σ_k (R_k − R_{k−1}) · P_k over
    the distinct scores in decreasing order.
    """
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order].astype(np.float64)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # the end of each threshold group
    true_pos = np.cumsum(positives)[last_of_tie]
    predicted = (np.arange(scores.size) + 1.0)[last_of_tie]
    recall = true_pos / true_pos[-1]
    precision = true_pos / predicted
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classes_with_positives(targets: np.ndarray) -> np.ndarray:
    return np.flatnonzero(targets.sum(axis=0) > 0)


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean AP over the classes with at least one positive; (N, C) scores, (N, C) 0/1."""
    classes = classes_with_positives(targets)
    if classes.size == 0:
        raise ValueError("mAP needs at least one positive label")
    return float(np.mean([average_precision(scores[:, c], targets[:, c]) for c in classes]))


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count ½)."""
    ranks = stats.rankdata(scores)  # average ranks over ties
    pos = positives.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def d_prime(auc: float) -> float:
    """The separation of two unit Gaussians whose ROC has this AUC: √2 · Φ⁻¹(AUC)."""
    return float(np.sqrt(2.0) * stats.norm.ppf(auc))


def mean_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean ROC AUC over classes with both positives and negatives."""
    counts = targets.sum(axis=0)
    classes = np.flatnonzero((counts > 0) & (counts < targets.shape[0]))
    if classes.size == 0:
        return float("nan")
    return float(np.mean([roc_auc(scores[:, c], targets[:, c]) for c in classes]))


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose highest score is at the label's highest entry."""
    return float(np.mean(scores.argmax(axis=1) == targets.argmax(axis=1)))


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Every metric that is defined for this split (mAP/AUC need positive classes)."""
    targets = (targets > 0.5).astype(np.float64)
    result = {"accuracy": accuracy(scores, targets), "num_clips": float(scores.shape[0])}
    if classes_with_positives(targets).size:
        result["mAP"] = mean_average_precision(scores, targets)
        auc = mean_auc(scores, targets)
        result |= {"mean_auc": auc, "d_prime": d_prime(auc)}
    return result
