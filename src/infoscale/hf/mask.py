"""The mask function registered as ``"infoscale"`` in transformers' ``AttentionMaskInterface``.

It is transformers' ``sdpa_mask`` (bool, True = may attend) with the method's own mask (window, StreamingLLM
sinks, LM-Infinite's Λ) ANDed on, on pad-aware positions. It records on the mask tensor where the queries and keys
sit (``q_offset``, ``kv_offset``) and the 2-D padding mask, which the attention function reads
(:mod:`infoscale.hf.geometry`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attn.plan import in_window
from .methods import _mask_params, _parsed

_META_ATTR = "_infoscale_meta"  # (q_offset, kv_offset, 2-D padding mask) recorded on a mask tensor


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


def _padding_of(attention_mask) -> torch.Tensor | None:
    """The 2-D padding mask (B, n) behind a forward's ``attention_mask``: the tensor itself, the one recorded on a
    4-D mask this mask function built, or the first of ``generate``'s per-layer-type masks; None if there is none."""
    am = attention_mask
    if isinstance(am, dict):  # generate's per-layer-type masks
        am = next(iter(am.values()), None)
    if isinstance(am, torch.Tensor) and am.dim() == 4:  # built by generate with this mask function
        am = (getattr(am, _META_ATTR, None) or (0, 0, None))[2]
    return am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
