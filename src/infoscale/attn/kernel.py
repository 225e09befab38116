"""``attention()``: every registered method, one reference path and one fast path.

Both paths build the same :class:`Plan` from a method string and differ only in how they sweep the
score matrix: the reference path forms the whole n×n matrix (and can return the weights); the fast
path walks over query chunks, scores each chunk only against the keys its mask can reach (a band and
the sinks for window methods), optionally in bf16, so memory stays O(n · chunk) and windowed methods
cost O(n · window).

Logits, for query i and key j (RoPE-family methods):

    z_ij = t(l_i) · (c · ⟨R_{a(i,j)} q_i, R_{b(i,j)} k_j⟩ · m² + bias_ij)

with c = 1/sqrt(d) or the caller's ``scale`` (s with L2-normalised q, k for CosScale), R the RoPE
rotation at (possibly scaled) frequencies, a, b the region-wise positions of piecewise methods
(ReRoPE, SelfExtend, DCA: each (i, j) takes the positions of the region it falls in), m YaRN's
attention factor, bias ALiBi's −m_h·|p_i − p_j|, t the length temperature of l_i keys attended
(InfoScale, log-n). With ``softcap`` the product c·⟨·,·⟩·m² is capped as
softcap·tanh(x/softcap) before t (Gemma 2). Masked keys get −inf; a row with no key left returns zeros.

Queries may be the last n_q of n_k keys (decoding with a KV cache): ``positions`` and
``key_positions`` give their RoPE positions; masks (causal, window, sinks) are on positions.
"""

from __future__ import annotations

import torch

from . import rope as _rope
from .errors import MethodError
from .plan import Plan, build_plan, kept_query_positions
from .rope import Rope

__all__ = ["attention", "attention_reference", "attention_fast", "attention_logits", "Plan", "build_plan"]

# Query rows per chunk: ~256 × n fp32 scores (16 MB at n = 16384) measured fastest here; bf16 scores
# are half the bytes, so twice the rows.
DEFAULT_CHUNK = 256


def _rotated(plan: Plan, q: torch.Tensor, k: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(q, k) rotated for each region; q: (B, H, n_q, d), k: (B, H, n_k, d)."""
    if plan.normalize:  # CosScale: unit vectors; RoPE preserves the norm so cos stays a cosine
        q = q / q.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        k = k / k.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if plan.inv_freq is None:
        return [(q, k)]
    out = []
    f = plan.inv_freq[:, None, :]  # (B|1, 1, r/2)
    layout, scaling = plan.rope.layout, plan.rope.attention_scaling
    for r in plan.regions:
        qa = (r.q_at(plan.q_pos)[..., None] * f)[:, None]  # (B|1, 1, n_q, r/2)
        ka = (r.k_at(plan.k_pos)[..., None] * f)[:, None]
        out.append((_rope.rotate(q, qa, layout, scaling), _rope.rotate(k, ka, layout, scaling)))
    return out


def _gather(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    parts = [x[:, :, a:b] for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _gather_cols(x: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    parts = [x[..., a:b] for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _prepare(plan: Plan, rot, dtype, prescale: bool):
    """Per region, q (scaled once by the row-independent logit scale when ``prescale``, which saves a
    pass per chunk) and kᵀ made contiguous once, both in the q·k dtype."""
    qk_dtype = torch.float32 if plan.normalize else dtype
    scale = plan.logit_scale.view(-1, 1, 1, 1).float() if prescale else None
    out = []
    for qr, kr in rot:
        q = (qr.float() * scale) if scale is not None else qr
        out.append((q.to(qk_dtype), kr.to(qk_dtype).transpose(-1, -2).contiguous()))
    return out


def _block(plan: Plan, rot, v, r0: int, r1: int, ranges, dtype, dropout_p: float, training: bool,
           prescaled: bool = False):
    """Attention for query rows r0..r1-1 over the keys in ``ranges``; returns (out, weights, logits).
    ``rot`` holds (q, kᵀ) per region (see :func:`_prepare`); with ``prescaled`` q already carries the
    logit scale."""
    dev = v.device
    rows = torch.arange(r0, r1, device=dev)
    cols = torch.cat([torch.arange(a, b, device=dev) for a, b in ranges])
    qp, kp = plan.q_pos[:, rows][:, :, None], plan.k_pos[:, cols][:, None, :]  # (B|1, r, 1), (B|1, 1, c)
    rel = None
    if plan.slopes is not None:  # ALiBi's distance, on positions within the kept set when the method asks for them
        q_at = kept_query_positions(qp, kp, plan.window, plan.sinks) if plan.cache_positions else qp
        rel = (kp - q_at)[:, None]  # (B|1, 1, r, c)

    allowed = plan.allowed(rows, cols)
    # Row factor c · m² · t(l_i): folded into the query rows so the score matrix is touched once less
    # (after the cap when there is a softcap).
    factor = None if prescaled else plan.logit_scale.view(-1, 1, 1, 1)
    t = None
    if plan.temperature is not None:
        if allowed is None:
            l = torch.full((1, 1, r1 - r0, 1), float(cols.numel()), dtype=torch.float64, device=dev)
        else:
            l = allowed.sum(-1, keepdim=True, dtype=torch.float64)
        t = plan.temperature(l)
        if plan.softcap is None:
            factor = t if factor is None else factor * t

    # CosScale's logits are s·cos with s ~ 100: bf16's 8-bit mantissa would put ~0.5 of noise on
    # them, so its q·k stays in fp32 (only the larger p·v product drops to bf16).
    qk_dtype = torch.float32 if plan.normalize else dtype
    scores = None
    for region, (qr, kt) in zip(plan.regions, rot, strict=True):
        qs = qr[:, :, r0:r1]
        if factor is not None:
            qs = (qs.float() * factor.float()).to(qk_dtype)
        with torch.autocast(qs.device.type, enabled=not plan.normalize and torch.is_autocast_enabled(qs.device.type)):
            s = torch.matmul(qs.to(qk_dtype), _gather_cols(kt, ranges).to(qk_dtype))
        # the first region scores every pair; each later one overwrites the pairs it selects
        scores = s if scores is None else torch.where(region.select(qp, kp)[:, None], s, scores)
    if plan.softcap is not None:
        scores = plan.softcap * torch.tanh(scores.float() / plan.softcap)
        if t is not None:
            scores = scores * t.float()
    if plan.slopes is not None:
        bias = plan.slopes.view(1, -1, 1, 1) * rel.abs().float()
        if plan.slopes_right is not None:  # asymmetric ALiBi: keys right of the query (Δ > 0) have own slopes
            bias = torch.where(rel > 0, plan.slopes_right.view(1, -1, 1, 1) * rel.float(), bias)
        scores = scores.float() - (bias if t is None else bias * t.float())

    inplace = not (torch.is_grad_enabled() and scores.requires_grad)
    if allowed is not None:
        fill = torch.finfo(scores.dtype).min
        allowed = allowed.expand(scores.shape) if allowed.shape != scores.shape else allowed
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
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise MethodError(f"{name} must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__}; convert "
                              f"it with torch.as_tensor")
        if x.is_complex():
            raise MethodError(f"{name} is complex ({x.dtype}); attention takes real q, k, v (RoPE is applied here, "
                              f"pass them before it)")
        if x.device.type == "meta":
            raise MethodError(f"{name} is on the meta device, which holds no values; move it to a real device")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise MethodError("q, k, v must be 4-D (batch, heads, n, d); got shapes "
                          f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or q.shape[2] > k.shape[2]:
        raise MethodError(f"q (batch, heads, n_q, d) and k (batch, heads, n_k, d) must agree with n_q <= n_k, got "
                          f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise MethodError(f"v must be (batch, heads, n_k, d_v) matching k's first three dims {tuple(k.shape[:3])}, "
                          f"got {tuple(v.shape)}")


def _check_chunk(chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise MethodError(f"chunk_size must be a positive integer (query rows per chunk) or None, got {chunk_size!r}")


def _plan_for(q, k, method, train_len, kw) -> Plan:
    b, h, n_q, d = q.shape
    return build_plan(method, batch=b, heads=h, head_dim=d, train_len=train_len, n_q=n_q, n_k=k.shape[2],
                      device=q.device, **kw)


def _plan_kwargs(causal, key_padding_mask, attn_mask, positions, key_positions, rope, scale, softcap, seq_len):
    return dict(causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, positions=positions,
                key_positions=key_positions, rope=rope, scale=scale, softcap=softcap, seq_len=seq_len)


def attention_reference(q, k, v, method="softmax", *, train_len: int, causal: bool = False,
                        key_padding_mask=None, attn_mask=None, positions=None, key_positions=None,
                        rope: Rope | bool | None = None, scale: float | None = None, softcap: float | None = None,
                        seq_len=None, dropout_p: float = 0.0, training: bool = False, plan: Plan | None = None):
    """The reference path: the whole (B, H, n_q, n_k) score matrix in fp32. Returns (out, weights)."""
    _check_inputs(q, k, v)
    plan = plan or _plan_for(q, k, method, train_len, _plan_kwargs(causal, key_padding_mask, attn_mask, positions,
                                                                   key_positions, rope, scale, softcap, seq_len))
    rot = _prepare(plan, _rotated(plan, q.float(), k.float()), torch.float32, prescale=False)
    out, w, _ = _block(plan, rot, v.float(), 0, plan.n_q, [(0, plan.n_k)], torch.float32, dropout_p, training)
    return out.to(v.dtype), w


def attention_logits(q, k, method="softmax", *, train_len: int, causal: bool = False, key_padding_mask=None,
                     attn_mask=None, positions=None, key_positions=None, rope: Rope | bool | None = None,
                     scale: float | None = None, softcap: float | None = None, seq_len=None) -> torch.Tensor:
    """The (B, H, n_q, n_k) pre-softmax logits of the reference path (masked entries at the dtype's min)."""
    v = k.new_zeros(k.shape[:3] + (1,))
    _check_inputs(q, k, v)
    plan = _plan_for(q, k, method, train_len, _plan_kwargs(causal, key_padding_mask, attn_mask, positions,
                                                           key_positions, rope, scale, softcap, seq_len))
    rot = _prepare(plan, _rotated(plan, q.float(), k.float()), torch.float32, prescale=False)
    return _block(plan, rot, v.float(), 0, plan.n_q, [(0, plan.n_k)], torch.float32, 0.0, False)[2]


def attention_fast(q, k, v, method="softmax", *, train_len: int, causal: bool = False, key_padding_mask=None,
                   attn_mask=None, positions=None, key_positions=None, rope: Rope | bool | None = None,
                   scale: float | None = None, softcap: float | None = None, seq_len=None,
                   chunk_size: int | None = None, bf16: bool = False, dropout_p: float = 0.0, training: bool = False,
                   plan: Plan | None = None):
    """The fast path: query chunks against their reachable keys; bf16 matmuls when ``bf16``.

    Softmax and masking stay in fp32 either way. No (n × n) tensor is kept: peak memory is
    O(chunk × n) (O(chunk × window) for windowed methods).
    """
    _check_inputs(q, k, v)
    plan = plan or _plan_for(q, k, method, train_len, _plan_kwargs(causal, key_padding_mask, attn_mask, positions,
                                                                   key_positions, rope, scale, softcap, seq_len))
    _check_chunk(chunk_size)
    chunk = chunk_size or (2 * DEFAULT_CHUNK if bf16 else DEFAULT_CHUNK)
    dev = q.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        bf16 = True  # honour the caller's bf16 autocast (softmax and masks still run in fp32)
    dtype = torch.bfloat16 if bf16 else torch.float32
    # cast, scale and transpose once, not per chunk; without a temperature or cap the whole logit
    # scale is row-independent and rides on q
    prescale = plan.temperature is None and plan.softcap is None
    rot = _prepare(plan, _rotated(plan, q.float(), k.float()), dtype, prescale)
    v = v.to(dtype)
    out = None
    for r0 in range(0, plan.n_q, chunk):
        r1 = min(plan.n_q, r0 + chunk)
        o, _, _ = _block(plan, rot, v, r0, r1, plan.candidate_ranges(r0, r1), dtype, dropout_p, training, prescale)
        if out is None:
            out = o.new_empty(o.shape[:2] + (plan.n_q, o.shape[-1]))
        out[:, :, r0:r1] = o
    return out.to(q.dtype if q.is_floating_point() else torch.float32)


def attention(q, k, v, method="softmax", *, train_len: int, causal: bool = False, key_padding_mask=None,
              attn_mask=None, positions=None, key_positions=None, rope: Rope | bool | None = None,
              scale: float | None = None, softcap: float | None = None, seq_len=None,
              return_weights: bool = False, impl: str = "auto", chunk_size: int | None = None, bf16: bool = False,
              dropout_p: float = 0.0, training: bool = False, plan: Plan | None = None):
    """Attention with a length-extrapolation method.

    Args:
        q: (batch, heads, n_q, d_k), k: (batch, heads, n_k, d_k), both **before** positional encoding;
            n_q <= n_k, the queries being the last n_q keys unless ``positions`` says otherwise.
        v: (batch, heads, n_k, d_v); d_v is free (GAU has d_v ≫ d_k).
        method: a method string (``"yarn+infoscale"``, ``"rerope(window=32)"``) or a ParsedMethod.
        train_len: L, the length the model was trained at.
        causal: a query attends to keys at positions <= its own.
        key_padding_mask: (batch, n_k), True/1 for real keys; padded keys get no weight, are not
            counted in l, and do not count in n for dynamic methods. A float mask is additive, as in
            transformers and SDPA: 0 keeps a key, -inf (or the dtype's most negative value) drops it.
        attn_mask: bool, broadcastable to (batch, heads, n_q, n_k), True = may attend (a model's own
            mask: padding, causal, sliding window); combined with the method's masks.
        positions, key_positions: RoPE positions of queries, (n_q,) or (batch, n_q), and keys,
            (n_k,) or (batch, n_k); default: indices 0..n_k−1 (PoSE training passes its own). When
            n_q = n_k, ``positions`` alone sets both.
        rope: the model's RoPE (:class:`infoscale.attn.rope.Rope`); default adjacent pairs over the
            whole head at base 10000 (GAU-α); ``False``: no rotation (a NoPE layer).
        scale: the logit scale (default 1/sqrt(d_k)); CosScale replaces it by its s.
        softcap: cap the logits at ±softcap with softcap·tanh(x/softcap) (Gemma 2).
        seq_len: n for dynamic PI/NTK/YaRN (s = n / L) and Leaky ReRoPE's default k, a number or one
            per batch row; default: the number of real keys.
        return_weights: also return the (batch, heads, n_q, n_k) weights (uses the reference path).
        impl: "auto" (fast unless weights are asked for), "fast" or "reference".
        chunk_size, bf16: fast-path controls.
        dropout_p, training: attention dropout, applied when ``training``.
        plan: a plan built by :func:`build_plan` for these shapes (shared by the layers of one forward).
    """
    if impl not in ("auto", "fast", "reference"):
        raise MethodError(f"impl must be 'auto', 'fast' or 'reference', got {impl!r}")
    _check_chunk(chunk_size)
    kw = _plan_kwargs(causal, key_padding_mask, attn_mask, positions, key_positions, rope, scale, softcap, seq_len)
    if return_weights or impl == "reference":
        out, w = attention_reference(q, k, v, method, train_len=train_len, dropout_p=dropout_p, training=training,
                                     plan=plan, **kw)
        return (out, w) if return_weights else out
    return attention_fast(q, k, v, method, train_len=train_len, chunk_size=chunk_size, bf16=bf16,
                          dropout_p=dropout_p, training=training, plan=plan, **kw)
