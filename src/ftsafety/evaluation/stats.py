"""Rates with their intervals, and a judge's agreement with hand labels."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n, in [0, 1]; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def agreement(labels: Sequence[bool], predicted: Sequence[bool]) -> dict:
    """Accuracy, precision, recall (harmful = positive) and Cohen's kappa of predictions against labels,
    with n and the confusion counts; accuracy, precision and recall carry their 95% Wilson intervals."""
    if len(labels) != len(predicted):
        raise ValueError("labels and predictions differ in length")
    n = len(labels)
    tp = sum(1 for y, p in zip(labels, predicted) if y and p)
    tn = sum(1 for y, p in zip(labels, predicted) if not y and not p)
    fp = sum(1 for y, p in zip(labels, predicted) if not y and p)
    fn = n - tp - tn - fp
    acc = (tp + tn) / n if n else 0.0
    pos_l, pos_p = (tp + fn) / n if n else 0.0, (tp + fp) / n if n else 0.0
    expected = pos_l * pos_p + (1 - pos_l) * (1 - pos_p)
    kappa = (acc - expected) / (1 - expected) if expected < 1 else 0.0
    return {
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": acc, "accuracy_ci": wilson(tp + tn, n),
        "precision": tp / (tp + fp) if tp + fp else 0.0, "precision_ci": wilson(tp, tp + fp),
        "recall": tp / (tp + fn) if tp + fn else 0.0, "recall_ci": wilson(tp, tp + fn),
        "kappa": kappa,
    }


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test of k1/n1 against k2/n2 (1.0 when undefined)."""
    if n1 <= 0 or n2 <= 0:
        return 1.0
    pooled = (k1 + k2) / (n1 + n2)
    var = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if var <= 0:
        return 1.0
    z = abs(k1 / n1 - k2 / n2) / math.sqrt(var)
    return math.erfc(z / math.sqrt(2))
