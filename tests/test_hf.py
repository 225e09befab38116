"""infoscale.hf: every inference method in transformers models built from tiny configs (fp32, no downloads).

Training length L = 8 (max_position_embeddings), sequences of 24 tokens, so every length method extrapolates.
The reference for a layer is :func:`infoscale.attention` applied to that layer's un-rotated q, k, v, captured by
hooks on the projections, with a RoPE description built here from the config (an independent path).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    StaticCache,
)

import infoscale

# Temporary, until the extended core (Rope; attention() with key_positions, rope, scale, softcap, seq_len) is
# merged from main: without it the integration cannot import.
from infoscale import hf
from infoscale.attn.rope import Rope
from infoscale.errors import ConfigError, MethodError

from .naive import self_extend_group

L = 8  # training length of every tiny model
N = 24  # evaluation length: 3 L
V = 64  # vocabulary
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=L, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             initializer_range=0.3)


def _build(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2))
    if family == "qwen2":  # layer 1 is a sliding-window layer (window 16 < N)
        return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, use_sliding_window=True,
                                            sliding_window=16, max_window_layers=1))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=12))
    if family == "gemma3":  # scaling 1/sqrt(16) != 1/sqrt(head_dim), two rotaries (bases 10k / 1M)
        return Gemma3ForCausalLM(Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=6,
                                                  query_pre_attn_scalar=16,
                                                  layer_types=["sliding_attention", "full_attention"]))
    if family == "gemma2":  # logit soft-capping at 5 (transformers passes softcap= to the attention function)
        return Gemma2ForCausalLM(Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=6,
                                              query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                              final_logit_softcapping=None,
                                              layer_types=["sliding_attention", "full_attention"]))
    if family == "phi3":  # partial rotary: 4 of 8 dims
        return Phi3ForCausalLM(Phi3Config(**SMALL, num_key_value_heads=2, partial_rotary_factor=0.5))
    if family == "smollm3":  # layer 1 has no RoPE
        return SmolLM3ForCausalLM(SmolLM3Config(**SMALL, num_key_value_heads=2, no_rope_layers=[1, 0],
                                                no_rope_layer_interval=2))
    if family == "modernbert":  # bidirectional; layer 0 local (|i - j| <= 4), layer 1 global
        cfg = ModernBertConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=L, local_attention=8,
                               global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               cls_token_id=1, sep_token_id=2, initializer_range=0.3)
        return ModernBertForMaskedLM(cfg)
    raise AssertionError(family)


_MODELS: dict[str, torch.nn.Module] = {}


def model_for(family: str, attn: str | None = None):
    if family not in _MODELS:
        _MODELS[family] = _build(family).eval()
    m = copy.deepcopy(_MODELS[family])
    # Gemma 2 has no SDPA; hf's helper because transformers 5.1-5.6 refuse to switch ModernBERT's implementation
    hf._set_attn_implementation(m, attn or ("eager" if family == "gemma2" else "sdpa"))
    return m


CAUSAL = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "smollm3"]
FAMILIES = CAUSAL + ["modernbert"]
# Every training-free method of the registry (transformers' own rope types, the entries with rope_parameters, have
# HF_ROPE_METHODS below; train-time ones are refused), at its defaults or at parameters that make it act within N,
# then combinations.
AT = {"llama4": "llama4(floor=4)"}  # F = L/2: the factor steps within N
TRAINING_FREE = [name for name, m in infoscale.REGISTRY.items() if not m.train_time and m.rope_parameters is None]
METHODS = [AT.get(name, name) for name in TRAINING_FREE] + [
    "rerope+infoscale", "leaky_rerope(window=3)+logn", "yarn+infoscale",
    "ntk+streamingllm(sinks=2, window=5)+infoscale", "window(width=3)+logn", "pi(factor=2)",
    "self_extend(group=3, window=2)+infoscale", "dca(chunk=4, local=2)+logn"]
TRAIN_TIME = [name for name, m in infoscale.REGISTRY.items() if m.train_time]


def _causal_only(method: str) -> bool:
    return any(c.method.causal_only for c in infoscale.parse_method(method).components)


def ids_for(batch: int = 1, n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (batch, n), generator=g)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


# --------------------------------------------------------------------------------------------
# The stock model and remove()
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_equals_stock_eager(family):
    stock = logits(model_for(family, "eager"), ids_for())
    m = hf.apply(model_for(family), "softmax")
    assert m.config._attn_implementation == "infoscale"
    torch.testing.assert_close(logits(m, ids_for()), stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rerope+infoscale", "streamingllm"])
def test_remove_restores_stock(family, method):
    m = model_for(family)
    impl = m.config._attn_implementation
    stock = logits(m, ids_for())
    rotaries = {n: mod for n, mod in m.named_modules() if type(mod).__name__.endswith("RotaryEmbedding")}
    hf.apply(m, method)
    changed = logits(m, ids_for())
    assert not torch.allclose(changed, stock, atol=1e-4)
    assert hf.remove(m) is m
    assert m.config._attn_implementation == impl and not hasattr(m.config, "infoscale")
    after = {n: mod for n, mod in m.named_modules() if type(mod).__name__.endswith("RotaryEmbedding")}
    assert after.keys() == rotaries.keys() and all(after[n] is rotaries[n] for n in after)
    assert not any(hasattr(mod, "_infoscale_rope") for mod in m.modules())
    assert torch.equal(logits(m, ids_for()), stock)


# --------------------------------------------------------------------------------------------
# Every layer against the core on its own un-rotated q, k, v
# --------------------------------------------------------------------------------------------


def _capture(model, family):
    """Hooks that record each attention layer's un-rotated q, k, v (B, heads, n, d) and its output before o_proj."""
    cfg = model.config
    H, d = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", H)
    rec, hooks = [], []

    def heads(x, h):
        return x.view(*x.shape[:2], h, d).transpose(1, 2)

    layers = model.model.layers if family != "modernbert" else model.model.layers
    for layer in layers:
        attn = getattr(layer, "self_attn", None) or layer.attn
        r = {}
        rec.append(r)

        def put(name, h, r=r):
            return lambda mod, inp, out: r.__setitem__(name, heads(out, h) if h else out)

        if family == "phi3":
            def split(mod, inp, out, r=r):
                q, k, v = out.split([H * d, Hkv * d, Hkv * d], dim=-1)
                r.update(q=heads(q, H), k=heads(k, Hkv), v=heads(v, Hkv))
            hooks.append(attn.qkv_proj.register_forward_hook(split))
        elif family == "modernbert":
            def split3(mod, inp, out, r=r):
                q, k, v = out.view(*out.shape[:2], 3, H, d).unbind(2)
                r.update(q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2))
            hooks.append(attn.Wqkv.register_forward_hook(split3))
        elif family == "gemma3":  # q, k after their RMS norms, before RoPE
            hooks.append(attn.q_norm.register_forward_hook(put("q", None)))
            hooks.append(attn.k_norm.register_forward_hook(put("k", None)))
            hooks.append(attn.v_proj.register_forward_hook(put("v", Hkv)))
        else:
            hooks.append(attn.q_proj.register_forward_hook(put("q", H)))
            hooks.append(attn.k_proj.register_forward_hook(put("k", Hkv)))
            hooks.append(attn.v_proj.register_forward_hook(put("v", Hkv)))
        out_proj = attn.Wo if family == "modernbert" else attn.o_proj
        hooks.append(out_proj.register_forward_hook(lambda mod, inp, out, r=r: r.__setitem__("out", inp[0])))
    return rec, hooks


def _reference_setup(model, family, i, n):
    """The core's arguments for layer i, from the config alone: RoPE, scale, causality, the model's own mask."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None)
    lt = types[i] if types else ("sliding_attention" if family == "mistral" else None)
    rp = cfg.rope_parameters
    rp = rp.get(lt, rp)
    dim = int(d * rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))
    rope = Rope(dim, base=rp["rope_theta"], layout="halves")
    if family == "smollm3" and not cfg.no_rope_layers[i]:
        rope = False
    scale = cfg.query_pre_attn_scalar ** -0.5 if family.startswith("gemma") else d ** -0.5
    causal = family != "modernbert"
    softcap = cfg.attn_logit_softcapping if family == "gemma2" else None
    a = torch.arange(n)
    mask = None
    if lt == "sliding_attention":
        w = cfg.sliding_window
        mask = ((a[:, None] - a[None, :]).abs() <= w) if not causal else (a[:, None] - a[None, :] < w)
        mask = mask[None, None]
    return dict(rope=rope, scale=scale, causal=causal, attn_mask=mask, softcap=softcap)


def _nope(method: str) -> str:
    """On a layer without RoPE, position components do not apply; LM-Infinite keeps its Λ-mask."""
    pm = infoscale.parse_method(method, L).resolved(L)
    keep = [f"streamingllm(sinks={c.params.sinks}, window={c.params.window})" if c.name == "lm_infinite" else str(c)
            for c in pm.components if c.name == "lm_infinite" or "positions" not in c.method.slots]
    return "+".join(keep) or "softmax"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_layers_equal_core(family, method):
    if family == "modernbert" and _causal_only(method):  # DCA on a bidirectional model
        with pytest.raises(MethodError, match="causal attention only"):
            hf.apply(model_for(family), method)
        return
    _layers_equal_core(family, method)


# transformers' own rope types through the config: one rope_parameters per model, so not on models with a rotary
# per layer type (Gemma 3, ModernBERT)
HF_ROPE_METHODS = ["hf_yarn", "hf_dynamic", "hf_linear(factor=3.0)+infoscale", "hf_yarn(factor=4.0)+logn"]
HF_ROPE_FAMILIES = [f for f in FAMILIES if f not in ("gemma3", "modernbert")]


@pytest.mark.parametrize("method", HF_ROPE_METHODS)
@pytest.mark.parametrize("family", HF_ROPE_FAMILIES)
def test_transformers_rope_types_equal_core(family, method):
    """The model's own rotary with rope_parameters {rope_type: yarn|dynamic|linear, factor} (transformers' code)
    gives, layer by layer, the core's formula of the same method on the un-rotated q, k."""
    if family == "phi3" and method.startswith("hf_yarn"):
        pytest.skip("on a partial rotary transformers' YaRN scales only the rotated dims by its attention factor "
                    "(it multiplies cos and sin); YaRN's formula scales the whole logit")
    m = hf.apply(model_for(family), method)
    assert m.config.rope_parameters["rope_type"] == method[3:].split("(")[0].split("+")[0]
    _layers_equal_core(family, method, m)


def test_every_training_free_method_is_checked_layer_by_layer():
    """Completeness guard: every registered method that needs no training runs in the layer == core checks of every
    family (METHODS, or HF_ROPE_METHODS for transformers' own rope types)."""
    used = {c.name for m in METHODS + HF_ROPE_METHODS for c in infoscale.parse_method(m, L).components}
    missing = {name for name, m in infoscale.REGISTRY.items() if not m.train_time and name != "softmax"} - used
    assert not missing, f"add these methods to METHODS in tests/test_hf.py: {sorted(missing)}"
    assert set(TRAINING_FREE) | set(TRAIN_TIME) | {c.name for m in HF_ROPE_METHODS
                                                   for c in infoscale.parse_method(m, L).components} == set(
        infoscale.REGISTRY)
    assert {"cosscale", "alibi", "pose"} <= set(TRAIN_TIME)  # refused by test_train_time_methods_refused


@pytest.mark.parametrize(("ours", "theirs"), [("yarn(factor=2.0)", "hf_yarn(factor=2.0)"),
                                               ("pi(factor=2.0)", "hf_linear(factor=2.0)")])
def test_our_yarn_and_pi_equal_transformers(ours, theirs):
    """infoscale's yarn and pi (our rotation of un-rotated keys) give transformers' YaRN and linear scaling at the
    same factor; the dynamic type equals a model a user configures with rope_type 'dynamic' itself."""
    torch.testing.assert_close(logits(hf.apply(model_for("llama"), ours), ids_for()),
                               logits(hf.apply(model_for("llama"), theirs), ids_for()), atol=2e-5, rtol=1e-4)


def test_hf_dynamic_equals_a_model_configured_by_hand():
    base = model_for("llama")
    cfg = copy.deepcopy(base.config)
    cfg.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": cfg.rope_parameters["rope_theta"]}
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(base.state_dict())
    hf._set_attn_implementation(ref, "sdpa")
    torch.testing.assert_close(logits(hf.apply(base, "hf_dynamic(factor=2.0)"), ids_for()), logits(ref, ids_for()))


@pytest.mark.parametrize("method", ["hf_yarn", "hf_dynamic+infoscale"])
def test_transformers_rope_types_remove_and_refusals(method):
    m = model_for("llama")
    stock = logits(m, ids_for())
    hf.apply(m, method)
    assert not torch.allclose(logits(m, ids_for()), stock)
    hf.remove(m)
    torch.testing.assert_close(logits(m, ids_for()), stock, atol=0, rtol=0)
    assert m.config.rope_parameters.get("rope_type", "default") == "default" and m.config.max_position_embeddings == L
    with pytest.raises(ConfigError, match="per-layer-type rotaries"):
        hf.apply(model_for("gemma3"), method)


def _layers_equal_core(family, method, m=None):
    m = m if m is not None else hf.apply(model_for(family), method)
    rec, hooks = _capture(m, family)
    try:
        logits(m, ids_for())
    finally:
        for h in hooks:
            h.remove()
    H = m.config.num_attention_heads
    for i, r in enumerate(rec):
        q, k, v = r["q"], r["k"], r["v"]
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
        setup = _reference_setup(m, family, i, N)
        meth = method if setup["rope"] is not False else _nope(method)
        want = infoscale.attention(q, k, v, meth, train_len=L, impl="reference", **setup)
        got = r["out"].view(1, N, H, -1).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda s, i=i: f"layer {i}: {s}")


@pytest.mark.parametrize("method", ["window(width=5)+infoscale", "streamingllm(sinks=3, window=7)+logn",
                                    "lm_infinite(sinks=2, window=6, cap=4)"])
@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_long_band_equals_core(family, method):
    """Windows over several query chunks (300 tokens): the band path against the core's full computation."""
    n = 300
    m = hf.apply(model_for(family), method)
    rec, hooks = _capture(m, family)
    try:
        logits(m, ids_for(n=n))
    finally:
        for h in hooks:
            h.remove()
    H = m.config.num_attention_heads
    for i, r in enumerate(rec):
        k, v = r["k"].repeat_interleave(H // r["k"].shape[1], 1), r["v"].repeat_interleave(H // r["v"].shape[1], 1)
        want = infoscale.attention(r["q"], k, v, method, train_len=L, impl="reference",
                                   **_reference_setup(m, family, i, n))
        got = r["out"].view(1, n, H, -1).transpose(1, 2)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=lambda s, i=i: f"layer {i}: {s}")


# --------------------------------------------------------------------------------------------
# Padding, decoding
# --------------------------------------------------------------------------------------------

PAD_METHODS = ["softmax", "infoscale", "yarn", "leaky_rerope+logn", "streamingllm(sinks=2, window=5)",
               "lm_infinite+infoscale", "self_extend+logn", "dca(chunk=5, local=3)"]


@pytest.mark.parametrize("method", PAD_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_rows(family, method):
    if family == "modernbert" and _causal_only(method):
        pytest.skip("causal only")
    m = hf.apply(model_for(family), method)
    a, b = ids_for(1, N, seed=2), ids_for(1, N - 7, seed=3)
    batch = torch.zeros(2, N, dtype=torch.long)
    mask = torch.zeros(2, N, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    if family == "modernbert":  # encoders pad on the right
        batch[1, : N - 7], mask[1, : N - 7] = b[0], 1
        real = slice(0, N - 7)
    else:
        batch[1, 7:], mask[1, 7:] = b[0], 1
        real = slice(7, N)
    out = logits(m, batch, attention_mask=mask)
    torch.testing.assert_close(out[0], logits(m, a)[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, real], logits(m, b)[0], atol=2e-5, rtol=1e-4)


def _fixed(method: str, n: int) -> str:
    """The method with the factor a cached decode fixes at a prompt of n tokens (s = n / L; Leaky ReRoPE's k;
    SelfExtend's group)."""
    pm = infoscale.parse_method(method, L).resolved(L)
    parts = []
    for c in pm.components:
        p = c.params
        if c.name in ("pi", "ntk", "yarn") and p.factor is None:
            extra = ", beta_fast=32.0, beta_slow=1.0" if c.name == "yarn" else ""
            parts.append(f"{c.name}(factor={max(1.0, n / L)}{extra})")
        elif c.name == "leaky_rerope" and p.k is None:
            parts.append(f"leaky_rerope(window={p.window}, k={max(1.0, (n - 1 - p.window) / (L - 1 - p.window))})")
        elif c.name == "self_extend" and p.group is None:
            parts.append(f"self_extend(group={self_extend_group(n, L, p.window)}, window={p.window})")
        else:
            parts.append(str(c))
    return "+".join(parts) or "softmax"


DECODE_METHODS = ["softmax", "infoscale", "pi", "ntk", "yarn+logn", "rerope", "leaky_rerope", "window",
                  "streamingllm(sinks=2, window=5)+infoscale", "lm_infinite", "self_extend", "dca+infoscale"]


# generate() on every family is the slowest matrix here and in test_hf_cache: make test-fast keeps Llama and Qwen2 (a
# sliding-window layer), make test runs every family
DECODE_FAMILIES = [f if f in ("llama", "qwen2") else pytest.param(f, marks=pytest.mark.e2e) for f in CAUSAL]


@pytest.mark.parametrize("cache", ["dynamic", "static", "static-unpadded"])
@pytest.mark.parametrize("method", DECODE_METHODS)
@pytest.mark.parametrize("family", DECODE_FAMILIES)
def test_cached_decoding_equals_full_forward(family, method, cache, monkeypatch):
    """Greedy generate's logits at every step equal a full forward over the same tokens (with the dynamic
    factors the prompt fixed). Left padding; unpadded, transformers skips the prefill mask. The methods that move
    positions decode with a RotatedKeysCache (dynamic) whose stores every region uses (a tiny model's regions score
    fewer keys than the store's threshold)."""
    from infoscale.attn import sdpa

    monkeypatch.setattr(sdpa, "STORE_FROM", 0)
    prompt, new = 18, 4
    m = hf.apply(model_for(family), method)
    ids = ids_for(2, prompt, seed=4)
    mask = torch.ones_like(ids)
    pad = 0 if cache.endswith("unpadded") else 3
    mask[1, :pad] = 0  # left padding: row 1 has 15 real tokens
    kw = {}
    if cache.startswith("static"):
        kw[hf.cache_kwarg(m)] = StaticCache(config=m.config, max_cache_len=prompt + new)
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    seqs = out.sequences
    for row, n_real in ((0, prompt), (1, prompt - pad)):
        full = hf.apply(model_for(family), _fixed(method, n_real))
        real = seqs[row : row + 1, pad if row else 0 :]
        want = logits(full, real)[0, n_real - 1 : n_real - 1 + new]
        got = torch.stack([step[row] for step in out.logits])
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("keyword", hf.CACHE_KWARGS)
@pytest.mark.parametrize("method", ["pi", "leaky_rerope"])
def test_hand_written_decode_loop_keeps_the_prompt_factor(method, keyword):
    """A decode loop written by hand, the cache passed under either keyword (``cache`` from transformers 5.24,
    ``past_key_values`` before and still accepted, deprecated), keeps the prompt's dynamic factor: each step
    equals a full forward with the factor fixed at the prompt's n."""
    m = hf.apply(model_for("llama"), method)
    if keyword == "cache" and hf.cache_kwarg(m) != "cache":
        pytest.skip("this transformers takes the cache as past_key_values only")
    prompt, new = 12, 5
    ids = ids_for(1, prompt + new, seed=7)
    with torch.no_grad():
        out = m(ids[:, :prompt], use_cache=True)
        cache = out["cache" if "cache" in out else "past_key_values"]
        steps = []
        for i in range(prompt, prompt + new):
            out = m(ids[:, i : i + 1], **{keyword: cache}, use_cache=True)
            steps.append(out.logits[0, -1])
    want = logits(hf.apply(model_for("llama"), _fixed(method, prompt)), ids)[0, prompt : prompt + new]
    torch.testing.assert_close(torch.stack(steps), want, atol=5e-5, rtol=1e-4)


def test_cache_kwarg_is_what_forward_takes():
    import inspect

    m = model_for("llama")
    assert hf.cache_kwarg(m) in inspect.signature(m.forward).parameters


def test_dynamic_factor_follows_length_without_cache():
    """Without a cache, dynamic PI is PI at s = n / L, per row."""
    m = hf.apply(model_for("llama"), "pi")
    ref = hf.apply(model_for("llama"), f"pi(factor={N / L})")
    torch.testing.assert_close(logits(m, ids_for()), logits(ref, ids_for()), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Options, persistence, refusals
# --------------------------------------------------------------------------------------------


def test_options_on_config_and_train_len_default():
    m = hf.apply(model_for("llama"), "rerope+infoscale")
    assert m.config.infoscale == {"method": "rerope(window=4)+infoscale(clamp=True)", "train_len": L}
    cfg = LlamaConfig(**{**SMALL, "max_position_embeddings": 64},
                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 16})
    assert hf.train_len_of(cfg) == 16
    assert hf.train_len_of(LlamaConfig(**SMALL)) == L
    m2 = hf.apply(model_for("llama"), "infoscale", train_len=5)
    assert m2.config.infoscale["train_len"] == 5


def test_save_load_reapply(tmp_path):
    m = hf.apply(model_for("gemma3"), "yarn+infoscale")
    want = logits(m, ids_for())
    m.save_pretrained(tmp_path)
    loaded = Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.infoscale["method"] == m.config.infoscale["method"]
    hf.apply(loaded)  # the method saved in the config
    torch.testing.assert_close(logits(loaded, ids_for()), want, atol=1e-6, rtol=1e-6)
    hf.apply(loaded, "infoscale")  # re-applying replaces
    assert loaded.config.infoscale["method"].startswith("infoscale")


def test_output_attentions_are_the_core_weights():
    m = hf.apply(model_for("llama"), "rerope+infoscale")
    with torch.no_grad():
        att = m(ids_for(), output_attentions=True).attentions
    assert len(att) == 2 and att[0].shape == (1, 4, N, N)
    torch.testing.assert_close(att[0].sum(-1), torch.ones(1, 4, N))
    assert torch.all(att[0].triu(1) == 0)


@pytest.mark.parametrize("method", TRAIN_TIME + ["cosscale+infoscale"])
def test_train_time_methods_refused(method):
    m = model_for("llama")
    with pytest.raises(MethodError, match="train-time"):
        hf.apply(m, method)
    assert m.config._attn_implementation == "sdpa" and not hasattr(m.config, "infoscale")


def test_trained_with_cosscale_is_accepted():
    m = model_for("llama")
    m.config.infoscale = {"train_method": "cosscale(s=20)"}
    hf.apply(m, "rerope")  # inherits CosScale
    assert m.config.infoscale["method"].startswith("cosscale(s=20.0)+rerope")
    rec, hooks = _capture(m, "llama")
    logits(m, ids_for())
    for h in hooks:
        h.remove()
    r = rec[0]
    k, v = r["k"].repeat_interleave(2, 1), r["v"].repeat_interleave(2, 1)
    want = infoscale.attention(r["q"], k, v, "cosscale(s=20)+rerope", train_len=L, causal=True,
                               rope=Rope(8, layout="halves"), scale=8 ** -0.5)
    torch.testing.assert_close(r["out"].view(1, N, 4, 8).transpose(1, 2), want, atol=2e-5, rtol=1e-4)
    hf.remove(m)
    assert m.config.infoscale == {"train_method": "cosscale(s=20)"}


def test_bad_methods_refused():
    with pytest.raises(MethodError, match="do not compose"):
        hf.apply(model_for("llama"), "rerope+yarn")
    with pytest.raises(MethodError, match="unknown method"):
        hf.apply(model_for("llama"), "nope")


def test_models_without_rope_or_supported_rope_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=16)).eval()
    with pytest.raises(ConfigError, match="no rotary module"):
        hf.apply(gpt2, "rerope")
    assert gpt2.config._attn_implementation != "infoscale"
    hf.apply(gpt2, "infoscale")  # a temperature needs no RoPE
    assert torch.isfinite(logits(gpt2, ids_for(n=12))).all()
    dyn = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                 "factor": 2.0}))
    with pytest.raises(ConfigError, match="dynamic"):
        hf.apply(dyn, "rerope")
    remote = model_for("llama")
    remote.config.auto_map = {"AutoModelForCausalLM": "x.Y"}
    with pytest.raises(ConfigError, match="remote code"):
        hf.apply(remote, "infoscale")


def test_yarn_refused_on_non_geometric_frequencies():
    m = LlamaForCausalLM(LlamaConfig(**{**SMALL, "max_position_embeddings": 32},
                                     rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8}))
    hf.apply(m, "rerope")  # the model's own llama3 frequencies are kept
    own = m.model.rotary_emb.original.inv_freq
    assert m.model.layers[0].self_attn._infoscale_rope.inv_freq == tuple(own.double().tolist())
    hf.apply(m, "ntk")  # θ_i · s^(-2i/(d-2)) is defined on any frequencies
    with pytest.raises(MethodError, match="plain RoPE"):
        hf.apply(m, "yarn")
    assert m.config._attn_implementation == "sdpa" and type(m.model.rotary_emb).__name__ == "LlamaRotaryEmbedding"


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_switching_away_from_infoscale_gives_the_stock_model(family):
    """After apply(rerope), the rotary stand-in must not keep RoPE off when the user switches to sdpa."""
    m = model_for(family)
    stock = logits(m, ids_for())
    hf.apply(m, "rerope")
    assert not torch.allclose(logits(m, ids_for()), stock, atol=1e-3)
    hf._set_attn_implementation(m, "sdpa")
    with pytest.warns(UserWarning, match="not 'infoscale'.*RoPE runs as in the stock model"):
        switched = logits(m, ids_for())
    torch.testing.assert_close(switched, stock, atol=1e-5, rtol=1e-5)
    hf._set_attn_implementation(m, "infoscale")  # back: the method again
    assert not torch.allclose(logits(m, ids_for()), stock, atol=1e-3)


def test_generate_beyond_the_training_length_does_not_warn_while_applied():
    """transformers' 'exceeded the model's predefined maximum length' reminder is what a length method is for:
    dropped during generate() of a model with a method applied; the same message from anything else (another
    model, a direct call) and other messages of that logger pass; after remove, generate is the class's again."""
    import logging

    from transformers.generation.stopping_criteria import MaxLengthCriteria

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("transformers.generation.stopping_criteria")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.WARNING)  # whatever verbosity other tests left on transformers' logger
    ids = ids_for(n=30)
    try:
        m = hf.apply(model_for("llama"), "rerope+infoscale")
        out = m.generate(ids_for(n=12), max_new_tokens=2, do_sample=False)
        assert out.shape[1] == 14 and not any("maximum length" in s for s in seen), seen
        log.warning("another message")
        MaxLengthCriteria(max_length=100, max_position_embeddings=29)(ids, None)  # outside generate: not dropped
        assert seen[0] == "another message" and "predefined maximum length (29)" in seen[1], seen
        hf.remove(m)
        assert "generate" not in vars(m)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
