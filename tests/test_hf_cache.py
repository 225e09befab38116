"""infoscale.hf's caches in tiny transformers models: the bounded cache (SinkCache) of window, streamingllm and
lm_infinite, and the cache that keeps rotated keys (RotatedKeysCache) for the methods that move positions.

Decoding with the bounded cache must give, at every step, what the method defines for a full forward: the logits
of a forward without cache over the whole text (every layer), and, on a one-layer model, those of a plain forward
over exactly the tokens the cache kept (StreamingLLM's own positions: the kept tokens at 0 .. k − 1).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from infoscale import hf
from infoscale.attn import sdpa as sdpa_mod
from infoscale.errors import ConfigError
from infoscale.hf.rotated_cache import RotatedLayer

from .test_hf import DECODE_FAMILIES, SMALL, V, _fixed, ids_for, logits, model_for

METHODS = ["streamingllm(sinks=2, window=5)", "streamingllm(sinks=2, window=5, true_positions=True)",
           "window(width=4)", "lm_infinite(sinks=2, window=5, cap=4)",
           "ntk(factor=2.0)+streamingllm(sinks=3, window=4)+infoscale"]


def _generate(m, ids, n, **kw):
    out = m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                     return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@contextlib.contextmanager
def _caches_seen(m):
    """The cache every forward of the backbone is handed, while the block runs."""
    seen = []
    hook = m.model.register_forward_pre_hook(lambda mod, a, kw: seen.append(hf._cache_in(kw)), with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()


@pytest.mark.parametrize("method", METHODS + ["streamingllm(sinks=2, window=14)"])
@pytest.mark.parametrize("family", DECODE_FAMILIES)
def test_generate_uses_the_bounded_cache_and_equals_a_full_forward(family, method):
    """generate() after apply builds a SinkCache by itself; every step's logits are the full forward's (no cache)
    at that token, on every causal family. Qwen2's layer 1, Mistral's layers and Gemma's sliding layers have their
    own window (16, 12, 6): there window=14 keeps fewer recent keys, all they attend."""
    m = hf.apply(model_for(family), method)
    ids = ids_for(n=9)
    with _caches_seen(m) as seen:
        seq, step = _generate(m, ids, 20)
    assert all(isinstance(c, hf.SinkCache) for c in seen) and len({id(c) for c in seen}) == 1
    cache = seen[0]
    window, sinks = hf._mask_params(hf._parsed(m.config.infoscale["method"], 8))
    assert max(cache.stored()) <= sinks + window < seq.shape[1]
    full = logits(m, seq)[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_cache_without_the_config(family):
    """SinkCache(sinks, window) without the model's config: every layer full attention, the same steps."""
    m = hf.apply(model_for(family), "streamingllm(sinks=2, window=5)")
    ids = ids_for(n=9)
    seq, step = _generate(m, ids, 16)
    got_seq, got = _generate(m, ids, 16, **{hf.cache_kwarg(m): hf.SinkCache(sinks=2, window=5)})
    assert torch.equal(got_seq, seq)
    torch.testing.assert_close(got, step, atol=1e-5, rtol=1e-5)


def _one_layer():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**{**SMALL, "num_hidden_layers": 1}, num_key_value_heads=2)).eval()
    hf._set_attn_implementation(m, "sdpa")
    return m


@pytest.mark.parametrize("method", ["streamingllm(sinks=2, window=5)",
                                    "streamingllm(sinks=2, window=5, true_positions=True)", "window(width=4)"])
def test_each_step_is_a_forward_over_the_kept_tokens(method):
    """One layer, a by-hand loop with the cache under the model's keyword: the logits of step t are the stock
    model's over exactly the tokens kept (the sinks and the last window), at positions 0 .. k − 1 for StreamingLLM's
    own positions, at their true positions otherwise. The cache holds at most sinks + window keys."""
    stock = _one_layer()
    m = hf.apply(copy.deepcopy(stock), method)
    window, sinks = hf._mask_params(hf._parsed(m.config.infoscale["method"], 8))
    cache = hf.bounded_cache(m)
    seq = ids_for(n=30, seed=3)
    n0 = 6
    with torch.no_grad():
        out = m(seq[:, :n0], **{hf.cache_kwarg(m): cache}, use_cache=True)
        got = [out.logits[:, -1]]
        for t in range(n0, seq.shape[1]):
            got.append(m(seq[:, t:t + 1], **{hf.cache_kwarg(m): cache}, use_cache=True).logits[:, -1])
            assert max(cache.stored()) <= sinks + window
    for t, g in zip(range(n0 - 1, seq.shape[1]), got, strict=True):
        kept = sorted(set(range(min(sinks, t + 1))) | set(range(max(0, t - window), t + 1)))
        pos = None if "true_positions" not in method and sinks else torch.tensor([kept])
        want = logits(stock, seq[:, kept], position_ids=pos)[:, -1]
        torch.testing.assert_close(g, want, atol=2e-5, rtol=1e-4, msg=lambda s, t=t: f"step {t}: {s}")


@pytest.mark.parametrize("method", ["streamingllm(sinks=2, window=5)", "lm_infinite(sinks=2, window=5, cap=4)",
                                    "window(width=4)+logn"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill(family, method):
    """Forwards of several tokens on a cache that has already dropped keys (a prompt read in chunks of 7): the
    logits of a single forward over the whole text."""
    m = hf.apply(model_for(family), method)
    seq = ids_for(n=30, seed=7)
    cache = hf.bounded_cache(m)
    with torch.no_grad():
        got = torch.cat([m(seq[:, c:c + 7], **{hf.cache_kwarg(m): cache}, use_cache=True).logits
                         for c in range(0, seq.shape[1], 7)], 1)
    torch.testing.assert_close(got, logits(m, seq), atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # the old keyword, on transformers 5.24+
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_caller_cache_under_either_keyword(family):
    """A SinkCache the caller passes (``past_key_values=``, or the model's keyword) gives what generate builds;
    a DynamicCache the caller passes is kept (all keys), with the same tokens."""
    m = hf.apply(model_for(family), "streamingllm(sinks=2, window=5)")
    ids = ids_for(n=9)
    seq, _ = _generate(m, ids, 16)
    for kw in ("past_key_values", hf.cache_kwarg(m)):
        cache = hf.SinkCache(sinks=2, window=5, config=m.config)
        got, _ = _generate(m, ids, 16, **{kw: cache})
        assert torch.equal(got, seq) and cache.get_seq_length() == seq.shape[1] - 1
        assert max(cache.stored()) == 2 + 5
    full = DynamicCache()
    with _caches_seen(m) as seen:
        got, _ = _generate(m, ids, 16, **{hf.cache_kwarg(m): full})
    assert all(c is full for c in seen) and torch.equal(got, seq)


@pytest.mark.parametrize("method", ["streamingllm(sinks=2, window=5)", "window(width=4)",
                                    "lm_infinite(sinks=2, window=5, cap=4)"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_left_padding(family, method):
    """A left-padded row decodes as it does alone: its sinks are its first real tokens."""
    m = hf.apply(model_for(family), method)
    a, b = ids_for(n=9, seed=4), ids_for(n=6, seed=5)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    seq, step = _generate(m, batch, 16, attention_mask=mask)
    for row, ids in ((0, a), (1, b)):
        alone_seq, alone = _generate(m, ids, 16)
        assert torch.equal(seq[row, -16:], alone_seq[0, -16:])
        torch.testing.assert_close(step[row], alone[0], atol=1e-4, rtol=1e-4)


def test_full_forward_unchanged_within_the_cache():
    """Up to sinks + window + 1 tokens nothing is dropped: StreamingLLM's positions are the true ones."""
    ids = ids_for(n=8)
    own = logits(hf.apply(model_for("llama"), "streamingllm(sinks=2, window=5)"), ids)
    true = logits(hf.apply(model_for("llama"), "streamingllm(sinks=2, window=5, true_positions=True)"), ids)
    torch.testing.assert_close(own, true, atol=1e-5, rtol=1e-5)
    longer = ids_for(n=20)
    assert not torch.allclose(logits(hf.apply(model_for("llama"), "streamingllm(sinks=2, window=5)"), longer),
                              logits(hf.apply(model_for("llama"), "streamingllm(sinks=2, window=5, "
                                                                  "true_positions=True)"), longer), atol=1e-4)


def test_beam_search_with_the_bounded_cache():
    m = hf.apply(model_for("llama"), "streamingllm(sinks=2, window=5)")
    ids = ids_for(n=9)
    got = m.generate(ids, max_new_tokens=12, num_beams=2, do_sample=False, pad_token_id=0)
    want = m.generate(ids, max_new_tokens=12, num_beams=2, do_sample=False, pad_token_id=0,
                      **{hf.cache_kwarg(m): DynamicCache()})
    assert torch.equal(got, want)


def test_refusals_and_remove():
    m = hf.apply(model_for("llama"), "streamingllm(sinks=2, window=5)")
    right = torch.ones(2, 9, dtype=torch.long)
    right[1, -2:] = 0
    with pytest.raises(ConfigError, match="left padding only"):
        m.generate(ids_for(batch=2, n=9), attention_mask=right, max_new_tokens=2, pad_token_id=0)
    cache = hf.bounded_cache(m)
    with torch.no_grad():
        m(ids_for(n=12), **{hf.cache_kwarg(m): cache}, use_cache=True)
    with pytest.raises(ConfigError, match="cannot be rolled back"):
        cache.crop(-1)
    with pytest.raises(ConfigError, match="windowed methods"):
        hf.bounded_cache(hf.apply(model_for("llama"), "infoscale"))
    hf.remove(m)
    assert "_prepare_cache_for_generation" not in vars(m)
    with _caches_seen(m) as seen:
        m.generate(ids_for(n=9), max_new_tokens=2, pad_token_id=0)
    assert type(seen[0]) is DynamicCache


def _flat_decode(new_tokens: int, sinks: int = 4, window: int = 32):
    """Greedy decoding of ``new_tokens`` with a by-hand loop; the cache's bytes after every step."""
    m = hf.apply(model_for("llama"), f"streamingllm(sinks={sinks}, window={window})")
    cache = hf.bounded_cache(m)
    kw = {hf.cache_kwarg(m): cache, "use_cache": True}
    sizes = []
    with torch.no_grad():
        x = m(ids_for(n=16), **kw).logits[:, -1:].argmax(-1)
        for _ in range(new_tokens):
            x = m(x, **kw).logits[:, -1:].argmax(-1) % V
            sizes.append(cache.nbytes())
    return cache, sizes


@pytest.mark.e2e
def test_long_generation_holds_the_cache_flat():
    """2,000 new tokens: from the step the cache fills, its bytes stay the same (sinks + window keys)."""
    cache, sizes = _flat_decode(2000)
    assert cache.get_seq_length() == 16 + 2000
    assert cache.stored() == [4 + 32] * len(cache.layers)
    full = sizes[40]
    assert all(s == full for s in sizes[40:]) and max(sizes) == full


@pytest.mark.slow
def test_very_long_generation_holds_the_cache_flat():
    cache, sizes = _flat_decode(20_000)
    assert cache.get_seq_length() == 16 + 20_000 and max(sizes) == sizes[-1] == sizes[100]


ROTATED = ["yarn(factor=4.0)", "rerope(window=4)+infoscale", "self_extend(group=2, window=4)",
           "dca(chunk=6, local=2)", "leaky_rerope(window=4)", "pi+logn"]


@pytest.mark.parametrize("method", ROTATED)
@pytest.mark.parametrize("family", DECODE_FAMILIES)
def test_generate_keeps_rotated_keys_and_equals_a_full_forward(family, method, monkeypatch):
    """generate() after apply decodes with a RotatedKeysCache whose layers hold the rotated keys, and every step's
    logits are the full forward's at that token (a dynamic method at the prompt's n, as the cache fixes it)."""
    monkeypatch.setattr(sdpa_mod, "STORE_FROM", 0)  # a tiny model: every region takes its keys from the store
    m = hf.apply(model_for(family), method)
    ids = ids_for(n=9)
    with _caches_seen(m) as seen:
        seq, step = _generate(m, ids, 12)
    assert all(isinstance(c, hf.RotatedKeysCache) for c in seen) and len({id(c) for c in seen}) == 1
    # the full-attention layers keep stores, a layer of the model's own sliding window (all of Mistral's) none; the
    # stores fill where the fused path runs (not under Gemma 2's softcap, nor in SmolLM3's layers without RoPE)
    assert all(isinstance(layer, RotatedLayer) != layer.is_sliding for layer in seen[0].layers)
    if family in ("llama", "qwen2"):
        assert all(layer.rotated for layer in seen[0].layers if isinstance(layer, RotatedLayer))
    full = logits(hf.apply(model_for(family), _fixed(method, ids.shape[1])), seq)[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-4)


def test_a_cut_or_reordered_cache_drops_its_stores(monkeypatch):
    """crop (assisted decoding), beam search's reorder and a reset drop the stores: after a crop, new tokens give the
    logits of a fresh forward; beam search gives what it gives with transformers' own DynamicCache."""
    monkeypatch.setattr(sdpa_mod, "STORE_FROM", 0)
    m = hf.apply(model_for("llama"), "yarn(factor=4.0)")
    a, b = ids_for(n=12), ids_for(n=3, seed=7)
    cache = hf.RotatedKeysCache(config=m.config)
    kw = {hf.cache_kwarg(m): cache, "use_cache": True}
    logits(m, a[:, :11], **kw)
    assert not any(layer.rotated for layer in cache.layers)  # a prefill keeps none: decoding stores what it takes
    logits(m, a[:, 11:], **kw)
    assert all(layer.rotated for layer in cache.layers)
    cache.crop(-3)
    assert not any(layer.rotated for layer in cache.layers)
    got = logits(m, b, **kw)
    want = logits(m, torch.cat([a[:, :9], b], 1))[:, -3:]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    ids = ids_for(n=9)
    beams = m.generate(ids, max_new_tokens=10, num_beams=2, do_sample=False, pad_token_id=0)
    plain = m.generate(ids, max_new_tokens=10, num_beams=2, do_sample=False, pad_token_id=0,
                       **{hf.cache_kwarg(m): DynamicCache()})
    assert torch.equal(beams, plain)
    cache.reset()
    assert not any(layer.rotated for layer in cache.layers)
    assert isinstance(hf.cache_for(m), hf.RotatedKeysCache)  # what generate builds, for a loop written by hand
    assert isinstance(hf.cache_for(hf.apply(model_for("llama"), "window(width=4)")), hf.SinkCache)
    assert type(hf.cache_for(hf.apply(model_for("llama"), "infoscale"))) is DynamicCache
    assert type(hf.cache_for(model_for("llama"))) is DynamicCache


@pytest.mark.parametrize("method", ["rerope(window=8)", "lm_infinite(sinks=2, window=8, cap=8)"])
def test_decoding_keeps_the_models_own_rope_scaling_on_keys_at_position_zero(method):
    """A model with its own YaRN (rope_parameters) scales the rotated dims by its attention_scaling even at angle 0:
    a decoding step must not skip that for the far side's keys at position 0 (cached == full forward)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMALL, "max_position_embeddings": 128}, num_key_value_heads=2,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                       "original_max_position_embeddings": 8})
    model = LlamaForCausalLM(cfg).eval()
    hf._set_attn_implementation(model, "sdpa")
    m = hf.apply(model, method, train_len=8)
    ids = ids_for(n=80)  # >= 64 rows: the full forward takes the prefill path, which rotates every key
    seq, step = _generate(m, ids, 3)
    full = logits(m, seq)[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-4)
