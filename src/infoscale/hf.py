"""Every inference method of :mod:`infoscale` in a Hugging Face transformers 5.x model.

    import infoscale.hf
    infoscale.hf.apply(model, "rerope+infoscale")     # train_len defaults from the config
    model.generate(ids, max_new_tokens=64)
    infoscale.hf.remove(model)                        # the stock model again
    infoscale.hf.calibrate(model, ids)                # per-layer InfoScale dims: infoscale(calibrated=True)
    infoscale.hf.capture_attention(model, ids, fn)    # every layer's logits under the method, to fn (analysis)

transformers 5.1.0 or newer (pyproject.toml's range; ``make test-compat`` tests its oldest end).

How it plugs in (transformers' "attention interface", docs: huggingface.co/docs/transformers/attention_interface):

* ``apply`` registers :func:`infoscale_attention` with ``AttentionInterface.register("infoscale", ...)`` and
  :func:`infoscale_mask` with ``AttentionMaskInterface.register("infoscale", ...)`` under the same name (without a
  registered mask function transformers hands the attention function ``attention_mask=None``, even for padded
  batches), then calls ``model.set_attn_implementation("infoscale")``. The method and its options are stored on the
  config as ``config.infoscale = {"method": ..., "train_len": ...}`` and read by the attention function through
  ``module.config``; they are saved by ``save_pretrained``, but the attention implementation is not, so a reloaded
  model needs ``apply(model)`` again (with no method: the one saved in the config).
* The mask function is transformers' ``sdpa_mask`` (bool, True = may attend) with the method's own mask
  (window, StreamingLLM sinks, LM-Infinite's Λ) ANDed on, on pad-aware positions (position = number of real
  tokens before, so sinks are the first real tokens of a left-padded row). It records on the mask tensor where
  the queries and keys sit in the sequence (``q_offset``, ``kv_offset``) and the 2-D padding mask, so that the
  attention function knows every query's and key's position under any cache (dynamic, sliding-window, static)
  and any padding. transformers skips building the mask only when it would be plain causal or bidirectional
  attention without padding and without a sliding window (``_ignore_causal_mask_sdpa``); the attention function
  then derives the same geometry from the shapes and applies the method's band itself, over the keys the band
  reaches only (O(n·window) instead of an n×n mask).
* Length temperatures (InfoScale, log-n, softmax_plus, Llama 4's) need l_i, the number of keys query i attends:
  ``l_i = Σ_j mask_ij`` over the model's own mask (padding, causal, sliding window) and the method's; when
  the mask was skipped, l_i = q_offset + i + 1 (causal) or n_k (bidirectional), which is the same count.

Positions (ReRoPE, Leaky ReRoPE, SelfExtend, DCA, LM-Infinite, PI, NTK, YaRN, StreamingLLM's positions within its
cache): these need the keys *before*
rotation. ``apply``
replaces the model's rotary module(s) by a stand-in returning cos = 1, sin = 0 of the same shape, so the
model's own ``apply_rotary_pos_emb`` becomes the identity and the KV cache stores un-rotated keys (the design of
bojone/rerope, mit-han-lab/streaming-llm's pos-shift and LongLM's SelfExtend). The original rotary module is
kept and describes the model's RoPE to the core as a :class:`infoscale.attn.rope.Rope`: its base
(``rope_parameters["rope_theta"]``), its rotated dims (partial rotary, e.g. Phi-3), its frequencies, its
``attention_scaling`` (YaRN/LongRoPE mscale) and its layout (transformers' ``rotate_half``); per-layer-type
rotaries (Gemma 3, ModernBERT) give one Rope per layer type, and NoPE layers (SmolLM3 ``no_rope_layers``) none.
``apply`` checks each Rope against the model's own ``apply_rotary_pos_emb`` on probe positions and refuses a
model whose rotation it cannot reproduce. Every call then rotates q and the cached keys at their positions
(O(n_k·d) per layer and step; while decoding only the keys each position region scores). Methods without a
position component leave the rotary modules alone: q and k arrive rotated and the core is called with ``rope=False``.

Dynamic factors when decoding: PI, NTK and YaRN without a ``factor`` use s = n / L, and Leaky ReRoPE without
``k`` and SelfExtend without ``group`` use n, where n is the number of real tokens. In a forward pass without a
cache n is the sequence length. With a cache, n is fixed by the prompt at prefill and kept for every decoding
step (as Qwen's dynamic NTK, ``Qwen/Qwen-7B`` ``modeling_qwen.py``, which computes its NTK alpha at prefill
only): a forward hook stores it on the cache object. Cached decoding therefore equals a full forward with that
fixed factor, e.g. ``pi(factor=n_prompt / L)``; the keys of earlier steps stay consistent because every key is
re-rotated with the same frequencies at every step.

The computation is :func:`infoscale.attention` (reference semantics). Methods that only scale logits per query
row or mask keys (softmax, temperatures, window, StreamingLLM on true positions) take a fast path that folds the
row factor t(l_i) into q and calls ``torch.nn.functional.scaled_dot_product_attention`` (as Llama 4's
``attn_temperature_tuning`` and Qwen's ``use_logn_attn`` do), which is exact: t(l_i)·(q_i·k_j) = (t(l_i) q_i)·k_j.
Methods that move positions run as fused SDPA calls too (:func:`infoscale.attn.sdpa.attention_sdpa`): one per
position region (ReRoPE's band and far side, SelfExtend's neighbour and grouped attention, DCA's chunk relations)
and per block of key columns, merged by their log-sum-exp; the core's chunked path remains for what that cannot do
(attention weights, softcap, ALiBi, and several regions off the CPU or with gradients).

Bounded cache of the windowed methods (``window``, ``streamingllm``, ``lm_infinite``): ``apply`` wraps the model's
``_prepare_cache_for_generation`` (on the instance), so that ``generate`` replaces the fresh ``DynamicCache`` it
made (none given by the caller) by a :class:`SinkCache` (:mod:`infoscale.hf_cache`, :func:`bounded_cache`): per
layer the first ``sinks`` and the last ``window`` keys, the rest dropped as StreamingLLM's ``StartRecentKVCache``
drops them. The keys it returns carry their sequence indices, from which the attention function places them after
an eviction (:func:`_kept_geometry`); a forward pre-hook gives the cache the batch's left padding. ``streamingllm``
(without ``true_positions=True``) moves positions: its keys are cached un-rotated and every step rotates them at
their index within the kept set, the query after the last (StreamingLLM's pos_shift); the same positions in a
forward without cache are the core's definition, so cached decoding equals a full forward.

Refused with a clear error: train-time methods (CosScale, ALiBi, PoSE) unless ``config.infoscale["train_method"]``
says the model was trained with them; position methods on models whose rotary module cannot be found or
reproduced (complex RoPE as Llama 4, frequencies that change with the length: ``dynamic``, ``longrope``);
remote-code models; models that do not use transformers' attention interface.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .attn import attention, attention_logits, build_plan, merge_with_training, parse_method
from .attn.methods import Component
from .attn.plan import in_window
from .attn.rope import Rope, rotate
from .attn.sdpa import attention_sdpa
from .errors import ConfigError, MethodError
from .hf_cache import KEPT_ATTR, SinkCache
from .models import train_len_of

__all__ = ["NAME", "apply", "remove", "calibrate", "capture_attention", "cache_kwarg", "infoscale_attention",
           "infoscale_mask", "train_len_of", "SinkCache", "bounded_cache"]

NAME = "infoscale"
# The newest transformers release this package's CI has run its tests against (the version in the committed
# lock file, constraints.txt; a test keeps the two equal). A newer one may have changed how attention, masks
# or the cache reach the model: apply() warns once and names the self-test, ``infoscale doctor``.
TESTED_TRANSFORMERS = "5.25.0"
SEQ_LEN_KWARG = "infoscale_seq_len"  # the per-row n of dynamic methods, injected into the forward kwargs
_CACHE_ATTR = "_infoscale_seq_len"  # where the prompt's n is kept on a cache object
_META_ATTR = "_infoscale_meta"  # (q_offset, kv_offset, 2-D padding mask) recorded on a mask tensor
_ROPE_ATTR = "_infoscale_rope"  # an attention module's Rope (or False: NoPE) when keys arrive un-rotated
_STATE_ATTR = "_infoscale_state"  # on the model: what apply changed, for remove


# --------------------------------------------------------------------------------------------
# Method bookkeeping
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _parsed(method: str, train_len: int):
    """The method the attention function runs: every component except one the model's own rotary computes
    (``hf_yarn``, ``hf_dynamic``, ``hf_linear``: the rotary applies them before attention is called)."""
    pm = parse_method(method, train_len).resolved(train_len)
    return type(pm)(tuple(c for c in pm.components if c.method.rope_parameters is None))


def _rotary_component(method: str, train_len: int):
    """The component whose positions the model's own rotary computes with new ``rope_parameters``, or None."""
    for c in parse_method(method, train_len).resolved(train_len).components:
        if c.method.rope_parameters is not None:
            return c
    return None


def _cache_positions(pm) -> bool:
    """Whether RoPE positions are those within the kept set (StreamingLLM's default), which moves positions."""
    return any(c.method.cache_positions is not None and c.method.cache_positions(c.params) for c in pm.components)


def _needs_positions(pm) -> bool:
    return pm.slot("positions") is not None or _cache_positions(pm)


def _fast_ok(pm) -> bool:
    """Only per-row logit factors and masks: exact with a q fold and torch's SDPA."""
    return all(set(c.method.slots) <= {"temperature", "mask"} for c in pm.components) and not _cache_positions(pm)


def _mask_params(pm):
    """(window, sinks) of the method's mask slot, or None."""
    c = pm.slot("mask")
    if c is None:
        return None
    window, sinks = c.method.mask(c.params)
    return int(window), int(sinks)


def _without_positions(pm):
    """The method on a layer without RoPE (a NoPE layer), as each registry entry says (``Method.without_rope``): a
    position component does not apply; LM-Infinite keeps its Λ-mask, which is StreamingLLM's mask with its sinks and
    window."""
    parts = []
    for c in pm.components:
        if c.method.without_rope is not None:
            parts.append(c.method.without_rope(c.params))
        elif "positions" not in c.method.slots:
            parts.append(str(c))
    return "+".join(parts) or "softmax"


def _dynamic(pm) -> bool:
    """Whether the method depends on n (dynamic PI/NTK/YaRN, Leaky ReRoPE's default k, SelfExtend's default group),
    as its registry entry says."""
    return any(c.method.dynamic is not None and c.method.dynamic(c.params) for c in pm.components)


def _settings(config) -> dict:
    s = getattr(config, "infoscale", None)
    if not isinstance(s, dict) or "method" not in s:
        raise ConfigError("the model's attention implementation is 'infoscale' but config.infoscale has no method; "
                          "call infoscale.hf.apply(model, method)")
    return s


# --------------------------------------------------------------------------------------------
# Mask function
# --------------------------------------------------------------------------------------------


def _positions_table(pad2d: torch.Tensor, length: int) -> torch.Tensor:
    """Pad-aware position of every sequence index: (number of real tokens up to it) − 1."""
    if pad2d.shape[-1] < length:
        pad2d = F.pad(pad2d, (0, length - pad2d.shape[-1]))
    return pad2d[:, :length].long().cumsum(-1) - 1


def _method_overlay(window: int, sinks: int, pos: torch.Tensor | None):
    """Mask predicate of a window with sinks on positions (:func:`infoscale.attn.plan.in_window`)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        if pos is None:
            pq, pk = q_idx, kv_idx
        else:
            pq, pk = pos[batch_idx, q_idx], pos[batch_idx, kv_idx]
        return in_window(pq, pk, window, sinks)

    return inner


def infoscale_mask(*args, **kwargs):
    """transformers' ``sdpa_mask`` (bool, True = attend) with the method's mask ANDed on, registered under
    ``"infoscale"`` in ``AttentionMaskInterface``. Signature-agnostic (``*args, **kwargs``)."""
    from transformers.masking_utils import and_masks, sdpa_mask

    config = kwargs.get("config")
    settings = getattr(config, "infoscale", None) if config is not None else None
    overlay = None
    if isinstance(settings, dict) and "method" in settings:
        overlay = _mask_params(_parsed(settings["method"], int(settings["train_len"])))
    pad2d = kwargs.get("attention_mask")
    q_offset, kv_offset = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    q_len, kv_len = kwargs.get("q_length", 0), kwargs.get("kv_length", 0)
    cache_position = kwargs.get("cache_position")
    if "q_length" not in kwargs and torch.is_tensor(cache_position) and cache_position.numel():
        # transformers 5.0-5.3: sdpa_mask(batch_size, cache_position, kv_length, kv_offset, ...), where
        # cache_position holds the queries' indices (a contiguous range), instead of q_length and q_offset (5.4+)
        q_len, q_offset = cache_position.shape[0], cache_position[0]
    if torch.is_tensor(q_offset):  # a static cache's length counter, which its update() bumps in place
        q_offset = q_offset.clone()
    if overlay is not None:
        # transformers may still skip the mask when it would only be causal/bidirectional without padding;
        # the attention function then applies the method's band itself on the (trivial) positions
        pos = None
        if pad2d is not None:
            length = max(int(q_offset) + int(q_len), int(kv_offset) + int(kv_len), pad2d.shape[-1])
            pos = _positions_table(pad2d.bool(), length)
        kwargs["mask_function"] = and_masks(kwargs.get("mask_function"), _method_overlay(*overlay, pos))
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor):
        setattr(mask, _META_ATTR, (q_offset, kv_offset, pad2d))
    return mask


# --------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------


def _bool_mask(mask, n_q: int, n_k: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"infoscale attention got a {type(mask).__name__} mask; only tensor masks are supported")
    if mask.dtype != torch.bool:  # an additive float mask: 0 = attend, a large negative number = not
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    return mask[..., -n_q:, :n_k]


def _geometry(mask, raw_mask, n_q: int, n_k: int, causal: bool, device, position_ids=None):
    """Query positions (B|1, n_q), key positions (B|1, n_k), key padding (B, n_k) or None.

    From the mask's record when transformers built it; from the shapes when it skipped it (then there is
    no padding and the queries are the last n_q keys, except at a static cache's prefill, the only skip with
    1 < n_q < n_k, where they are the first n_q), placed by the model's ``position_ids``: a full sliding-window
    cache holds the last n_k tokens, not the first, which a method on absolute positions (SelfExtend's groups,
    DCA's chunks) must know; from the mask's diagonal for a caller's own 4-D mask.
    """
    meta = getattr(raw_mask, _META_ATTR, None) if raw_mask is not None else None
    if meta is not None:
        q_off, kv_off, pad2d = meta
        q_hist = torch.arange(n_q, device=device) + (q_off.to(device) if torch.is_tensor(q_off) else int(q_off))
        k_hist = torch.arange(n_k, device=device) + int(kv_off)
        if pad2d is None:
            return q_hist[None], k_hist[None], None
        length = max(int(q_hist[-1]) + 1, int(k_hist[-1]) + 1, pad2d.shape[-1])
        pad = pad2d.bool().to(device)
        pad = F.pad(pad, (0, length - pad.shape[-1])) if pad.shape[-1] < length else pad
        pos = pad.long().cumsum(-1) - 1
        return pos[:, q_hist], pos[:, k_hist], pad[:, k_hist]
    k_pos = torch.arange(n_k, device=device)[None]
    if mask is None:
        q_off = 0 if (causal and 1 < n_q < n_k) else n_k - n_q
        q_pos = (torch.arange(n_q, device=device) + q_off)[None]
    else:  # a mask without a record (a caller's own): each query's own key is the last one it may attend
        q_off = n_k - n_q
        last = torch.where(mask, torch.arange(n_k, device=device), -1).amax(-1)[:, 0]  # (B, n_q)
        q_pos = torch.where(last >= 0, last, torch.arange(n_q, device=device) + q_off)
    if torch.is_tensor(position_ids) and position_ids.shape[-1] == n_q:
        # a full sliding-window cache starts past token 0: the model's position id of a query that sits on its own
        # key places the keys on the sequence (the last such row: with left padding, a real token)
        pid = position_ids.reshape(-1, n_q).to(device)
        B = max(pid.shape[0], q_pos.shape[0])
        pid, q_pos = pid.expand(B, -1), q_pos.expand(B, -1)
        rows = torch.arange(n_q, device=device)
        last = torch.where(q_pos == rows + q_off, rows, -1).amax(-1, keepdim=True)  # (B, 1)
        r = last.clamp(min=0)
        shift = torch.where(last >= 0, pid.gather(1, r) - q_pos.gather(1, r), 0)
        q_pos, k_pos = q_pos + shift, k_pos + shift
    return q_pos, k_pos, None


def _kv_repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat GQA key/value heads (transformers' repeat_kv: kv head h serves query heads h·r .. h·r + r − 1)."""
    r = heads // x.shape[1]
    return x if r == 1 else x.repeat_interleave(r, dim=1)


def infoscale_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """The attention function registered as ``"infoscale"`` (transformers' attention-interface signature).

    query (B, H, n_q, d), key/value (B, H_kv, n_k, d) including the cache; returns ((B, n_q, H, d_v), weights
    or None). Un-rotated q, k when the method moves positions (see the module docstring), rotated otherwise.
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
    if _CAPTURE is not None and "rows" in _CAPTURE:
        _capture(module, query, key, mask, n_q, n_k, causal, scaling)

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
    if _CAPTURE is not None and "reduce" in _CAPTURE:
        _capture_method(module, pm, L, query, key, mask, attention_mask, n_q, n_k, causal, scaling, softcap, rope,
                        kwargs)

    kept = getattr(key, KEPT_ATTR, None)
    if kept is not None and not kept.contiguous:  # a bounded cache after eviction: keys placed by their record
        q_pos, k_pos, kpm, mask = _kept_geometry(kept, B, n_q, kwargs.get("sliding_window"), query.device)
        seq_len = _seq_len(kwargs, B, q_pos)
    elif _fast_ok(pm) and softcap is None and not want_weights:
        return _fast(pm, L, query, key, value, mask, n_q, n_k, causal, scaling, dropout)
    else:
        q_pos, k_pos, kpm, seq_len = _core_geometry(mask, attention_mask, n_q, n_k, causal, B, query.device, kwargs)
    plan = build_plan(pm, batch=B, heads=H, head_dim=d, train_len=L, n_q=n_q, n_k=n_k, causal=causal,
                      key_padding_mask=kpm, attn_mask=mask, positions=q_pos, key_positions=k_pos, rope=rope,
                      scale=scaling, softcap=softcap, seq_len=seq_len, device=query.device)
    if not want_weights:  # fused SDPA calls, one per position region, where the plan allows (attn.sdpa)
        out = attention_sdpa(plan, query, key, value, dropout)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    out = attention(query, _kv_repeat(key, H), _kv_repeat(value, H), pm, train_len=L, causal=causal,
                    key_padding_mask=kpm, attn_mask=mask, positions=q_pos, key_positions=k_pos, rope=rope,
                    scale=scaling, softcap=softcap, seq_len=seq_len, return_weights=want_weights,
                    dropout_p=dropout, training=training, plan=plan)
    out, w = out if want_weights else (out, None)
    return out.transpose(1, 2).contiguous(), w


def _core_geometry(mask, raw_mask, n_q: int, n_k: int, causal: bool, B: int, device, kwargs):
    """(query positions, key positions, key padding, n per row) as the core takes them (:func:`_geometry`; n: the
    prompt's real tokens kept by the forward hook for dynamic methods, else the real tokens up to the last query)."""
    q_pos, k_pos, kpm = _geometry(mask, raw_mask, n_q, n_k, causal, device, kwargs.get("position_ids"))
    return q_pos, k_pos, kpm, _seq_len(kwargs, B, q_pos)


def _seq_len(kwargs, B: int, q_pos: torch.Tensor) -> torch.Tensor:
    """n per row: the prompt's real tokens kept by the forward hook for dynamic methods, else the real tokens up to
    the last query."""
    seq_len = kwargs.get(SEQ_LEN_KWARG)
    if seq_len is not None and seq_len.shape[0] != B and B % seq_len.shape[0] == 0:
        seq_len = seq_len.repeat_interleave(B // seq_len.shape[0])  # beams / expanded batches
    if seq_len is None:
        seq_len = q_pos[:, -1] + 1
    return seq_len.clamp(min=1)  # a row of padding only counts as one token


def _kept_geometry(kept, B: int, n_q: int, sliding_window, device):
    """Positions of the queries (B|1, n_q) and keys (B|1, n_k), key padding (B, n_k) or None, and the model's own
    mask beyond causality (its sliding window on sequence indices, as transformers' ``sliding_window_overlay``)
    for the keys a bounded cache returned (:mod:`infoscale.hf_cache`): the new queries are its last n_q keys; a
    row left-padded by P has its real tokens at positions index − P."""
    idx = kept.index.to(device)
    pos = idx[None].double()
    kpm = None
    if kept.pads is not None:
        pos = pos - kept.pads.to(device)[:, None].double()
        kpm = pos >= 0
        if kpm.shape[0] != B and B % kpm.shape[0] == 0:  # beams / expanded batches
            r = B // kpm.shape[0]
            pos, kpm = pos.repeat_interleave(r, 0), kpm.repeat_interleave(r, 0)
    model_mask = None
    if sliding_window:
        q_idx = idx[-n_q:]
        model_mask = (q_idx[:, None] - idx[None, :] < int(sliding_window))[None, None]
    return pos[:, -n_q:], pos, kpm, model_mask


def _layer_method(pm, settings: dict, module, L: int):
    """``infoscale(calibrated=True)`` becomes ``infoscale(dim=d_ℓ)`` with this layer's fitted d (:func:`calibrate`)."""
    if not any(c.method.calibrated is not None and c.method.calibrated(c.params) for c in pm.components):
        return pm
    dims = settings.get("dims")
    idx = getattr(module, "layer_idx", None)
    if dims is None or idx is None or idx >= len(dims):
        raise MethodError("infoscale(calibrated=True) needs this model's calibration: run "
                          "infoscale.hf.calibrate(model, input_ids) first (it stores config.infoscale['dims'])")
    spec = "+".join(str(Component(c.name, c.method.with_dim(c.params, dims[idx])))
                    if c.method.calibrated is not None and c.method.calibrated(c.params) else str(c)
                    for c in pm.components)
    return _parsed(spec, L)


# The view into attention of calibrate and capture_attention. While set, each layer reports here:
# {"rows": pick, "layers": {}}: logits before the method for a few query rows (calibrate, _capture);
# {"reduce": fn, "chunk": r, "layers": {}}: the method's own logits, r query rows at a time, through fn
# (capture_attention, _capture_method).
_CAPTURE: dict | None = None


def _capture(module, query, key, mask, n_q: int, n_k: int, causal: bool, scaling) -> None:
    """Logits of the query rows ``_CAPTURE["rows"]`` of batch row 0, every head, and their key counts (before any
    temperature; q and k rotated as the model rotates them, which is how temperature-only methods get them)."""
    rows = _CAPTURE["rows"](n_q)
    H, d = query.shape[1], query.shape[-1]
    q = query[0, :, rows].float()
    k = _kv_repeat(key, H)[0].float()
    z = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)  # (H, r, n_k)
    ok = _bool_mask(mask, n_q, n_k)
    if ok is not None:
        ok = ok[0, 0, rows] if ok.dim() == 4 else ok[rows]
        allowed = ok.expand(H, -1, -1) if ok.dim() == 2 else ok
    else:
        q_off = n_k - n_q
        kp = torch.arange(n_k, device=z.device)[None, :]
        qp = (rows.to(z.device) + q_off)[:, None]
        allowed = (kp <= qp if causal else torch.ones_like(kp + qp, dtype=torch.bool)).expand(H, -1, -1)
    z = z.masked_fill(~allowed, torch.finfo(z.dtype).min)
    _CAPTURE["layers"][module.layer_idx] = (z.reshape(-1, n_k).cpu(), allowed.sum(-1).reshape(-1).double().cpu())


def _capture_method(module, pm, L: int, query, key, mask, raw_mask, n_q: int, n_k: int, causal: bool, scaling,
                    softcap, rope, kwargs) -> None:
    """The logits of batch row 0 under the layer's method, every head, ``_CAPTURE["chunk"]`` query rows at a time:
    :func:`infoscale.attn.attention_logits`, the reference path's own logits, with the arguments the reference
    call below gets (the fast path computes the same attention), so temperatures, moved positions, the method's
    masks and the model's mask are all in; masked keys sit at the dtype's minimum. Each chunk (H, r, n_k) goes to
    ``_CAPTURE["reduce"](logits, q_pos (r,), k_pos (n_k,))`` and its results are kept per ``layer_idx``: only the
    reductions are kept, so memory stays O(H · r · n_k) at any length."""
    q_pos, k_pos, kpm, seq_len = _core_geometry(mask, raw_mask, n_q, n_k, causal, query.shape[0], query.device,
                                                kwargs)
    H = query.shape[1]
    k = _kv_repeat(key[:1], H)
    if mask is not None:  # 4-D from _bool_mask; batch row 0, every query row (a padding mask has one row)
        mask = mask[:1].expand(1, mask.shape[1], n_q, n_k)
    chunk = int(_CAPTURE.get("chunk", 256))
    got = []
    for r0 in range(0, n_q, chunk):
        r1 = min(n_q, r0 + chunk)
        z = attention_logits(query[:1, :, r0:r1], k, pm, train_len=L, causal=causal,
                             key_padding_mask=None if kpm is None else kpm[:1],
                             attn_mask=None if mask is None else mask[..., r0:r1, :],
                             positions=q_pos[:1, r0:r1], key_positions=k_pos[:1], rope=rope, scale=scaling,
                             softcap=softcap, seq_len=seq_len[:1])
        got.append(_CAPTURE["reduce"](z[0], q_pos[0, r0:r1], k_pos[0]))
    _CAPTURE["layers"][module.layer_idx] = got


def _row_lengths(mask, n_q: int, n_k: int, causal: bool, device) -> torch.Tensor:
    """l_i, keys each query attends: (B|1, 1, n_q, 1) float64."""
    if mask is not None:
        return mask.sum(-1, keepdim=True, dtype=torch.float64)
    if not causal:
        return torch.full((1, 1, n_q, 1), float(n_k), dtype=torch.float64, device=device)
    q_off = 0 if 1 < n_q < n_k else n_k - n_q
    return (torch.arange(n_q, dtype=torch.float64, device=device) + q_off + 1).view(1, 1, n_q, 1)


@functools.lru_cache(maxsize=64)
def _temperature(pm, L: int, heads: int, head_dim: int):
    """The method's row factor t(l) (the core's, from a plan built once per method and shape)."""
    return build_plan(pm, batch=1, heads=heads, head_dim=head_dim, train_len=L, n_q=1, n_k=1, rope=False).temperature


def _banded(pm, L, query, key, value, n_q, n_k, causal, scaling, dropout, window: int, sinks: int):
    """A window (with sinks) when transformers skipped the mask (no padding, positions = indices): query chunks
    against only the keys their band and the sinks reach, so the cost is O(n · (window + sinks))."""
    q_off = 0 if (causal and 1 < n_q < n_k) else n_k - n_q
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


def _fast(pm, L, query, key, value, mask, n_q, n_k, causal, scaling, dropout):
    """Temperatures and masks: t(l_i) folded into q, then torch's SDPA with the model's mask (or its causal flag)."""
    band = _mask_params(pm)
    if mask is None and band is not None:
        return _banded(pm, L, query, key, value, n_q, n_k, causal, scaling, dropout, *band)
    q = query
    if pm.slot("temperature") is not None:
        l = _row_lengths(mask, n_q, n_k, causal, query.device)
        t = _temperature(pm, L, query.shape[1], query.shape[-1])(l)
        q = (query.float() * t.float()).to(query.dtype)
    gqa = key.shape[1] != query.shape[1]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=mask is None and causal and n_q > 1, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# Rotary modules
# --------------------------------------------------------------------------------------------


class UnrotatedRotary(nn.Module):
    """Stands in for a model's rotary module: the same output shapes with cos = 1 and sin = 0, so the model's
    ``apply_rotary_pos_emb`` leaves q and k as they are and the cache keeps un-rotated keys. The original module
    is kept as ``original`` (its buffers move with the model) and is put back by :func:`remove`.

    Only the infoscale attention rotates q and k itself: if the user switches the model to another
    implementation (``model.set_attn_implementation("sdpa")``) the stand-in returns the original cos and sin,
    so the model is the stock one again, and warns once."""

    def __init__(self, original: nn.Module, config=None):
        super().__init__()
        self.original = original
        self.config = config  # the model's config: its _attn_implementation says who rotates q and k
        self._warned = False

    def forward(self, x, position_ids, *args, **kwargs):
        cos, sin = self.original(x, position_ids, *args, **kwargs)
        impl = getattr(self.config, "_attn_implementation", NAME) if self.config is not None else NAME
        if impl != NAME:
            if not self._warned:
                self._warned = True
                warnings.warn(f"infoscale.hf: the model's attention implementation is now {impl!r}, not "
                              f"{NAME!r}, so its method is not in effect and RoPE runs as in the stock model; "
                              "call infoscale.hf.apply(model, ...) again to use a method, or "
                              "infoscale.hf.remove(model)", stacklevel=2)
            return cos, sin
        return torch.ones_like(cos), torch.zeros_like(sin)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config")]


def _rotary_for(model: nn.Module, name: str):
    """The rotary module nearest above the attention module ``name``: (parent, attribute, module)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        parent = model.get_submodule(".".join(parts[:i])) if i else model
        for attr, child in parent.named_children():
            inner = child.original if isinstance(child, UnrotatedRotary) else child
            if type(inner).__name__.endswith("RotaryEmbedding"):
                return parent, attr, inner
    return None


def _layer_type(module) -> str | None:
    lt = getattr(module, "layer_type", None)
    if lt is None:
        types = getattr(module.config, "layer_types", None)
        if types is not None and getattr(module, "layer_idx", None) is not None:
            lt = types[module.layer_idx]
    return lt


def _rotary_call(rotary, x, pos, layer_type):
    params = inspect.signature(rotary.forward).parameters
    if "layer_type" in params:
        return rotary(x, pos, layer_type)
    return rotary(x, pos)


def _rope_of(rotary, module, layer_type, head_dim: int) -> Rope:
    """The model's RoPE for one attention module, checked against the model's own ``apply_rotary_pos_emb``."""
    cls = type(rotary).__name__
    if hasattr(rotary, "inv_freq") and not (layer_type and hasattr(rotary, f"{layer_type}_inv_freq")):
        inv_freq, scaling = rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0)
        rope_type = getattr(rotary, "rope_type", "default")
    elif layer_type and hasattr(rotary, f"{layer_type}_inv_freq"):
        inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
        scaling = getattr(rotary, f"{layer_type}_attention_scaling", 1.0)
        rope_type = rotary.rope_type.get(layer_type, "default") if isinstance(rotary.rope_type, dict) else "default"
    else:
        raise ConfigError(f"{cls} has no inv_freq buffer this integration can read (layer type {layer_type!r})")
    if rope_type in ("dynamic", "longrope") or "dynamic" in str(rope_type):
        raise ConfigError(f"the model's RoPE (rope_type {rope_type!r}) changes its frequencies with the sequence "
                          "length; position methods re-rotate every key with fixed frequencies and would drop that. "
                          "Use a temperature or mask method (infoscale, logn, window, ...) with this model")
    if inv_freq.is_complex() or not inv_freq.is_floating_point():
        raise ConfigError(f"{cls} is not a cos/sin rotary (complex RoPE, as Llama 4); position methods are not "
                          "supported for this model")
    inv = inv_freq.detach().double().cpu()
    dim = 2 * inv.numel()
    if dim > head_dim:
        raise ConfigError(f"{cls} rotates {dim} dims but the head has {head_dim}")
    rp = getattr(module.config, "rope_parameters", None) or {}
    if layer_type and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    base = float(rp.get("rope_theta", getattr(module.config, "rope_theta", 10000.0)))
    geometric = torch.allclose(inv, base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim), rtol=1e-5)
    freqs = None if geometric else tuple(float(f) for f in inv)
    apply_fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if apply_fn is None:
        raise ConfigError(f"{type(module).__name__}'s module has no apply_rotary_pos_emb; cannot check its RoPE")
    # probe: the model's own rotation of random vectors at positions 0..15 and a few far ones
    pos = torch.cat([torch.arange(16), torch.tensor([100, 1000, 4097])])[None]
    dev = inv_freq.device
    cos, sin = _rotary_call(rotary, torch.zeros(1, pos.shape[1], 1, device=dev), pos.to(dev), layer_type)
    if cos.is_complex() or cos.shape[-1] != dim:
        raise ConfigError(f"{cls} returns {'complex' if cos.is_complex() else cos.shape[-1]} values where a "
                          f"cos/sin rotary of {dim} dims was expected; position methods are not supported")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, pos.shape[1], head_dim, generator=g).to(dev)
    want, _ = apply_fn(q, q, cos.float(), sin.float())
    angles = pos[0].double()[:, None] * (inv if freqs is None else torch.tensor(freqs, dtype=torch.float64))
    for layout in ("halves", "pairs"):
        got = rotate(q.double().cpu(), angles[None, None], layout, float(scaling))
        if torch.allclose(got.float(), want.float().cpu(), atol=2e-3, rtol=1e-3):
            return Rope(dim, base=base, layout=layout, inv_freq=freqs, attention_scaling=float(scaling))
    raise ConfigError(f"cannot reproduce {type(module).__name__}'s rotary embedding ({cls}) as a rotation of "
                      "adjacent pairs or halves; position methods are not supported for this model")


def _uses_rope(module) -> bool:
    use = getattr(module, "use_rope", True)  # SmolLM3's NoPE layers
    return bool(use)


# --------------------------------------------------------------------------------------------
# The prompt length of dynamic methods, kept on the cache
# --------------------------------------------------------------------------------------------


def _past_length(cache) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # an unknown cache object: treat as empty
        return 0


# The keyword under which the KV cache reaches a model's forward and comes back on its output: ``cache`` from
# transformers 5.24 (``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`` on every modeling forward,
# and ``generate`` passes ``cache=``), ``past_key_values`` before. A caller may still use the old keyword on 5.24+
# (renamed inside ``forward`` by the decorator, after forward pre-hooks have run), so hooks accept both.
CACHE_KWARGS = ("cache", "past_key_values")


def _cache_in(kwargs: dict):
    """The cache object among a forward's keyword arguments, under either keyword (None if none)."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def _cache_out(output):
    """The cache a forward returned: its output's ``cache`` field (5.24+) or ``past_key_values`` field (before).
    Read by field name, since 5.24's ``output.past_key_values`` is a deprecated alias that logs a warning."""
    fields = getattr(output, "__dataclass_fields__", None) or {}
    for name in CACHE_KWARGS:
        if name in fields:
            return getattr(output, name, None)
    return None


def cache_kwarg(model) -> str:
    """The keyword this model's forward takes its KV cache under: ``"cache"`` (transformers 5.24+) or
    ``"past_key_values"``; for code that calls ``model(ids, **{cache_kwarg(model): cache}, use_cache=True)`` on
    every supported transformers version without a deprecation warning."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _pre_hook(module, args, kwargs):
    cache = _cache_in(kwargs)
    if _past_length(cache) == 0:
        am = kwargs.get("attention_mask")
        if isinstance(am, dict):  # generate's per-layer-type masks
            am = next(iter(am.values()), None)
        if isinstance(am, torch.Tensor) and am.dim() == 4:  # built by generate with our mask function
            am = (getattr(am, _META_ATTR, None) or (0, 0, None))[2]
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            n = am.bool().sum(-1)
        else:
            x = kwargs.get("input_ids", args[0] if args else None)
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is None:
                return args, kwargs
            n = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        if cache is not None:
            setattr(cache, _CACHE_ATTR, n)
    else:
        n = getattr(cache, _CACHE_ATTR, None)
        if n is None:
            return args, kwargs
    kwargs[SEQ_LEN_KWARG] = n
    return args, kwargs


def _post_hook(module, args, kwargs, output):
    cache = _cache_out(output)
    n = kwargs.get(SEQ_LEN_KWARG)
    if cache is not None and n is not None and getattr(cache, _CACHE_ATTR, None) is None:
        setattr(cache, _CACHE_ATTR, n)
    return output


# --------------------------------------------------------------------------------------------
# The bounded cache of the windowed methods
# --------------------------------------------------------------------------------------------


def bounded_cache(model) -> SinkCache:
    """A :class:`SinkCache` for the windowed method applied to ``model`` (``window``: no sinks; ``streamingllm``,
    ``lm_infinite``: their sinks), which ``generate`` uses by itself after :func:`apply`; for a by-hand
    ``model(ids, **{cache_kwarg(model): cache}, use_cache=True)`` loop."""
    s = _settings(model.config)
    band = _mask_params(_parsed(s["method"], int(s["train_len"])))
    if band is None:
        raise ConfigError(f"{s['method']} attends every key; a bounded cache is for the windowed methods (window, "
                          "streamingllm, lm_infinite)")
    window, sinks = band
    return SinkCache(sinks=sinks, window=window, config=model.config)


def _bounded_padding_hook(module, args, kwargs):
    """Before a forward on an empty :class:`SinkCache`: the batch's left padding, from the 2-D attention mask, so
    that the cache keeps each row's first real tokens as its sinks."""
    cache = _cache_in(kwargs)
    if isinstance(cache, SinkCache) and cache.get_seq_length() == 0:
        am = kwargs.get("attention_mask")
        if isinstance(am, dict):
            am = next(iter(am.values()), None)
        if isinstance(am, torch.Tensor) and am.dim() == 4:
            am = (getattr(am, _META_ATTR, None) or (0, 0, None))[2]
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            cache.set_padding(am)
    return args, kwargs


def _generation_cache_wrapper(model, original):
    """``model._prepare_cache_for_generation``, then a fresh ``DynamicCache`` that ``generate`` made for itself
    (none given by the caller) replaced by :func:`bounded_cache`. The same hook on transformers 5.1 … 5.25: the
    method takes ``model_kwargs`` second (after ``generation_config``) and puts the cache under ``past_key_values``
    (before 5.24) or ``cache``. Assisted decoding and contrastive search roll the cache back: they keep a full one."""
    from transformers import DynamicCache

    @functools.wraps(original)
    def prepare(*args, **kwargs):
        model_kwargs = kwargs.get("model_kwargs", args[1] if len(args) > 1 else None)
        mode = kwargs.get("generation_mode", args[2] if len(args) > 2 else None)
        given = {k: model_kwargs.get(k) for k in CACHE_KWARGS} if isinstance(model_kwargs, dict) else {}
        out = original(*args, **kwargs)
        if getattr(mode, "value", mode) in ("assisted_generation", "contrastive_search"):
            return out
        for name in given:
            made = model_kwargs.get(name)
            if given[name] is None and type(made) is DynamicCache and made.get_seq_length() == 0:
                model_kwargs[name] = bounded_cache(model)
        return out

    return prepare


# --------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------


# transformers' generate reminds that a generation "exceeded the model's predefined maximum length", which is what
# a length method is for: during generate() of a model with a method applied, that one message is dropped (nothing
# else is, and no other model's generation is touched: apply wraps the instance's generate, which marks the call).
_LENGTH_REMINDER = "exceeded the model's predefined maximum length"
_GENERATING: contextvars.ContextVar[bool] = contextvars.ContextVar("infoscale_generating", default=False)


class _LengthReminderFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_GENERATING.get() and _LENGTH_REMINDER in record.getMessage())


_REMINDER_FILTER = _LengthReminderFilter()


def _quiet_generate(generate):
    """``model.generate`` with the length reminder dropped for the duration of the call."""
    @functools.wraps(generate)
    def run(*args, **kwargs):
        token = _GENERATING.set(True)
        try:
            return generate(*args, **kwargs)
        finally:
            _GENERATING.reset(token)
    run._infoscale_quiet = True
    return run


def _reminder_logger() -> logging.Logger:
    return logging.getLogger("transformers.generation.stopping_criteria")


def _register():
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, infoscale_attention)
    AttentionMaskInterface.register(NAME, infoscale_mask)


def _set_attn_implementation(model, name: str):
    """``model.set_attn_implementation(name)``. transformers decides whether a model may switch by a look at its
    source (``_can_set_attn_implementation``: the attention must call ``ALL_ATTENTION_FUNCTIONS.get_interface(``);
    a model that declares ``_supports_attention_backend`` but indexes ``ALL_ATTENTION_FUNCTIONS[...]`` (ModernBERT
    in transformers 5.1-5.6) is refused with a warning although it reads the implementation from its config at
    every call. For such a model the config's implementation is set directly, which is what the switch does."""
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set() and getattr(model, "_supports_attention_backend", False):
        model.config._attn_implementation = name
    else:
        model.set_attn_implementation(name)


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit()) if p[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def newer_than_tested(version: str) -> bool:
    """Whether a transformers version is past :data:`TESTED_TRANSFORMERS` (a dev or rc build of the next release
    counts as newer)."""
    return _version_tuple(version) > _version_tuple(TESTED_TRANSFORMERS)


@functools.lru_cache(maxsize=1)
def _warn_if_untested() -> None:
    import warnings

    import transformers

    if newer_than_tested(transformers.__version__):
        warnings.warn(f"transformers {transformers.__version__} is newer than the newest version infoscale was "
                      f"tested with ({TESTED_TRANSFORMERS}); run `infoscale doctor` to check that this install "
                      "still runs the methods correctly", stacklevel=3)


def _rebuilt_rotaries(model, attn, config, comp, L: int):
    """For a component that transformers' own rotary computes (``hf_yarn``, ``hf_dynamic``, ``hf_linear``): the
    config fields to set ({rope_parameters, max_position_embeddings}) and, per rotary module, a builder of the
    model's rotary class on that config, as a user would configure it: ``config.rope_parameters = {"rope_type":
    "yarn", "factor": 2, ...}`` then build the model. transformers' "dynamic" type reads L from
    ``max_position_embeddings``, so that is set to L too (and restored by :func:`remove`)."""
    import copy

    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        raise ConfigError(f"{comp.name} sets the model's rope_parameters, but {type(model).__name__} has "
                          "per-layer-type rotaries (or none); use the matching infoscale method (yarn, ntk, pi)")
    if rp.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"{comp.name} replaces the model's RoPE scaling, but it already uses rope_type "
                          f"{rp.get('rope_type')!r}; apply it to a model with plain RoPE")
    new_rp = {k: v for k, v in rp.items() if k in ("rope_theta", "partial_rotary_factor")}
    new_rp.update(comp.method.rope_parameters(comp.params, L))
    fields = {"rope_parameters": new_rp, "max_position_embeddings": L}
    scratch = copy.copy(config)
    for k, v in fields.items():
        setattr(scratch, k, v)
    modules, seen = [], set()
    for name, m in attn:
        if not _uses_rope(m):
            continue
        found = _rotary_for(model, name)
        if found is None:
            raise ConfigError(f"{comp.name} needs the model's rotary module (*RotaryEmbedding); none was found "
                              f"for {name}")
        parent, attr, rotary = found
        if id(rotary) in seen:
            continue
        seen.add(id(rotary))
        cls = type(rotary)
        if "config" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(f"{cls.__name__} is not built from a config; {comp.name} cannot configure it")
        device = next((b.device for b in rotary.buffers()), torch.device("cpu"))

        def build(cfg, cls=cls, device=device):  # transformers 5.1 takes device=, later versions do not
            if "device" in inspect.signature(cls.__init__).parameters:
                return cls(config=cfg, device=device)
            return cls(config=cfg).to(device)

        try:
            build(scratch)  # the rope_parameters are valid for this rotary (checked before anything changes)
        except Exception as e:
            raise ConfigError(f"transformers refused rope_parameters {new_rp}: {type(e).__name__}: {e}") from None
        modules.append((parent, attr, rotary, functools.partial(build, config)))
    return fields, modules


def _check_model(model):
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"infoscale.hf.apply needs a transformers PreTrainedModel, got {type(model).__name__}")
    mod = type(model).__module__
    if mod.startswith("transformers_modules") or getattr(model.config, "auto_map", None):
        raise ConfigError(f"{type(model).__name__} is remote code (trust_remote_code); infoscale.hf supports the "
                          "models shipped with transformers, whose attention goes through AttentionInterface")
    if model.config.get_text_config() is not model.config:
        raise ConfigError(f"{type(model).__name__} is a composite (multimodal) model; apply infoscale to its "
                          "language model, e.g. infoscale.hf.apply(model.model.language_model, ...)")
    if getattr(model.config, "model_type", "") in ("llama4", "llama4_text"):
        raise ConfigError("Llama 4 uses a complex RoPE and its own attention temperature on NoPE layers; "
                          "infoscale.hf does not support it")


def apply(model, method: str | None = None, *, train_len: int | None = None):
    """Run ``model``'s attention with ``method`` (e.g. ``"infoscale"``, ``"rerope(window=512)+logn"``).

    Args:
        model: a transformers 5.x ``PreTrainedModel`` (decoder or encoder) built from transformers' own modeling
            files, with RoPE (methods without a position component also work without RoPE).
        method: a method string of :func:`infoscale.parse_method`; None re-applies the method saved in
            ``config.infoscale`` (after ``from_pretrained``). A model trained with a method
            (``config.infoscale["train_method"]``, e.g. ``"cosscale(s=20)"``) keeps what its training changed.
        train_len: L; default ``rope_parameters["original_max_position_embeddings"]`` when present, else
            ``config.max_position_embeddings``.

    Returns the same model (modified in place). :func:`remove` undoes everything.
    """
    _check_model(model)
    _warn_if_untested()
    if getattr(model, _STATE_ATTR, None) is not None:
        remove(model)
    config = model.config
    previous = getattr(config, "infoscale", None)
    saved = dict(previous) if isinstance(previous, dict) else {}
    if method is None:
        method = saved.get("method")
        if method is None:
            raise MethodError("no method given and config.infoscale has none saved; e.g. apply(model, 'infoscale')")
        train_len = train_len or saved.get("train_len")
    L = int(train_len) if train_len is not None else train_len_of(config)
    if L < 2:
        raise ConfigError(f"train_len must be at least 2, got {L}")
    train_method = saved.get("train_method", "softmax")
    asked = parse_method(method, L)
    if asked.get("pose") is not None and parse_method(train_method, L).get("pose") is None:
        raise MethodError(f"pose is a train-time method (positional skip-wise training) and this model was trained "
                          f"with '{train_method}'; at inference PoSE is plain RoPE, so use a training-free method")
    pm = merge_with_training(train_method, asked, L).resolved(L)
    spec = str(pm)

    ropes: dict[nn.Module, Rope | bool] = {}
    rotaries: dict[int, tuple[nn.Module, str, nn.Module]] = {}
    attn = _attention_modules(model)
    if not attn:
        raise ConfigError(f"no attention modules found in {type(model).__name__}")
    causal_only = [c.name for c in pm.components if c.method.causal_only]
    if causal_only and not all(getattr(m, "is_causal", True) for _, m in attn):
        raise MethodError(f"{causal_only[0]} is defined for causal attention only and {type(model).__name__}'s "
                          "attention is bidirectional")
    by_rotary = _rotary_component(spec, L)
    pm = _parsed(spec, L)  # what the attention function runs (without a component the model's rotary computes)
    rebuilt = _rebuilt_rotaries(model, attn, config, by_rotary, L) if by_rotary is not None else None
    if _needs_positions(pm):
        for name, m in attn:
            if not _uses_rope(m):
                ropes[m] = False
                continue
            found = _rotary_for(model, name)
            if found is None:
                raise ConfigError(f"{pm} moves RoPE positions but no rotary module (*RotaryEmbedding) was found "
                                  f"for {name}; this model is not supported for position methods")
            head_dim = int(getattr(m, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
            ropes[m] = _rope_of(found[2], m, _layer_type(m), head_dim)
            rotaries[id(found[2])] = found
        # a dry run surfaces the core's own refusals (e.g. NTK on a model whose frequencies are not geometric)
        for r in {r for r in ropes.values() if r is not False}:
            d = max(r.dim, 2)
            x = torch.zeros(1, 1, 2, d)
            attention(x, x, x, pm, train_len=L, causal=True, rope=r)

    _register()
    state = {"attn_implementation": config._attn_implementation, "infoscale": previous, "rotaries": [],
             "hooks": []}
    config.infoscale = {**saved, "method": spec, "train_len": L}
    try:
        _set_attn_implementation(model, NAME)
    except Exception as e:
        _restore_config(config, previous)
        raise ConfigError(f"{type(model).__name__} refused the attention implementation: {e}") from None
    if config._attn_implementation != NAME:
        _restore_config(config, previous)
        raise ConfigError(f"{type(model).__name__} does not let its attention implementation be set (it does not "
                          "use transformers' AttentionInterface)")
    for m, r in ropes.items():
        setattr(m, _ROPE_ATTR, r)
    for parent, attr, rotary in rotaries.values():
        setattr(parent, attr, UnrotatedRotary(rotary, config))
        state["rotaries"].append((parent, attr, rotary))
    if rebuilt is not None:
        new_config, modules = rebuilt
        state["rope_config"] = {k: getattr(config, k) for k in new_config}
        for k, v in new_config.items():
            setattr(config, k, v)
        for parent, attr, rotary, build in modules:
            setattr(parent, attr, build())
            state["rotaries"].append((parent, attr, rotary))
    if _dynamic(pm):
        base = model.base_model
        if any(p.kind == p.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values()):
            state["hooks"] = [base.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                              base.register_forward_hook(_post_hook, with_kwargs=True)]
    if _mask_params(pm) is not None and hasattr(model, "_prepare_cache_for_generation"):
        # the windowed methods decode with a bounded cache (infoscale.hf_cache)
        base = model.base_model
        state["hooks"].append(base.register_forward_pre_hook(_bounded_padding_hook, with_kwargs=True))
        model._prepare_cache_for_generation = _generation_cache_wrapper(model, model._prepare_cache_for_generation)
        state["generation_cache"] = True
    if hasattr(model, "generate") and not getattr(model.generate, "_infoscale_quiet", False):
        model.generate = _quiet_generate(model.generate)  # an instance attribute: remove deletes it
        state["quiet_generate"] = True
    setattr(model, _STATE_ATTR, state)
    _reminder_logger().addFilter(_REMINDER_FILTER)  # once: a logger holds a filter at most once; idle outside generate
    return model


def calibrate(model, input_ids, *, lengths: list[int] | None = None, train_len: int | None = None, rows: int = 32,
              seed: int = 0, log=None) -> dict:
    """Fit InfoScale's effective dimension per layer on ``model``'s own attention (see :mod:`infoscale.calibrate`)
    and apply ``infoscale(calibrated=True)``.

    ``input_ids`` (windows, N): a few windows of the user's text (unlabelled), each at least the longest length.
    The target of layer ℓ is its mean H / ln l at the training length L (the first L tokens of each window); the
    fit runs at ``lengths`` (default 4L, 16L, … up to N), on the first n tokens of each window, over ``rows``
    query positions from the last half of each window (for a causal model those attend n/2 … n keys), every
    head. Layers are fitted in order (layer ℓ sees inputs from the calibrated layers before it), by
    ``module.layer_idx``. The dims are stored in ``config.infoscale["dims"]`` (saved by ``save_pretrained``;
    ``apply(model)`` after reloading uses them). Returns the calibration (as ``calibration.json`` holds it)."""
    from .calfit import calibrate_layers

    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    L = int(train_len) if train_len is not None else train_len_of(model.config)
    N = ids.shape[1]
    lengths = list(lengths) if lengths else [n for n in (4 * L, 16 * L, 64 * L) if n <= N]
    if not lengths or any(n <= L or n > N for n in lengths):
        raise ConfigError(f"calibrate needs lengths above L = {L} and at most the text's {N} tokens; got "
                          f"{lengths or 'none (the text is shorter than 4L: give longer windows or lengths=)'}")
    saved = getattr(model.config, "infoscale", None)
    if isinstance(saved, dict) and saved.get("method"):
        merged = parse_method(saved["method"], L)
        if any(c.method.calibrated is None and "temperature" in c.method.slots for c in merged.components):
            raise MethodError(f"the model runs {saved['method']}, another length temperature; calibrate fits InfoScale")
    apply(model, "infoscale(calibrated=True)", train_len=L)
    layers = max(m.layer_idx for _, m in _attention_modules(model)) + 1
    head_dim = None
    gen = torch.Generator().manual_seed(seed)

    def pick(n_q):
        lo = n_q // 2
        if n_q - lo <= rows:
            return torch.arange(lo, n_q)
        return (lo + torch.randperm(n_q - lo, generator=gen)[:rows]).sort().values

    def capture(dims, n, w):
        nonlocal head_dim
        global _CAPTURE
        hd = head_dim or 64
        model.config.infoscale["dims"] = [hd if d is None else float(d) for d in dims]
        _CAPTURE = {"rows": pick, "layers": {}}
        try:
            with torch.no_grad():
                model(ids[w:w + 1, :n].to(model.device))
            got = _CAPTURE["layers"]
        finally:
            _CAPTURE = None
        if len(got) != layers:
            raise ConfigError(f"calibrate saw {len(got)} of {layers} attention layers; this model does not route "
                              "every layer through transformers' attention interface")
        return [got[i] for i in range(layers)]

    was_training = model.training
    model.eval()
    try:
        first = _attention_modules(model)[0][1]
        head_dim = int(getattr(first, "head_dim", 0) or model.config.hidden_size // model.config.num_attention_heads)
        cal = calibrate_layers(capture, layers, lengths, ids.shape[0], L, head_dim, rows=rows, seed=seed,
                               log=log or (lambda s: None))
    finally:
        model.train(was_training)
    model.config.infoscale["dims"] = cal["dims"]
    return cal


def capture_attention(model, input_ids, reduce, *, chunk: int = 256) -> list[list]:
    """Run ``model`` (a method applied with :func:`apply`) once on ``input_ids`` and hand every layer's attention
    logits under its method to ``reduce``, ``chunk`` query rows at a time; returns, per layer in ``layer_idx``
    order, the list of ``reduce``'s results (one per chunk, in row order).

    ``reduce(logits, q_pos, k_pos)``: ``logits`` (H, r, n_k) float32 of batch row 0, every head (GQA heads
    repeated), with masked keys (causal, the method's window or sinks, padding) at the dtype's minimum;
    ``q_pos`` (r,), ``k_pos`` (n_k,) float64, the positions of the queries and keys as the core sees them. The
    logits are the reference path's (:func:`infoscale.attn.attention_logits`) with the call's own arguments,
    after the length temperature, moved positions and masks of the method; a row's weights are their softmax.
    The forward's output is unchanged (the usual path still computes it). Used by ``infoscale analyze`` for
    attention entropy on causal runs; keep ``reduce`` small (per-row sums), not the logits."""
    global _CAPTURE
    if getattr(model, _STATE_ATTR, None) is None:
        raise ConfigError("capture_attention needs a model whose attention runs a method: call "
                          "infoscale.hf.apply(model, method) first")
    if chunk < 1:
        raise ConfigError(f"chunk must be a positive number of query rows, got {chunk}")
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    want = sorted({m.layer_idx for _, m in _attention_modules(model)})
    was_training = model.training
    model.eval()
    _CAPTURE = {"reduce": reduce, "chunk": chunk, "layers": {}}
    try:
        with torch.no_grad():
            model(ids.to(model.device))
        got = _CAPTURE["layers"]
    finally:
        _CAPTURE = None
        model.train(was_training)
    if sorted(got) != want:
        raise ConfigError(f"capture_attention saw {len(got)} of {len(want)} attention layers; this model does not "
                          "route every layer through transformers' attention interface")
    return [got[i] for i in want]


def _restore_config(config, previous):
    if previous is None:
        if hasattr(config, "infoscale"):
            delattr(config, "infoscale")
    else:
        config.infoscale = previous


def remove(model):
    """Undo :func:`apply`: the original attention implementation, rotary modules and ``config.infoscale``."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return model
    for h in state["hooks"]:
        h.remove()
    if state.get("generation_cache"):
        del model._prepare_cache_for_generation  # the instance attribute: the class's method again
    for parent, attr, rotary in state["rotaries"]:
        setattr(parent, attr, rotary)
    for _, m in _attention_modules(model):
        if hasattr(m, _ROPE_ATTR):
            delattr(m, _ROPE_ATTR)
    for k, v in state.get("rope_config", {}).items():
        setattr(model.config, k, v)
    _set_attn_implementation(model, state["attn_implementation"])
    _restore_config(model.config, state["infoscale"])
    if state.get("quiet_generate") and "generate" in vars(model):
        del model.generate  # the class's generate again
    delattr(model, _STATE_ATTR)
    return model

