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
cache): these need the keys *before* rotation. ``apply`` replaces the model's rotary module(s) by a stand-in
returning cos = 1, sin = 0 of the same shape, so the model's own ``apply_rotary_pos_emb`` becomes the identity and
the KV cache stores un-rotated keys (the design of bojone/rerope, mit-han-lab/streaming-llm's pos-shift and LongLM's
SelfExtend). The original rotary module is kept and describes the model's RoPE to the core as a
:class:`infoscale.attn.rope.Rope`: its base (``rope_parameters["rope_theta"]``), its rotated dims (partial rotary,
e.g. Phi-3), its frequencies, its ``attention_scaling`` (YaRN/LongRoPE mscale) and its layout (transformers'
``rotate_half``); per-layer-type rotaries (Gemma 3, ModernBERT) give one Rope per layer type, and NoPE layers
(SmolLM3 ``no_rope_layers``) none. ``apply`` checks each Rope against the model's own ``apply_rotary_pos_emb`` on
probe positions and refuses a model whose rotation it cannot reproduce. Every call then rotates q and the cached
keys at their positions (O(n_k·d) per layer and step; while decoding only the keys each position region scores).
Methods without a position component leave the rotary modules alone: q and k arrive rotated and the core is called
with ``rope=False``.

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
made (none given by the caller) by a :class:`SinkCache` (:mod:`infoscale.hf.sink_cache`, :func:`bounded_cache`): per
layer the first ``sinks`` and the last ``window`` keys, the rest dropped as StreamingLLM's ``StartRecentKVCache``
drops them. The keys it returns carry their sequence indices, from which the attention function places them after an
eviction (:func:`infoscale.hf.geometry._kept_geometry`); a forward pre-hook gives the cache the batch's left
padding. ``streamingllm`` (without ``true_positions=True``) moves positions: its keys are cached un-rotated and
every step rotates them at their index within the kept set, the query after the last (StreamingLLM's pos_shift); the
same positions in a forward without cache are the core's definition, so cached decoding equals a full forward.

Rotated keys of the methods that move positions (YaRN, PI, NTK, the ReRoPE family, SelfExtend, DCA): the same hook
makes ``generate`` decode with a :class:`RotatedKeysCache` (:mod:`infoscale.hf.rotated_cache`), a ``DynamicCache``
that also keeps, per layer, each position region's rotated keys, so a decoding step rotates only its own key.

Refused with a clear error: train-time methods (CosScale, ALiBi, PoSE) unless ``config.infoscale["train_method"]``
says the model was trained with them; position methods on models whose rotary module cannot be found or
reproduced (complex RoPE as Llama 4, frequencies that change with the length: ``dynamic``, ``longrope``);
remote-code models; models that do not use transformers' attention interface.

The modules, one concern each: ``patch`` (apply, remove), ``methods`` (the method on the config and what its
registry entries say), ``mask`` (the mask function and its record), ``geometry`` (where queries and keys sit),
``attention`` (the attention function and its SDPA paths), ``rotary`` (the rotary stand-in and the model's Rope),
``cache`` (the forward and generate hooks around the KV cache), ``sink_cache`` (the bounded cache),
``rotated_cache`` (the cache that keeps rotated keys), ``capture``
and ``calibration`` (calibrate, capture_attention), ``versions`` (the tested transformers).
"""

from ..models import train_len_of
from .attention import infoscale_attention
from .cache import bounded_cache, cache_for, cache_kwarg
from .calibration import calibrate, capture_attention
from .mask import infoscale_mask
from .methods import NAME
from .patch import apply, remove
from .rotated_cache import RotatedKeysCache
from .sink_cache import SinkCache

__all__ = ["NAME", "apply", "remove", "calibrate", "capture_attention", "cache_kwarg", "infoscale_attention",
           "infoscale_mask", "train_len_of", "SinkCache", "bounded_cache", "RotatedKeysCache",
           "cache_for"]

# Also importable from here, as before the package had modules (``infoscale doctor`` and the tests use them). To
# replace one in a test, patch the module it lives in (e.g. infoscale.hf.cache._pre_hook): the name here is a copy.
from .cache import CACHE_KWARGS, _cache_in, _pre_hook  # noqa: F401, E402
from .methods import _mask_params, _parsed  # noqa: F401, E402
from .patch import _set_attn_implementation  # noqa: F401, E402
from .versions import TESTED_TRANSFORMERS, _warn_if_untested, newer_than_tested  # noqa: F401, E402
