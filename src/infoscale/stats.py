"""Confidence intervals for accuracies measured on windows of text (windows are clusters)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cluster_ci"]


def cluster_ci(correct_per_window: list[np.ndarray]) -> tuple[float, float]:
    """95% CI of the pooled accuracy: windows as clusters (ratio estimator), floored at the binomial
    standard error; Wilson's interval for a single window."""
    counts = np.array([len(c) for c in correct_per_window], float)
    hits = np.array([c.sum() for c in correct_per_window], float)
    n, acc = counts.sum(), hits.sum() / counts.sum()
    w = len(counts)
    if w < 2:
        z = 1.96
        centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)
    se = math.sqrt(w / (w - 1) * float(((hits - acc * counts) ** 2).sum())) / n
    # never narrower than independent predictions would give: with few windows the cluster estimate
    # can come out near zero by chance
    se = max(se, math.sqrt(acc * (1 - acc) / n))
    return max(0.0, acc - 1.96 * se), min(1.0, acc + 1.96 * se)
