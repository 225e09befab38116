"""Precision choice: forced flags, the measured ``auto`` (with a patched timer: no timing in tests)."""

from __future__ import annotations

import json

import pytest
import torch

from infoscale import runtime
from infoscale.errors import ConfigError


@pytest.fixture
def fresh(monkeypatch):
    """Empty per-process caches, and a fake timer that records its calls and returns set timings."""
    monkeypatch.setattr(runtime, "_MEASURED", {})
    monkeypatch.setattr(runtime, "_LAST", {})
    monkeypatch.setattr(runtime, "bf16_supported", lambda device="cpu": True)
    calls = []
    fake = {"fp32": 2e-3, "bf16": 1e-3}

    def measure(device, dtypes, repeats=9):
        calls.append((str(device), dtypes))
        return {runtime._NAMES[dt]: {"matmul": fake[runtime._NAMES[dt]] / 2,
                                     "attention": fake[runtime._NAMES[dt]] / 2,
                                     "total": fake[runtime._NAMES[dt]]} for dt in dtypes}

    monkeypatch.setattr(runtime, "_measure", measure)
    return calls, fake


@pytest.mark.parametrize("flag, dtype", [("on", torch.bfloat16), ("off", torch.float32)])
def test_on_off_force_without_timing(fresh, flag, dtype):
    calls, _ = fresh
    prec = runtime.choose_precision(flag, "cpu")
    assert prec.dtype == dtype and prec.reason == "forced" and prec.timings == {}
    assert runtime.use_bf16(flag, torch.device("cpu")) is (flag == "on")
    assert calls == []


def test_auto_is_measured_once_per_device(fresh, capsys):
    calls, _ = fresh
    first = runtime.choose_precision("auto", "cpu")
    assert runtime.use_bf16("auto", torch.device("cpu")) is True
    assert runtime.choose_precision("auto", torch.device("cpu")) is first
    assert len(calls) == 1 and calls[0][1] == (torch.float32, torch.bfloat16)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp32 2.00 ms" in err[0] and "bf16 1.00 ms" in err[0] and err[0].endswith("bf16")


@pytest.mark.parametrize("fp32, bf16, expect", [
    (2e-3, 1e-3, "bf16"),  # bf16 twice as fast
    (1e-3, 1.6e-3, "fp32"),  # bf16 slower (AVX512-BF16 without AMX)
    (1.05e-3, 1e-3, "fp32"),  # within the margin: not measurably faster
])
def test_auto_picks_the_faster(fresh, fp32, bf16, expect):
    _, fake = fresh
    fake.update(fp32=fp32, bf16=bf16)
    prec = runtime.choose_precision("auto", "cpu")
    assert prec.name == expect and prec.reason == "measured"
    assert prec.timings["fp32"]["total"] == fp32 and prec.timings["bf16"]["total"] == bf16


def test_auto_without_native_bf16_keeps_fp32_untimed(fresh, monkeypatch):
    calls, _ = fresh
    monkeypatch.setattr(runtime, "bf16_supported", lambda device="cpu": False)
    prec = runtime.choose_precision("auto", "cpu")
    assert prec.dtype == torch.float32 and prec.reason == "unsupported" and calls == []


def test_precision_info_is_json(fresh):
    assert runtime.precision_info() == {}
    runtime.choose_precision("auto", "cpu")
    info = runtime.precision_info("cpu")
    assert json.loads(json.dumps(info)) == info
    assert info["precision"] == "bf16" and info["timings_s"]["fp32"]["total"] == 2e-3
    runtime.choose_precision("off", "cpu")
    assert runtime.precision_info()["precision"] == "fp32"


@pytest.mark.parametrize("flag", ["yes", "bf16", "", "AUTO"])
def test_bad_flag(fresh, flag):
    with pytest.raises(ConfigError, match="--bf16"):
        runtime.choose_precision(flag, "cpu")
    with pytest.raises(ConfigError):
        runtime.use_bf16(flag, torch.device("cpu"))


def test_real_probe_runs(monkeypatch):
    """The real timer on this machine: both dtypes timed, positive medians (no claim about which wins)."""
    t = runtime._measure(torch.device("cpu"), (torch.float32, torch.bfloat16), repeats=1)
    assert set(t) == {"fp32", "bf16"} and all(v["total"] > 0 for v in t.values())
