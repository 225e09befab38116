"""The method a model runs: ``config.infoscale`` read and parsed, and what its registry entries say about it.

Everything here asks the method's components (:mod:`infoscale.attn.methods`), never a method's name.
"""

from __future__ import annotations

import functools

from ..attn import parse_method
from ..attn.methods import Component
from ..errors import ConfigError, MethodError

NAME = "infoscale"  # the attention implementation's name in transformers' AttentionInterface and on the config


def _settings(config) -> dict:
    s = getattr(config, "infoscale", None)
    if not isinstance(s, dict) or "method" not in s:
        raise ConfigError("the model's attention implementation is 'infoscale' but config.infoscale has no method; "
                          "call infoscale.hf.apply(model, method)")
    return s


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


def _layer_method(pm, settings: dict, module, L: int):
    """``infoscale(calibrated=True)`` becomes ``infoscale(dim=d_ℓ)`` with this layer's fitted d
    (:func:`infoscale.hf.calibrate`)."""
    if not pm.calibrated():
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
