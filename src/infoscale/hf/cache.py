"""What ``apply`` hooks into a model's forward and ``generate``, around the KV cache.

* The prompt length of dynamic methods (PI, NTK and YaRN without a ``factor``, Leaky ReRoPE without ``k``,
  SelfExtend without ``group``: they use n, the number of real tokens). With a cache, n is fixed by the prompt at
  prefill and kept for every decoding step (as Qwen's dynamic NTK, ``Qwen/Qwen-7B`` ``modeling_qwen.py``, computes
  its NTK alpha at prefill only): forward hooks store it on the cache object and pass it to the attention function
  (:func:`keep_prompt_length`). Cached decoding therefore equals a full forward with that fixed factor.
* The bounded cache of the windowed methods (``window``, ``streamingllm``, ``lm_infinite``): ``generate`` replaces
  the fresh ``DynamicCache`` it made (none given by the caller) by a :class:`SinkCache`
  (:func:`bound_generation_cache`, :func:`bounded_cache`); a forward pre-hook gives the cache the batch's left
  padding.
* ``generate``'s reminder that a generation "exceeded the model's predefined maximum length", which is what a
  length method is for, is dropped during the model's own ``generate`` (:func:`quiet_generate`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging

import torch

from ..errors import ConfigError
from .geometry import SEQ_LEN_KWARG
from .mask import _padding_of
from .methods import _mask_params, _needs_positions, _parsed, _settings
from .rotated_cache import RotatedKeysCache
from .sink_cache import SinkCache

_CACHE_ATTR = "_infoscale_seq_len"  # where the prompt's n is kept on a cache object

# The keyword under which the KV cache reaches a model's forward and comes back on its output: ``cache`` from
# transformers 5.24 (``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")`` on every modeling forward,
# and ``generate`` passes ``cache=``), ``past_key_values`` before. A caller may still use the old keyword on 5.24+
# (renamed inside ``forward`` by the decorator, after forward pre-hooks have run), so hooks accept both.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model) -> str:
    """The keyword this model's forward takes its KV cache under: ``"cache"`` (transformers 5.24+) or
    ``"past_key_values"``; for code that calls ``model(ids, **{cache_kwarg(model): cache}, use_cache=True)`` on
    every supported transformers version without a deprecation warning."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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


def _past_length(cache) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # an unknown cache object: treat as empty
        return 0


# --- the prompt length of dynamic methods, kept on the cache ---------------------------------


def _pre_hook(module, args, kwargs):
    cache = _cache_in(kwargs)
    if _past_length(cache) == 0:
        am = _padding_of(kwargs.get("attention_mask"))
        if am is not None:
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


def keep_prompt_length(model) -> list:
    """Hooks on ``model.base_model`` that pass n to the attention function (under ``SEQ_LEN_KWARG``) and keep the
    prompt's n on the cache; their handles (none when the forward takes no ``**kwargs`` to pass n on)."""
    base = model.base_model
    if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values()):
        return []
    return [base.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            base.register_forward_hook(_post_hook, with_kwargs=True)]


# --- the bounded cache of the windowed methods ------------------------------------------------


def bounded_cache(model) -> SinkCache:
    """A :class:`SinkCache` for the windowed method applied to ``model`` (``window``: no sinks; ``streamingllm``,
    ``lm_infinite``: their sinks), which ``generate`` uses by itself after :func:`infoscale.hf.apply`; for a
    by-hand ``model(ids, **{cache_kwarg(model): cache}, use_cache=True)`` loop."""
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
        am = _padding_of(kwargs.get("attention_mask"))
        if am is not None:
            cache.set_padding(am)
    return args, kwargs


def _generation_cache_wrapper(model, original, make):
    """``model._prepare_cache_for_generation``, then a fresh ``DynamicCache`` that ``generate`` made for itself
    (none given by the caller) replaced by ``make(model)`` (:func:`bounded_cache`, :class:`RotatedKeysCache`). The
    same hook on transformers 5.1 … 5.25: the method takes ``model_kwargs`` second (after ``generation_config``)
    and puts the cache under ``past_key_values`` (before 5.24) or ``cache``. Assisted decoding and contrastive
    search roll the cache back: they keep a full one."""
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
            # (an offloading DynamicCache, generate's cache_implementation="offloaded", is left as it is: ours
            # keep everything on the model's device)
            if (given[name] is None and type(made) is DynamicCache and made.get_seq_length() == 0
                    and not getattr(made, "offloading", False)):
                model_kwargs[name] = make(model)
        return out

    return prepare


def cache_for(model):
    """The KV cache ``generate`` builds for ``model`` when the caller gives none, for a decoding loop written by
    hand: after :func:`infoscale.hf.apply`, the bounded :func:`bounded_cache` of a windowed method or a
    :class:`RotatedKeysCache` for a method that moves positions; else transformers' ``DynamicCache``."""
    from transformers import DynamicCache

    s = getattr(model.config, "infoscale", None)
    if isinstance(s, dict) and "method" in s:
        pm = _parsed(s["method"], int(s["train_len"]))
        if _mask_params(pm) is not None:
            return bounded_cache(model)
        if _needs_positions(pm):
            return RotatedKeysCache(config=model.config)
    return DynamicCache(config=model.config)


def generation_cache(model) -> list:
    """Make ``model.generate`` decode with :func:`cache_for` (an instance attribute wraps the model's
    ``_prepare_cache_for_generation``; deleting it undoes this); returns the handles of its hooks (the bounded
    cache's padding hook)."""
    model._prepare_cache_for_generation = _generation_cache_wrapper(model, model._prepare_cache_for_generation,
                                                                    cache_for)
    return [model.base_model.register_forward_pre_hook(_bounded_padding_hook, with_kwargs=True)]


# --- generate without the length reminder -----------------------------------------------------

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


def quiet_generate(model) -> bool:
    """Wrap ``model.generate`` (an instance attribute; deleting it undoes this) so that the length reminder is
    dropped during the call; whether it was wrapped now."""
    _reminder_logger().addFilter(_REMINDER_FILTER)  # once: a logger holds a filter at most once; idle outside generate
    if hasattr(model, "generate") and not getattr(model.generate, "_infoscale_quiet", False):
        model.generate = _quiet_generate(model.generate)
        return True
    return False
