"""``attention()``: every registered method, one reference path and one fast path.

Both paths build the same :class:`Plan` from a method string and differ only in how they sweep the
score matrix: the reference path forms the whole n×n matrix (and can return the weights); the fast
path walks over query chunks, scores each chunk only against the keys its mask can reach (a band and
the sinks for window methods), optionally in bf16, so memory stays O(n · chunk) and windowed methods
cost O(n · window).

Logits, for query i and key j (RoPE-family methods):

    z_ij = t(l_i) · (c · ⟨R_{a(i,j)} q_i, R_{b(i,j)} k_j⟩ · m² + bias_ij)

with c = 1/sqrt(d) (or s with L2-normalised q, k for CosScale), R the RoPE rotation at (possibly
scaled) frequencies, a, b the region-wise positions of piecewise methods (ReRoPE & co.), m YaRN's
attention factor, bias ALiBi's −m_h·|p_i − p_j|, t the length temperature of l_i keys attended
(InfoScale, log-n). Masked keys get −inf; a row with no key left returns zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import rope
from .methods import (
    MethodError,
    ParsedMethod,
    alibi_slopes,
    infoscale_factor,
    logn_factor,
    parse_method,
    softmax_plus_factor,
    yarn_attention_factor,
)

__all__ = [
    "attention", "attention_reference", "attention_fast", "attention_logits", "Plan", "build_plan",
]

# Query rows per chunk: ~256 × n fp32 scores (16 MB at n = 16384) measured fastest here; bf16 scores
# are half the bytes, so twice the rows.
DEFAULT_CHUNK = 256


@dataclass
class Region:
    """A set of (i, j) pairs scored with q rotated at qa·p_i + qb and k at ka·p_j (per batch)."""

    select: str  # "all" | "near" (|Δ| <= w) | "right" (Δ > w) | "left" (Δ < −w), Δ = p_j − p_i
    width: float
    qa: torch.Tensor  # (B, 1) float64
    qb: torch.Tensor
    ka: torch.Tensor

    def mask(self, rel: torch.Tensor) -> torch.Tensor | None:
        if self.select == "near":
            return rel.abs() <= self.width
        if self.select == "right":
            return rel > self.width
        if self.select == "left":
            return rel < -self.width
        return None


@dataclass
class Plan:
    """Everything ``attention`` needs for one call, derived from the method and the shapes."""

    method: ParsedMethod
    n: int
    train_len: int
    head_dim: int
    causal: bool
    positions: torch.Tensor  # (B or 1, n) float64
    inv_freq: torch.Tensor | None  # (B or 1, d/2) float64; None = no RoPE (ALiBi)
    regions: list[Region]
    logit_scale: torch.Tensor  # (B or 1,) base scale × YaRN m²
    normalize: bool  # CosScale
    slopes: torch.Tensor | None  # ALiBi (H,)
    window: int | None  # mask band half-width
    sinks: int
    temperature: str | None
    temperature_params: object
    key_padding_mask: torch.Tensor | None  # (B, n) bool, True = real key

    # -- masks and candidates --------------------------------------------------------------
    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Bool (B or 1, 1, r, c) of pairs a query may attend, or None when all are allowed."""
        ok = None
        i, j = rows[:, None], cols[None, :]
        if self.window is not None:
            ok = (i - j).abs() <= self.window
            if self.sinks:
                ok = ok | (j < self.sinks) | (i < self.sinks)
        if self.causal:
            c = j <= i
            ok = c if ok is None else ok & c
        if ok is not None:
            ok = ok[None, None]
        if self.key_padding_mask is not None:
            kp = self.key_padding_mask[:, None, None, cols]
            ok = kp if ok is None else ok & kp
        return ok

    def candidate_ranges(self, r0: int, r1: int) -> list[tuple[int, int]]:
        """Key index ranges that contain every key rows r0..r1-1 may attend."""
        hi = r1 if self.causal else self.n
        if self.window is None or r0 < self.sinks:
            return [(0, hi)]
        lo, hi = max(0, r0 - self.window), min(hi, r1 + self.window)
        if self.sinks and lo > self.sinks:
            return [(0, self.sinks), (lo, hi)]
        return [(0, hi)] if self.sinks else [(lo, hi)]

    # -- logits ------------------------------------------------------------------------------
    def temperature_factor(self, l: torch.Tensor) -> torch.Tensor | None:
        p = self.temperature_params
        if self.temperature == "infoscale":
            return infoscale_factor(l, self.train_len, self.head_dim, clamp=p.clamp)
        if self.temperature == "logn":
            return logn_factor(l, self.train_len, clamp=p.clamp)
        if self.temperature == "softmax_plus":
            return softmax_plus_factor(l, p.base)
        return None


def _as_bool_mask(key_padding_mask, b: int, n: int, device) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    m = torch.as_tensor(key_padding_mask, device=device)
    if m.shape != (b, n):
        raise ValueError(f"key_padding_mask must have shape (batch, n) = {(b, n)}, got {tuple(m.shape)}")
    return m.bool() if m.dtype != torch.bool else m


def build_plan(method, *, n: int, batch: int, heads: int, head_dim: int, train_len: int,
               causal: bool = False, key_padding_mask=None, positions=None,
               device: torch.device | str = "cpu") -> Plan:
    """Resolve a method for one call: frequencies, regions, scales, masks (see module docstring)."""
    if not isinstance(train_len, int) or train_len < 1:
        raise MethodError(f"train_len must be a positive integer, got {train_len!r}")
    pm = parse_method(method, train_len).resolved(train_len)
    device = torch.device(device)
    kpm = _as_bool_mask(key_padding_mask, batch, n, device)
    # Per-sequence length: the number of real keys. Length-dependent methods (PI, NTK, YaRN with a
    # dynamic factor; Leaky ReRoPE's default k) use it, so padding a batch changes nothing.
    n_eff = (kpm.sum(-1).double() if kpm is not None else torch.full((1,), float(n), dtype=torch.float64))
    n_eff = n_eff.to(device).clamp(min=1)
    rows = n_eff.shape[0]

    if positions is None:
        pos = torch.arange(n, dtype=torch.float64, device=device)[None]
    else:
        pos = torch.as_tensor(positions, device=device).to(torch.float64)
        pos = pos[None] if pos.dim() == 1 else pos
        if pos.shape[-1] != n or pos.shape[0] not in (1, batch):
            raise ValueError(f"positions must have shape (n,) or (batch, n) with n = {n}, got {tuple(pos.shape)}")

    scale = 1.0 / math.sqrt(head_dim)
    normalize = pm.get("cosscale") is not None
    if normalize:
        scale = float(pm.get("cosscale").s)
    logit_scale = torch.full((rows,), scale, dtype=torch.float64, device=device)

    ones, zeros = torch.ones(rows, 1, dtype=torch.float64, device=device), torch.zeros(rows, 1,
                                                                                      dtype=torch.float64,
                                                                                      device=device)
    inv_freq = rope.rope_inv_freq(head_dim).to(device)[None].expand(rows, -1)
    regions = [Region("all", 0.0, ones, zeros, ones)]
    slopes = None
    dyn = (n_eff / train_len).clamp(min=1.0)  # s = n / L, at least 1

    pos_c = pm.slot("positions")
    if pos_c is not None:
        p = pos_c.params
        name = pos_c.name
        if name in ("pi", "ntk", "yarn"):
            s = torch.full_like(dyn, float(p.factor)) if p.factor is not None else dyn
            fn = {
                "pi": lambda v: rope.pi_inv_freq(head_dim, v),
                "ntk": lambda v: rope.ntk_inv_freq(head_dim, v),
                "yarn": lambda v: rope.yarn_inv_freq(head_dim, v, train_len, p.beta_fast, p.beta_slow),
            }[name]
            inv_freq = torch.stack([fn(float(v)) for v in s]).to(device)
            if name == "yarn":
                m = torch.tensor([yarn_attention_factor(float(v)) for v in s], dtype=torch.float64, device=device)
                logit_scale = logit_scale * m**2
        elif name in ("rerope", "leaky_rerope", "lm_infinite"):
            w = float(p.cap if name == "lm_infinite" else p.window)
            if name == "leaky_rerope":
                if p.k is not None:
                    kk = torch.full_like(dyn, float(p.k))
                else:  # smallest slope that keeps the longest distance within L - 1
                    span = max(train_len - 1 - w, 1.0)
                    kk = ((n_eff - 1 - w) / span).clamp(min=1.0)
                kk = kk[:, None]
            else:
                kk = torch.full_like(ones, math.inf)
            a = 1.0 / kk  # 0 for ReRoPE (k = ∞)
            shift = w * (1.0 - a)
            regions = [
                Region("near", w, ones, zeros, ones),
                Region("right", w, a, -shift, a),  # Δ' = w + (Δ − w)/k
                Region("left", w, a, shift, a),  # Δ' = −w + (Δ + w)/k
            ]
        elif name == "alibi":
            inv_freq = None
            slopes = torch.tensor(alibi_slopes(heads, p.max_bias), dtype=torch.float32, device=device)

    window, sinks = None, 0
    mask_c = pm.slot("mask")
    if mask_c is not None:
        p = mask_c.params
        window = p.width if mask_c.name == "window" else p.window
        sinks = getattr(p, "sinks", 0)

    temp_c = pm.slot("temperature")
    return Plan(method=pm, n=n, train_len=train_len, head_dim=head_dim, causal=causal, positions=pos,
                inv_freq=inv_freq, regions=regions, logit_scale=logit_scale, normalize=normalize,
                slopes=slopes, window=window, sinks=sinks,
                temperature=temp_c.name if temp_c else None,
                temperature_params=temp_c.params if temp_c else None, key_padding_mask=kpm)


# --------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------


def _rotated(plan: Plan, q: torch.Tensor, k: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q, k) rotated for each region; q, k: (B, H, n, d)."""
    if plan.normalize:  # CosScale: unit vectors; RoPE preserves the norm so cos stays a cosine
        q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if plan.inv_freq is None:
        return [(q, k)]
    out = []
    p, f = plan.positions, plan.inv_freq[:, None, :]  # (B|1, n), (B|1, 1, d/2)
    for r in plan.regions:
        qa = ((r.qa * p + r.qb)[..., None] * f)[:, None]  # (B, 1, n, d/2)
        ka = ((r.ka * p)[..., None] * f)[:, None]
        out.append((rope.rotate(q, qa), rope.rotate(k, ka)))
    return out


def _gather(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    parts = [x[:, :, a:b] for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _block(plan: Plan, rot, v, r0: int, r1: int, ranges, dtype, dropout_p: float, training: bool):
    """Attention for query rows r0..r1-1 over the keys in ``ranges``; returns (out, weights, logits)."""
    dev = v.device
    rows = torch.arange(r0, r1, device=dev)
    cols = torch.cat([torch.arange(a, b, device=dev) for a, b in ranges])
    rel = None
    if len(plan.regions) > 1 or plan.slopes is not None:
        p = plan.positions
        rel = (p[:, cols][:, None, :] - p[:, rows][:, :, None])[:, None]  # (B|1, 1, r, c)

    allowed = plan.allowed(rows, cols)
    # Row factor c · m² · t(l_i): folded into the query rows so the score matrix is touched once less.
    factor = plan.logit_scale.view(-1, 1, 1, 1)
    t = None
    if plan.temperature is not None:
        if allowed is None:
            l = torch.full((1, 1, r1 - r0, 1), float(cols.numel()), dtype=torch.float64, device=dev)
        else:
            l = allowed.sum(-1, keepdim=True, dtype=torch.float64)
        t = plan.temperature_factor(l)
        factor = factor * t

    # CosScale's logits are s·cos with s ~ 100: bf16's 8-bit mantissa would put ~0.5 of noise on
    # them, so its q·k stays in fp32 (only the larger p·v product drops to bf16).
    qk_dtype = torch.float32 if plan.normalize else dtype
    scores = None
    for region, (qr, kr) in zip(plan.regions, rot, strict=True):
        qs = (qr[:, :, r0:r1].float() * factor.float()).to(qk_dtype)
        with torch.autocast(qs.device.type, enabled=not plan.normalize and torch.is_autocast_enabled(qs.device.type)):
            s = torch.matmul(qs, _gather(kr, ranges).to(qk_dtype).transpose(-1, -2))
        sel = region.mask(rel) if rel is not None else None
        scores = s if sel is None or scores is None else torch.where(sel, s, scores)
    if plan.slopes is not None:
        bias = plan.slopes.view(1, -1, 1, 1) * rel.abs().float()
        scores = scores.float() - (bias if t is None else bias * t.float())

    inplace = not (torch.is_grad_enabled() and scores.requires_grad)
    if allowed is not None:
        fill = torch.finfo(scores.dtype).min
        scores = scores.masked_fill_(~allowed, fill) if inplace else scores.masked_fill(~allowed, fill)
    w = torch.softmax(scores, dim=-1)
    if allowed is not None:  # a query with no key left attends to nothing (no NaN, no weight)
        empty = ~allowed.any(-1, keepdim=True)
        if empty.any():
            w = w.masked_fill(empty, 0.0)
    if dropout_p > 0 and training:
        w = torch.nn.functional.dropout(w, p=dropout_p)
    out = torch.matmul(w.to(dtype), _gather(v, ranges).to(dtype))
    return out, w, scores


def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D (batch, heads, n, d); got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (batch, heads, n, d_v) matching q's first three dims {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if q.shape[-1] % 2:
        raise ValueError(f"the head dimension must be even for RoPE, got {q.shape[-1]}")


def _plan_for(q, method, train_len, causal, key_padding_mask, positions) -> Plan:
    b, h, n, d = q.shape
    return build_plan(method, n=n, batch=b, heads=h, head_dim=d, train_len=train_len, causal=causal,
                      key_padding_mask=key_padding_mask, positions=positions, device=q.device)


def attention_reference(q, k, v, method="softmax", *, train_len: int, causal: bool = False,
                        key_padding_mask=None, positions=None, dropout_p: float = 0.0,
                        training: bool = False, plan: Plan | None = None):
    """The reference path: the whole (B, H, n, n) score matrix in fp32. Returns (out, weights)."""
    _check_inputs(q, k, v)
    plan = plan or _plan_for(q, method, train_len, causal, key_padding_mask, positions)
    rot = _rotated(plan, q.float(), k.float())
    out, w, _ = _block(plan, rot, v.float(), 0, plan.n, [(0, plan.n)], torch.float32, dropout_p, training)
    return out.to(v.dtype), w


def attention_logits(q, k, method="softmax", *, train_len: int, causal: bool = False,
                     key_padding_mask=None, positions=None) -> torch.Tensor:
    """The (B, H, n, n) pre-softmax logits of the reference path (masked entries at the dtype's min)."""
    v = q.new_zeros(q.shape[:3] + (1,))
    _check_inputs(q, k, v)
    plan = _plan_for(q, method, train_len, causal, key_padding_mask, positions)
    rot = _rotated(plan, q.float(), k.float())
    return _block(plan, rot, v.float(), 0, plan.n, [(0, plan.n)], torch.float32, 0.0, False)[2]


def attention_fast(q, k, v, method="softmax", *, train_len: int, causal: bool = False,
                   key_padding_mask=None, positions=None, chunk_size: int | None = None,
                   bf16: bool = False, dropout_p: float = 0.0, training: bool = False,
                   plan: Plan | None = None):
    """The fast path: query chunks against their reachable keys; bf16 matmuls when ``bf16``.

    Softmax and masking stay in fp32 either way. No (n × n) tensor is kept: peak memory is
    O(chunk × n) (O(chunk × window) for windowed methods).
    """
    _check_inputs(q, k, v)
    plan = plan or _plan_for(q, method, train_len, causal, key_padding_mask, positions)
    chunk = chunk_size or (2 * DEFAULT_CHUNK if bf16 else DEFAULT_CHUNK)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    dev = q.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        bf16 = True  # honour the caller's bf16 autocast (softmax and masks still run in fp32)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rot = _rotated(plan, q.float(), k.float())
    if bf16:  # cast once, not per chunk
        if not plan.normalize:
            rot = [(a.to(dtype), b.to(dtype)) for a, b in rot]
        v = v.to(dtype)
    outs = []
    for r0 in range(0, plan.n, chunk):
        r1 = min(plan.n, r0 + chunk)
        o, _, _ = _block(plan, rot, v, r0, r1, plan.candidate_ranges(r0, r1), dtype, dropout_p, training)
        outs.append(o)
    return torch.cat(outs, dim=2).to(q.dtype if q.is_floating_point() else torch.float32)


def attention(q, k, v, method="softmax", *, train_len: int, causal: bool = False, key_padding_mask=None,
              return_weights: bool = False, positions=None, impl: str = "auto",
              chunk_size: int | None = None, bf16: bool = False, dropout_p: float = 0.0,
              training: bool = False):
    """Attention with a length-extrapolation method.

    Args:
        q, k: (batch, heads, n, d_k) **before** positional encoding.
        v: (batch, heads, n, d_v); d_v is free (GAU has d_v ≫ d_k).
        method: a method string, e.g. ``"yarn+infoscale"`` or ``"rerope(window=32)"``.
        train_len: L, the length the model was trained at.
        causal: attend to j <= i only.
        key_padding_mask: (batch, n), True/1 for real keys; padded keys get no weight and are not
            counted in l.
        return_weights: also return the (batch, heads, n, n) weights (uses the reference path).
        positions: optional (n,) or (batch, n) RoPE positions (PoSE training); default 0..n−1.
        impl: "auto" (fast unless weights are asked for), "fast" or "reference".
        chunk_size, bf16: fast-path controls.
        dropout_p, training: attention dropout, applied when ``training``.
    """
    if impl not in ("auto", "fast", "reference"):
        raise ValueError(f"impl must be 'auto', 'fast' or 'reference', got {impl!r}")
    if return_weights or impl == "reference":
        out, w = attention_reference(q, k, v, method, train_len=train_len, causal=causal,
                                     key_padding_mask=key_padding_mask, positions=positions,
                                     dropout_p=dropout_p, training=training)
        return (out, w) if return_weights else out
    return attention_fast(q, k, v, method, train_len=train_len, causal=causal,
                          key_padding_mask=key_padding_mask, positions=positions, chunk_size=chunk_size,
                          bf16=bf16, dropout_p=dropout_p, training=training)
