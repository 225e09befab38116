"""The plan of one attention call: the registry's functions folded over the method's components.

Nothing here names a method: every effect comes from a function the method registered
(:mod:`infoscale.attn.methods`). A plan is built once per forward pass and shared by the layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .errors import MethodError
from .methods import Context, ParsedMethod, Region, parse_method
from .rope import Rope

__all__ = ["Plan", "build_plan", "in_window", "with_dims"]


def in_window(qp, kp, window: int, sinks: int):
    """Whether a query at position ``qp`` may attend a key at ``kp`` under a window with sinks (StreamingLLM's
    mask, LM-Infinite's Λ): |p_i − p_j| <= window, or p_j < sinks, or p_i < sinks. The sinks are the positions
    0 .. sinks − 1, the start of the sequence (with pad-aware positions, the first real tokens; a pad's negative
    position is no sink). ``qp`` and ``kp`` broadcast against each other (tensors, or transformers' index
    tensors inside a mask function)."""
    ok = (kp >= qp - window) & (kp <= qp + window)  # |p_i − p_j| <= window without an r × c difference
    if sinks:
        ok = ok | (kp < sinks) | (qp < sinks)
    return ok


@dataclass
class Plan:
    """Everything ``attention`` needs for one call, derived from the method and the shapes."""

    method: ParsedMethod
    n_q: int
    n_k: int
    train_len: int
    head_dim: int
    causal: bool
    q_pos: torch.Tensor  # (B or 1, n_q) float64
    k_pos: torch.Tensor  # (B or 1, n_k) float64
    banded: bool  # positions are the default indices, so a band of positions is a band of indices
    rope: Rope | None
    inv_freq: torch.Tensor | None  # (B or 1, rope.dim/2) float64; None = no rotation
    regions: list[Region]
    logit_scale: torch.Tensor  # (B or 1,) the base scale (1/sqrt(d), the caller's, or CosScale's s) × factors
    normalize: bool  # CosScale
    slopes: torch.Tensor | None  # ALiBi (H,)
    slopes_right: torch.Tensor | None  # ALiBi slopes for keys right of the query (H,); None = symmetric
    window: int | None  # mask band half-width
    sinks: int
    cache_positions: bool  # positions within the kept set (StreamingLLM): see :func:`kept_query_positions`
    temperature: object  # (l) -> factor, or None
    softcap: float | None
    key_padding_mask: torch.Tensor | None  # (B, n_k) bool, True = real key
    attn_mask: torch.Tensor | None  # bool, broadcastable to (B, H, n_q, n_k), True = may attend

    # -- masks and candidates --------------------------------------------------------------
    def allowed(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Bool (B or 1, H or 1, r, c) of the pairs (query rows, key cols) a query may attend, or None
        when all are allowed. Bands, sinks and causality are on positions (sinks: positions 0 .. sinks − 1,
        so a caller with pad-aware positions gets the first real tokens)."""
        ok = None
        pi, pj = self.q_pos[:, rows][:, None, :, None], self.k_pos[:, cols][:, None, None, :]
        if self.window is not None:
            ok = in_window(pi, pj, self.window, self.sinks)
        if self.causal:
            c = pj <= pi
            ok = c if ok is None else ok & c
        if self.key_padding_mask is not None:
            kp = self.key_padding_mask[:, None, None, cols]
            ok = kp if ok is None else ok & kp
        if self.attn_mask is not None:
            am = self.attn_mask[..., rows, :][..., cols]
            ok = am if ok is None else ok & am
        return ok

    def candidate_ranges(self, r0: int, r1: int) -> list[tuple[int, int]]:
        """Key index ranges that contain every key query rows r0..r1-1 may attend."""
        off = self.n_k - self.n_q  # query row r sits at key index r + off
        hi = min(self.n_k, r1 + off) if self.causal and self.banded else self.n_k
        if self.window is None or not self.banded or r0 + off < self.sinks:
            return [(0, hi)]
        lo, hi = max(0, r0 + off - self.window), min(hi, r1 + off + self.window)
        if self.sinks and lo > self.sinks:
            return [(0, self.sinks), (lo, hi)]
        return [(0, hi)] if self.sinks else [(lo, hi)]


def _as_bool_mask(key_padding_mask, b: int, n: int, device) -> torch.Tensor | None:
    if key_padding_mask is None:
        return None
    m = torch.as_tensor(key_padding_mask, device=device)
    if m.shape != (b, n):
        raise MethodError(f"key_padding_mask must have shape (batch, n) = {(b, n)}, got {tuple(m.shape)}")
    if m.is_complex():
        raise MethodError(f"key_padding_mask must be bool (True = real key) or additive float, got {m.dtype}")
    if m.is_floating_point():  # additive, as transformers and SDPA use it: 0 keeps a key, -inf drops it
        keep, drop = m == 0, m <= torch.finfo(m.dtype).min / 2
        if not bool((keep | drop).all()):
            bad = m[~(keep | drop)].flatten()[0].item()
            raise MethodError(f"a float key_padding_mask is additive (0 = keep the key, -inf = drop it), but it holds "
                              f"{bad}; pass a bool mask (True = real key) or only 0 and -inf")
        return keep
    return m.bool() if m.dtype != torch.bool else m


def _positions(given, default: torch.Tensor, batch: int, name: str, device) -> torch.Tensor:
    if given is None:
        return default[None]
    pos = torch.as_tensor(given, device=device)
    if pos.is_complex():
        raise MethodError(f"{name} must be real, got {pos.dtype}")
    pos = pos.to(torch.float64)
    pos = pos[None] if pos.dim() == 1 else pos
    n = default.shape[0]
    if pos.dim() != 2 or pos.shape[-1] != n or pos.shape[0] not in (1, batch):
        raise MethodError(f"{name} must have shape (n,) or (batch, n) with n = {n}, got {tuple(pos.shape)}")
    if not bool(torch.isfinite(pos).all()):
        raise MethodError(f"{name} holds NaN or infinite values; positions must be finite numbers")
    return pos


def _positive_number(scale) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if isinstance(scale, (bool, str, bytes)) or not (math.isfinite(value) and value > 0):
        raise MethodError(f"scale must be a positive finite number (the logit scale, default 1/sqrt(d)), got {scale!r}")
    return value


def kept_query_positions(qp: torch.Tensor, kp: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """The query's position against each key under positions within the kept set (StreamingLLM, Xiao et al. 2023,
    arXiv 2309.17453 §3.2): query i keeps the sinks 0 .. sinks − 1 and the keys with |p_i − p_j| <= window, each at
    its index in that set, so the query sits at min(p_i, sinks + window); a key inside the window keeps its distance
    p_i − p_j and a sink beyond it is min(p_i, sinks + window) − p_j away. ``qp``, ``kp`` broadcast against each
    other; returns the query position to use for each pair (p_i where nothing moves)."""
    far_sink = (kp < sinks) & ((qp - kp).abs() > window)
    return torch.where(far_sink, qp.clamp(max=float(sinks + window)), qp)


def _kept_region(window: int, sinks: int) -> Region:
    """The pairs whose positions move under positions within the kept set: sinks beyond the window, the query
    rotated at min(p_i, sinks + window)."""
    return Region(lambda qp, kp: (kp < sinks) & ((kp < qp - window) | (kp > qp + window)),
                  lambda pos: pos.clamp(max=float(sinks + window)))


def _call_temperature(f, params, ctx, l):
    return f(params, l, ctx)


def build_plan(method, *, n: int | None = None, batch: int, heads: int, head_dim: int, train_len: int,
               n_q: int | None = None, n_k: int | None = None, causal: bool = False, key_padding_mask=None,
               attn_mask=None, positions=None, key_positions=None, rope: Rope | bool | None = None,
               scale: float | None = None, softcap: float | None = None, seq_len=None, dims: float | None = None,
               device: torch.device | str = "cpu") -> Plan:
    """Resolve a method for one call: frequencies, regions, scales, masks (see :mod:`infoscale.attn.kernel`).

    ``n`` sets both lengths; ``n_q`` < ``n_k`` when queries are the last ``n_q`` of the keys (decoding).
    ``dims``: the calibrated effective dimension ``infoscale(calibrated=True)`` uses (see :func:`with_dims`).
    """
    if not isinstance(train_len, int) or isinstance(train_len, bool) or train_len < 1:
        raise MethodError(f"train_len must be a positive integer, got {train_len!r}")
    given = {k: v for k, v in (("n", n), ("n_q", n_q), ("n_k", n_k)) if v is not None}
    bad = [k for k, v in given.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    n_q, n_k = (n if n_q is None else n_q), (n if n_k is None else n_k)
    if bad or n_q is None or n_k is None:
        passed = ", ".join(f"{k}={v!r}" for k, v in given.items()) or "none of them"
        raise MethodError(f"build_plan needs the sequence length: n (queries and keys) or both n_q and n_k, each a "
                          f"positive integer; got {passed}")
    pm = parse_method(method, train_len).resolved(train_len)
    device = torch.device(device)
    if rope is None:
        rope = Rope(head_dim)
    elif rope is False:
        rope = None
    elif rope.dim > head_dim:
        raise MethodError(f"RoPE rotates {rope.dim} dims but the head has {head_dim}")
    kpm = _as_bool_mask(key_padding_mask, batch, n_k, device)
    if attn_mask is not None:
        attn_mask = torch.as_tensor(attn_mask, device=device)
        if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[-2:] != (n_q, n_k):
            raise MethodError(f"attn_mask must be a bool tensor (batch or 1, heads or 1, {n_q}, {n_k}), got "
                              f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
    k_default = torch.arange(n_k, dtype=torch.float64, device=device)
    if key_positions is None and n_q == n_k:  # self-attention: one sequence, one set of positions
        key_positions = positions
    k_pos = _positions(key_positions, k_default, batch, "key_positions", device)
    q_pos = _positions(positions, k_default[n_k - n_q:], batch, "positions", device)
    banded = ((positions is None or torch.equal(q_pos[0], k_default[n_k - n_q:]) and (q_pos == q_pos[:1]).all())
              and (key_positions is None or torch.equal(k_pos[0], k_default) and (k_pos == k_pos[:1]).all()))

    # n per row for length-dependent methods: the real keys (padding changes nothing), or the caller's
    if seq_len is not None:
        n_eff = torch.as_tensor(seq_len, dtype=torch.float64, device=device).reshape(-1)
        if n_eff.numel() == 0 or not bool((torch.isfinite(n_eff) & (n_eff >= 1)).all()):
            raise MethodError(f"seq_len must be a finite number >= 1 (the sequence length n), or one per batch row; "
                              f"got {seq_len!r}")
    elif kpm is not None:
        n_eff = kpm.sum(-1).double()
    else:
        n_eff = torch.full((1,), float(n_k), dtype=torch.float64, device=device)
    n_eff = n_eff.clamp(min=1).cpu()
    rows = n_eff.shape[0]
    ctx = Context(train_len=train_len, head_dim=head_dim, heads=heads, rope=rope, seq_len=n_eff, dims=dims)

    base_scale = 1.0 / math.sqrt(head_dim) if scale is None else _positive_number(scale)
    logit_scale = torch.full((rows,), base_scale, dtype=torch.float64)
    inv_freq = rope.frequencies()[None] if rope is not None else None
    regions = [Region(None)]
    normalize, slopes, slopes_right, window, sinks, temperature = False, None, None, None, 0, None
    cache_positions, region_method = None, None
    for c in pm.components:
        m, p = c.method, c.params
        if m.causal_only and not causal:
            raise MethodError(f"{c.name} is defined for causal attention only (its positions assume every key "
                              f"precedes its query); this attention is bidirectional")
        if m.normalize is not None:
            normalize = True
            logit_scale = torch.full((rows,), m.normalize(p), dtype=torch.float64)
        if m.temperature is not None:
            temperature = functools.partial(_call_temperature, m.temperature, p, ctx)
        if m.positions is not None:
            eff = m.positions(p, ctx)
            if eff.inv_freq is not None:
                inv_freq = eff.inv_freq
            if eff.logit_factor is not None:
                logit_scale = logit_scale * eff.logit_factor
            if eff.regions is not None:
                regions, region_method = eff.regions, c.name
            if eff.slopes is not None:
                slopes, inv_freq = eff.slopes.to(device), None
                slopes_right = eff.slopes_right.to(device) if eff.slopes_right is not None else None
        if m.mask is not None:
            window, sinks = m.mask(p)
        if m.cache_positions is not None and m.cache_positions(p):
            cache_positions = c.name
    if cache_positions is not None and inv_freq is not None:
        if region_method is not None:
            raise MethodError(f"{cache_positions}'s positions within the cache do not compose with {region_method}'s "
                              f"piecewise positions; give {cache_positions}(true_positions=True) to combine them")
        regions = regions + [_kept_region(window, sinks)]
    if causal:  # a region of keys after their query only holds pairs causality masks: not scored at all
        regions = [r for i, r in enumerate(regions) if i == 0 or not r.later_keys]
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise MethodError(f"softcap must be a positive number, got {softcap}")
    to = {"device": device}
    return Plan(method=pm, n_q=n_q, n_k=n_k, train_len=train_len, head_dim=head_dim, causal=causal, q_pos=q_pos,
                k_pos=k_pos, banded=bool(banded), rope=rope if inv_freq is not None else None,
                inv_freq=inv_freq.to(**to) if inv_freq is not None else None,
                regions=regions,
                logit_scale=logit_scale.to(**to), normalize=normalize, slopes=slopes,
                slopes_right=slopes_right, window=window, sinks=sinks, cache_positions=cache_positions is not None,
                temperature=temperature, softcap=softcap, key_padding_mask=kpm, attn_mask=attn_mask)


def with_dims(plan: Plan, dims: float | None) -> Plan:
    """The same plan with another calibrated dimension for ``infoscale(calibrated=True)`` (one per layer):
    only the length temperature changes, everything else is shared, so a per-layer variant costs nothing."""
    if plan.temperature is None:
        return plan
    f, p, ctx = plan.temperature.args
    return dataclasses.replace(plan, temperature=functools.partial(_call_temperature, f, p,
                                                                   dataclasses.replace(ctx, dims=dims)))
