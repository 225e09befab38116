"""Where and how computation runs: device, precision, seeded generators, several processes."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = ["resolve_device", "bf16_supported", "Precision", "choose_precision", "use_bf16", "precision_info",
           "step_generator", "dist_info", "quiet_libraries", "available_memory"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls are native here (CUDA with bf16, or a CPU with AVX512-BF16/AMX).

    Native is not the same as faster: see :func:`choose_precision`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------------------------------------
# Precision by measurement
# ------------------------------------------------------------------------------------------------

#: ``auto`` picks the reduced precision only when its probe is at least this much faster (10%).
MARGIN = 0.10
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_MEASURED: dict[str, Precision] = {}  # device -> the measured ``auto`` choice (once per process)
_LAST: dict[str, Precision] = {}  # device -> the last choice handed out, for precision_info()


@dataclass(frozen=True)
class Precision:
    """The compute dtype chosen for a device, and why.

    ``timings`` maps a dtype name ("fp32", "bf16", "fp16") to the median seconds of each probe
    ("matmul", "attention") and their sum ("total"); it is empty when the flag forced the choice or
    the device has no native reduced precision (nothing was timed).
    """

    dtype: torch.dtype
    flag: str
    device: str
    reason: str  # "forced" | "measured" | "unsupported"
    timings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _NAMES[self.dtype]

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    def info(self) -> dict:
        """A JSON-able summary, for eval records and training metadata."""
        return {"precision": self.name, "flag": self.flag, "device": self.device, "reason": self.reason,
                "margin": MARGIN, "timings_s": {k: dict(v) for k, v in self.timings.items()}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probes(device: torch.device, dtype: torch.dtype):
    """Two workloads shaped like GAU-α's: a dense layer run the way autocast runs it (fp32 weights cast
    on the fly) and one attention block as the fast path computes it (reduced-precision q·kᵀ, fp32
    softmax, reduced-precision p·v)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 512, generator=g).to(device), torch.randn(1024, 512, generator=g).to(device)
    q, k = torch.randn(512, 64, generator=g).to(device), torch.randn(512, 64, generator=g).to(device)
    v = torch.randn(512, 512, generator=g).to(device)
    reduced = dtype != torch.float32
    qr, kr, vr = (t.to(dtype) for t in (q, k, v))

    def matmul():
        with torch.autocast(device.type, dtype=dtype if reduced else torch.bfloat16, enabled=reduced):
            return torch.nn.functional.linear(x, w)

    def attention():
        s = torch.matmul(qr, kr.transpose(0, 1)) * 0.125
        return torch.matmul(torch.softmax(s.float(), dim=-1).to(dtype), vr)

    return {"matmul": matmul, "attention": attention}


def _measure(device: torch.device, dtypes: tuple[torch.dtype, ...], repeats: int = 9) -> dict:
    """Seconds of each probe in each dtype: the fastest of ``repeats`` runs, interleaved across dtypes.

    Other processes only ever add time, so the minimum is the steadiest estimate of a probe's own cost
    (the advice of Python's ``timeit`` documentation). On CPU the probes run on one thread: the choice
    is about the core's instructions (AMX, AVX512-BF16 or neither), and on a shared machine a second
    thread waiting at a barrier for a pre-empted sibling would add scheduler quanta (milliseconds) to
    sub-millisecond probes. About 0.1–0.3 s in all.
    """
    probes = {_NAMES[dt]: _probes(device, dt) for dt in dtypes}
    samples = {name: {p: [] for p in fns} for name, fns in probes.items()}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for fns in probes.values():  # warm up: oneDNN builds its kernels on the first call
                for f in fns.values():
                    f(), f()
            _sync(device)
            for _ in range(repeats):
                for name, fns in probes.items():
                    for p, f in fns.items():
                        t0 = time.perf_counter()
                        f()
                        _sync(device)
                        samples[name][p].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    out = {}
    for name, per in samples.items():
        best = {p: min(ts) for p, ts in per.items()}
        out[name] = best | {"total": sum(best.values())}
    return out


def _key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def choose_precision(flag: str, device: torch.device | str) -> Precision:
    """The compute dtype for ``--bf16 flag`` on ``device``.

    ``on``/``off`` force bf16/fp32. ``auto`` times small probes (:func:`_probes`, :func:`_measure`) once
    per process and device, in fp32 and in the native reduced precision (bf16, or fp16 on a CUDA device
    without bf16), and picks the reduced one only when the sum of its probe times is at least ``MARGIN``
    below fp32's: "supported" does not mean
    "faster" (on some CPUs with AVX512-BF16 but no AMX, bf16 matmuls are slower than fp32; with AMX
    they are several times faster). The choice is logged once to stderr with both timings and is
    available from :func:`precision_info`. fp16 needs loss scaling to train; callers that only know
    bf16 (``use_bf16``) run such a choice in fp32.
    """
    if flag not in ("auto", "on", "off"):
        raise ConfigError(f"--bf16 must be auto, on or off, got {flag!r}")
    device = torch.device(device)
    key = _key(device)
    if flag != "auto":
        prec = Precision(torch.bfloat16 if flag == "on" else torch.float32, flag, key, "forced")
    elif key in _MEASURED:
        prec = _MEASURED[key]
    else:
        if bf16_supported(device):
            reduced = torch.bfloat16
        elif device.type == "cuda":
            reduced = torch.float16
        else:
            reduced = None
        if reduced is None:
            prec = Precision(torch.float32, flag, key, "unsupported")
        else:
            t = _measure(device, (torch.float32, reduced))
            fast, slow = t[_NAMES[reduced]]["total"], t["fp32"]["total"]
            dtype = reduced if fast * (1 + MARGIN) <= slow else torch.float32
            prec = Precision(dtype, flag, key, "measured", t)
            print(f"infoscale: precision auto on {key}: fp32 {slow * 1e3:.2f} ms, {_NAMES[reduced]} "
                  f"{fast * 1e3:.2f} ms ({slow / fast:.2f}x) -> {prec.name}", file=sys.stderr, flush=True)
        _MEASURED[key] = prec
    _LAST.pop(key, None)  # re-insert: the most recent choice is the last entry
    _LAST[key] = prec
    return prec


def use_bf16(flag: str, device: torch.device) -> bool:
    """Whether to run in bf16 (autocast and bf16 attention) for ``--bf16 flag``; see :func:`choose_precision`."""
    return choose_precision(flag, device).bf16


def precision_info(device: torch.device | str | None = None) -> dict:
    """The last precision chosen in this process (for ``device``, or any device), as :meth:`Precision.info`;
    ``{}`` when none was chosen yet."""
    prec = _LAST.get(_key(torch.device(device))) if device is not None else next(reversed(_LAST.values()), None)
    return prec.info() if prec is not None else {}


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The RNG of one (step, purpose): independent of anything that happened before."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + stream) % (2**63))


def dist_info() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def quiet_libraries(progress: bool) -> None:
    """With progress off, silence transformers' own progress bars ("Loading weights", "Writing model
    shards") and its warnings, so ``--no-progress`` output holds only infoscale's lines."""
    if progress:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers is imported only with the models
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device`` now (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:  # MemAvailable counts the page cache the kernel can drop
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_FLOPS: dict[str, float] = {}


def device_flops(device) -> float:
    """Measured fp32 matmul throughput of ``device`` (operations/s), once per process."""
    key = str(device)
    if key not in _FLOPS:
        a = torch.randn(256, 256, device=device)
        torch.matmul(a, a)
        reps, t0 = 8, time.perf_counter()
        for _ in range(reps):
            b = torch.matmul(a, a)
        float(b[0, 0])
        _FLOPS[key] = reps * 2 * 256**3 / max(time.perf_counter() - t0, 1e-9)
    return _FLOPS[key]


def duration(seconds: float) -> str:
    """A duration as a person reads it: seconds, minutes or hours."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
