"""Result records as ``infoscale report`` takes them: each line checked (one clear error naming file:line), the same
record given twice counted once, and model names made distinct. Files users hand us are untrusted: a record with a
missing field, a value out of range or a name that would break a table or a file name is refused."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

from ..errors import DataError
from ..io import iter_records, record_identity
from ..tasks.metrics import METRICS

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
    per_depth = rec.get("per_depth")
    if per_depth is not None and not (isinstance(per_depth, dict) and all(
            _DEPTH.fullmatch(str(d)) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
            for d, v in per_depth.items())):
        return "per_depth must map needle depths (numbers from 0 to 1) to accuracies from 0 to 1"
    return ""


_BUCKET = re.compile(r"nll\[\d{1,13},\d{1,13}\)")
_DEPTH = re.compile(r"(0(\.\d{1,12})?|1(\.0{1,12})?)")


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

