"""Where and how computation runs: device, precision, seeded generators, several processes."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["resolve_device", "bf16_supported", "use_bf16", "step_generator", "dist_info", "quiet_libraries",
           "available_memory"]


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
    """Whether bf16 matmuls are native here (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(flag: str, device: torch.device) -> bool:
    if flag not in ("auto", "on", "off"):
        raise ConfigError(f"--bf16 must be auto, on or off, got {flag!r}")
    return flag == "on" or (flag == "auto" and bf16_supported(device))


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
