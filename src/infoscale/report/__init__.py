"""``infoscale report``: markdown tables and PNG plots, computed from result records only.

Evaluation records (from ``infoscale eval``) become, per protocol and setting, one table per model
(rows: methods, columns: lengths, value ± 95% CI half-width, best per column in bold), the paired
differences, and one figure per setting (the metric against length on a log₂ axis, one line per method,
one panel per model); a causal model's NLL by position bucket gets a table per length and a figure.
Where the same cells were measured with two protocols, a table compares them; a cell measured with more windows
(grown from a smaller one or anew) replaces the smaller one. Analysis records (from
``infoscale analyze``, ``kind`` = "entropy" | "dilution" | "cos_window") get their own tables and plots.
Nothing here computes a metric: it only reads, groups and draws. Every task's records go through the same
tables, ranked and formatted by each metric's spec (:mod:`infoscale.tasks.metrics`).

- :mod:`.records`: reading and checking the records users hand us;
- :mod:`.tables`: the markdown tables; :mod:`.plots`: the figures.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_bytes, check_output, latest_cells
from .plots import plot_analysis, plot_buckets, plot_eval, plot_passkey
from .records import check_record, distinct_model_names, load_records, safe_file_name
from .tables import (
    analysis_tables,
    bucket_tables,
    delta_pairs,
    delta_tables,
    eval_tables,
    is_bucket,
    protocol_comparison,
)

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


def write_report(records: list[dict], out_dir: str | Path) -> Path:
    """``report.md`` and its PNGs in ``out_dir`` from ``records`` (any mix of tasks and kinds). A cell the records
    also hold with more windows is shown with the most only, in the place of the first
    (:func:`infoscale.io.latest_cells`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = distinct_model_names(latest_cells(records))
    evals = [r for r in records if r.get("kind", "eval") == "eval" and "metric" in r]
    analyses = [r for r in records if r.get("kind") in ("entropy", "dilution", "cos_window")]
    lines = ["# infoscale report", ""]
    buckets, evals = [r for r in evals if is_bucket(r)], [r for r in evals if not is_bucket(r)]
    if buckets:
        lines += ["## NLL by position", ""] + bucket_tables(buckets)
        lines += [f"![{p.stem}]({p.name})\n" for p in plot_buckets(buckets, out)]
        lines += delta_tables(buckets)  # per bucket: beyond L is where the methods differ
    if evals:
        lines += ["## Extrapolation", ""] + eval_tables(evals) + delta_tables(evals) + protocol_comparison(evals)
        for p in plot_eval(evals, out) + plot_passkey(evals, out):
            lines += [f"![{p.stem}]({p.name})", ""]
    if analyses:
        lines += ["## Attention analysis", ""] + analysis_tables(analyses)
        for p in plot_analysis(analyses, out):
            lines += [f"![{p.stem}]({p.name})", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode("utf-8"))
    return path


__all__ = ["write_report", "load_records", "check_record", "distinct_model_names", "safe_file_name", "eval_tables",
           "bucket_tables", "delta_tables", "delta_pairs", "protocol_comparison", "analysis_tables", "plot_eval",
           "plot_buckets", "plot_passkey", "plot_analysis", "is_bucket", "HELP", "add_arguments", "run"]
