"""A plan's attention as torch's fused ``scaled_dot_product_attention`` calls: one per position region, merged.

The reference path (:mod:`infoscale.attn.kernel`) writes every method as regions of (query, key) pairs, each with
its own rotation positions (ReRoPE's band and far sides, SelfExtend's neighbour and grouped attention, DCA's three
chunk relations, StreamingLLM's moved sinks). Softmax over the union of disjoint key sets is the merge of the
softmaxes over each set by their log-sum-exp (the identity FlashAttention's tiling and ring attention rest on;
Dao et al. 2022, arXiv 2205.14135, §3.1): with lse_r = log Σ_{j∈r} exp(z_ij) and o_r the softmax-weighted values
over region r,

    out_i = Σ_r exp(lse_r,i − lse_i) · o_r,i,   lse_i = log Σ_r exp(lse_r,i).

So each region is one fused attention call over the keys it owns (q and k rotated at that region's positions,
the row factor c·m²·t(l_i) folded into q, as in the reference path), and nothing of size n_q × n_k is kept
beyond one query chunk's masks. Per query chunk a region only scores the key columns it owns (ReRoPE's band
reaches w keys, its far side the keys before the band), so a two-region method costs about one attention, not
two, and decoding rotates only the keys a region scores (none for ReRoPE's far side, whose keys sit at position 0).

GQA: the query heads that share a key/value head are stacked along the rows (masks do not depend on the head),
so cached keys are never repeated. One region needs no merge and runs through the public
``torch.nn.functional.scaled_dot_product_attention`` (differentiable, any device). Several regions need each
call's log-sum-exp, which the public function does not return: on CPU the fused kernel behind it,
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, returns it. Elsewhere, with gradients, dropout, a
softcap or ALiBi, :func:`attention_sdpa` returns None and the caller takes the reference semantics' chunked path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import rope as _rope
from .plan import Plan

__all__ = ["attention_sdpa", "supported"]

# Query rows × key columns per chunk: the masks of one chunk hold this many entries per region.
CHUNK_ENTRIES = 1 << 24
CHUNKS = 16  # query chunks per prefill at most (each at least 256 rows)
# Below this many query rows (decoding) keys are rotated per region and chunk, only those the region scores.
ROTATE_ALL_FROM = 64
# Decoding with a key store (``rotated``): a region that scores at least this many keys takes them from the store
# (rotating only the keys it has not seen); fewer (ReRoPE's band) are rotated afresh each step, unless a region that
# places keys alike is stored (DCA's three regions share one store).
STORE_FROM = 1024


def _store_of(plan: Plan, idx: int) -> int:
    """The region whose key store region ``idx`` uses: the first that places keys by the same function."""
    k_at = plan.regions[idx].k_at
    return next(j for j, r in enumerate(plan.regions) if r.k_at is k_at)


def _lse_kernel(device: torch.device):
    if device.type != "cpu":
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def supported(plan: Plan, q: torch.Tensor, *, dropout_p: float = 0.0) -> bool:
    """Whether :func:`attention_sdpa` computes this plan (else the caller's chunked path does)."""
    if plan.softcap is not None or plan.slopes is not None or not q.is_floating_point():
        return False
    if len(plan.regions) == 1:
        return True
    grads = torch.is_grad_enabled() and q.requires_grad
    return not grads and dropout_p == 0.0 and _lse_kernel(q.device) is not None


def _with_lse(kernel, q, k, v, bias):
    """(out, lse) of one fused call; the kernel wants one head size for q, k and v, so the smaller side is padded
    with zeros (zero dims add nothing to q·k; zero value dims are cut off the output)."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv > d:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    elif dv < d:
        v = F.pad(v, (0, d - dv))
    out, lse = kernel(q, k, v, 0.0, False, attn_mask=bias, scale=1.0)
    return out[..., :dv], lse


def _rotate(plan: Plan, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, h, n, d) rotated at positions (B|1, n) with the plan's frequencies, in x's dtype. The angles are taken
    in float64 and reduced mod 2π before the float32 cos/sin (p·θ at p ≈ 16k needs float64; cos of the reduced
    angle does not)."""
    if plan.inv_freq is None:
        return x
    ang = torch.remainder(pos[..., None] * plan.inv_freq[:, None, :], 2 * math.pi)[:, None]  # (B|1, 1, n, r/2)
    return _rope.rotate(x.float(), ang.float(), plan.rope.layout, plan.rope.attention_scaling).to(x.dtype)


class _Rotated:
    """A region's keys rotated at its key positions, for the first ``m`` keys of a layer's cache, with the positions
    and frequencies they were rotated at: a buffer that grows by a quarter when full, so appending a step's key
    costs its own rotation and, amortised, a few copies."""

    __slots__ = ("buf", "pos", "freq", "rope", "m")

    def __init__(self):
        self.buf = self.pos = self.freq = self.rope = None
        self.m = 0


def _keys_at(plan: Plan, k: torch.Tensor, idx: int, rotated: dict | None) -> torch.Tensor:
    """k (B, H_kv, n_k, d) rotated at region ``idx``'s key positions. With ``rotated`` (a layer's key store that its
    cache keeps across decoding steps) the keys it holds are reused and only the new ones rotated. A stored key is
    reused only where its position and the frequencies are those it was rotated at (a dynamic method whose factor
    was not fixed at prefill moves them: then everything is rotated again); the cache clears the store when it cuts
    or reorders its keys, the one change positions cannot show."""
    region = plan.regions[idx]
    kp = region.k_at(plan.k_pos)  # (B|1, n_k)
    if rotated is None or plan.inv_freq is None:
        return _rotate(plan, k, kp)
    n_k = k.shape[2]
    # regions that place keys by the same function (DCA's three, SelfExtend's and ReRoPE's two far sides) share one
    # store: the first such region's
    e = rotated.setdefault(_store_of(plan, idx), _Rotated())
    m = e.m
    if m and not (m <= n_k and e.buf.dtype == k.dtype and e.buf.device == k.device and e.buf.shape[:2] == k.shape[:2]
                  and e.buf.shape[-1] == k.shape[-1] and e.pos.shape[0] == kp.shape[0] and e.rope == plan.rope
                  and torch.equal(e.freq, plan.inv_freq) and torch.equal(e.pos[:, :m], kp[:, :m])):
        m = 0  # another sequence, layout or rotation: start over
    if m < n_k:
        if e.buf is None or m == 0 or e.buf.shape[2] < n_k or e.buf.dtype != k.dtype:
            cap = n_k + n_k // 4 + 256
            buf = k.new_empty(*k.shape[:2], cap, k.shape[-1])
            pos = kp.new_empty(kp.shape[0], cap)
            if m:
                buf[:, :, :m], pos[:, :m] = e.buf[:, :, :m], e.pos[:, :m]
            e.buf, e.pos = buf, pos
        e.buf[:, :, m:n_k] = _rotate(plan, k[:, :, m:], kp[:, m:])
        e.pos[:, m:n_k] = kp[:, m:]
        e.freq, e.rope, e.m = plan.inv_freq, plan.rope, n_k
    return e.buf[:, :, :n_k]


def _normalized(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    return x / x.float().norm(dim=-1, keepdim=True).clamp(min=1e-12).to(x.dtype) if plan.normalize else x


def _stack_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, r, d) -> (B, H_kv, g·r, d): query heads h·g .. h·g + g − 1 share key/value head h (transformers'
    repeat_kv order), so they become rows of one call against that head."""
    B, H, r, d = x.shape
    return x.reshape(B, kv_heads, (H // kv_heads) * r, d)


def _unstack_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, h_kv, gr, d = x.shape
    return x.reshape(B, heads, gr // (heads // h_kv), d)


def _row_mask(m: torch.Tensor, B: int, g: int) -> torch.Tensor:
    """A (B|1, 1, r, c) mask for the stacked rows (B|1, 1, g·r, c) (g = 1: itself)."""
    return m.expand(m.shape[0], 1, *m.shape[-2:]).repeat(1, 1, g, 1) if g > 1 else m


def _repeat_heads(x: torch.Tensor, g: int) -> torch.Tensor:
    """transformers' repeat_kv: key/value head h serves query heads h·g .. h·g + g − 1."""
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def _zero(dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device)


def _most_negative(dtype, device) -> torch.Tensor:
    """The additive mask of a dropped pair: the dtype's most negative value (−inf would make a row that a region
    does not reach NaN; this gives it a log-sum-exp so low that the merge weighs it 0)."""
    return torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)


# A run of columns that every row of a chunk attends is scored without a mask (the fused kernel's fast case) once it
# is at least this long; the columns around it get the mask.
FULL_RUN = 128


def _segments(m: torch.Tensor | None, n_cols: int, split: bool):
    """(lo, hi, mask or None) blocks of one region's key columns for one query chunk, m (B|1, 1, r, c) the pairs it
    scores (None: all). With ``split`` the longest run of columns every row attends becomes a block without a mask
    (ReRoPE's far side: the keys before the chunk's band) and the columns on each side keep theirs; empty blocks are
    left out."""
    if m is None:
        yield 0, n_cols, None
        return
    rows_any = _any(m, (0, 1, 2))  # (c,) columns some row scores
    at = rows_any.nonzero()
    if at.numel() == 0:
        return
    lo, hi = int(at[0]), int(at[-1]) + 1
    if split:
        full = _all(m, (0, 1, 2))  # (c,) columns every row scores
        a, b = _longest_run(full)
        if b - a >= FULL_RUN:
            if lo < a:
                yield lo, a, m[..., lo:a]
            yield a, b, None
            if b < hi:
                yield b, hi, m[..., b:hi]
            return
    yield lo, hi, m[..., lo:hi]


def _any(m: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``m.any(dim)`` for a bool mask, as a max over its bytes: torch's ``any`` over a 1024 × 16384 mask takes
    ~40 ms on one core, ``amax`` of the uint8 view ~2 ms (measured; the fused path reduces every chunk's masks)."""
    return m.view(torch.uint8).amax(dim, keepdim=keepdim).bool()


def _all(m: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``m.all(dim)`` for a bool mask (see :func:`_any`)."""
    return m.view(torch.uint8).amin(dim, keepdim=keepdim).bool()


def _longest_run(flags: torch.Tensor) -> tuple[int, int]:
    """[a, b) of the longest run of True in a 1-D bool tensor ((0, 0) if none)."""
    if not bool(flags.any()):
        return 0, 0
    x = torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).to(torch.int8)
    edges = (x[1:] - x[:-1]).nonzero().flatten()  # starts at +1, ends at −1, alternating
    starts, ends = edges[0::2], edges[1::2]
    i = int((ends - starts).argmax())
    return int(starts[i]), int(ends[i])


class _Layout:
    """What one query chunk's calls need from the masks alone (no q, k, v): the key counts ``l`` (B|1, 1, r, 1)
    for the length temperature (None without one), ``blocks`` [(region, key columns, mask or None)] with each
    mask ready for the call (bool for one region, else additive in the compute dtype, rows stacked for GQA), and
    ``empty`` (rows with no key, stacked) or None."""

    __slots__ = ("l", "blocks", "empty")

    def __init__(self, l, blocks, empty):
        self.l, self.blocks, self.empty = l, blocks, empty


def _chunk_layout(plan: Plan, r0: int, r1: int, *, split: bool, dtype, stack: int, B: int):
    """The :class:`_Layout` of query rows r0..r1-1, or False where the mask differs per head."""
    dev = plan.q_pos.device
    ranges = plan.candidate_ranges(r0, r1)
    cols = torch.cat([torch.arange(a, b, device=dev) for a, b in ranges])
    rows = torch.arange(r0, r1, device=dev)
    allowed = plan.allowed(rows, cols)  # (B|1, H|1, r, c) or None
    if allowed is not None and allowed.shape[1] != 1:
        return False
    # The key counts feed a length temperature only. The blocks below partition the pairs a row attends (regions
    # last-wins, a region's column blocks disjoint), so a row's count is the sum over blocks: a block without a mask
    # adds its width, a masked one its row sums over its few columns; counting the whole r × c mask instead costs
    # ~0.1 s a chunk at 16k on one core. In int32 (exact: a row has fewer than 2^31 keys), then widened.
    count = plan.temperature is not None
    l = torch.zeros((1, 1, r1 - r0, 1), dtype=torch.int32, device=dev) if count else None
    qp, kp = plan.q_pos[:, rows], plan.k_pos[:, cols]
    regions = plan.regions
    sels = [None] + [r.select(qp[:, :, None], kp[:, None, :])[:, None] for r in regions[1:]]  # (B|1, 1, r, c)
    blocks = []
    # Regions apply last-wins: from the last, each takes the pairs it selects among those still open (the attended
    # pairs no later region took); the first takes the rest. (``a > b`` is ``a & ~b`` on bools, in one pass.)
    open_pairs = allowed  # None: every pair
    for idx in range(len(regions) - 1, -1, -1):
        sel = sels[idx]
        if sel is None:
            m = open_pairs
        else:
            m = sel if open_pairs is None else sel & open_pairs
            open_pairs = ~sel if open_pairs is None else open_pairs > sel
        for lo, hi, mm in _segments(m, cols.numel(), split=split):
            if count:
                l = l + (hi - lo if mm is None else mm.sum(-1, keepdim=True, dtype=torch.int32))
            c_idx = cols[lo:hi]
            contiguous = c_idx.numel() == int(c_idx[-1] - c_idx[0]) + 1
            pick = slice(int(c_idx[0]), int(c_idx[-1]) + 1) if contiguous else c_idx
            if mm is not None:
                if split:  # the log-sum-exp kernel takes an additive mask in the compute dtype
                    mm = torch.where(mm, _zero(dtype, dev), _most_negative(dtype, dev))
                mm = _row_mask(mm, B, stack)
                if split and mm.shape[0] != B:
                    mm = mm.expand(B, *mm.shape[1:])
            blocks.append((idx, pick, mm))
    empty = None
    if allowed is not None:
        e = ~_any(allowed, -1, keepdim=True)  # (B|1, 1, r, 1)
        if bool(e.any()):
            empty = _row_mask(e, B, stack)
    return _Layout(None if l is None else l.to(torch.float64), blocks, empty)


def _unmoved(plan: Plan, kpos: torch.Tensor) -> bool:
    """Keys that rotation leaves as they are: all at position 0 (ReRoPE's far side) and no scaling of the rotated
    dims (a model's own YaRN scales them by its attention_scaling even at angle 0)."""
    return plan.rope.attention_scaling == 1.0 and not bool(kpos.any())


def _count(pick) -> int:
    return pick.stop - pick.start if isinstance(pick, slice) else pick.numel()


def _causal_only(plan: Plan) -> bool:
    """The plan's mask is exactly causal on indices and SDPA can say it without a mask: a prefill (its own
    ``is_causal``, which skips the masked blocks) or one decoded token (it attends every key)."""
    return (plan.causal and plan.banded and plan.n_q in (plan.n_k, 1) and plan.window is None
            and plan.key_padding_mask is None and plan.attn_mask is None)


def attention_sdpa(plan: Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   memo: dict | None = None, rotated: dict | None = None) -> torch.Tensor | None:
    """The plan's attention through fused SDPA calls; q (B, H, n_q, d) and k, v (B, H_kv, n_k, ·) before RoPE
    (H a multiple of H_kv). Returns (B, H, n_q, d_v) in q's dtype (autocast's under autocast), or None where
    :func:`supported` says no.

    ``memo``: a dict the caller keeps for calls of the same geometry (the same method, lengths, positions, masks:
    the layers of one forward pass); each query chunk's masks, blocks and key counts are computed once into it
    and read back by the other calls, which then only rotate and attend.

    ``rotated``: a dict a KV cache keeps for one layer across steps (:class:`infoscale.hf.RotatedKeysCache`), in
    which each region's rotated keys are kept, so a decoding step rotates only its new keys (without it, every step
    rotates every cached key a region scores). Its keys must be those of the same sequence, only grown since the
    last call; the cache clears it when it cuts or reorders them."""
    if not supported(plan, q, dropout_p=dropout_p):
        return None
    B, H, n_q, _ = q.shape
    h_kv = k.shape[1]
    g = H // h_kv
    # under autocast the products run in its dtype, as torch's SDPA runs them (a model's q and k may arrive in fp32
    # beside a bf16 v: transformers' rotary multiplies them by fp32 cos and sin)
    dev = q.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q.dtype
    q, k = _normalized(plan, q), _normalized(plan, k).to(dtype)
    v = v.to(dtype)
    scale = plan.logit_scale.view(-1, 1, 1, 1)  # (B|1, 1, 1, 1): c · m²

    if len(plan.regions) == 1 and _causal_only(plan):
        region = plan.regions[0]
        qr = _rotate(plan, q, region.q_at(plan.q_pos))
        # decoding takes the keys from the store (rotating its own only) once the cache is long
        kr = _keys_at(plan, k, 0, rotated if n_q == 1 and plan.n_k >= STORE_FROM else None)
        factor = scale
        if plan.temperature is not None:  # l_i = i + 1 keys under a causal mask (i: the query's key index)
            l = torch.arange(plan.n_k - n_q + 1, plan.n_k + 1, dtype=torch.float64, device=q.device).view(1, 1, n_q, 1)
            factor = factor * plan.temperature(l)
        qr = (qr.float() * factor.float()).to(dtype)
        return F.scaled_dot_product_attention(qr, kr, v, is_causal=n_q > 1, scale=1.0, dropout_p=dropout_p,
                                              enable_gqa=g > 1)

    regions = plan.regions
    # the log-sum-exp kernel where regions (or a region's column blocks) are merged; one region on a device without
    # it: one public SDPA call per chunk with the region's mask
    lse_kernel = _lse_kernel(q.device) if dropout_p == 0.0 else None
    # Prefill: every key rotated once per region and key/value heads repeated once (masks then broadcast over the
    # heads); decoding: query heads stacked on their key/value head (no copy of the cache) and only the keys a
    # region scores rotated.
    prefill = n_q >= ROTATE_ALL_FROM
    if prefill:
        # (no store: which regions a decoding step will take from it, and so is worth a copy, shows only then)
        k_rot = [_repeat_heads(_keys_at(plan, k, i, None), g) for i in range(len(regions))]
        v_all, stack = _repeat_heads(v, g), 1
    else:
        k_rot, v_all, stack = None, v, g
    # Rows per chunk: small enough that a region's key columns follow the causal edge (ReRoPE's far side then scores
    # about the lower triangle, as SDPA's is_causal does), large enough that each fused call has work.
    chunk = max(1, min(n_q, max(plan.n_k // CHUNKS, 256), max(CHUNK_ENTRIES // max(plan.n_k, 1), 64)))
    out = None
    for r0 in range(0, n_q, chunk):
        r1 = min(n_q, r0 + chunk)
        key = (r0, r1, lse_kernel is not None, dtype, stack, B)
        lay = memo.get(key) if memo is not None else None
        if lay is None:
            lay = _chunk_layout(plan, r0, r1, split=lse_kernel is not None, dtype=dtype, stack=stack, B=B)
            if lay is False:  # a per-head mask: rows cannot stack across heads
                return None
            if memo is not None:
                memo[key] = lay
        qp = plan.q_pos[:, r0:r1]
        factor = scale if plan.temperature is None else scale * plan.temperature(lay.l)
        q_chunk = q[:, :, r0:r1]
        parts, q_rot = [], {}
        stored = () if prefill or rotated is None else {_store_of(plan, i) for i, p, _ in lay.blocks
                                                        if _count(p) >= STORE_FROM}
        for idx, pick, mask in lay.blocks:
            region = regions[idx]
            if prefill:
                kr = k_rot[idx][:, :, pick]
            elif rotated is not None and plan.inv_freq is not None and _store_of(plan, idx) in stored:
                kpos = region.k_at(plan.k_pos[:, pick])
                kr = k[:, :, pick] if _unmoved(plan, kpos) else _keys_at(plan, k, idx, rotated)[:, :, pick]
            else:
                kpos = region.k_at(plan.k_pos[:, pick])
                kr = (k[:, :, pick] if plan.inv_freq is None or _unmoved(plan, kpos)
                      else _rotate(plan, k[:, :, pick], kpos))
            vr = v_all[:, :, pick]
            if idx not in q_rot:
                qr = (_rotate(plan, q_chunk, region.q_at(qp)).float() * factor.float()).to(dtype)
                q_rot[idx] = _stack_groups(qr, h_kv) if stack > 1 else qr
            qs = q_rot[idx]
            if lse_kernel is None:  # one region, one call: SDPA's own softmax
                parts.append((F.scaled_dot_product_attention(qs, kr, vr, attn_mask=mask, scale=1.0,
                                                             dropout_p=dropout_p), None))
            else:
                parts.append(_with_lse(lse_kernel, qs, kr, vr, mask))
        if not parts:  # no key for any row of this chunk
            o = q.new_zeros(B, H // stack, stack * (r1 - r0), v.shape[-1]).to(dtype)
        elif parts[0][1] is None:
            o = parts[0][0]
        else:
            lse = torch.stack([p[1].float() for p in parts])  # (R, B, heads, rows)
            w = torch.exp(lse - torch.logsumexp(lse, 0))
            o = sum(w[i][..., None] * p[0].float() for i, p in enumerate(parts)).to(dtype)
        if lay.empty is not None:  # a row with no key left attends to nothing (as the reference path)
            o = o.masked_fill(lay.empty, 0.0)
        if stack > 1:
            o = _unstack_groups(o, H)
        if out is None:
            out = o.new_empty(B, H, n_q, o.shape[-1])
        out[:, :, r0:r1] = o
    return out
