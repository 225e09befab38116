"""Confidence intervals for metrics measured on windows of text (windows are clusters): one method's
accuracy (:func:`cluster_ci`) and the paired difference of two methods on the same windows
(:func:`paired_delta`). Pure numpy."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cluster_ci", "hits_ci", "ratio_se", "grown_fields", "pooled", "bootstrap_indices", "paired_delta",
           "windows_for_halfwidth", "window_fields"]


def ratio_se(sums, counts) -> float:
    """Standard error of the pooled mean Σ_w S_w / Σ_w N_w with windows as clusters (ratio estimator, Cochran
    1977, §6.4): se² = w/(w−1) · Σ_w (S_w − ȳ N_w)² / (Σ_w N_w)², from each window's sum S_w and count N_w
    (w ≥ 2; a window's results enter only through them, so a cell can grow by windows without its raw values)."""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    w, total = s.size, float(c.sum())
    if w < 2:
        raise ValueError("the cluster standard error needs at least two windows")
    mean = float(s.sum()) / total
    return math.sqrt(w / (w - 1) * float(((s - mean * c) ** 2).sum())) / total


def cluster_ci(correct_per_window: list[np.ndarray]) -> tuple[float, float]:
    """95% CI of the pooled accuracy: windows as clusters (ratio estimator), floored at the binomial
    standard error; Wilson's interval for a single window."""
    counts = np.array([len(c) for c in correct_per_window], float)
    hits = np.array([c.sum() for c in correct_per_window], float)
    return hits_ci(hits, counts)


def hits_ci(hits, counts) -> tuple[float, float]:
    """:func:`cluster_ci` from each window's hits and predictions."""
    hits, counts = np.asarray(hits, dtype=float), np.asarray(counts, dtype=float)
    n, acc = counts.sum(), hits.sum() / counts.sum()
    if len(counts) < 2:
        z = 1.96
        centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)
    # never narrower than independent predictions would give: with few windows the cluster estimate
    # can come out near zero by chance
    se = max(ratio_se(hits, counts), math.sqrt(acc * (1 - acc) / n))
    return max(0.0, acc - 1.96 * se), min(1.0, acc + 1.96 * se)


def grown_fields(old: dict, new: dict) -> dict:
    """The metric of a cell grown by windows: ``old``'s per-window fields followed by ``new``'s (the later
    windows of the same sequence), the pooled value and its 95% CI computed from them as for a cell measured at
    once (:func:`hits_ci` for 0/1 outcomes, which carry ``window_hits``; the ratio estimator's normal interval
    otherwise). Needs two windows or more in all."""
    counts = list(old["window_counts"]) + list(new["window_counts"])
    means = list(old["window_means"]) + list(new["window_means"])
    out = {"window_counts": counts, "window_means": means}
    c = np.asarray(counts, dtype=np.float64)
    if "window_hits" in new:
        out["window_hits"] = list(old["window_hits"]) + list(new["window_hits"])
        h = np.asarray(out["window_hits"], dtype=np.float64)
        lo, hi = hits_ci(h, c)
        return out | {"value": float(h.sum() / c.sum()), "ci_low": lo, "ci_high": hi}
    sums = np.asarray(means, dtype=np.float64) * c
    mean = float(sums.sum() / c.sum())
    se = ratio_se(sums, c)
    return out | {"value": mean, "ci_low": mean - 1.96 * se, "ci_high": mean + 1.96 * se}


# ---------------------------------------------------------------------------------------------
# Paired differences between two methods measured on the same windows
# ---------------------------------------------------------------------------------------------


def pooled(sums: np.ndarray, counts: np.ndarray) -> float:
    """The pooled mean Σ sums / Σ counts (accuracy: hits / predictions; loss: Σ loss / predictions)."""
    return float(np.sum(sums) / np.sum(counts))


def bootstrap_indices(windows: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """(resamples, windows) window indices drawn with replacement: the clusters of a cluster bootstrap
    (Efron & Tibshirani 1993, ch. 6; Field & Welsh 2007, "Bootstrapping clustered data", JRSS B 69: resample
    whole clusters). Seeded, so every pair of methods of a cell sees the same resamples."""
    rng = np.random.default_rng([seed, windows, 20250115])
    return rng.integers(0, windows, size=(resamples, windows))


def paired_delta(sums_a, sums_b, counts, resamples: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float, float]:
    """Δ = mean_a − mean_b of two methods measured on the same windows, with a percentile cluster-bootstrap CI.

    ``sums_a``, ``sums_b``: per window, the metric summed over its predictions (accuracy: hits; loss: the
    window's mean loss × its count), in window order; ``counts``: predictions per window (the same for both:
    the same masked positions). Pooled means are ratio estimators, Σ_w s_w / Σ_w c_w, so

        Δ = Σ_w (a_w − b_w) / Σ_w c_w,

    and each bootstrap replicate resamples the window indices *once* and applies them to both methods
    (Δ* = Σ_{w ∈ I*} (a_w − b_w) / Σ_{w ∈ I*} c_w): what the two methods share (the windows' difficulty)
    cancels. Two identical methods give Δ = 0 with a zero-width interval. One window gives a zero-width
    interval as well (nothing to resample): callers should require several windows. Returns
    (Δ, low, high)."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (sums_a, sums_b, counts))
    if not (a.shape == b.shape == c.shape) or a.ndim != 1 or a.size == 0:
        raise ValueError(f"per-window sums and counts must be equal-length 1-D lists, got {a.shape}, {b.shape}, "
                         f"{c.shape}")
    if np.any(c <= 0):
        raise ValueError("every window needs at least one prediction")
    diff = a - b
    delta = float(diff.sum() / c.sum())
    idx = bootstrap_indices(a.size, resamples, seed)
    reps = diff[idx].sum(1) / c[idx].sum(1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return delta, float(min(lo, delta)), float(max(hi, delta))


def window_fields(values_per_window, binary: bool = False) -> dict:
    """The per-window fields a record carries so that two methods can be paired later (:func:`paired_delta`):
    ``window_counts`` (predictions per window), ``window_means`` (the metric's mean in each window) and, for
    0/1 outcomes (``binary``), the exact ``window_hits``. In window order; an empty window has mean 0."""
    counts = [int(len(v)) for v in values_per_window]
    out = {"window_counts": counts,
           "window_means": [float(np.mean(v)) if len(v) else 0.0 for v in values_per_window]}
    if binary:
        out["window_hits"] = [int(round(float(np.sum(v)))) for v in values_per_window]
    return out


def windows_for_halfwidth(sums_a, sums_b, counts, target: float, level: float = 0.95) -> int:
    """Windows (of the same size) a paired Δ needs for a CI half-width of ``target``, from the per-window
    variance of the differences: the ratio estimator's variance is Σ_w (d_w − Δ c_w)² / (Σ c)², about
    s_r² / (W c̄²) with s_r² the variance of the residuals d_w − Δ c_w, so W ≈ (z s_r / (c̄ target))²."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (sums_a, sums_b, counts))
    d = a - b
    delta = d.sum() / c.sum()
    resid = d - delta * c
    s2 = float(resid.var(ddof=1)) if a.size > 1 else 0.0
    z = {0.95: 1.959964, 0.9: 1.644854, 0.99: 2.575829}.get(level, 1.959964)
    return max(1, math.ceil(z * z * s2 / (c.mean() ** 2 * target ** 2)))
