"""The report's tables, computed from records only: per (protocol, setting, model, metric) the values by length,
the NLL of a causal model by position bucket, the paired differences, protocols compared, the attention analysis.
Which way a metric is better and how it is shown comes from its spec (:mod:`infoscale.tasks.metrics`); a best is
bold only where it is separated from the runner-up (:mod:`infoscale.ranking`)."""

from __future__ import annotations

from collections import defaultdict

from ..ranking import (
    RESAMPLES,
    best_by_ci,
    bold_rule,
    cell_groups,
    grows_by_windows,
    is_temperature,
    paired,
    provenance,
    shared_windows,
    single_window_delta,
    window_sums,
)
from ..ranking import label as _label
from ..tasks.metrics import Metric, metric_spec


def _spec(metric: str) -> Metric:
    """The metric's entry (each task's metrics: :mod:`infoscale.tasks.metrics`): which way is better, shown in %."""
    return metric_spec(metric) or Metric(metric, True, False, "")


def _fmt(metric: str, x: float) -> str:
    return f"{100 * x:.1f}" if _spec(metric).percent else f"{x:.3f}"


def _length(rec: dict) -> int:
    return rec["length"]


def _cells(recs: list[dict], column=_length) -> dict:
    """(label, column) -> (value, ci_low, ci_high, count), the column a record's length unless ``column`` says
    otherwise; duplicate cells (two seeds, a rerun at other settings) are averaged and counted."""
    acc = defaultdict(list)
    for r in recs:
        acc[(_label(r), column(r))].append(r)
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


def _metric_table(recs: list[dict], metric: str, column=_length, header=str, best_row: bool = False):
    """The table of one metric's records, as every report table draws it: a row per method, a column per distinct
    ``column(record)`` (a length, a position bucket), each cell the value ± its 95% CI half-width (several records
    of one cell: their mean, marked †). The best per column is bold; where the records carry per-window results,
    only when its paired 95% CI against the runner-up excludes 0 (:func:`infoscale.ranking.best_by_ci`), and
    ``best_row`` adds that comparison under the table. Returns (markdown lines, ranking per column, any †)."""
    higher = _spec(metric).higher
    columns = sorted({column(r) for r in recs})
    methods = list(dict.fromkeys(_label(r) for r in recs))
    cell = _cells(recs, column)
    pick = max if higher else min
    best = {c: pick((cell[m, c][0] for m in methods if (m, c) in cell), default=None) for c in columns}
    for c in columns:  # a column measured for one method only has nothing to be best against
        if sum((m, c) in cell for m in methods) < 2:
            best[c] = None
    # a column's records alone: within one, all records share (length, seed, windows), the key of a cell
    ranked = {}
    for c in columns:
        col = [r for r in recs if column(r) == c]
        ranked[c] = best_by_ci(col, col[0]["length"], higher)  # None where records lack per-window fields
        if ranked[c] is not None:  # paired data: bold only a best separated from the runner-up
            best[c] = cell[ranked[c][0], c][0] if ranked[c][5] else None
    # a causal cell still growing by windows has fewer than the others in its column: its mean is over other text
    windows = defaultdict(int)
    for r in recs:
        if grows_by_windows(r) and window_sums(r) is not None:
            windows[_label(r), column(r)] = max(windows[_label(r), column(r)], len(window_sums(r)[1]))
    most = {c: max((w for (_, cc), w in windows.items() if cc == c), default=0) for c in columns}
    fewer = False
    lines = ["| method | " + " | ".join(header(c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for m in methods:
        row = []
        for c in columns:
            if (m, c) not in cell:
                row.append("–")
                continue
            value, lo, hi, count = cell[m, c]
            txt = _fmt(metric, value)
            if lo is not None and hi is not None:
                txt += f" ± {_fmt(metric, (hi - lo) / 2)}"
            if count > 1:
                txt += "†"
            txt = f"**{txt}**" if best[c] is not None and value == best[c] else txt
            if 0 < windows[m, c] < most[c]:
                txt += f" ({windows[m, c]} of {most[c]} windows)"
                fewer = True
            row.append(txt)
        lines.append(f"| `{m}` | " + " | ".join(row) + " |")
    if best_row and any(r is not None for r in ranked.values()):
        lines.append("| *best* (Δ vs runner-up, 95% CI) | " + " | ".join(_best_cell(ranked[c], metric) for c in columns)
                     + " |")
    if fewer:
        lines += ["", "*(k of n windows)*: a cell measured on fewer windows than its column's others (a sweep still "
                      "growing its cells): its mean is over less text, so compare it with the others through the Δ "
                      "tables, which pair cells on the windows both measured."]
    return lines, ranked, any(c[3] > 1 for c in cell.values())


def _best_cell(r, metric: str) -> str:
    """A ranking of :func:`infoscale.ranking.best_by_ci` as a table cell: the best in bold if separated."""
    if r is None:
        return "–"
    first, second, d, lo, hi, sig = r
    scale, p = (100, 1) if _spec(metric).percent else (1, 3)
    txt = f"`{first}` vs `{second}`: {scale * d:+.{p}f} [{scale * lo:+.{p}f}, {scale * hi:+.{p}f}]"
    return f"**{first}** ({txt})" if sig else f"none ({txt})"


def eval_tables(records: list[dict]) -> list[str]:
    """Markdown lines: one table per (protocol, setting, model, metric), a column per length."""
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
        table, ranked, dup = _metric_table(recs, metric)
        pct = _spec(metric).percent
        with_ci = any(r.get("ci_low") is not None for r in recs)
        lines += [f"### {model}: {setting}, {protocol} protocol, {metric}",
                  "",
                  f"{provenance(recs[0].get('train', {}))} "
                  f"{metric.replace('_', ' ').capitalize()}{' (%)' if pct else ''}"
                  f"{' ± 95% CI half-width' if with_ci else ''}; best per "
                  f"length in bold{bold_rule(ranked)}{'; † = mean of several records' if dup else ''}.",
                  "", *table, ""]
    return lines


# NLL by target position: the ``nll[lo,hi)`` records of a causal model's contiguous windows (one per bucket
# [0, L), [L, 2L), …), a table per model and length.

def is_bucket(rec: dict) -> bool:
    return isinstance(rec.get("bucket"), list) and rec.get("metric", "").startswith("nll[")


def _bucket_runs(records: list[dict]) -> dict:
    """model name -> its NLL-by-position records."""
    by = defaultdict(list)
    for r in records:
        if is_bucket(r):
            by[r["model_name"]].append(r)
    return by


def bucket_tables(records: list[dict]) -> list[str]:
    """Per model and length (longest first), a table of NLL per position bucket (rows: methods, columns: buckets),
    where a method that breaks beyond L shows a rising row; a run still filling its longest length keeps the
    shorter lengths' tables."""
    lines: list[str] = []
    for model, by_model in _bucket_runs(records).items():
        for n in sorted({r["length"] for r in by_model}, reverse=True):
            recs = [r for r in by_model if r["length"] == n]
            table, ranked, dup = _metric_table(recs, "nll", column=lambda r: tuple(r["bucket"]),
                                               header=lambda b: f"[{b[0]}, {b[1]})", best_row=True)
            lines += [f"### {model}: next-token NLL by target position at n = {n}", "",
                      f"{provenance(recs[0].get('train', {}), with_schedule=False)} Mean NLL (nats) of the "
                      "tokens whose position falls in each bucket ± 95% CI half-width (windows as clusters); lowest "
                      f"per bucket in bold{bold_rule(ranked)}{'; † = mean of several records' if dup else ''}.", "",
                      *table, ""]
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
    from ..attn import MethodError, parse_method

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


def _metric_order(metric: str) -> tuple:
    """Metrics by name, a metric's position buckets ``nll[lo,hi)`` by where they start."""
    name, _, rest = metric.partition("[")
    return name, int(rest.split(",")[0]) if rest else -1


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
                        "method where its Δ against the runner-up excludes 0. – : not measured; *(1 window)*: the Δ on "
                        "a single window, with no CI; *(first k windows)*: two causal cells of different window counts "
                        "compared on the windows both measured.", ""]
    missing = []
    models = list(dict.fromkeys(r["model_name"] for r in records))
    for (protocol, setting, model, metric), recs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                       models.index(kv[0][2]),
                                                                                       _metric_order(kv[0][3]))):
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
                if d is None:  # one window: its Δ, without a CI
                    one = single_window_delta(g[m], g[ref]) if m in g and ref in g else None
                    cells.append("–" if one is None else f"{scale * one:+.{1 if pct else 3}f} (1 window)")
                    continue
                half = max(d[0] - d[1], d[2] - d[0])
                txt = f"{scale * d[0]:+.{1 if pct else 3}f} ± {scale * half:.{1 if pct else 3}f}"
                txt = f"**{txt}**" if d[1] > 0 or d[2] < 0 else txt
                shared = len(shared_windows(g[m], g[ref])[2])
                if shared < max(len(window_sums(g[m])[1]), len(window_sums(g[ref])[1])):
                    txt += f" (first {shared} windows)"
                cells.append(txt)
            lines.append(f"| `{m}` − `{ref}` | " + " | ".join(cells) + " |")
        best = [_best_cell(best_by_ci(recs, n, higher), metric) for n in lengths]
        lines += ["| *best* (vs runner-up) | " + " | ".join(best) + " |", "",
                  "Bold Δ: the CI excludes 0.", ""]
        lines += precision_note(recs)
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


def precision_note(recs: list[dict]) -> list[str]:
    """A line naming the methods per precision at each length where the cells were measured at different ones (a
    sweep resumed on a machine without bf16, say): a paired Δ between two such cells holds the precision's own
    effect as well as the methods'."""
    by_length: dict = defaultdict(lambda: defaultdict(set))
    for r in recs:
        if isinstance(r.get("precision"), str):
            by_length[r["length"]][r["precision"]].add(_label(r))
    parts = [f"{n}: " + "; ".join(f"{p} {', '.join(f'`{m}`' for m in sorted(ms))}" for p, ms in sorted(ps.items()))
             for n, ps in sorted(by_length.items()) if len(ps) > 1]
    if not parts:
        return []
    return [f"Measured at different precisions ({' | '.join(parts)}): a Δ between cells of two precisions includes "
            "the precision's own effect.", ""]


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

