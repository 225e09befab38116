"""The evaluation sweep every task shares: cells in, records out, resumable and safe beside other writers.

A cell is the dict of what identifies one measurement (model, method, setting, length, protocol, windows, seed,
…); its key (:func:`infoscale.io.cell_key`) names it in the record file. For each cell not yet there (the file is
read again before each cell, so processes sharing a file split the work rather than repeat it), the task's
``measure(cell)`` returns the cell's own fields and one row per metric; each row becomes a record: the cell, its
fields, the provenance (precision and why, code version and commit, wall time, time) and the row, merged into the
file at once (:func:`infoscale.io.merge_records`), so a killed sweep loses at most the cell it was in.

The masked-LM sweep (:mod:`infoscale.evaluate`) and the causal-LM sweep (:mod:`infoscale.evaluate_clm`) differ only
in the cells they list and in ``measure``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import __version__
from .io import cell_key, git_commit, merge_records, read_records
from .runtime import precision_info

__all__ = ["sweep"]


def sweep(out: str, cells: list[tuple[dict, str]], measure: Callable[[dict], tuple[dict, list[dict]]], *, device,
          bf16: bool, desc: str, progress: bool = True) -> list[dict]:
    """Measure the ``cells`` ((cell, progress label) pairs) not yet in ``out``; returns the new records.

    ``measure(cell) -> (fields, rows)``: ``fields`` the cell's own results shared by its records (windows used,
    predictions, …), ``rows`` one dict per metric (``metric``, ``value``, ``ci_low``, ``ci_high`` and its
    per-window fields)."""
    from tqdm import tqdm

    done = {r.get("key") for r in read_records(out)}
    commit = git_commit()
    new: list[dict] = []
    bar = tqdm(cells, disable=not progress, dynamic_ncols=True, mininterval=2.0, desc=desc)
    for cell, label in bar:
        rec = dict(cell)
        rec["key"] = cell_key(rec)
        if rec["key"] in done:
            continue
        done |= {r.get("key") for r in read_records(out)}  # cells another process added meanwhile
        if rec["key"] in done:
            continue
        bar.set_postfix_str(label)
        t0 = time.perf_counter()
        fields, rows = measure(rec)
        rec.update(fields)
        rec.update({"precision": "bf16" if bf16 else "fp32", "precision_info": precision_info(device),
                    "version": __version__, "git_commit": commit, "wall_time": time.perf_counter() - t0,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        new += merge_records(out, [rec | row for row in rows])
        done.add(rec["key"])
    return new
