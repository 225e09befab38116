"""``infoscale doctor`` and the supported-version bookkeeping: the self-test passes on this install, fails with
one clear line per broken check, and the newest tested transformers is the lock's."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import transformers

from infoscale import doctor, hf
from infoscale.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_passes_on_this_install(capsys):
    assert main(["doctor", "--families", "llama"]) == 0
    out = capsys.readouterr().out
    assert f"transformers {transformers.__version__}" in out
    assert out.count("PASS") == 1 + len(doctor.DECODE_CHECKS)
    assert "FAIL" not in out


def test_doctor_fails_with_one_line_when_a_check_is_broken(monkeypatch, capsys):
    """Break on purpose what transformers 5.24 broke: the forward hook that keeps the prompt's n on the cache.
    Dynamic PI then recomputes its factor at every step, and only that check fails."""
    monkeypatch.setattr(hf.cache, "_pre_hook", lambda module, args, kwargs: (args, kwargs))
    assert main(["doctor", "--families", "llama"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and "pi" in failed[0] and "llama" in failed[0]
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert err[0].startswith("infoscale doctor: FAIL") and "pi" in err[0]
    assert "tested range" in err[-1]


def test_doctor_reports_a_check_that_raises_as_a_failure(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("the cache went away\nsecond line")

    monkeypatch.setattr(doctor, "check_stock", boom)
    assert main(["doctor", "--families", "llama"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  llama   apply(softmax)" in out and "RuntimeError: the cache went away)" in out


def test_doctor_refuses_an_unknown_family(capsys):
    assert main(["doctor", "--families", "gpt9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "doctor checks the families llama, qwen2; got gpt9" in err[0]


def test_tested_transformers_is_the_locks():
    lock = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    pinned = re.search(r"^transformers==(\S+)$", lock, re.M)
    assert pinned, "constraints.txt pins no transformers"
    assert pinned.group(1) == hf.TESTED_TRANSFORMERS, "update TESTED_TRANSFORMERS in hf/versions.py after `make lock`"


@pytest.mark.parametrize(("version", "newer"), [("5.25.0", False), ("5.1.0", False), ("5.25.1", True),
                                                 ("5.26.0.dev0", True), ("6.0.0rc1", True), ("5.25.0+local", False)])
def test_newer_than_tested(monkeypatch, version, newer):
    monkeypatch.setattr(hf.versions, "TESTED_TRANSFORMERS", "5.25.0")
    assert hf.newer_than_tested(version) is newer


def test_apply_warns_once_on_an_untested_transformers(monkeypatch):
    m = hf.apply(doctor._tiny("llama"), "softmax")  # transformers' lazy imports first: one of them captures warnings
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "99.0.0")
    hf._warn_if_untested.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            hf.apply(m, "infoscale")
            hf.apply(m, "logn")
        untested = [w for w in got if "newer than the newest version" in str(w.message)]
        assert len(untested) == 1 and "infoscale doctor" in str(untested[0].message)
    finally:
        hf._warn_if_untested.cache_clear()


def test_apply_does_not_warn_on_the_tested_transformers(monkeypatch):
    m = hf.apply(doctor._tiny("llama"), "softmax")
    monkeypatch.setattr(sys.modules["transformers"], "__version__", hf.TESTED_TRANSFORMERS)
    hf._warn_if_untested.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            hf.apply(m, "infoscale")
        assert not [w for w in got if "newer than the newest version" in str(w.message)]
    finally:
        hf._warn_if_untested.cache_clear()
