"""``infoscale report``: markdown tables and PNG plots, computed from result records only.

Evaluation records (from ``infoscale eval``) become, per protocol and setting, one table per model
(rows: methods, columns: lengths, accuracy ± 95% CI half-width, best per column in bold) and one
figure per setting (accuracy and loss against length on a log₂ axis, one line per method, one panel
per model). Where the same cells were measured with two protocols, a table compares them. Analysis
records (from ``infoscale analyze``, ``kind`` = "entropy" | "dilution" | "cos_window") get their own
plots. Nothing here computes a metric: it only reads, groups and draws.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .evaluate import read_records
from .train import atomic_write_bytes

HELP = "markdown tables and PNG plots from result records"


def add_arguments(parser) -> None:
    parser.add_argument("records", nargs="+", help="JSONL record files")
    parser.add_argument("--out", default="report", help="folder for report.md and the PNGs")


def run(args) -> int:
    records = [r for f in args.records for r in read_records(f)]
    if not records:
        from .data import DataError

        raise DataError(f"no records in {' '.join(args.records)}")
    path = write_report(records, args.out)
    print(f"wrote {path}")
    return 0


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _label(rec: dict) -> str:
    return rec["method"]


def eval_tables(records: list[dict]) -> list[str]:
    """Markdown lines: one table per (protocol, setting, model)."""
    lines: list[str] = []
    by = defaultdict(list)
    for r in records:
        by[(r["protocol"], r["setting"], r["model_name"])].append(r)
    models = list(dict.fromkeys(r["model_name"] for r in records))
    order = {"strided": 0, "sampled": 1, "exact": 2}
    for (protocol, setting, model), recs in sorted(by.items(), key=lambda kv: (order.get(kv[0][0], 3), kv[0][1],
                                                                                models.index(kv[0][2]))):
        lengths = sorted({r["length"] for r in recs})
        methods = list(dict.fromkeys(_label(r) for r in recs))
        cell = {(_label(r), r["length"]): r for r in recs}
        best = {n: max((cell[m, n]["accuracy"] for m in methods if (m, n) in cell), default=None) for n in lengths}
        train = recs[0]["train"]
        lines += [f"### {model}: {setting}, {protocol} protocol",
                  "",
                  f"Trained with `{train.get('attention')}` at L = {train.get('train_len')} on {train.get('corpus')} "
                  f"({train.get('steps')} steps). Masked-token accuracy (%) ± 95% CI half-width; best per length in "
                  "bold.",
                  "",
                  "| method | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for m in methods:
            row = []
            for n in lengths:
                r = cell.get((m, n))
                if r is None:
                    row.append("–")
                    continue
                half = (r["ci_high"] - r["ci_low"]) / 2
                txt = f"{_fmt_pct(r['accuracy'])} ± {_fmt_pct(half)}"
                row.append(f"**{txt}**" if best[n] is not None and r["accuracy"] >= best[n] - 1e-12 else txt)
            lines.append(f"| `{m}` | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def protocol_comparison(records: list[dict]) -> list[str]:
    """Cells measured with more than one protocol: their accuracies side by side."""
    by = defaultdict(dict)
    for r in records:
        by[(r["model_name"], r["method"], r["setting"], r["length"])][r["protocol"]] = r
    rows = [(k, v) for k, v in sorted(by.items()) if len(v) > 1]
    if not rows:
        return []
    protos = sorted({p for _, v in rows for p in v})
    lines = ["### Protocols compared", "",
             "The same cells measured with different protocols (accuracy %, predictions in brackets).", "",
             "| model | method | setting | n | " + " | ".join(protos) + " | max difference |",
             "|---|---|---|---:|" + "---:|" * (len(protos) + 1)]
    for (model, method, setting, n), v in rows:
        accs = [v[p]["accuracy"] for p in protos if p in v]
        cells = [f"{_fmt_pct(v[p]['accuracy'])} ({v[p]['n_predictions']})" if p in v else "–" for p in protos]
        lines.append(f"| {model} | `{method}` | {setting} | {n} | " + " | ".join(cells)
                     + f" | {_fmt_pct(max(accs) - min(accs))} |")
    lines.append("")
    return lines


def plot_eval(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    by_setting = defaultdict(list)
    for r in records:
        by_setting[(r["protocol"], r["setting"])].append(r)
    for (protocol, setting), recs in sorted(by_setting.items()):
        models = list(dict.fromkeys(r["model_name"] for r in recs))
        all_methods = list(dict.fromkeys(_label(r) for r in recs))  # one colour per method in every panel
        cmap = plt.get_cmap("tab20" if len(all_methods) > 10 else "tab10")
        fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 8.5), squeeze=False, sharex=True)
        for j, model in enumerate(models):
            mrecs = [r for r in recs if r["model_name"] == model]
            methods = list(dict.fromkeys(_label(r) for r in mrecs))
            for m in methods:
                i = all_methods.index(m)
                pts = sorted((r["length"], r) for r in mrecs if _label(r) == m)
                xs = [n for n, _ in pts]
                style = "-" if "infoscale" in m else "--"
                kw = dict(marker="o", ms=3, lw=1.4, ls=style, color=cmap(i % cmap.N), label=m)
                axes[0, j].plot(xs, [100 * r["accuracy"] for _, r in pts], **kw)
                axes[0, j].fill_between(xs, [100 * r["ci_low"] for _, r in pts], [100 * r["ci_high"] for _, r in pts],
                                        color=cmap(i % cmap.N), alpha=0.12, lw=0)
                axes[1, j].plot(xs, [r["loss"] for _, r in pts], **kw)
            train = mrecs[0]["train"]
            axes[0, j].set_title(f"{model}\ntrained: {train.get('attention')}, L={train.get('train_len')}", fontsize=9)
            for ax in axes[:, j]:
                ax.set_xscale("log", base=2)
                ax.grid(alpha=0.3)
                L = train.get("train_len")
                if L:
                    ax.axvline(L, color="grey", lw=0.8, ls=":")
            axes[1, j].set_xlabel("sequence length n (log₂)")
        axes[0, 0].set_ylabel("masked-token accuracy (%)")
        axes[1, 0].set_ylabel("cross-entropy")
        handles = {}
        for ax in axes[0]:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 7), fontsize=8,
                   frameon=False)
        fig.suptitle(f"{setting} text, {protocol} protocol (solid: with InfoScale; shading: 95% CI)", fontsize=11)
        fig.tight_layout(rect=(0, 0.04 + 0.022 * math.ceil(len(handles) / 7), 1, 1))
        path = out / f"accuracy_{setting}_{protocol}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(records: list[dict], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    evals = [r for r in records if r.get("kind", "eval") == "eval" and "accuracy" in r]
    analyses = [r for r in records if r.get("kind") in ("entropy", "dilution", "cos_window")]
    lines = ["# infoscale report", ""]
    if evals:
        lines += ["## Extrapolation", ""] + eval_tables(evals) + protocol_comparison(evals)
        for p in plot_eval(evals, out):
            lines += [f"![{p.stem}]({p.name})", ""]
    if analyses:
        from .analysis import plot_analysis

        lines += ["## Attention analysis", ""]
        for p in plot_analysis(analyses, out):
            lines += [f"![{p.stem}]({p.name})", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path

