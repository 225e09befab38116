"""The view into attention of :func:`infoscale.hf.calibrate` and :func:`infoscale.hf.capture_attention`.

Inside a ``with capturing(...)`` block every layer's attention call reports into the block's ``layers`` dict, by
``layer_idx``; outside one (and after an exception inside one) nothing is recorded. The view is a
``contextvars.ContextVar``, so it is the calling thread's (or task's) own:

* ``capturing(rows=pick)``: the logits *before* the method for the query rows ``pick(n_q)`` (calibrate);
* ``capturing(reduce=fn, chunk=r)``: the method's own logits, r query rows at a time, handed to ``fn``
  (capture_attention).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..attn import attention_logits
from .geometry import _bool_mask, _core_geometry, _kv_repeat, query_offset


@dataclass
class View:
    rows: Callable | None = None  # n_q -> the query rows whose logits before the method to record (calibrate)
    reduce: Callable | None = None  # (logits, q_pos, k_pos) -> a result kept per chunk (capture_attention)
    chunk: int = 256
    upto: int | None = None  # the forward stops once this layer has reported (calibrate: later layers cannot matter)
    layers: dict = field(default_factory=dict)  # layer_idx -> what the layer reported


class _Enough(Exception):
    """Raised by the layer ``upto`` once it has reported: ends the forward; its ``capturing`` block swallows it."""


_VIEW: contextvars.ContextVar[View | None] = contextvars.ContextVar("infoscale_capture", default=None)


@contextlib.contextmanager
def capturing(*, rows: Callable | None = None, reduce: Callable | None = None, chunk: int = 256,
              upto: int | None = None):
    """Yields the dict that the layers report into (``layer_idx`` -> report) while the block runs; with ``upto``,
    the block's forward ends once layer ``upto`` has reported (the rest of the block is skipped)."""
    view = View(rows=rows, reduce=reduce, chunk=chunk, upto=upto)
    token = _VIEW.set(view)
    try:
        yield view.layers
    except _Enough:
        pass
    finally:
        _VIEW.reset(token)


def current() -> View | None:
    """The view of the enclosing ``capturing`` block, or None."""
    return _VIEW.get()


def record_rows(view: View, module, query, key, mask, n_q: int, n_k: int, causal: bool, scaling) -> None:
    """Logits of the query rows ``view.rows(n_q)`` of batch row 0, every head, and their key counts (before any
    temperature; q and k rotated as the model rotates them, which is how temperature-only methods get them)."""
    rows = view.rows(n_q)
    H, d = query.shape[1], query.shape[-1]
    q = query[0, :, rows].float()
    k = _kv_repeat(key, H)[0].float()
    z = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)  # (H, r, n_k)
    ok = _bool_mask(mask, n_q, n_k)
    if ok is not None:
        ok = ok[0, 0, rows] if ok.dim() == 4 else ok[rows]
        allowed = ok.expand(H, -1, -1) if ok.dim() == 2 else ok
    else:
        kp = torch.arange(n_k, device=z.device)[None, :]
        qp = (rows.to(z.device) + query_offset(n_q, n_k, causal))[:, None]
        allowed = (kp <= qp if causal else torch.ones_like(kp + qp, dtype=torch.bool)).expand(H, -1, -1)
    z = z.masked_fill(~allowed, torch.finfo(z.dtype).min)
    view.layers[module.layer_idx] = (z.reshape(-1, n_k).cpu(), allowed.sum(-1).reshape(-1).double().cpu())
    if view.upto is not None and module.layer_idx >= view.upto:
        raise _Enough


def record_method(view: View, module, pm, L: int, query, key, mask, raw_mask, n_q: int, n_k: int, causal: bool,
                  scaling, softcap, rope, kwargs) -> None:
    """The logits of batch row 0 under the layer's method, every head, ``view.chunk`` query rows at a time:
    :func:`infoscale.attn.attention_logits`, the reference path's own logits, with the arguments the attention
    function's reference call gets (the fast path computes the same attention), so temperatures, moved positions,
    the method's masks and the model's mask are all in; masked keys sit at the dtype's minimum. Each chunk
    (H, r, n_k) goes to ``view.reduce(logits, q_pos (r,), k_pos (n_k,))`` and its results are kept per
    ``layer_idx``: only the reductions are kept, so memory stays O(H · r · n_k) at any length."""
    q_pos, k_pos, kpm, seq_len = _core_geometry(mask, raw_mask, n_q, n_k, causal, query.shape[0], query.device,
                                                kwargs)
    H = query.shape[1]
    k = _kv_repeat(key[:1], H)
    if mask is not None:  # 4-D from _bool_mask; batch row 0, every query row (a padding mask has one row)
        mask = mask[:1].expand(1, mask.shape[1], n_q, n_k)
    chunk = int(view.chunk)
    got = []
    for r0 in range(0, n_q, chunk):
        r1 = min(n_q, r0 + chunk)
        z = attention_logits(query[:1, :, r0:r1], k, pm, train_len=L, causal=causal,
                             key_padding_mask=None if kpm is None else kpm[:1],
                             attn_mask=None if mask is None else mask[..., r0:r1, :],
                             positions=q_pos[:1, r0:r1], key_positions=k_pos[:1], rope=rope, scale=scaling,
                             softcap=softcap, seq_len=seq_len[:1])
        got.append(view.reduce(z[0], q_pos[0, r0:r1], k_pos[0]))
    view.layers[module.layer_idx] = got
