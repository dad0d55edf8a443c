"""Evaluation beyond one number, from predicted probabilities and true labels (numpy only).

    evaluate(probabilities: float [N, K], labels: int [N], names: K labels) -> {
        "per_class": {label: {"precision", "recall", "f1", "support"}},
        "confusion_matrix": int [K][K], rows = true labels, columns = predicted, label order,
        "top_k_accuracy": {"k": min(5, K), "value": float},
        "expected_calibration_error": float (15 equal-width confidence bins),
    }

A class never predicted has precision 0, one with no examples recall 0 (and f1 0), as
scikit-learn's `zero_division=0`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CALIBRATION_BINS = 15


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K, K]: [true, predicted] counts."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def per_class(matrix: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """{label: {precision, recall, f1, support}} from a confusion matrix."""
    correct = np.diag(matrix).astype(np.float64)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
    recall = np.divide(correct, support, out=np.zeros_like(correct), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(correct), where=both > 0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(names)}


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of examples whose true label is among the k most probable."""
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1))) if len(labels) else 0.0


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = CALIBRATION_BINS) -> float:
    """Sum over equal-width bins of top-1 confidence (0, 1/bins], ...: the share of
    examples in the bin times |accuracy - mean confidence| there."""
    if not len(labels):
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; 0 goes to the first.
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def evaluate(probabilities: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> dict:
    """The metrics of the module docstring; probabilities float [N, K], labels int [N]."""
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    matrix = confusion_matrix(probabilities.argmax(axis=1), labels, len(names))
    k = min(5, len(names))
    return {
        "per_class": {name: {key: round(value, 5) for key, value in row.items()}
                      for name, row in per_class(matrix, names).items()},
        "confusion_matrix": matrix.tolist(),
        "top_k_accuracy": {"k": k, "value": round(top_k_accuracy(probabilities, labels, k), 5)},
        "expected_calibration_error": round(expected_calibration_error(probabilities, labels),
                                            5),
    }
