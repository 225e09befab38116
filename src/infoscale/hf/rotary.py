"""The model's rotary modules, for the methods that move positions.

Those methods need the keys *before* rotation. ``apply`` replaces each rotary module by an
:class:`UnrotatedRotary` (cos = 1, sin = 0), so that the model's own ``apply_rotary_pos_emb`` is the identity and
the KV cache stores un-rotated keys (the design of bojone/rerope, mit-han-lab/streaming-llm's pos-shift and
LongLM's SelfExtend), and describes the original to the core as a :class:`infoscale.attn.rope.Rope`
(:func:`_rope_of`), checked against the model's own rotation. A component that transformers' rotary computes
itself (``hf_yarn``, ``hf_dynamic``, ``hf_linear``) gets the model's rotary class rebuilt on new
``rope_parameters`` instead (:func:`_rebuilt_rotaries`).
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import warnings

import torch
from torch import nn

from ..attn.rope import Rope, rotate
from ..errors import ConfigError
from .methods import NAME

_ROPE_ATTR = "_infoscale_rope"  # an attention module's Rope (or False: NoPE) when keys arrive un-rotated


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


def _rebuilt_rotaries(model, attn, config, comp, L: int):
    """For a component that transformers' own rotary computes (``hf_yarn``, ``hf_dynamic``, ``hf_linear``): the
    config fields to set ({rope_parameters, max_position_embeddings}) and, per rotary module, a builder of the
    model's rotary class on that config, as a user would configure it: ``config.rope_parameters = {"rope_type":
    "yarn", "factor": 2, ...}`` then build the model. transformers' "dynamic" type reads L from
    ``max_position_embeddings``, so that is set to L too (and restored by :func:`remove`)."""
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


def _ropes_of(model, attn, pm, config):
    """For a method that moves positions: each attention module's Rope (False on a NoPE layer) and the rotary
    modules to stand in for, ``{id: (parent, attribute, module)}``. Refuses a model whose rotation it cannot
    reproduce, before anything is changed."""
    ropes: dict[nn.Module, Rope | bool] = {}
    rotaries: dict[int, tuple[nn.Module, str, nn.Module]] = {}
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
    return ropes, rotaries
