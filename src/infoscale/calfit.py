"""The per-layer fit of InfoScale's effective dimension (see :mod:`infoscale.calibrate` for the method):
pure functions, logits in and a dimension out, shared by ``infoscale calibrate`` (GAU runs and pretrained
models) and :func:`infoscale.hf.calibrate`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .attn.scales import infoscale_ratio

D_MAX = 1e6  # "d = ∞": t_d(l) is within 1e-5 of sqrt(ln l / ln L)
D_MIN = 1.0
_GRID = np.geomspace(D_MIN, D_MAX, 61)


# ---------------------------------------------------------------------------------------------
# the fit (pure: logits in, dimension out)
# ---------------------------------------------------------------------------------------------


def infoscale_t(l: torch.Tensor, train_len: int, d: float) -> torch.Tensor:
    """t_d(l) with clamp (1 for l <= L), float64; d = D_MAX behaves as its limit sqrt(ln l / ln L)."""
    l = l.double().clamp(min=float(train_len))
    if d >= D_MAX:
        return (l.log() / math.log(train_len)).sqrt()
    return infoscale_ratio(l, train_len, d)


def h_norm(z: torch.Tensor, l: torch.Tensor, t: torch.Tensor | float = 1.0) -> float:
    """Mean over rows of H / ln l of softmax(t · z); z (rows, n_k) with masked logits at −inf or the dtype's
    minimum, l (rows,) the keys each row attends (at least 2), t a number or (rows,)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    zz = z.double() * (t[:, None] if t.dim() else t)
    zz = zz.masked_fill(z <= torch.finfo(z.dtype).min / 2, -math.inf)
    logp = torch.log_softmax(zz, -1)
    p = logp.exp()
    ent = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)
    return float((ent / l.double().clamp(min=2).log()).mean())


@dataclass
class Sample:
    """One window's logits of one layer: ``z`` (rows, n_k) for a subset of queries, ``l`` (rows,) their key counts."""

    length: int
    z: torch.Tensor
    l: torch.Tensor


def fit_dim(target: float, samples: list[Sample], train_len: int) -> dict:
    """The effective dimension d whose InfoScale factor brings each length's mean H / ln l closest to
    ``target`` (least squares over lengths; per length, the mean over its windows). A grid over log d, then a
    golden-section refinement between the best grid point's neighbours. Returns d, whether it saturated at
    D_MAX, and per length the achieved H / ln l, the value without scaling and the factor needed at the mean
    l (for the record)."""
    lengths = sorted({s.length for s in samples})
    by_n = {n: [s for s in samples if s.length == n] for n in lengths}

    def level(n: int, d: float | None) -> float:
        return float(np.mean([h_norm(s.z, s.l, 1.0 if d is None else infoscale_t(s.l, train_len, d))
                              for s in by_n[n]]))

    def loss(d: float) -> float:
        return sum((level(n, d) - target) ** 2 for n in lengths)

    losses = [loss(float(d)) for d in _GRID]
    i = int(np.argmin(losses))
    lo, hi = math.log(_GRID[max(i - 1, 0)]), math.log(_GRID[min(i + 1, len(_GRID) - 1)])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(math.exp(a)), loss(math.exp(b))
    for _ in range(18):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(math.exp(b))
    d = math.exp((lo + hi) / 2)
    if losses[i] <= loss(d):
        d = float(_GRID[i])
    d = min(max(d, D_MIN), D_MAX)
    out = {"dim": d, "saturated": d >= D_MAX / 2, "target_H_norm": target, "lengths": {}}
    for n in lengths:
        def at(t, n=n):
            return float(np.mean([h_norm(s.z, s.l, t) for s in by_n[n]]))

        lo_t, hi_t = 1.0, 16.0  # the factor that would match the target exactly (H falls as t grows)
        for _ in range(40):
            mid = (lo_t + hi_t) / 2
            lo_t, hi_t = (mid, hi_t) if at(mid) > target else (lo_t, mid)
        mean_l = float(np.mean([float(s.l.double().mean()) for s in by_n[n]]))
        out["lengths"][str(n)] = {"H_norm_plain": level(n, None), "H_norm_calibrated": level(n, d),
                                  "H_norm_head_dim": None, "needed_factor": (lo_t + hi_t) / 2,
                                  "factor": float(infoscale_t(torch.tensor([mean_l]), train_len, d)[0]),
                                  "sqrt_logn_limit": math.sqrt(max(math.log(mean_l) / math.log(train_len), 1.0))}
    return out


def sample_rows(z: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of at most ``rows`` query rows (all when fewer), seeded."""
    n = z.shape[-2]
    if n <= rows:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:rows].sort().values


def calibrate_layers(capture: Callable[[list[float | None], int, int], list[tuple[torch.Tensor, torch.Tensor]]],
                     layers: int, lengths: list[int], windows: int, train_len: int, head_dim: int,
                     rows: int = 256, seed: int = 0, log=print) -> dict:
    """Fit every layer in order. ``capture(dims, n, w, upto)`` runs window w at length n with
    ``infoscale(calibrated=True)`` at per-layer ``dims`` (None = head dim) and returns per layer up to ``upto``
    (all when None; a layer's inputs depend only on the layers before it, so the forward may stop there)
    (logits (rows_all, n_k) as :func:`infoscale.attention_logits` gives them before the temperature, l per row).
    The target is each layer's mean H / ln l at the training length (where the factor is 1)."""
    gen = torch.Generator().manual_seed(seed)
    ref = [[] for _ in range(layers)]
    for w in range(windows):
        for li, (z, l) in enumerate(capture([None] * layers, train_len, w)):
            ref[li].append(h_norm(z, l))
    dims: list[float | None] = [None] * layers
    per_layer = []
    for li in range(layers):
        samples = []
        for n in lengths:
            for w in range(windows):
                z, l = capture(dims, n, w, li)[li]
                idx = sample_rows(z, rows, gen)
                samples.append(Sample(n, z[idx], l[idx]))
        target = float(np.mean(ref[li]))
        fit = fit_dim(target, samples, train_len)
        for n in lengths:  # the closed form, for comparison
            fit["lengths"][str(n)]["H_norm_head_dim"] = float(np.mean(
                [h_norm(s.z, s.l, infoscale_t(s.l, train_len, head_dim)) for s in samples if s.length == n]))
        dims[li] = fit["dim"]
        per_layer.append({"layer": li, **fit})
        sat = " (saturated: needs more than sqrt(log-n))" if fit["saturated"] else ""
        log(f"layer {li}: d_eff = {fit['dim']:.4g}{sat}; H/ln l at L {target:.3f}; at n={lengths[-1]}: plain "
            f"{fit['lengths'][str(lengths[-1])]['H_norm_plain']:.3f}, head-dim InfoScale "
            f"{fit['lengths'][str(lengths[-1])]['H_norm_head_dim']:.3f}, calibrated "
            f"{fit['lengths'][str(lengths[-1])]['H_norm_calibrated']:.3f}")
    return {"method": "infoscale", "train_len": train_len, "head_dim": head_dim, "lengths": lengths,
            "windows": windows, "rows": rows, "seed": seed, "dims": [float(d) for d in dims], "layers": per_layer}
