"""Rotary position embedding (RoPE) and its frequency variants: PI, NTK-aware, YaRN.

RoPE rotates adjacent pairs (x_2i, x_2i+1) by angle p·θ_i, θ_i = base^(−2i/d), as GAU-α and RoFormer
do (Su et al. 2021, arXiv 2104.09864); this is *not* the half-split "rotate_half" layout of GPT-NeoX.
Angles are built in float64: a float32 product p·θ at p ≈ 16k is off by ~1e-3 rad.
"""

from __future__ import annotations

import math

import torch

__all__ = ["rope_inv_freq", "pi_inv_freq", "ntk_inv_freq", "yarn_inv_freq", "rotate", "pose_positions"]


def rope_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    """θ_i = base^(−2i/d), i = 0 .. d/2 − 1, float64."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {dim}")
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def pi_inv_freq(dim: int, scale: float, base: float = 10000.0) -> torch.Tensor:
    """Position Interpolation (Chen et al. 2023): θ_i / s, i.e. positions divided by s."""
    return rope_inv_freq(dim, base) / scale


def ntk_inv_freq(dim: int, scale: float, base: float = 10000.0) -> torch.Tensor:
    """NTK-aware scaling (bloc97 2023): base' = base · s^(d/(d−2)); the lowest frequency becomes θ/s,
    the highest is unchanged."""
    return rope_inv_freq(dim, base * scale ** (dim / (dim - 2)))


def yarn_inv_freq(dim: int, scale: float, train_len: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, base: float = 10000.0) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies (Peng et al. 2023), as in its reference code and transformers.

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


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x`` (..., n, d) by ``angles`` (..., n, d/2) (broadcastable)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


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
