"""Files that must never be half-written: atomic writes, JSONL record files, the git commit.

Every write goes to a temporary file in the same folder, is flushed to disk and renamed over the
target, so a reader (or a crash) sees the old file or the new one, never a mix. A write that fails
(a full disk, a Ctrl-C) removes its temporary file and leaves the old file as it was; a full disk
or another operating-system error becomes a :class:`DataError` naming the file.

Record files (JSONL, one JSON object a line) are shared: several processes may add records to one
file at once. :func:`merge_records` takes an exclusive lock (``fcntl.flock`` on ``<file>.lock``
beside it, removed when done), re-reads the file, adds only the records it does not hold yet and replaces it
atomically, so no process loses another's records. No record holds NaN or an infinity.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import DataError, MethodError

__all__ = ["sha256_file", "atomic_write", "atomic_write_bytes", "atomic_write_json", "read_records", "iter_records",
           "write_records", "merge_records", "record_identity", "locked", "record_key", "method_identity", "cell_key",
           "series_key", "superseded", "latest_cells", "git_commit", "os_error_in", "write_error", "check_output",
           "check_parent_folders"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def check_parent_folders(path: str | Path, flag: str) -> None:
    """Refuse an output path under a regular file (``notes.txt/run``): nothing could be written there."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{flag} {path}: {parent} is a file, not a folder, so nothing can be written under "
                                "it; choose another path")
            return


def check_output(path: str | Path, flag: str, *, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: under a regular file, or an existing
    file where a folder is wanted (``folder``) or a folder where a file is wanted."""
    check_parent_folders(path, flag)
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise DataError(f"{flag} {path} is an existing file, not a folder; choose a folder path")
    if not folder and p.is_dir():
        raise DataError(f"{flag} {path} is a folder; give the path of a JSONL record file")


def os_error_in(exc: BaseException) -> OSError | None:
    """The operating-system error behind ``exc`` (itself, its cause or its context), if any: torch and
    other libraries wrap a failed ``write`` in their own exceptions."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: str | Path, err: OSError) -> DataError:
    """One line for a failed write of ``path``."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(f"cannot write {path}: no space left on the device; free some space and rerun "
                         "(the file as it was before is unchanged)")
    return DataError(f"cannot write {path}: {err.strerror or err}; check the folder exists and is writable, "
                     "then rerun (the file as it was before is unchanged)")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``. On any failure
    the temporary file is removed and ``path`` is untouched; operating-system errors (a full disk, a
    read-only folder) become a :class:`DataError` naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as e:
        err = os_error_in(e)
        if err is not None:
            raise write_error(path, err) from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _dumps(obj, **kw) -> str:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except ValueError:
        raise DataError(f"refusing to write a non-finite number (NaN or infinity): {_nonfinite(obj)}") from None


def _nonfinite(obj, where: str = "") -> str:
    """Where the first NaN/infinity sits in ``obj`` (for the message)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'value'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return ""


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (_dumps(obj, indent=1) + "\n").encode("utf-8"))


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each JSON object of a JSONL file (tidied; nothing if the file does
    not exist). A line that is not a JSON object, or a file that is not UTF-8, is a :class:`DataError`
    naming the line."""
    p = Path(path)
    if not p.exists():
        return
    if p.is_dir():
        raise DataError(f"{p} is a folder; give a JSONL record file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror}") from None
    for i, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}:{i} is not UTF-8 (invalid byte at column {e.start + 1}); fix or remove that "
                            "line") from None
        try:
            rec = json.loads(line, parse_constant=_reject_constant)
        except (json.JSONDecodeError, ValueError):
            raise DataError(f"{p}:{i} is not a JSON record (or holds NaN/Infinity); fix or remove that line") from None
        except RecursionError:
            raise DataError(f"{p}:{i} is nested too deeply to be a record; fix or remove that line") from None
        if not isinstance(rec, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(rec), "a number")
            raise DataError(f"{p}:{i} is {kind}, not a record (a JSON object); fix or remove "
                            "that line")
        try:
            for r in tidy(rec):
                yield i, r
        except KeyError as e:
            raise DataError(f"{p}:{i} is a record of the first format without the field {e.args[0]!r}; fix or "
                            "remove that line") from None


def _reject_constant(name: str):
    raise ValueError(name)


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file (none if it does not exist), records of the first format made tidy."""
    return [r for _, r in iter_records(path)]


def tidy(rec: dict) -> list[dict]:
    """Records of the first format (one line with ``accuracy``, ``loss``, ``ci_*``) as tidy records;
    tidy records pass through."""
    if "metric" in rec or "accuracy" not in rec:
        return [rec]
    base = {k: v for k, v in rec.items() if k not in ("accuracy", "loss", "ci_low", "ci_high")}
    return [base | {"metric": "accuracy", "value": rec["accuracy"], "ci_low": rec["ci_low"], "ci_high": rec["ci_high"]},
            base | {"metric": "loss", "value": rec["loss"], "ci_low": None, "ci_high": None}]


def _lines(records: list[dict]) -> str:
    return "".join(_dumps(r) + "\n" for r in records)


def write_records(path: str | Path, records: list[dict]) -> None:
    """Replace ``path`` with exactly ``records`` (atomically)."""
    p = Path(path)
    text = _lines(records)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, text.encode("utf-8"))


@contextlib.contextmanager
def locked(path: str | Path):
    """An exclusive lock on ``path`` between processes (``fcntl.flock`` on ``<path>.lock``), removed when done.

    The lock file is unlinked while still locked; a process that was waiting on the old file then finds it is
    no longer the one at ``<path>.lock`` and locks the new one, so two processes never hold the lock at once."""
    import fcntl

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lock = p.with_name(p.name + ".lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise write_error(lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                break  # the lock is ours and is the file at <path>.lock
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed or replaced meanwhile by the previous holder: lock the current file
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)  # releases the lock


def record_identity(rec: dict) -> str:
    """What makes two records the same: (key, metric) for evaluation records, else the whole record."""
    if "key" in rec:
        return f"{rec['key']}|{rec.get('metric')}"
    return json.dumps(rec, sort_keys=True)


def merge_records(path: str | Path, records: list[dict]) -> list[dict]:
    """Add ``records`` to the JSONL file ``path`` under its lock; returns the records that were new.

    The file is re-read under the lock, so records added by another process since are kept; the
    existing lines are kept byte for byte and the new ones appended; the file is replaced atomically."""
    p = Path(path)
    _lines(records)  # refuses NaN before taking the lock
    with locked(p):
        have = {record_identity(r) for r in read_records(p)}
        new = []
        for r in records:
            ident = record_identity(r)
            if ident not in have:
                have.add(ident)
                new.append(r)
        if new:
            old = p.read_bytes() if p.exists() else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            atomic_write_bytes(p, old + _lines(new).encode("utf-8"))
    return new


def record_key(*parts) -> str:
    """A short stable hash of the fields that identify a record."""
    text = "|".join(p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in parts)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def method_identity(resolved: str, calibrated: bool = False, dims=None) -> str:
    """What a record's ``method_resolved`` names: the resolved method string and, for a calibrated method (InfoScale
    with the per-layer dimension ``infoscale calibrate`` fitted), the sha256 of the dims it runs with, as
    ``"<method> [calibration <12 hex digits>]"``. The cell key holds ``method_resolved``, so a cell measured with
    one calibration is never reused for another (a recalibration re-measures). A calibrated method without dims
    is refused (MethodError): nothing could run it, so no record may name it."""
    if not calibrated:
        return resolved
    if not dims:
        raise MethodError(f"{resolved} needs the model's calibration (its per-layer dims): run `infoscale calibrate` "
                          "first")
    digest = hashlib.sha256(json.dumps([float(d) for d in dims]).encode()).hexdigest()[:12]
    return f"{resolved} [calibration {digest}]"


CELL_FIELDS = ("model", "method_resolved", "length", "setting", "protocol", "protocol_params", "seed", "windows",
               "predictions")


def cell_key(rec: dict) -> str:
    """What identifies one measured cell of an evaluation (the same for all its metrics), masked-LM or causal."""
    return record_key(*(rec[f] for f in CELL_FIELDS))


def series_key(rec: dict) -> str:
    """What a cell shares with the same cell at another number of windows: its key without ``windows`` (a cell's
    windows are drawn one after another from a generator seeded by the cell, so the first w of a larger cell are
    the w of a smaller one)."""
    return record_key(*(rec[f] for f in CELL_FIELDS if f != "windows"))


def _series(rec: dict) -> str | None:
    """:func:`series_key` of a record with a usable key and window count, else None (a record of another kind, an
    older format or a damaged one)."""
    if not isinstance(rec.get("key"), str) or type(rec.get("windows")) is not int:
        return None
    try:
        return series_key(rec)
    except (KeyError, TypeError, ValueError):
        return None


def superseded(records: list[dict]) -> set:
    """Keys of the cells that ``records`` also hold with more windows (the same cell by :func:`series_key`, grown
    from it or measured anew): their windows are the first of the larger cell's, so tables show the larger one
    alone rather than a mean of both. Records without a usable key or window count are left alone."""
    cells, most = [], {}
    for r in records:
        series = _series(r)
        if series is None:
            continue
        w = r["windows"]
        cells.append((series, w, r["key"]))
        most[series] = max(most.get(series, w), w)
    return {key for series, w, key in cells if w < most[series]}


def latest_cells(records: list[dict]) -> list[dict]:
    """``records`` without the cells they also hold with more windows (:func:`superseded`), each kept record in
    the place of its series' first record: a cell grown or measured again later keeps the row it had, so a
    report's order of methods does not depend on when each cell was last measured."""
    gone, first, kept = superseded(records), {}, []
    for i, r in enumerate(records):
        series = _series(r)
        place = i if series is None else first.setdefault(series, i)
        if not (series is not None and r["key"] in gone):
            kept.append((place, i, r))
    return [r for *_, r in sorted(kept, key=lambda t: t[:2])]


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def sha256_file(path) -> str:
    """The hex sha256 of a file, read 1 MiB at a time (a model file can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
