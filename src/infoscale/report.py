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
import re
from collections import defaultdict
from pathlib import Path

from .errors import DataError
from .io import atomic_write_bytes, check_output, iter_records, record_identity
from .ranking import (
    RESAMPLES,
    best_by_ci,
    bold_rule,
    cell_groups,
    has_temperature,
    is_temperature,
    origin,
    paired,
    provenance,
    window_sums,
)
from .ranking import label as _label
from .tasks.metrics import METRICS, Metric, metric_spec

HELP = "markdown tables and PNG plots from result records"


def add_arguments(parser) -> None:
    parser.add_argument("records", nargs="+", help="JSONL record files")
    parser.add_argument("--out", default="report", help="folder for report.md and the PNGs")


def run(args) -> int:
    check_output(args.out, "--out", folder=True)
    records = load_records(args.records)
    if not records:
        raise DataError(f"no records in {' '.join(args.records)}")
    path = write_report(records, args.out)
    print(f"wrote {path}")
    return 0


# The fields each kind of record must have to be drawn: name -> accepted types.
_NUM = (int, float)
REQUIRED = {
    "eval": {"model_name": str, "method": str, "length": int, "setting": str, "protocol": str, "metric": str,
             "value": _NUM},
    "entropy": {"source": str, "method": str, "length": int, "layer": int, "train_len": int, "H": _NUM,
                "H_norm": _NUM},
    "dilution": {"source": str, "method": str, "length": int, "layer": int, "train_len": int, "near_share": _NUM},
    "cos_window": {"source": str, "s": _NUM, "length": int, "width": int, "train_len": int, "outside_mass": _NUM,
                   "js": _NUM},
}


def check_record(rec: dict, where: str) -> None:
    """Refuse a record ``report`` cannot draw, naming its line and the fields at fault."""
    kind = rec.get("kind", "eval")
    if kind not in REQUIRED:
        raise DataError(f"{where}: a record of kind {kind!r}, which report does not draw (kinds: "
                        f"{', '.join(REQUIRED)}); remove that line or give only files written by infoscale")
    bad = [k for k, t in REQUIRED[kind].items()
           if not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)
           or (isinstance(rec.get(k), float) and not math.isfinite(rec[k]))]
    if kind == "eval":
        bad += [k for k in ("ci_low", "ci_high") if rec.get(k) is not None
                and (not isinstance(rec[k], _NUM) or isinstance(rec[k], bool))]
    if bad:
        missing = [k for k in bad if k not in rec]
        wrong = [k for k in bad if k in rec]
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                     f"wrong type or value of {', '.join(wrong)}" if wrong else "") if x)
        raise DataError(f"{where}: incomplete {kind} record ({what}); fix or remove that line")
    problem = _record_problem(rec, kind)
    if problem:
        raise DataError(f"{where}: {problem}; fix or remove that line")


# Names that reach tables and file names: printable, no table or code delimiters, not too long.
SAFE_NAME = re.compile(r"[^\x00-\x1f\x7f|`<>\\]{1,200}")
MAX_LENGTH = 2**40  # sequence lengths, layers, widths: integers in [1, MAX_LENGTH)
MAX_VALUE = 1e15  # a metric's magnitude (beyond it sums and formats overflow)


def _record_problem(rec: dict, kind: str) -> str:
    """What makes a record with the right fields unusable (a value out of range, an unsafe name), or ''."""
    for k in ("model_name", "method", "method_label", "setting", "protocol", "metric", "source"):
        v = rec.get(k)
        if v is not None and (not isinstance(v, str) or not SAFE_NAME.fullmatch(v)):
            return (f"{k} {str(v)[:60]!r} is not a name report can show (at most 200 printable characters, without "
                    "| ` < > \\ or line breaks)")
    for k in ("length", "layer", "train_len", "width"):
        v = rec.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not (0 if k == "layer" else 1) <= v
                              < MAX_LENGTH):
            return f"{k} {str(v)[:40]} is out of range (an integer from {0 if k == 'layer' else 1} to 2**40)"
    for k in ("value", "ci_low", "ci_high", "H", "H_norm", "near_share", "s", "outside_mass", "js"):
        v = rec.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (math.isfinite(v) and abs(v) <= MAX_VALUE):
            return f"{k} = {v:.3g} is not a finite number of magnitude at most {MAX_VALUE:g}"
    metric = rec.get("metric")
    if kind == "eval" and metric not in METRICS and not (_BUCKET.fullmatch(metric) and isinstance(rec.get("bucket"),
                                                                                                    list)):
        # (the metrics every task writes: infoscale.tasks.metrics)
        return f"unknown metric {metric!r} (known: {', '.join(METRICS)}, nll[lo,hi) with a bucket)"
    for k in ("window_means", "window_counts", "window_hits"):
        v = rec.get(k)
        if v is not None and (not isinstance(v, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and abs(x) <= MAX_VALUE
                for x in v)):
            return f"{k} must be a list of finite numbers"
    if rec.get("window_counts") and rec.get("window_hits") is not None \
            and len(rec["window_hits"]) != len(rec["window_counts"]):
        return "window_hits and window_counts differ in length"
    bucket = rec.get("bucket")
    if bucket is not None and (not isinstance(bucket, list) or len(bucket) != 2 or not all(
            isinstance(b, int) and not isinstance(b, bool) and 0 <= b < MAX_LENGTH for b in bucket)):
        return "bucket must be [lo, hi] with integer positions"
    for k in ("train", "protocol_params"):
        if rec.get(k) is not None and not isinstance(rec[k], dict):
            return f"{k} must be a JSON object"
    return ""


_BUCKET = re.compile(r"nll\[\d{1,13},\d{1,13}\)")


def safe_file_name(text: str) -> str:
    """``text`` as one file-name component: letters, digits, ``._-`` (anything else becomes ``_``), never a path."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))[:100].strip("._")
    return name or "_"


def load_records(files) -> list[dict]:
    """The records of ``files``, each checked (one clear error naming file:line), the same record
    given twice (a file named twice) counted once."""
    out, seen = [], set()
    for f in files:
        if not Path(f).exists():
            raise DataError(f"record file {f} does not exist")
        for i, rec in iter_records(f):
            check_record(rec, f"{f}:{i}")
            ident = record_identity(rec)
            if ident not in seen:
                seen.add(ident)
                out.append(rec)
    return out


def distinct_model_names(records: list[dict]) -> list[dict]:
    """Records whose ``model_name`` is shared by different run folders (two folders called ``run``)
    are renamed ``parent/run`` (or the full path if that still clashes), so two models never fall
    into one table."""
    paths: dict[str, set] = defaultdict(set)
    for r in records:
        if "model_name" in r:
            paths[r["model_name"]].add(str(r.get("model", r["model_name"])))
    rename = {}
    for name, ps in paths.items():
        if len(ps) > 1:
            short = {p: f"{Path(p).parent.name}/{Path(p).name}" for p in ps}
            unique = len(set(short.values())) == len(ps)
            rename |= {(name, p): (short[p] if unique else p) for p in ps}
    if not rename:
        return records
    return [r | {"model_name": rename[r["model_name"], str(r.get("model", r["model_name"]))]}
            if (r.get("model_name"), str(r.get("model", r.get("model_name")))) in rename else r for r in records]


def _spec(metric: str) -> Metric:
    """The metric's entry (each task's metrics: :mod:`infoscale.tasks.metrics`): which way is better, shown in %."""
    return metric_spec(metric) or Metric(metric, True, False, "")


def _fmt(metric: str, x: float) -> str:
    return f"{100 * x:.1f}" if _spec(metric).percent else f"{x:.3f}"


def _cells(recs: list[dict]) -> dict:
    """(label, length) -> (value, ci_low, ci_high, count); duplicate cells (two seeds, a rerun at other
    settings) are averaged and counted."""
    acc = defaultdict(list)
    for r in recs:
        acc[(_label(r), r["length"])].append(r)
    out = {}
    for k, rs in acc.items():
        vals = [r["value"] for r in rs]
        lows = [r["ci_low"] for r in rs if r.get("ci_low") is not None]
        highs = [r["ci_high"] for r in rs if r.get("ci_high") is not None]
        out[k] = (sum(vals) / len(vals), min(lows) if lows else None, max(highs) if highs else None, len(rs))
    return out


def protocol_of(rec: dict) -> str:
    """The protocol as tables name it: ``strided`` at eval's default stride (every 8th position masked), else with
    its mask density (``strided (1 in 64)``), so records of two densities never share a table."""
    stride = (rec.get("protocol_params") or {}).get("stride")
    if rec["protocol"] != "strided" or stride in (None, 8):
        return rec["protocol"]
    return f"strided (1 in {stride})"


def eval_tables(records: list[dict]) -> list[str]:
    """Markdown lines: one table per (protocol, setting, model, metric)."""
    lines: list[str] = []
    by = defaultdict(list)
    for r in records:
        by[(protocol_of(r), r["setting"], r["model_name"], r["metric"])].append(r)
    models = list(dict.fromkeys(r["model_name"] for r in records))
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    order = {"strided": 0, "sampled": 1, "exact": 2}
    for (protocol, setting, model, metric), recs in sorted(
            by.items(), key=lambda kv: (order.get(kv[0][0].split()[0], 3), kv[0][0], kv[0][1], models.index(kv[0][2]),
                                        metrics.index(kv[0][3]))):
        higher, pct = _spec(metric).higher, _spec(metric).percent
        lengths = sorted({r["length"] for r in recs})
        methods = list(dict.fromkeys(_label(r) for r in recs))
        cell = _cells(recs)
        pick = max if higher else min
        best = {n: pick((cell[m, n][0] for m in methods if (m, n) in cell), default=None) for n in lengths}
        ranked = {n: best_by_ci(recs, n, higher) for n in lengths}  # None where records lack per-window fields
        for n in lengths:  # a length measured for one method only has nothing to be best against
            if sum((m, n) in cell for m in methods) < 2:
                best[n] = None
        for n, r in ranked.items():
            if r is not None:  # paired data: bold only a best whose CI against the runner-up excludes 0
                best[n] = cell[r[0], n][0] if r[5] else None
        train = recs[0].get("train", {})
        dup = any(c[3] > 1 for c in cell.values())
        lines += [f"### {model}: {setting}, {protocol} protocol, {metric}",
                  "",
                  f"{provenance(train)} "
                  f"{metric.replace('_', ' ').capitalize()}{' (%)' if pct else ''}"
                  f"{' ± 95% CI half-width' if any(c[1] is not None for c in cell.values()) else ''}; best per "
                  f"length in bold{bold_rule(ranked)}{'; † = mean of several records' if dup else ''}.",
                  "",
                  "| method | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for m in methods:
            row = []
            for n in lengths:
                c = cell.get((m, n))
                if c is None:
                    row.append("–")
                    continue
                value, lo, hi, count = c
                txt = _fmt(metric, value)
                if lo is not None and hi is not None:
                    txt += f" ± {_fmt(metric, (hi - lo) / 2)}"
                if count > 1:
                    txt += "†"
                row.append(f"**{txt}**" if best[n] is not None and value == best[n] else txt)
            lines.append(f"| `{m}` | " + " | ".join(row) + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# paired differences (from the per-window fields of the records; the pairing itself: infoscale.ranking)
# ---------------------------------------------------------------------------------------------


def _strip_temperature(label: str):
    """(the label without its length temperature term, that term), or None."""
    terms = label.split("+")
    temps = [t for t in terms if is_temperature(t)]
    if len(temps) != 1 or len(terms) < 2:
        return None
    rest = [t for t in terms if t is not temps[0]]
    return "+".join(rest), temps[0]


FEW_WINDOWS = 5  # fewer clusters than this: a cluster bootstrap's CI is not to be trusted (said under the table)


def _is_ecosystem_reference(label: str) -> bool:
    """A method that is only the model's own rotary reconfigured (a registry entry with ``rope_parameters``)."""
    from .attn import MethodError, parse_method

    try:
        pm = parse_method(label)
    except MethodError:  # a label of an older record that no longer parses is no reference
        return False
    return len(pm.components) == 1 and pm.components[0].method.rope_parameters is not None


def delta_pairs(labels: list[str], base: str = "softmax") -> list[tuple[str, str]]:
    """(method, reference) rows of a Δ table: every method against the model's plain method, each position
    method X + a length temperature against X alone, and a parametrised temperature against the plain one."""
    have = set(labels)
    rows = [(m, base) for m in labels if m != base and base in have]
    # the ecosystem's own position method alone (transformers' rope types, e.g. hf_yarn) is a second reference:
    # the method a user would otherwise configure
    for ref in (m for m in labels if _is_ecosystem_reference(m)):
        rows += [(m, ref) for m in labels if m not in (ref, base)]
    for m in labels:
        s = _strip_temperature(m)
        if s and s[0] in have and s[0] != base:
            rows.append((m, s[0]))
        # a parametrised temperature against the default one
        temp = s[1] if s else (m if "+" not in m and is_temperature(m) else None)
        if temp is not None and "(" in temp and m.replace(temp, temp.split("(")[0]) in have:
            rows.append((m, m.replace(temp, temp.split("(")[0])))
    return list(dict.fromkeys(rows))


def delta_tables(records: list[dict]) -> list[str]:
    """Markdown lines: per (protocol, setting, model, metric) the paired Δ of each method to its reference on
    the same windows, with a cluster-bootstrap 95% CI, and the best method per length where it is
    distinguishable from the runner-up."""
    by = defaultdict(list)
    for r in records:
        by[(protocol_of(r), r["setting"], r["model_name"], r["metric"])].append(r)
    lines: list[str] = ["### Paired differences", "",
                        f"Δ = method − reference on the identical windows and masked positions, 95% CI from a cluster "
                        f"bootstrap over windows ({RESAMPLES} resamples, the same window indices for both methods). "
                        "Reference: the model's plain method (`softmax`: its training method alone), for X + a "
                        "length temperature X alone, and transformers' own rope type alone (`hf_yarn`, …) where it "
                        "was measured. Accuracy in points, loss and NLL in nats. *Best*: the top "
                        "method where its Δ against the runner-up excludes 0. – : not measured, or a single window "
                        "(no CI).", ""]
    missing = []
    models = list(dict.fromkeys(r["model_name"] for r in records))
    for (protocol, setting, model, metric), recs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                       models.index(kv[0][2]),
                                                                                       kv[0][3])):
        higher, pct = _spec(metric).higher, _spec(metric).percent
        groups = cell_groups(recs)
        if not groups:
            missing.append(f"{model} ({setting}, {protocol}, {metric})")
            continue
        lengths = sorted(groups)
        labels = list(dict.fromkeys(_label(r) for r in recs if window_sums(r) is not None))
        rows = delta_pairs(labels)
        if not rows:
            continue
        scale = 100 if pct else 1
        lines += [f"#### {model}: {setting}, {protocol} protocol, Δ {metric}", "",
                  "| method − reference | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for m, ref in rows:
            cells = []
            for n in lengths:
                g = groups[n]
                d = paired(g[m], g[ref]) if m in g and ref in g else None
                if d is None:
                    cells.append("–")
                    continue
                half = max(d[0] - d[1], d[2] - d[0])
                txt = f"{scale * d[0]:+.{1 if pct else 3}f} ± {scale * half:.{1 if pct else 3}f}"
                cells.append(f"**{txt}**" if d[1] > 0 or d[2] < 0 else txt)
            lines.append(f"| `{m}` − `{ref}` | " + " | ".join(cells) + " |")
        best = []
        for n in lengths:
            r = best_by_ci(recs, n, higher)
            if r is None:
                best.append("–")
                continue
            first, second, d, lo, hi, sig = r
            p = 1 if pct else 3
            txt = f"`{first}` vs `{second}`: {scale * d:+.{p}f} [{scale * lo:+.{p}f}, {scale * hi:+.{p}f}]"
            best.append(f"**{first}** ({txt})" if sig else f"none ({txt})")
        lines += ["| *best* (vs runner-up) | " + " | ".join(best) + " |", "",
                  "Bold Δ: the CI excludes 0.", ""]
        # cells with a CI (2 windows or more; one window shows "–")
        counts = [len(ws[1]) for ws in (window_sums(r) for r in recs) if ws is not None and len(ws[1]) >= 2]
        if counts and min(counts) < FEW_WINDOWS:
            lines += [f"Only {min(counts)} windows per cell here: a bootstrap over so few windows understates the "
                      f"uncertainty (its CI spans little more than the windows' own Δs); read these Δs as "
                      f"indications, not as separated results ({FEW_WINDOWS} or more windows for that).", ""]
    if missing:
        lines += [f"No paired Δ for {', '.join(missing)}: those records have no per-window results (written before "
                  "`infoscale eval` stored them); rerun the evaluation into a new file to get them.", ""]
    return lines


def protocol_comparison(records: list[dict]) -> list[str]:
    """Cells measured with more than one protocol: their values side by side (accuracy only)."""
    by = defaultdict(dict)
    for r in records:
        if r["metric"] == "accuracy":
            by[(r["model_name"], _label(r), r["setting"], r["length"])][r["protocol"]] = r
    rows = [(k, v) for k, v in sorted(by.items()) if len(v) > 1]
    if not rows:
        return []
    protos = sorted({p for _, v in rows for p in v})
    lines = ["### Protocols compared", "",
             "The same cells measured with different protocols (accuracy %, predictions in brackets).", "",
             "| model | method | setting | n | " + " | ".join(protos) + " | max difference |",
             "|---|---|---|---:|" + "---:|" * (len(protos) + 1)]
    for (model, method, setting, n), v in rows:
        vals = [v[p]["value"] for p in protos if p in v]
        cells = [f"{_fmt('accuracy', v[p]['value'])} ({v[p].get('n_predictions')})" if p in v else "–"
                 for p in protos]
        lines.append(f"| {model} | `{method}` | {setting} | {n} | " + " | ".join(cells)
                     + f" | {_fmt('accuracy', max(vals) - min(vals))} |")
    lines.append("")
    return lines


def plot_eval(records: list[dict], out: Path) -> list[Path]:
    """One figure per (protocol, setting): a row per metric, a panel per model, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        handles = {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(lab, h)
        # as many legend columns as the figure is wide (an entry such as leaky_rerope+infoscale takes ~1.9 in)
        width, height = fig.get_size_inches()
        ncol = max(1, min(len(handles), int(width / 1.9)))
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.suptitle(f"{setting} text, {protocol} protocol (solid: with InfoScale; shading: 95% CI)", fontsize=11)
        fig.tight_layout(rect=(0, (0.35 + 0.17 * math.ceil(len(handles) / ncol)) / height, 1, 1))
        slug = protocol.replace("strided (1 in ", "strided").rstrip(")")  # strided64: a file name without spaces
        path = out / safe_file_name(f"{'accuracy' if 'accuracy' in metrics else metrics[0]}_{setting}_{slug}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(records: list[dict], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = distinct_model_names(records)
    evals = [r for r in records if r.get("kind", "eval") == "eval" and "metric" in r]
    analyses = [r for r in records if r.get("kind") in ("entropy", "dilution", "cos_window")]
    lines = ["# infoscale report", ""]
    from .report_clm import bucket_tables, is_bucket, plot_buckets  # causal runs: NLL by position

    buckets, evals = [r for r in evals if is_bucket(r)], [r for r in evals if not is_bucket(r)]
    if buckets:
        lines += ["## NLL by position", ""] + bucket_tables(buckets)
        lines += [f"![{p.stem}]({p.name})\n" for p in plot_buckets(buckets, out)]
    if evals:
        lines += ["## Extrapolation", ""] + eval_tables(evals) + delta_tables(evals) + protocol_comparison(evals)
        for p in plot_eval(evals, out):
            lines += [f"![{p.stem}]({p.name})", ""]
    if analyses:
        lines += ["## Attention analysis", ""] + analysis_tables(analyses)
        for p in plot_analysis(analyses, out):
            lines += [f"![{p.stem}]({p.name})", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


def analysis_tables(records: list[dict]) -> list[str]:
    """Markdown lines: per source (a model or synthetic q, k), the entropy and dilution records as one table,
    rows methods, columns lengths, cells H / ln l and the near share, each the mean over layers."""
    lines: list[str] = []
    ent = [r for r in records if r["kind"] in ("entropy", "dilution")]
    for src in dict.fromkeys(r["source"] for r in ent):
        rs = [r for r in ent if r["source"] == src]
        lengths = sorted({r["length"] for r in rs})
        methods = list(dict.fromkeys(r["method"] for r in rs))
        cell = defaultdict(list)
        for r in rs:
            key = "H_norm" if r["kind"] == "entropy" else "near_share"
            cell[r["method"], r["length"], key].append(r[key])
        L, layers = rs[0]["train_len"], len({r["layer"] for r in rs})
        lines += [f"### Attention of {src}: H / ln l and near share", "",
                  f"Mean over {layers} layer{'s' if layers > 1 else ''} (and heads, query rows, windows) of the "
                  f"normalised entropy H / ln l (1: uniform over the l keys a query attends, 0: one key) and, after "
                  f"the slash, the share of attention on keys within |i − j| ≤ {L // 2} (L/2, L = {L}), in %.", "",
                  "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for m in methods:
            row = []
            for n in lengths:
                h, near = cell.get((m, n, "H_norm")), cell.get((m, n, "near_share"))
                row.append(" / ".join(x for x in (f"{sum(h) / len(h):.3f}" if h else "",
                                                  f"{100 * sum(near) / len(near):.1f}" if near else "") if x) or "–")
            lines.append(f"| `{m}` | " + " | ".join(row) + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# plots (pure readers of the records)
# ---------------------------------------------------------------------------------------------


def plot_analysis(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for kind, keys in (("entropy", ("H", "H_norm")), ("dilution", ("near_share",))):
        recs = [r for r in records if r["kind"] == kind]
        sources = list(dict.fromkeys(r["source"] for r in recs))
        for src in sources:
            rs = [r for r in recs if r["source"] == src]
            layers = sorted({r["layer"] for r in rs})
            fig, axes = plt.subplots(len(keys), len(layers), figsize=(3.6 * len(layers) + 0.8, 3.2 * len(keys)),
                                     squeeze=False, sharex=True)
            methods = list(dict.fromkeys(r["method"] for r in rs))
            for j, layer in enumerate(layers):
                for a, key in enumerate(keys):
                    ax = axes[a, j]
                    for i, m in enumerate(methods):
                        pts = sorted((r["length"], r[key]) for r in rs if r["method"] == m and r["layer"] == layer)
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m,
                                color=plt.get_cmap("tab10")(i))
                    L = rs[0]["train_len"]
                    ref = [r[key] for r in rs if r["layer"] == layer and r["length"] == L and r["method"] == methods[0]]
                    if ref:
                        ax.axhline(ref[0], color="grey", lw=0.8, ls=":", label=f"{methods[0]} at L={L}")
                    ax.axvline(L, color="grey", lw=0.6, ls="--")
                    ax.set_xscale("log", base=2)
                    ax.grid(alpha=0.3)
                    if j == 0:
                        ax.set_ylabel({"H": "entropy H (nats)", "H_norm": "H / ln l",
                                       "near_share": f"attention on |i−j| ≤ {L // 2}"}[key])
                axes[0, j].set_title(f"layer {layer}" if len(layers) > 1 else src, fontsize=9)
                axes[-1, j].set_xlabel("length n (log₂)")
            axes[0, 0].legend(fontsize=7)
            fig.suptitle(f"{kind}: {src}", fontsize=11)
            fig.tight_layout()
            path = out / safe_file_name(f"{kind}_{src}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
