"""Where the queries and keys of one attention call sit in the sequence, and which keys each query attends.

transformers hands the attention function q (B, H, n_q, d) and k, v (B, H_kv, n_k, d) with the cache's keys in
front. The mask function records the offsets and the padding on the mask it builds (:mod:`infoscale.hf.mask`);
when transformers skips the mask, the shapes say it (:func:`query_offset`); after a bounded cache evicted keys,
the cache's own record does (:func:`_kept_geometry`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .mask import _META_ATTR

SEQ_LEN_KWARG = "infoscale_seq_len"  # the per-row n of dynamic methods, injected into the forward kwargs


def query_offset(n_q: int, n_k: int, causal: bool) -> int:
    """The key index of the first query when transformers skipped the mask: the queries are the last n_q keys,
    except at a static cache's prefill, the only skip with 1 < n_q < n_k (causal), where they are the first n_q."""
    return 0 if (causal and 1 < n_q < n_k) else n_k - n_q


def _bool_mask(mask, n_q: int, n_k: int) -> torch.Tensor | None:
    """The model's mask as bool (True = may attend), 4-D, cut to the call's queries and keys."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"infoscale attention got a {type(mask).__name__} mask; only tensor masks are supported")
    if mask.dtype != torch.bool:  # an additive float mask: 0 = attend, a large negative number = not
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    return mask[..., -n_q:, :n_k]


def _kv_repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat GQA key/value heads (transformers' repeat_kv: kv head h serves query heads h·r .. h·r + r − 1)."""
    r = heads // x.shape[1]
    return x if r == 1 else x.repeat_interleave(r, dim=1)


def _geometry(mask, raw_mask, n_q: int, n_k: int, causal: bool, device, position_ids=None):
    """Query positions (B|1, n_q), key positions (B|1, n_k), key padding (B, n_k) or None.

    From the mask's record when transformers built it; from the shapes when it skipped it (then there is no
    padding, and the queries sit at :func:`query_offset`), placed by the model's ``position_ids``: a full
    sliding-window cache holds the last n_k tokens, not the first, which a method on absolute positions
    (SelfExtend's groups, DCA's chunks) must know; from the mask's diagonal for a caller's own 4-D mask.
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
        q_off = query_offset(n_q, n_k, causal)
        q_pos = (torch.arange(n_q, device=device) + q_off)[None]
    else:  # a mask without a record (a caller's own): each query's own key is the last one it may attend
        q_off = n_k - n_q  # no skipped mask, so no static-cache prefill case: the queries are the last n_q keys
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


def _seq_len(kwargs, B: int, q_pos: torch.Tensor) -> torch.Tensor:
    """n per row: the prompt's real tokens kept by the forward hook for dynamic methods (:mod:`infoscale.hf.cache`),
    else the real tokens up to the last query."""
    seq_len = kwargs.get(SEQ_LEN_KWARG)
    if seq_len is not None and seq_len.shape[0] != B and B % seq_len.shape[0] == 0:
        seq_len = seq_len.repeat_interleave(B // seq_len.shape[0])  # beams / expanded batches
    if seq_len is None:
        seq_len = q_pos[:, -1] + 1
    return seq_len.clamp(min=1)  # a row of padding only counts as one token


def _core_geometry(mask, raw_mask, n_q: int, n_k: int, causal: bool, B: int, device, kwargs):
    """(query positions, key positions, key padding, n per row) as the core takes them (:func:`_geometry`,
    :func:`_seq_len`)."""
    q_pos, k_pos, kpm = _geometry(mask, raw_mask, n_q, n_k, causal, device, kwargs.get("position_ids"))
    return q_pos, k_pos, kpm, _seq_len(kwargs, B, q_pos)


def _kept_geometry(kept, B: int, n_q: int, sliding_window, device):
    """Positions of the queries (B|1, n_q) and keys (B|1, n_k), key padding (B, n_k) or None, and the model's own
    mask beyond causality (its sliding window on sequence indices, as transformers' ``sliding_window_overlay``)
    for the keys a bounded cache returned (:mod:`infoscale.hf.sink_cache`): the new queries are its last n_q keys; a
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


def _row_lengths(mask, n_q: int, n_k: int, causal: bool, device) -> torch.Tensor:
    """l_i, keys each query attends: (B|1, 1, n_q, 1) float64."""
    if mask is not None:
        return mask.sum(-1, keepdim=True, dtype=torch.float64)
    if not causal:
        return torch.full((1, 1, n_q, 1), float(n_k), dtype=torch.float64, device=device)
    q_off = query_offset(n_q, n_k, causal)
    return (torch.arange(n_q, dtype=torch.float64, device=device) + q_off + 1).view(1, 1, n_q, 1)
