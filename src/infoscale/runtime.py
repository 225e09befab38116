"""Where and how computation runs: device, precision, seeded generators, several processes."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["resolve_device", "bf16_supported", "use_bf16", "step_generator", "dist_info"]


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
