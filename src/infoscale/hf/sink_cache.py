"""A bounded KV cache for the windowed methods (``window``, ``streamingllm``, ``lm_infinite``) in transformers models.

    cache = infoscale.hf.SinkCache(sinks=4, window=1024, config=model.config)
    model.generate(ids, past_key_values=cache, max_new_tokens=20_000)   # ``cache=`` on transformers 5.24+

After ``infoscale.hf.apply(model, "streamingllm(sinks=4, window=1024)")`` ``generate`` builds one itself
(:func:`infoscale.hf.bounded_cache`).

Eviction (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453; github.com/mit-han-lab/streaming-llm
``StartRecentKVCache``, which keeps ``start_size`` first and ``recent_size`` last keys): per layer the cache keeps
the first ``sinks`` tokens and the last ``window`` tokens it has seen; a step's new keys are appended, the whole set
is returned to attention (a query at distance <= window sees every key it may attend, itself included: the
"+ 1"), then the keys outside the two ends are dropped. Between steps a layer holds at most ``sinks + window``
keys, whatever the length of the text: memory is flat. A layer of the model's own sliding window ``sw`` (Mistral,
Qwen2, Gemma) keeps at most ``min(window, sw − 1)`` recent keys, all its attention reaches.

The cache records, for the keys it returns, their index in the sequence (``_infoscale_kept`` on the key tensor:
the indices and each row's left padding), so that :func:`infoscale.hf.infoscale_attention` knows every key's
position after eviction: true positions for ``window``, ``lm_infinite`` and ``streamingllm(true_positions=True)``
(whose keys the model rotates, or the core rotates at their positions), positions within the kept set for
``streamingllm``, the core's definition (:func:`infoscale.attn.plan.kept_query_positions`), which for a decoding
step is StreamingLLM's pos_shift: the keys at their index in the cache, the query after the last one.

Left padding: a row's sinks are its first real tokens; the cache keeps the first ``sinks + P`` slots, P the
largest left padding of the batch (set from the prompt's attention mask by a hook ``apply`` installs), and the
attention function masks the pads and the extra real tokens of the less padded rows. Right padding is refused.
Rolling back past evicted keys (``crop``: assisted decoding) is refused; ``generate`` keeps a full cache for
assisted decoding and contrastive search.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import ConfigError

__all__ = ["SinkCache", "SinkLayer", "KEPT_ATTR", "Kept"]

KEPT_ATTR = "_infoscale_kept"  # on the key tensor a bounded layer returns: a :class:`Kept`


class Kept:
    """Where the keys a bounded layer returned sit: ``index`` (n_k,) their indices in the sequence, the same for
    every row; ``pads`` (B,) each row's left padding, or None; ``contiguous``: they are one stretch of the sequence
    (nothing dropped between them), the last ones, as transformers' mask and the shapes place them."""

    __slots__ = ("index", "pads", "contiguous")

    def __init__(self, index: torch.Tensor, pads: torch.Tensor | None, contiguous: bool):
        self.index, self.pads, self.contiguous = index, pads, contiguous


class SinkLayer(DynamicLayer):
    """One layer of :class:`SinkCache`: the first ``sinks`` and the last ``window`` keys seen (module docstring)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, sinks: int, window: int, sliding: bool = False, **kwargs):
        super().__init__()
        if sinks < 0 or window < 1:
            raise ConfigError(f"a bounded cache needs sinks >= 0 and window >= 1, got sinks={sinks}, window={window}")
        self.sinks, self.window = int(sinks), int(window)
        self.is_sliding = bool(sliding)  # mirrors the model's layer type, so transformers picks its masks' layer
        self.cumulative_length = 0  # tokens seen (the sequence index of the next one)
        self.index: torch.Tensor | None = None  # (n_stored,) sequence indices of the stored keys
        self.pads: torch.Tensor | None = None  # (B,) left padding per row, set before the first update
        self.dropped = False  # some key was dropped (no roll-back past it)
        self.gap = False  # the stored keys skip some: kept first slots, then the recent ones after a dropped stretch

    def first(self) -> int:
        """Slots kept at the start: the sinks, after the largest left padding of the batch."""
        return self.sinks + (int(self.pads.max()) if self.pads is not None and self.sinks else 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.index = torch.zeros(0, dtype=torch.long, device=key_states.device)
        n = key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        index = torch.cat([self.index, torch.arange(self.cumulative_length, self.cumulative_length + n,
                                                    device=self.index.device)])
        self.cumulative_length += n
        setattr(keys, KEPT_ATTR, Kept(index, self.pads, not self.gap))
        # drop what no later query may attend: beyond the first slots and the last `window` tokens
        first, recent = self.first(), self.cumulative_length - self.window
        if recent <= first:
            self.keys, self.values, self.index = keys, values, index
        else:
            keep = (index < first) | (index >= recent)
            self.keys, self.values, self.index = keys[..., keep, :], values[..., keep, :], index[keep]
            # without first slots (window) the kept keys stay one stretch: transformers' own mask places them
            self.dropped, self.gap = True, self.gap or first > 0
        return keys, values

    def get_mask_sizes(self, query) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask transformers builds: the stored keys and the queries, placed as if
        they were the last ones (they are, until the first eviction; after it the attention function places
        them by their recorded indices). ``query``: the query length (5.4+) or the cache positions (5.1-5.3)."""
        q_len = int(query.shape[0]) if torch.is_tensor(query) else int(query)
        stored = 0 if self.index is None else int(self.index.numel())
        return stored + q_len, self.cumulative_length - stored

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # no limit on the sequence

    def get_max_cache_shape(self) -> int:  # transformers 5.1-5.x name of get_max_length
        return -1

    def stored(self) -> int:
        """Keys held now."""
        return 0 if self.index is None else int(self.index.numel())

    def reset(self) -> None:
        super().reset()
        self.index, self.dropped, self.gap, self.cumulative_length = None, False, False, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        if self.dropped or tokens_to_remove > 0:
            raise ConfigError("a bounded cache (SinkCache) cannot be rolled back once it has dropped keys; use a "
                              "DynamicCache for assisted decoding")
        super().crop(tokens_to_remove)
        self.index = self.index[: self.keys.shape[-2]]
        self.cumulative_length = int(self.index.numel())

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.pads is not None:
            self.pads = self.pads.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.pads is not None:
            self.pads = self.pads[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.pads is not None:
            self.pads = self.pads.index_select(0, beam_idx.to(self.pads.device))


def _layer_windows(config, window: int) -> list[tuple[int, bool]] | None:
    """Per layer (recent keys to keep, whether the model's layer is a sliding-window one), from the config; None
    without a config (layers are then added as the model reaches them, all full attention)."""
    if config is None:
        return None
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = int(cfg.num_hidden_layers)
    sw = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or (["sliding_attention" if sw else "full_attention"] * n)
    out = []
    for t in types[:n]:
        if t == "sliding_attention" and sw:
            out.append((min(window, int(sw) - 1), True))
        elif t == "full_attention":
            out.append((window, False))
        else:
            raise ConfigError(f"a bounded cache supports full and sliding-window attention layers, not {t!r}")
    return out


class SinkCache(Cache):
    """A transformers ``Cache`` that holds at most ``sinks + window`` keys per layer (module docstring).

    Args:
        sinks: first tokens kept (StreamingLLM's start_size; 0 for ``window``).
        window: last tokens kept: the method's window (a query attends keys at distance <= window).
        config: the model's config; with it, layers of the model's own sliding window keep at most that window,
            and transformers builds each layer type's mask from the right layer. Without it every layer is a full
            attention layer.
    """

    def __init__(self, sinks: int, window: int, config=None):
        self.sinks, self.window = int(sinks), int(window)
        plan = _layer_windows(config, self.window)
        if plan is None:
            super().__init__(layer_class_to_replicate=_Replicate(self.sinks, self.window))
        else:
            super().__init__(layers=[SinkLayer(self.sinks, w, sliding) for w, sliding in plan])

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """The batch's left padding, from the prompt's 2-D attention mask (1 = real token); refused once keys are
        stored, and for right padding (a pad after a real token)."""
        if self.get_seq_length() > 0:
            raise ConfigError("SinkCache.set_padding: the padding is set before the first forward")
        am = attention_mask.bool()
        seen = am.long().cumsum(-1) > 0
        if bool((seen & ~am).any()):
            raise ConfigError("a bounded cache (SinkCache) supports left padding only: a row of the attention mask "
                              "has a pad after a real token")
        pads = (~seen).sum(-1)
        self._pads = pads if bool(pads.any()) else None
        for layer in self.layers:
            layer.pads = self._pads

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is not None:
            while len(self.layers) <= layer_idx:
                layer = self.layer_class_to_replicate()
                layer.pads = getattr(self, "_pads", None)
                self.layers.append(layer)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def stored(self) -> list[int]:
        """Keys held now, per layer."""
        return [layer.stored() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the keys and values held now (all layers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


class _Replicate:
    """A layer factory for ``Cache(layer_class_to_replicate=...)``, which calls it without arguments."""

    def __init__(self, sinks: int, window: int):
        self.sinks, self.window = sinks, window

    def __call__(self):
        return SinkLayer(self.sinks, self.window)
