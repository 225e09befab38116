"""``apply`` and ``remove``: what a method changes on a transformers model, and putting it back.

``apply`` registers :func:`infoscale.hf.infoscale_attention` with ``AttentionInterface.register("infoscale", ...)``
and :func:`infoscale.hf.infoscale_mask` with ``AttentionMaskInterface.register("infoscale", ...)`` under the same
name, then calls ``model.set_attn_implementation("infoscale")``; the method is stored as ``config.infoscale``.
Where the method needs them it also stands in for the rotary modules (:mod:`infoscale.hf.rotary`) and hooks the
forward and ``generate`` (:mod:`infoscale.hf.cache`). Everything it changed is listed on the model
(``_infoscale_state``) for ``remove``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attn import attention, merge_with_training, parse_method
from ..errors import ConfigError, MethodError
from ..models import train_len_of
from .attention import forward_scope, infoscale_attention
from .cache import generation_cache, keep_prompt_length, quiet_generate
from .mask import infoscale_mask
from .methods import NAME, _dynamic, _mask_params, _needs_positions, _parsed, _rotary_component
from .rotary import _ROPE_ATTR, UnrotatedRotary, _rebuilt_rotaries, _ropes_of
from .versions import _warn_if_untested

_STATE_ATTR = "_infoscale_state"  # on the model: what apply changed, for remove


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config")]


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


def _restore_config(config, previous):
    if previous is None:
        if hasattr(config, "infoscale"):
            delattr(config, "infoscale")
    else:
        config.infoscale = previous


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
    trained = {c.name for c in parse_method(train_method, L).components}
    for c in asked.components:  # a method that only changes training positions (PoSE) means nothing here
        if c.method.slots == ("training",) and c.name not in trained:
            raise MethodError(f"{c.name} is a train-time method ({c.method.formula}) and this model was trained "
                              f"with '{train_method}'; at inference it is plain RoPE, so use a training-free method")
    pm = merge_with_training(train_method, asked, L).resolved(L)
    spec = str(pm)

    # everything that can refuse the model runs before anything on it changes
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
    ropes, rotaries = _ropes_of(model, attn, pm, config) if _needs_positions(pm) else ({}, {})
    # a dry run surfaces the core's own refusals (e.g. NTK on a model whose frequencies are not geometric)
    for r in {r for r in ropes.values() if r is not False}:
        x = torch.zeros(1, 1, 2, max(r.dim, 2))
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
    state["hooks"] = forward_scope(model)  # the layers of one forward share their attention layouts
    if _dynamic(pm):
        state["hooks"] += keep_prompt_length(model)
    if (_mask_params(pm) is not None or _needs_positions(pm)) and hasattr(model, "_prepare_cache_for_generation"):
        # the windowed methods decode with a bounded cache, the methods that move positions keep rotated keys
        state["hooks"] += generation_cache(model)
        state["generation_cache"] = True
    if quiet_generate(model):
        state["quiet_generate"] = True
    setattr(model, _STATE_ATTR, state)
    return model


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
