"""Files that must never be half-written: atomic writes, JSONL record files, the git commit.

Every write goes to a temporary file in the same folder, is flushed to disk and renamed over the
target, so a reader (or a crash) sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

from .errors import DataError

__all__ = ["atomic_write_bytes", "atomic_write_json", "read_records", "write_records", "record_key", "git_commit"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file (none if it does not exist), records of the first format made tidy."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out += tidy(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{p}:{i} is not a JSON record; fix or remove that line") from None
    return out


def tidy(rec: dict) -> list[dict]:
    """Records of the first format (one line with ``accuracy``, ``loss``, ``ci_*``) as tidy records;
    tidy records pass through."""
    if "metric" in rec or "accuracy" not in rec:
        return [rec]
    base = {k: v for k, v in rec.items() if k not in ("accuracy", "loss", "ci_low", "ci_high")}
    return [base | {"metric": "accuracy", "value": rec["accuracy"], "ci_low": rec["ci_low"], "ci_high": rec["ci_high"]},
            base | {"metric": "loss", "value": rec["loss"], "ci_low": None, "ci_high": None}]


def write_records(path: str | Path, records: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def record_key(*parts) -> str:
    """A short stable hash of the fields that identify a record."""
    text = "|".join(p if isinstance(p, str) else json.dumps(p, sort_keys=True) for p in parts)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
