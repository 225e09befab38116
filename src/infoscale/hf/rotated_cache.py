"""A KV cache that also keeps each layer's keys rotated, for the methods that move positions.

A method that moves positions (YaRN, PI, NTK, ReRoPE and leaky ReRoPE, SelfExtend, Dual Chunk Attention) gets
q and k from the model un-rotated (:mod:`infoscale.hf.rotary`) and rotates them itself, per position region. In
a decoding step a cached key's rotation is the one it had in the step before (a region's key positions depend on
the key's index alone, and a dynamic method's factor is fixed at prefill), so rotating every cached key again
each step is wasted work: it made decoding 3 to 4 times slower than stock. :class:`RotatedKeysCache` keeps, beside
the un-rotated keys transformers' ``DynamicCache`` keeps, a store per layer in which the attention function leaves
each region's rotated keys (:func:`infoscale.attn.sdpa.attention_sdpa`'s ``rotated``); a step then rotates only
its own key. The store costs up to one more copy of the keys per region that scores many keys.

    cache = infoscale.hf.RotatedKeysCache(config=model.config)
    model.generate(ids, past_key_values=cache, max_new_tokens=256)   # ``cache=`` on transformers 5.24+

After ``infoscale.hf.apply(model, "yarn")`` (or any method that moves positions) ``generate`` builds one itself.
A cache that is cut (``crop``, assisted decoding), reordered (beam search) or reset drops its stores, which are
then built again; a layer of the model's own sliding window keeps none (its keys move as the window slides).
"""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["RotatedKeysCache", "RotatedLayer", "ROTATED_ATTR"]

ROTATED_ATTR = "_infoscale_rotated"  # on the key tensor a layer returns: the layer's store (a dict)


class RotatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose returned keys carry the layer's rotated-key store (``ROTATED_ATTR``)."""

    _layer_type = None  # not registered in transformers' layer-type mapping (DynamicCache keeps its own layers)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rotated: dict = {}

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        setattr(keys, ROTATED_ATTR, self.rotated)
        return keys, values

    # every change other than growth drops the store (it is rebuilt from the keys at the next step)
    def reset(self) -> None:
        self.rotated.clear()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self.rotated.clear()
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.rotated.clear()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        self.rotated.clear()
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx) -> None:
        self.rotated.clear()
        super().reorder_cache(beam_idx)


class RotatedKeysCache(DynamicCache):
    """transformers' ``DynamicCache`` whose full-attention layers keep rotated-key stores (module docstring).
    Arguments as ``DynamicCache``'s; with ``config`` the model's sliding-window layers stay transformers' own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = RotatedLayer
        self.layers = [RotatedLayer() if type(layer) is DynamicLayer and not layer.is_initialized else layer
                       for layer in self.layers]
