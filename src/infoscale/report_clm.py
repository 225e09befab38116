"""Report pieces for causal runs: NLL by target position (the ``nll[lo,hi)`` records of ``infoscale eval``).

Pure readers of the records, like :mod:`infoscale.report`: per model, a table of NLL per position bucket at the
longest length (rows: methods, columns: buckets [0, L), [L, 2L), …) and a figure of NLL against position
(log₂ axis, one line per method), where a method that breaks beyond L shows a rising line. A bucket's lowest NLL
is bold only when it is separated from the runner-up (:func:`infoscale.ranking.best_by_ci`: the paired 95% CI of
their difference on the same windows excludes 0), the rule of every other report table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .ranking import best_by_ci, bold_rule, has_temperature, origin, provenance
from .ranking import label as _label
from .tasks.metrics import metric_spec

__all__ = ["is_bucket", "bucket_tables", "plot_buckets"]


def is_bucket(rec: dict) -> bool:
    return isinstance(rec.get("bucket"), list) and rec.get("metric", "").startswith("nll[")


def _by_model(records):
    by = defaultdict(list)
    for r in records:
        if is_bucket(r):
            by[r["model_name"]].append(r)
    return by


def bucket_tables(records: list[dict]) -> list[str]:
    """Per model and length (longest first), a table of NLL per position bucket; a run still filling its longest
    length keeps the shorter lengths' tables."""
    lines: list[str] = []
    for model, by_model in _by_model(records).items():
        for n in sorted({r["length"] for r in by_model}, reverse=True):
            lines += _bucket_table(model, n, [r for r in by_model if r["length"] == n])
    return lines


def _bucket_table(model: str, n: int, recs: list[dict]) -> list[str]:
    buckets = sorted({tuple(r["bucket"]) for r in recs})
    methods = list(dict.fromkeys(_label(r) for r in recs))
    cell = {(_label(r), tuple(r["bucket"])): r for r in recs}
    higher = metric_spec("nll").higher
    pick = max if higher else min
    best = {b: pick((cell[m, b]["value"] for m in methods if (m, b) in cell), default=None) for b in buckets}
    if len(methods) < 2:  # nothing to compare with
        best = dict.fromkeys(buckets)
    # the bucket's records alone: all buckets of a length share (length, seed, windows), the key of a cell
    ranked = {b: best_by_ci([r for r in recs if tuple(r["bucket"]) == b], n, higher) for b in buckets}
    for b, r in ranked.items():
        if r is not None:  # paired data: bold only a best separated from the runner-up
            best[b] = cell[r[0], b]["value"] if r[5] else None
    train = recs[0].get("train", {})
    lines = [f"### {model}: next-token NLL by target position at n = {n}", "",
             f"{provenance(train, with_schedule=False)} Mean NLL (nats) of the "
             "tokens whose position falls in each bucket ± 95% CI half-width (windows as clusters); lowest per "
             f"bucket in bold{bold_rule(ranked)}.", "",
             "| method | " + " | ".join(f"[{lo}, {hi})" for lo, hi in buckets) + " |",
             "|---|" + "---:|" * len(buckets)]
    for m in methods:
        row = []
        for b in buckets:
            r = cell.get((m, b))
            if r is None:
                row.append("–")
                continue
            txt = f"{r['value']:.3f} ± {(r['ci_high'] - r['ci_low']) / 2:.3f}"
            row.append(f"**{txt}**" if best[b] is not None and r["value"] == best[b] else txt)
        lines.append(f"| `{m}` | " + " | ".join(row) + " |")
    if any(r is not None for r in ranked.values()):
        lines.append("| *best* (Δ vs runner-up, 95% CI) | " + " | ".join(_best_cell(ranked[b]) for b in buckets)
                     + " |")
    lines.append("")
    return lines


def _best_cell(r) -> str:
    if r is None:
        return "–"
    first, second, d, lo, hi, sig = r
    txt = f"`{first}` vs `{second}`: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"  # as the Δ tables' best row
    return f"**{first}** ({txt})" if sig else f"none ({txt})"


def plot_buckets(records: list[dict], out: Path) -> list[Path]:
    """One figure: a panel per model, NLL against bucket midpoint at the longest length, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by_model(records)
    if not by:
        return []
    methods = list(dict.fromkeys(_label(r) for rs in by.values() for r in rs))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    fig, axes = plt.subplots(1, len(by), figsize=(6.5 * len(by), 5.2), squeeze=False, sharey=True)
    lo_y, hi_y = math.inf, -math.inf
    for j, (model, recs) in enumerate(by.items()):
        n = max(r["length"] for r in recs)
        recs = [r for r in recs if r["length"] == n]
        ax = axes[0, j]
        for m in dict.fromkeys(_label(r) for r in recs):
            pts = sorted((r["bucket"], r) for r in recs if _label(r) == m)
            xs = [math.sqrt(max(b[0], 1) * b[1]) for b, _ in pts]  # geometric midpoint on the log axis
            ys = [r["value"] for _, r in pts]
            lo_y, hi_y = min(lo_y, min(ys)), max(hi_y, max(ys))
            i = methods.index(m)
            ax.plot(xs, ys, marker="o", ms=3, lw=1.4, ls="-" if has_temperature(m) else "--",
                    color=cmap(i % cmap.N), label=m)
        train = recs[0].get("train", {})
        L = train.get("train_len")
        if L:
            ax.axvline(L, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.set_title(f"{model} ({origin(train)}, L={L}), n={n}", fontsize=9)
        ax.set_xlabel("target position (bucket [L·2^k, L·2^(k+1)), log₂)")
    axes[0, 0].set_ylabel("next-token NLL (nats)")
    if math.isfinite(lo_y):  # methods that explode would flatten the others: cap the axis at 2.5× the best
        axes[0, 0].set_ylim(lo_y - 0.1, min(hi_y, 2.5 * lo_y) + 0.1)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    # as many legend columns as the figure is wide (an entry such as hf_yarn(factor=4.0)+infoscale takes ~2.3 in)
    width, height = fig.get_size_inches()
    ncol = max(1, min(len(handles), int(width / 2.3)))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("NLL by position (solid: with a length temperature; above the y limit: off the chart)", fontsize=11)
    fig.tight_layout(rect=(0, (0.35 + 0.17 * math.ceil(len(handles) / ncol)) / height, 1, 1))
    path = out / "nll_by_position.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
