"""Rotary position embedding (RoPE), its frequency variants (PI, NTK-aware, YaRN) and PoSE positions.

A :class:`Rope` says how a model rotates: which dims (partial rotary), at which frequencies
(θ_i = base^(−2i/dim) unless the model has its own), in which layout:

- ``"pairs"``: adjacent pairs (x_2i, x_2i+1), as RoFormer and GAU-α (Su et al. 2021, arXiv 2104.09864);
- ``"halves"``: (x_i, x_i+dim/2), GPT-NeoX's and transformers' ``rotate_half``.

Angles are built in float64: a float32 product p·θ at p ≈ 16k is off by ~1e-3 rad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import MethodError

__all__ = ["Rope", "rope_inv_freq", "pi_inv_freq", "ntk_inv_freq", "yarn_inv_freq", "rotate", "pose_positions"]


@dataclass(frozen=True)
class Rope:
    """How q and k are rotated: ``dim`` rotated dims (the first ``dim`` of the head; the rest pass
    through), ``base``, ``layout``, the model's own ``inv_freq`` (a tuple, when not base^(−2i/dim)),
    and ``attention_scaling``, a factor on the rotated part (transformers' cos/sin scaling: YaRN's or
    LongRoPE's mscale of the model itself)."""

    dim: int
    base: float = 10000.0
    layout: str = "pairs"
    inv_freq: tuple[float, ...] | None = None
    attention_scaling: float = 1.0

    def __post_init__(self):
        if self.dim < 2 or self.dim % 2:
            raise MethodError(f"RoPE needs an even number of rotated dims, got {self.dim}")
        if self.layout not in ("pairs", "halves"):
            raise MethodError(f"RoPE layout must be 'pairs' or 'halves', got {self.layout!r}")
        if self.inv_freq is not None and len(self.inv_freq) != self.dim // 2:
            raise MethodError(f"inv_freq has {len(self.inv_freq)} frequencies for {self.dim} rotated dims")

    @property
    def geometric(self) -> bool:
        """Whether the frequencies are base^(−2i/dim) (what PI/NTK/YaRN are defined on)."""
        return self.inv_freq is None

    def frequencies(self) -> torch.Tensor:
        if self.inv_freq is not None:
            return torch.tensor(self.inv_freq, dtype=torch.float64)
        return rope_inv_freq(self.dim, self.base)


def rope_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """θ_i = base^(−2i/d), i = 0 .. d/2 − 1, float64."""
    if dim % 2:
        raise MethodError(f"RoPE needs an even head dimension, got {dim}")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def pi_inv_freq(theta: torch.Tensor, scale: float) -> torch.Tensor:
    """Position Interpolation (Chen et al. 2023, arXiv 2306.15595): θ_i / s, i.e. positions divided by s."""
    return theta / scale


def ntk_inv_freq(theta: torch.Tensor, scale: float) -> torch.Tensor:
    """NTK-aware scaling (bloc97 2023): base' = base · s^(d/(d−2)), i.e. θ'_i = θ_i · s^(−2i/(d−2)); the
    lowest frequency becomes θ/s, the highest is unchanged."""
    d = 2 * theta.numel()
    i = torch.arange(theta.numel(), dtype=torch.float64)
    return theta * scale ** (-2 * i / (d - 2))


def yarn_inv_freq(dim: int, scale: float, train_len: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, base: float = 10000.0) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies (Peng et al. 2023, arXiv 2309.00071), as in its reference code and
    transformers.

    idx(r) = d·ln(L/(2πr)) / (2 ln base) turns a rotation count r over the original length L into a
    pair index; low = max(floor(idx(β_fast)), 0), high = min(ceil(idx(β_slow)), d − 1); ramp
    ρ_i = clamp((i − low)/(high − low), 0, 1) over pair index i; θ'_i = (1 − ρ_i)·θ_i + ρ_i·θ_i/s
    (high-frequency pairs extrapolate, low-frequency pairs interpolate). The ramp is linear in the
    index (in log r), matching the code rather than the paper's text.
    """

    def idx(rot: float) -> float:
        return dim * math.log(train_len / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(idx(beta_fast)), 0)
    high = min(math.ceil(idx(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp, as the reference does
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    theta = rope_inv_freq(dim, base)
    return (1 - ramp) * theta + ramp * theta / scale


def rotate(x: torch.Tensor, angles: torch.Tensor, layout: str = "pairs", scaling: float = 1.0) -> torch.Tensor:
    """Rotate the first ``2·angles.shape[-1]`` dims of ``x`` (..., n, d) by ``angles`` (..., n, r/2)
    (broadcastable) in ``layout``; the other dims pass through. ``scaling`` multiplies the rotated part."""
    r = 2 * angles.shape[-1]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    xr = x[..., :r]
    if layout == "pairs":
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., : r // 2], xr[..., r // 2:]
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), dim=-1)


def pose_positions(gen: torch.Generator, batch: int, length: int, target: int, chunks: int = 2) -> torch.Tensor:
    """PoSE position ids (Zhu et al. 2023): each window of ``length`` tokens is cut into ``chunks``
    contiguous pieces at uniform random points; piece c is shifted by a skip u_c, with
    0 <= u_1 <= ... <= u_{c} <= target − length drawn uniformly and sorted, so positions stay increasing
    and the last one stays below ``target``. The first piece starts at 0."""
    span = max(target - length, 0)
    out = torch.empty(batch, length, dtype=torch.long)
    base = torch.arange(length)
    for b in range(batch):
        cuts = torch.randperm(length - 1, generator=gen)[: chunks - 1].add(1).sort().values if chunks > 1 else []
        skips = torch.randint(0, span + 1, (max(chunks - 1, 0),), generator=gen).sort().values
        shift = torch.zeros(length, dtype=torch.long)
        for c, u in zip(cuts, skips, strict=True):
            shift[int(c):] = int(u)
        out[b] = base + shift
    return out
