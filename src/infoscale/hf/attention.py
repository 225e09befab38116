"""The attention function registered as ``"infoscale"`` in transformers' ``AttentionInterface``.

The computation is :func:`infoscale.attention` (reference semantics), in the fastest form that is exact:

* methods that only scale logits per query row or mask keys (softmax, temperatures, window, StreamingLLM on true
  positions) fold the row factor t(l_i) into q and call ``torch.nn.functional.scaled_dot_product_attention`` (as
  Llama 4's ``attn_temperature_tuning`` and Qwen's ``use_logn_attn`` do): t(l_i)·(q_i·k_j) = (t(l_i) q_i)·k_j
  (:func:`_fast`); a window whose mask transformers skipped runs over only the keys its band reaches
  (:func:`_banded`, O(n·window));
* methods that move positions run as fused SDPA calls, one per position region and block of key columns, merged
  by their log-sum-exp (:func:`infoscale.attn.sdpa.attention_sdpa`);
* the core's chunked path does what those cannot (attention weights, softcap, ALiBi, several regions off the CPU
  or with gradients).

Length temperatures (InfoScale, log-n, softmax_plus, Llama 4's) need l_i, the number of keys query i attends:
``l_i = Σ_j mask_ij`` over the model's own mask and the method's; when the mask was skipped, l_i = q_offset + i + 1
(causal) or n_k (bidirectional), which is the same count (:func:`infoscale.hf.geometry._row_lengths`).
"""

from __future__ import annotations

import contextvars
import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..attn import attention, build_plan
from ..attn.plan import in_window
from ..attn.sdpa import attention_sdpa
from ..errors import ConfigError
from . import capture
from .geometry import (
    SEQ_LEN_KWARG,
    _bool_mask,
    _core_geometry,
    _kept_geometry,
    _kv_repeat,
    _row_lengths,
    _seq_len,
    query_offset,
)
from .methods import _fast_ok, _layer_method, _mask_params, _needs_positions, _parsed, _settings, _without_positions
from .rotary import _ROPE_ATTR
from .rotated_cache import ROTATED_ATTR
from .sink_cache import KEPT_ATTR


def infoscale_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The attention function registered as ``"infoscale"`` (transformers' attention-interface signature).

    query (B, H, n_q, d), key/value (B, H_kv, n_k, d) including the cache; returns ((B, n_q, H, d_v), weights
    or None). Un-rotated q, k when the method moves positions (see :mod:`infoscale.hf.rotary`), rotated otherwise.
    """
    s = _settings(module.config)
    L = int(s["train_len"])
    pm = _parsed(s["method"], L)
    B, H, n_q, d = query.shape
    n_k = key.shape[2]
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    mask = _bool_mask(attention_mask, n_q, n_k)
    softcap = kwargs.get("softcap")
    want_weights = bool(kwargs.get("output_attentions", False))
    training = module.training
    dropout = float(dropout) if training else 0.0

    pm = _layer_method(pm, s, module, L)
    view = capture.current()
    if view is not None and view.rows is not None:
        capture.record_rows(view, module, query, key, mask, n_q, n_k, causal, scaling)

    if _needs_positions(pm):
        rope = getattr(module, _ROPE_ATTR, None)
        if rope is None:
            raise ConfigError(f"method {pm} needs un-rotated keys but this model's rotary modules were not "
                              "replaced; call infoscale.hf.apply(model) instead of setting the attention "
                              "implementation by name")
        if rope is False:  # a NoPE layer
            pm = _parsed(_without_positions(pm), L)
    else:
        rope = False  # q and k arrive rotated by the model
    if view is not None and view.reduce is not None:
        capture.record_method(view, module, pm, L, query, key, mask, attention_mask, n_q, n_k, causal, scaling,
                              softcap, rope, kwargs)

    kept = getattr(key, KEPT_ATTR, None)
    if kept is not None and not kept.contiguous:  # a bounded cache after eviction: keys placed by their record
        q_pos, k_pos, kpm, mask = _kept_geometry(kept, B, n_q, kwargs.get("sliding_window"), query.device)
        seq_len = _seq_len(kwargs, B, q_pos)
    elif _fast_ok(pm) and softcap is None and not want_weights:
        return _fast(pm, L, query, key, value, mask, n_q, n_k, causal, scaling, dropout, attention_mask)
    else:
        q_pos = None
    # the layers of one forward share their geometry and plan where they have the same method, rope and mask
    shared = None if kept is not None else _forward_memo(
        ("plan", id(attention_mask), id(kwargs.get("position_ids")), id(kwargs.get(SEQ_LEN_KWARG)), str(pm), L, n_q,
         n_k, causal, B, H, d, scaling, softcap, rope, kwargs.get("sliding_window"), query.device),
        (attention_mask, kwargs.get("position_ids"), kwargs.get(SEQ_LEN_KWARG)))
    if shared is not None and "plan" in shared:
        plan, q_pos, k_pos, kpm, seq_len = shared["plan"]
    else:
        if q_pos is None:
            q_pos, k_pos, kpm, seq_len = _core_geometry(mask, attention_mask, n_q, n_k, causal, B, query.device,
                                                        kwargs)
        plan = build_plan(pm, batch=B, heads=H, head_dim=d, train_len=L, n_q=n_q, n_k=n_k, causal=causal,
                          key_padding_mask=kpm, attn_mask=mask, positions=q_pos, key_positions=k_pos, rope=rope,
                          scale=scaling, softcap=softcap, seq_len=seq_len, device=query.device)
        if shared is not None:
            shared["plan"] = plan, q_pos, k_pos, kpm, seq_len
    if not want_weights:  # fused SDPA calls, one per position region, where the plan allows (attn.sdpa)
        memo = None if kept is not None else _layout_memo(attention_mask, kwargs.get("position_ids"), pm, L, n_q,
                                                          n_k, causal, seq_len, kwargs.get("sliding_window"))
        out = attention_sdpa(plan, query, key, value, dropout, memo=memo, rotated=getattr(key, ROTATED_ATTR, None))
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    out = attention(query, _kv_repeat(key, H), _kv_repeat(value, H), pm, train_len=L, causal=causal,
                    key_padding_mask=kpm, attn_mask=mask, positions=q_pos, key_positions=k_pos, rope=rope,
                    scale=scaling, softcap=softcap, seq_len=seq_len, return_weights=want_weights,
                    dropout_p=dropout, training=training, plan=plan)
    out, w = out if want_weights else (out, None)
    return out.transpose(1, 2).contiguous(), w


@functools.lru_cache(maxsize=64)
def _temperature(pm, L: int, heads: int, head_dim: int):
    """The method's row factor t(l) (the core's, from a plan built once per method and shape)."""
    return build_plan(pm, batch=1, heads=heads, head_dim=head_dim, train_len=L, n_q=1, n_k=1, rope=False).temperature


def _fast(pm, L, query, key, value, mask, n_q, n_k, causal, scaling, dropout, raw_mask=None):
    """Temperatures and masks: t(l_i) folded into q, then torch's SDPA with the model's mask (or its causal flag).
    The key counts l_i of a mask are counted once per forward (``raw_mask``: the mask transformers built, shared by
    the layers of its type): a sum over a 4096 × 64k mask takes seconds on one core."""
    band = _mask_params(pm)
    if mask is None and band is not None:
        return _banded(pm, L, query, key, value, n_q, n_k, causal, scaling, dropout, *band)
    q = query
    if pm.slot("temperature") is not None:
        shared = (_forward_memo(("row_lengths", id(raw_mask), n_q, n_k, causal), (raw_mask,))
                  if mask is not None and torch.is_tensor(raw_mask) else None)
        l = shared.get("l") if shared is not None else None
        if l is None:
            l = _row_lengths(mask, n_q, n_k, causal, query.device)
            if shared is not None:
                shared["l"] = l
        t = _temperature(pm, L, query.shape[1], query.shape[-1])(l)
        q = (query.float() * t.float()).to(query.dtype)
    gqa = key.shape[1] != query.shape[1]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=mask is None and causal and n_q > 1, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _banded(pm, L, query, key, value, n_q, n_k, causal, scaling, dropout, window: int, sinks: int):
    """A window (with sinks) when transformers skipped the mask (no padding, positions = indices): query chunks
    against only the keys their band and the sinks reach, so the cost is O(n · (window + sinks))."""
    q_off = query_offset(n_q, n_k, causal)
    t_fn = _temperature(pm, L, query.shape[1], query.shape[-1]) if pm.slot("temperature") is not None else None
    chunk = max(128, min(1024, window))
    dev, outs = query.device, []
    for r0 in range(0, n_q, chunk):
        r1 = min(n_q, r0 + chunk)
        p0, p1 = q_off + r0, q_off + r1 - 1
        lo, hi = max(0, p0 - window), min(n_k, (p1 if causal else p1 + window) + 1)
        if not causal and p0 < sinks:  # sink queries attend every key
            lo, hi = 0, n_k
        idx = torch.arange(lo, hi, device=dev)
        if sinks and lo > 0:
            idx = torch.cat([torch.arange(min(sinks, lo), device=dev), idx])
        qp, kp = torch.arange(p0, p1 + 1, device=dev)[:, None], idx[None, :]
        ok = in_window(qp, kp, window, sinks)  # positions are indices here (>= 0), so sinks = 0 adds nothing
        if causal:
            ok = ok & (kp <= qp)
        qc = query[:, :, r0:r1]
        if t_fn is not None:
            t = t_fn(ok.sum(-1, keepdim=True, dtype=torch.float64))
            qc = (qc.float() * t.float()).to(query.dtype)
        outs.append(F.scaled_dot_product_attention(qc, key[:, :, idx], value[:, :, idx], attn_mask=ok, scale=scaling,
                                                   dropout_p=dropout, enable_gqa=key.shape[1] != query.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


# The layout memos of the model forwards running in this thread (or task), innermost last: :func:`forward_scope`'s
# hooks push a fresh dict when a hooked model's forward starts and pop it when it ends. A ContextVar holding an
# immutable tuple, so concurrent forwards in other threads never see or pop this one's.
_FORWARDS: contextvars.ContextVar[tuple] = contextvars.ContextVar("infoscale_forward_memos", default=())


def _enter_forward(module, args, kwargs):
    _FORWARDS.set(_FORWARDS.get() + ({},))


def _exit_forward(module, args, kwargs, output):
    _FORWARDS.set(_FORWARDS.get()[:-1])


def forward_scope(model: nn.Module) -> list:
    """Hooks that give each forward of ``model``'s backbone a fresh layout memo and drop it when the forward ends
    (``always_call``, so also when it raises); their handles."""
    base = getattr(model, "base_model", model)
    return [base.register_forward_pre_hook(_enter_forward, with_kwargs=True),
            base.register_forward_hook(_exit_forward, with_kwargs=True, always_call=True)]


def _forward_memo(key: tuple, hold: tuple) -> dict | None:
    """The dict of this forward's scope under ``key`` (None outside a hooked forward); the entry keeps ``hold``, the
    tensors whose ids are in the key, alive for the forward, so no id is reused within it."""
    scopes = _FORWARDS.get()
    if not scopes:
        return None
    entry = scopes[-1].get(key)
    if entry is None:
        entry = scopes[-1][key] = (hold, {})
    return entry[1]


def _layout_memo(raw_mask, position_ids, pm, L: int, n_q: int, n_k: int, causal: bool, seq_len, sliding_window):
    """The dict in which the layers of one forward share their query chunks' masks (:func:`attention_sdpa`'s
    ``memo``), or None outside a hooked forward. Within the forward's scope it is keyed by the tensor that fixes the
    geometry, the mask transformers built for this layer type (or, when it skipped the mask, the position ids),
    and everything else the masks depend on (the layer's method, which differs for calibrated or NoPE layers, the
    lengths, n of the dynamic methods). The scope holds the tensors it keys by, so no id is reused within it; it
    lives for one forward, so a tensor changed in place between forwards never meets a stale entry (inference
    tensors keep no version counter to tell)."""
    scopes = _FORWARDS.get()
    scope = scopes[-1] if scopes else None
    host = raw_mask if torch.is_tensor(raw_mask) else position_ids if torch.is_tensor(position_ids) else None
    if scope is None or host is None:
        return None
    key = (id(host), id(position_ids), str(pm), L, n_q, n_k, causal, tuple(seq_len.tolist()), sliding_window)
    entry = scope.get(key)
    if entry is None:
        entry = scope[key] = (host, position_ids, {})
    return entry[2]
