"""The evaluation sweep every task shares: cells in, records out, resumable and safe beside other writers.

A cell is the dict of what identifies one measurement (model, method, setting, length, protocol, windows, seed,
…); its key (:func:`infoscale.io.cell_key`) names it in the record file. For each cell not yet there (the file is
read again before each cell, so processes sharing a file split the work rather than repeat it), the task's
``measure(cell)`` returns the cell's own fields and one row per metric; each row becomes a record: the cell, its
fields, the provenance (precision and why, code version and commit, wall time, time) and the row, merged into the
file at once (:func:`infoscale.io.merge_records`), so a killed sweep loses at most the cell it was in. A cell the
file has with fewer windows grows from it (:func:`sweep`): only the new windows are measured.

The masked-LM sweep (:mod:`infoscale.evaluate`) and the causal-LM sweep (:mod:`infoscale.evaluate_clm`) differ only
in the cells they list and in ``measure``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from . import __version__
from .io import cell_key, git_commit, merge_records, read_records, series_key
from .runtime import precision_info
from .stats import grown_fields

__all__ = ["sweep"]


# Per-window lists a row may carry besides its window fields (the copy spans, the passkey depths): a grown cell's
# are the earlier cell's followed by the new windows'.
PER_WINDOW_EXTRAS = ("spans", "depth_of_window")


def sweep(out: str, cells: list[tuple[dict, str]], measure: Callable[..., tuple[dict, list[dict]]], *, device,
          bf16: bool, desc: str, progress: bool = True, windows_of: Callable[[dict], int] | None = None
          ) -> list[dict]:
    """Measure the ``cells`` ((cell, progress label) pairs) not yet in ``out``; returns the new records.

    ``measure(cell) -> (fields, rows)``: ``fields`` the cell's own results shared by its records (windows used,
    predictions, …), ``rows`` one dict per metric (``metric``, ``value``, ``ci_low``, ``ci_high`` and its
    per-window fields).

    Cells can grow by windows where the task gives ``windows_of(cell)``, the windows the cell measures (0: it
    cannot grow): when ``out`` has the same cell with fewer windows (:func:`infoscale.io.series_key`; its windows
    are the first of this one's) at the same precision, ``measure(cell, start=w)`` measures only the windows from
    the w-th on and the records join both (:func:`infoscale.stats.grown_fields`), naming the smaller cell in
    ``grown_from``; the smaller cell's records stay in the file (reports show the grown one). So a sweep asked for
    more windows continues one that ran with fewer instead of starting over."""
    from tqdm import tqdm

    done = {r.get("key") for r in read_records(out)}
    commit = git_commit()
    precision = "bf16" if bf16 else "fp32"
    new: list[dict] = []
    bar = tqdm(cells, disable=not progress, dynamic_ncols=True, mininterval=2.0, desc=desc)
    for cell, label in bar:
        rec = dict(cell)
        rec["key"] = cell_key(rec)
        if rec["key"] in done:
            continue
        have = read_records(out)  # cells another process added meanwhile
        done |= {r.get("key") for r in have}
        if rec["key"] in done:
            continue
        bar.set_postfix_str(label)
        t0 = time.perf_counter()
        count = windows_of(rec) if windows_of else 0
        prior = smaller_cell(have, rec, count, precision) if count else []
        grown = _grow(prior, *measure(rec, start=prior[0]["windows_used"])) if prior else None
        if grown is not None:
            rec["grown_from"] = prior[0]["key"]
        fields, rows = grown if grown is not None else measure(rec)
        rec.update(fields)
        rec.update({"precision": precision, "precision_info": precision_info(device),
                    "version": __version__, "git_commit": commit, "wall_time": time.perf_counter() - t0,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        new += merge_records(out, [rec | row for row in rows])
        done.add(rec["key"])
    return new


def smaller_cell(records: list[dict], cell: dict, count: int, precision: str) -> list[dict]:
    """The records of the largest cell in ``records`` that is ``cell`` with fewer windows than ``count``, measured
    at the same ``precision`` (windows of two precisions never join), whose per-window results are whole and
    consistent; [] when there is none (a record file is untrusted: a damaged cell is measured anew, not joined)."""
    series = series_key(cell)
    by_key: dict[str, list[dict]] = {}
    for r in records:
        try:
            if series_key(r) != series or type(r["windows"]) is not int or r["windows"] >= cell["windows"]:
                continue
        except (KeyError, TypeError, ValueError):  # a record of another kind or an older format
            continue
        if isinstance(r.get("key"), str):
            by_key.setdefault(r["key"], []).append(r)
    usable = [rs for rs in by_key.values() if _joinable(rs, count, precision)]
    return max(usable, key=lambda rs: rs[0]["windows_used"]) if usable else []


def _numbers(values, length: int, integer: bool = False) -> bool:
    if not isinstance(values, list) or len(values) != length:
        return False
    kinds = (int,) if integer else (int, float)
    return all(isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _joinable(rs: list[dict], count: int, precision: str) -> bool:
    """Whether one cell's records can be the first windows of a cell of ``count`` windows."""
    w = rs[0].get("windows_used")
    if type(w) is not int or not 1 <= w < count:
        return False
    metrics = [r.get("metric") for r in rs]
    if not all(isinstance(m, str) for m in metrics) or len(set(metrics)) != len(metrics):
        return False
    for r in rs:
        if r.get("windows_used") != w or r.get("precision") != precision:
            return False
        if not (_numbers(r.get("window_counts"), w, integer=True) and all(c > 0 for c in r["window_counts"])
                and _numbers(r.get("window_means"), w)):
            return False
        if "window_hits" in r and not _numbers(r["window_hits"], w, integer=True):
            return False
        if "n_predictions" in r and type(r["n_predictions"]) is not int:
            return False
        if any(k in r and not (isinstance(r[k], list) and len(r[k]) == w) for k in PER_WINDOW_EXTRAS):
            return False
    return True


def _grow(prior: list[dict], fields: dict, rows: list[dict]) -> tuple[dict, list[dict]] | None:
    """(fields, rows) of the grown cell from the smaller cell's records and the new windows' results; None when
    they do not join (the smaller cell lacks one of the metrics): the cell is then measured whole."""
    old = {r["metric"]: r for r in prior}
    fields = fields | {"windows_used": prior[0]["windows_used"] + fields["windows_used"]}
    if {r["metric"] for r in rows} != set(old):
        return None
    out = []
    for row in rows:
        before = old[row["metric"]]
        joined = row | grown_fields(before, row)
        joined["n_predictions"] = before.get("n_predictions", 0) + row.get("n_predictions", 0)
        for k in PER_WINDOW_EXTRAS:
            if k in row:
                joined[k] = list(before.get(k, [])) + list(row[k])
        out.append(joined)
    return fields, out
