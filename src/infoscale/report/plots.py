"""The report's figures: pure readers of the records, one PNG per (protocol, setting), per NLL-by-position run and
per analysis kind."""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from pathlib import Path

from ..ranking import has_temperature, origin
from ..ranking import label as _label
from .records import safe_file_name
from .tables import _bucket_runs, _cells, _spec, protocol_of


def _pyplot():
    """matplotlib's pyplot on the file-only backend (imported when a figure is drawn: reading records needs none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _legend_below(fig, axes, title: str, entry_inches: float) -> None:
    """One legend for all panels under them (each label once), as many columns as the figure is wide at
    ``entry_inches`` an entry, the title above, and the panels laid out in the space left."""
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    width, height = fig.get_size_inches()
    ncol = max(1, min(len(handles), int(width / entry_inches)))
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    # a one-panel figure is narrower than a long title: wrap it to the figure's width (~12 characters an inch)
    lines = textwrap.wrap(title, width=max(20, int(width * 12))) or [title]
    fig.suptitle("\n".join(lines), fontsize=11)
    fig.tight_layout(rect=(0, (0.35 + 0.17 * math.ceil(len(handles) / ncol)) / height, 1,
                           1 - 0.19 * (len(lines) - 1) / height))


def plot_eval(records: list[dict], out: Path) -> list[Path]:
    """One figure per (protocol, setting): a row per metric, a panel per model, a line per method."""
    plt = _pyplot()

    paths = []
    by_setting = defaultdict(list)
    for r in records:
        by_setting[(protocol_of(r), r["setting"])].append(r)
    for (protocol, setting), recs in sorted(by_setting.items()):
        models = list(dict.fromkeys(r["model_name"] for r in recs))
        metrics = list(dict.fromkeys(r["metric"] for r in recs))
        all_methods = list(dict.fromkeys(_label(r) for r in recs))  # one colour per method in every panel
        # distinct colours for up to 40 methods (tab20 alone repeats its first colours from the 21st method on)
        palette = (plt.get_cmap("tab10").colors if len(all_methods) <= 10
                   else plt.get_cmap("tab20").colors + plt.get_cmap("tab20b").colors)
        fig, axes = plt.subplots(len(metrics), len(models), figsize=(4.6 * len(models), 4.25 * len(metrics)),
                                 squeeze=False, sharex=True)
        for j, model in enumerate(models):
            mrecs = [r for r in recs if r["model_name"] == model]
            for a, metric in enumerate(metrics):
                scale = 100 if _spec(metric).percent else 1
                cell = _cells([r for r in mrecs if r["metric"] == metric])
                for m in dict.fromkeys(k[0] for k in cell):
                    i = all_methods.index(m)
                    pts = sorted((n, c) for (mm, n), c in cell.items() if mm == m)
                    xs = [n for n, _ in pts]
                    style = "-" if has_temperature(m) else "--"
                    axes[a, j].plot(xs, [scale * c[0] for _, c in pts], marker="o", ms=3, lw=1.4, ls=style,
                                    color=palette[i % len(palette)], label=m)
                    if all(c[1] is not None for _, c in pts):
                        axes[a, j].fill_between(xs, [scale * c[1] for _, c in pts], [scale * c[2] for _, c in pts],
                                                color=palette[i % len(palette)], alpha=0.12, lw=0)
                if j == 0:
                    axes[a, 0].set_ylabel(metric.replace("_", " ") + (" (%)" if scale == 100 else ""))
            train = mrecs[0].get("train", {})
            axes[0, j].set_title(f"{model}\n{origin(train)}, L={train.get('train_len')}", fontsize=9)
            for ax in axes[:, j]:
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
                L = train.get("train_len")
                if L:
                    ax.axvline(L, color="grey", lw=0.8, ls=":")
            axes[-1, j].set_xlabel("sequence length n (log₂)")
        # an entry such as leaky_rerope+infoscale takes ~1.9 in
        _legend_below(fig, axes, f"{setting} text, {protocol} protocol (solid: with InfoScale; shading: 95% CI)", 1.9)
        slug = protocol.replace("strided (1 in ", "strided").rstrip(")")  # strided64: a file name without spaces
        path = out / safe_file_name(f"{'accuracy' if 'accuracy' in metrics else metrics[0]}_{setting}_{slug}.png")
        paths.append(_save(fig, path))
    return paths


def plot_buckets(records: list[dict], out: Path) -> list[Path]:
    """One figure: a panel per model, NLL against bucket midpoint at the longest length, a line per method."""
    plt = _pyplot()

    by = _bucket_runs(records)
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
    # an entry such as hf_yarn(factor=4.0)+infoscale takes ~2.3 in
    _legend_below(fig, axes, "NLL by position (solid: with a length temperature; above the y limit: off the chart)",
                  2.3)
    return [_save(fig, out / "nll_by_position.png")]


def plot_passkey(records: list[dict], out: Path) -> list[Path]:
    """The needle-in-a-haystack heat map: per model, a panel per method, passkey digits right (%) by needle depth
    (rows) and prompt length (columns), from the records' ``per_depth`` field."""
    plt = _pyplot()

    recs = [r for r in records if r.get("metric") == "passkey_accuracy" and isinstance(r.get("per_depth"), dict)]
    paths = []
    for model in dict.fromkeys(r["model_name"] for r in recs):
        mrecs = [r for r in recs if r["model_name"] == model]
        methods = list(dict.fromkeys(_label(r) for r in mrecs))
        lengths = sorted({r["length"] for r in mrecs})
        depths = sorted({float(d) for r in mrecs for d in r["per_depth"]})
        ncol = min(len(methods), 6)
        nrow = math.ceil(len(methods) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(1.0 + (0.55 * len(lengths) + 0.9) * ncol,
                                                      0.6 + (1.1 + 0.3 * len(depths)) * nrow), squeeze=False,
                                 layout="constrained")
        for ax in axes.flat[len(methods):]:
            ax.axis("off")
        for ax, m in zip(axes.flat, methods, strict=False):  # (more panels than methods: the rest are off)
            grid = [[math.nan] * len(lengths) for _ in depths]
            for r in (r for r in mrecs if _label(r) == m):
                for d, v in r["per_depth"].items():
                    if isinstance(v, (int, float)):
                        grid[depths.index(float(d))][lengths.index(r["length"])] = 100 * v
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(m, fontsize=8)
            ax.set_xlabel("prompt length", fontsize=7)
        for row in axes:
            row[0].set_ylabel("needle depth", fontsize=8)
        fig.colorbar(im, ax=list(axes.flat), fraction=0.02, label="digits right (%)")
        fig.suptitle(f"passkey retrieval: {model}", fontsize=10)
        path = out / safe_file_name(f"passkey_heatmap_{model}.png")
        paths.append(_save(fig, path))
    return paths


MAX_LAYER_PANELS = 8  # more layers than this (a pretrained LLM's 30): one panel per measure with the layer on x


def _analysis_label(key: str, L: int) -> str:
    return {"H": "entropy H (nats)", "H_norm": "H / ln l", "near_share": f"attention on |i−j| ≤ {L // 2}"}[key]


def _analysis_by_length(plt, rs: list[dict], keys: tuple, layers: list, methods: list):
    """A column of panels per layer, the measure against length (log₂), a line per method; the first method at L
    dotted for reference."""
    fig, axes = plt.subplots(len(keys), len(layers), figsize=(3.6 * len(layers) + 0.8, 3.2 * len(keys)),
                             squeeze=False, sharex=True)
    L = rs[0]["train_len"]
    for j, layer in enumerate(layers):
        for a, key in enumerate(keys):
            ax = axes[a, j]
            for i, m in enumerate(methods):
                pts = sorted((r["length"], r[key]) for r in rs if r["method"] == m and r["layer"] == layer)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m,
                        color=plt.get_cmap("tab10")(i))
            ref = [r[key] for r in rs if r["layer"] == layer and r["length"] == L and r["method"] == methods[0]]
            if ref:
                ax.axhline(ref[0], color="grey", lw=0.8, ls=":", label=f"{methods[0]} at L={L}")
            ax.axvline(L, color="grey", lw=0.6, ls="--")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(_analysis_label(key, L))
        axes[0, j].set_title(f"layer {layer}" if len(layers) > 1 else rs[0]["source"], fontsize=9)
        axes[-1, j].set_xlabel("length n (log₂)")
    axes[0, 0].legend(fontsize=7)
    return fig


def _analysis_by_layer(plt, rs: list[dict], keys: tuple, layers: list, methods: list):
    """One panel per measure, the layer on x: a colour per method, a line style per length (a model with many
    layers, where a panel per layer would be unreadable)."""
    lengths = sorted({r["length"] for r in rs})
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(8.0, 0.3 * len(layers) + 3.0), 3.0 * len(keys)),
                             squeeze=False, sharex=True)
    L = rs[0]["train_len"]
    styles = ("-", "--", ":", "-.")
    for a, key in enumerate(keys):
        ax = axes[a, 0]
        for i, m in enumerate(methods):
            for k, n in enumerate(lengths):
                pts = sorted((r["layer"], r[key]) for r in rs if r["method"] == m and r["length"] == n)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2.5, lw=1.0,
                            ls=styles[k % len(styles)], color=plt.get_cmap("tab10")(i),
                            label=f"{m}, n = {n}" + (" (L)" if n == L else ""))
        ax.set_ylabel(_analysis_label(key, L))
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("layer")
    axes[-1, 0].set_xticks(layers[::max(1, len(layers) // 16)])
    axes[0, 0].legend(fontsize=7, ncol=min(len(methods), 3))
    return fig


def plot_analysis(records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()

    paths = []
    for kind, keys in (("entropy", ("H", "H_norm")), ("dilution", ("near_share",))):
        recs = [r for r in records if r["kind"] == kind]
        sources = list(dict.fromkeys(r["source"] for r in recs))
        for src in sources:
            rs = [r for r in recs if r["source"] == src]
            layers = sorted({r["layer"] for r in rs})
            methods = list(dict.fromkeys(r["method"] for r in rs))
            draw = _analysis_by_layer if len(layers) > MAX_LAYER_PANELS else _analysis_by_length
            fig = draw(plt, rs, keys, layers, methods)
            fig.suptitle(f"{kind}: {src}", fontsize=11)
            fig.tight_layout()
            path = out / safe_file_name(f"{kind}_{src}.png")
            paths.append(_save(fig, path))
    recs = [r for r in records if r["kind"] == "cos_window"]
    if recs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        lengths = sorted({r["length"] for r in recs})
        sources = list(dict.fromkeys(r["source"] for r in recs))
        for src, n in dict.fromkeys((r["source"], r["length"]) for r in recs):
            pts = sorted((r["s"], r) for r in recs if r["source"] == src and r["length"] == n)
            kw = dict(marker="os^v"[sources.index(src) % 4], ms=3, label=f"{src}, n={n}",
                      color=plt.get_cmap("viridis")(lengths.index(n) / max(len(lengths) - 1, 1) * 0.9),
                      ls=["-", "--", ":", "-."][sources.index(src) % 4])
            axes[0].plot([p[0] for p in pts], [p[1]["outside_mass"] for p in pts], **kw)
            axes[1].plot([p[0] for p in pts], [p[1]["js"] for p in pts], **kw)
        w = recs[0]["width"]
        axes[0].set_ylabel(f"attention mass outside |i−j| ≤ {w}")
        axes[1].set_ylabel("JS(CosScale ‖ window) (nats)")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("CosScale s (log₂)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle("CosScale approaches windowed attention as s grows", fontsize=11)
        fig.tight_layout()
        path = out / "cos_window.png"
        paths.append(_save(fig, path))
    return paths
