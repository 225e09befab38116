"""Length temperatures and bias slopes: pure formulas with their sources (golden values in the tests).

Notation: L = training length, l = number of keys a query attends after all masks, d = head dim,
s = n / L.
"""

from __future__ import annotations

import math

from .errors import MethodError

__all__ = ["infoscale_factor", "infoscale_ratio", "logn_factor", "softmax_plus_factor", "yarn_attention_factor",
           "alibi_slopes", "llama4_factor"]


def infoscale_ratio(l, train_len: float, dim: float):
    """sqrt(1 − l^(−2/d)) / sqrt(1 − L^(−2/d)) (Li et al. 2025, arXiv 2501.08570, InfoScale): the one definition of
    the formula, for l a number or a float64 tensor (no clamp, no checks; d may be a fitted real number). Every
    InfoScale factor of the package is this."""
    denom = math.sqrt(1.0 - train_len ** (-2.0 / dim))
    if _is_tensor(l):
        return (1.0 - l ** (-2.0 / dim)).sqrt() / denom
    return math.sqrt(1.0 - l ** (-2.0 / dim)) / denom


def infoscale_factor(n, train_len: int, head_dim: int, clamp: bool = True):
    """InfoScale logit multiplier sqrt(1 - l^(-2/d)) / sqrt(1 - L^(-2/d)) (arXiv 2501.08570).

    ``n`` is l, the number of keys attended (a number or a tensor). With ``clamp`` the factor is 1
    for l <= L so that nothing changes inside the training length; ``clamp=False`` is the official
    code's form (below 1 for l < L). Golden values: (4096, 64, 128) -> 1.392, (512, 64, 128) -> 1.215.
    """
    _check_positive(train_len=train_len, head_dim=head_dim)
    if train_len < 2:
        raise MethodError(f"infoscale_factor needs train_len >= 2 (1 - L^(-2/d) is 0 at L = 1), got {train_len}")
    if _is_tensor(n):
        l = n.double().clamp(min=1.0)
        if clamp:
            l = l.clamp(min=float(train_len))
        return infoscale_ratio(l, train_len, head_dim)
    if not (n >= 1 and math.isfinite(n)):  # also refuses NaN, which every comparison fails
        raise MethodError(f"infoscale_factor needs a finite n >= 1 keys, got {n}")
    return infoscale_ratio(max(n, train_len) if clamp else n, train_len, head_dim)


def logn_factor(n, train_len: int, clamp: bool = True):
    """Log-n scale log(l) / log(L) (Su 2021, kexue.fm/archives/8823; normalised to the training length
    as in kexue.fm/archives/9444). With ``clamp`` it is max(1, .), the training-free form of
    bojone/rerope's patches."""
    _check_positive(train_len=train_len)
    if train_len < 2:
        raise MethodError("logn needs train_len >= 2 (log 1 = 0)")
    if _is_tensor(n):
        f = n.double().clamp(min=1.0).log() / math.log(train_len)
        return f.clamp(min=1.0) if clamp else f
    if not (n >= 0 and math.isfinite(n)):
        raise MethodError(f"logn_factor needs a finite n >= 0 keys, got {n}")
    f = math.log(max(n, 1)) / math.log(train_len)
    return max(1.0, f) if clamp else f


def softmax_plus_factor(n, base: int = 512):
    """GAU-α's ``softmax_plus``: log(l) / log(base), base 512 (its pretraining length; Su 2021,
    kexue.fm/archives/8823, and the official InfoScale code). Not normalised to the training length,
    so it is 2/3 at l = 64."""
    if _is_tensor(n):
        return n.double().clamp(min=1.0).log() / math.log(base)
    return math.log(max(n, 1)) / math.log(base)


def yarn_attention_factor(scale: float) -> float:
    """YaRN's mscale 0.1 ln s + 1 (Peng et al. 2023). It multiplies both q and k (cos and sin), so the
    logits grow by its square; 1 for s <= 1."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> list[float]:
    """ALiBi head slopes m_h = 2^(-max_bias * h / H), h = 1..H (Press et al. 2022). For H not a power
    of two: the slopes of the nearest lower power of two H', then every other slope of 2H'."""

    def powers(h: int) -> list[float]:
        return [2.0 ** (-max_bias * (i + 1) / h) for i in range(h)]

    if num_heads < 1:
        raise MethodError(f"alibi needs at least one head, got {num_heads}")
    p = 2 ** int(math.floor(math.log2(num_heads)))
    if p == num_heads:
        return powers(num_heads)
    return powers(p) + powers(2 * p)[0::2][: num_heads - p]


def _is_tensor(x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")


def _check_positive(**kw):
    for k, v in kw.items():
        if not isinstance(v, int) or v < 1:
            raise MethodError(f"{k} must be a positive integer, got {v!r}")


def llama4_factor(n, beta: float, floor_scale: int):
    """Llama 4's attention temperature 1 + β·ln(1 + ⌊l / F⌋) (Meta's Llama 4 ``attn_temperature_tuning``,
    β = 0.1, F = 8192; the same law as Ministral 3's ``llama_4_scaling_beta`` with F = the original
    context), here with l = keys attended. It is 1 for l < F, so F = L keeps the training length
    untouched, and it grows in steps of about β·ln 2 per doubling beyond."""
    if _is_tensor(n):
        return 1.0 + beta * (1.0 + (n.double().clamp(min=0) / floor_scale).floor()).log()
    return 1.0 + beta * math.log(1.0 + math.floor(max(n, 0) / floor_scale))
