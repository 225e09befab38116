"""The registry: parsing, validation, formulas, golden values and the entropy property."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import infoscale
from infoscale.attn import rope
from infoscale.attn.methods import REGISTRY, MethodError, merge_with_training, parse_method
from infoscale.cli import main as cli_main

# ---------------------------------------------------------------------------------------------
# golden values (computed by hand from the printed formulas)
# ---------------------------------------------------------------------------------------------


def test_infoscale_golden_values():
    assert infoscale.infoscale_factor(4096, 64, 128) == pytest.approx(1.3918, abs=1e-4)
    assert infoscale.infoscale_factor(512, 64, 128) == pytest.approx(1.2150, abs=1e-4)
    assert infoscale.infoscale_factor(64, 64, 128) == 1.0
    assert infoscale.infoscale_factor(16, 64, 128) == 1.0  # clamped inside the training length
    raw = math.sqrt(1 - 16 ** (-2 / 128)) / math.sqrt(1 - 64 ** (-2 / 128))
    assert infoscale.infoscale_factor(16, 64, 128, clamp=False) == pytest.approx(raw)
    assert raw < 1


def test_infoscale_tensor_matches_scalar():
    n = torch.tensor([1, 10, 64, 100, 4096])
    t = infoscale.infoscale_factor(n, 64, 128)
    assert [round(float(x), 10) for x in t] == [round(infoscale.infoscale_factor(int(v), 64, 128), 10) for v in n]


@given(st.integers(1, 10**6), st.integers(1, 10**6), st.sampled_from([16, 64, 128]), st.integers(2, 4096))
def test_infoscale_monotone_bounded(a, b, d, L):
    lo, hi = sorted((a, b))
    f_lo, f_hi = infoscale.infoscale_factor(lo, L, d), infoscale.infoscale_factor(hi, L, d)
    assert 1.0 <= f_lo <= f_hi + 1e-12
    assert f_hi <= 1 / math.sqrt(1 - L ** (-2 / d)) + 1e-9  # bounded as l → ∞
    assert infoscale.logn_factor(hi, L) >= infoscale.logn_factor(lo, L) >= 1.0


def test_infoscale_below_logn_and_near_sqrt_log():
    for n in (128, 512, 4096):
        f = infoscale.infoscale_factor(n, 64, 128)
        assert 1 < f < infoscale.logn_factor(n, 64)
        assert f == pytest.approx(math.sqrt(math.log(n) / math.log(64)), rel=0.02)


def test_softmax_plus_and_logn():
    assert infoscale.softmax_plus_factor(512) == pytest.approx(1.0)
    assert infoscale.softmax_plus_factor(64) == pytest.approx(2 / 3)
    assert infoscale.logn_factor(4096, 64) == pytest.approx(2.0)
    assert infoscale.logn_factor(8, 64) == 1.0
    assert infoscale.logn_factor(8, 64, clamp=False) == pytest.approx(0.5)


@pytest.mark.parametrize("s", [1.5, 2, 4, 16, 64])
def test_yarn_attention_factor(s):
    assert infoscale.yarn_attention_factor(s) == pytest.approx(0.1 * math.log(s) + 1)
    assert infoscale.yarn_attention_factor(0.5) == 1.0


def test_yarn_logits_scale_by_mscale_squared_once():
    """At Δ = 0 the rotation is the identity, so a query on itself scores q·q/√d × (0.1 ln s + 1)²."""
    n, L = 64, 4
    q = torch.randn(1, 1, n, 16)
    plain = infoscale.attention_logits(q, q, "softmax", train_len=L).diagonal(dim1=-2, dim2=-1)
    yarn = infoscale.attention_logits(q, q, "yarn", train_len=L).diagonal(dim1=-2, dim2=-1)
    assert torch.allclose(yarn / plain, torch.full_like(plain, (0.1 * math.log(16) + 1) ** 2), rtol=1e-5)
    assert (0.1 * math.log(16) + 1) ** 2 == pytest.approx(1.6314, abs=1e-4)


def test_yarn_frequency_snapshot():
    """transformers' YaRN snapshot (d = 128, base 1e4, L = 2048, s = 10): pairs 16 / 17 / 41."""
    f = rope.yarn_inv_freq(128, 10.0, 2048)
    assert float(f[16]) == pytest.approx(1.0e-1, rel=1e-3)
    assert float(f[17]) == pytest.approx(8.3479e-2, rel=1e-4)
    assert float(f[41]) == pytest.approx(2.7384e-4, rel=1e-4)
    base = rope.rope_inv_freq(128)
    assert torch.all(f <= base + 1e-15) and torch.all(f >= base / 10 - 1e-15)


def test_ntk_lowest_frequency_interpolates_highest_extrapolates():
    base = rope.rope_inv_freq(128)
    f = rope.ntk_inv_freq(base, 8.0)
    assert float(f[0]) == pytest.approx(float(base[0]))
    assert float(f[-1]) == pytest.approx(float(base[-1]) / 8, rel=1e-9)
    # the per-frequency form equals NTK's base change base' = base · s^(d/(d−2))
    assert torch.allclose(f, rope.rope_inv_freq(128, 10000.0 * 8.0 ** (128 / 126)), rtol=1e-12)


def test_alibi_slopes():
    assert infoscale.alibi_slopes(1) == [2 ** -8]
    assert infoscale.alibi_slopes(8) == [2 ** -i for i in range(1, 9)]
    s12 = infoscale.alibi_slopes(12)
    assert s12[:8] == [2 ** -i for i in range(1, 9)]
    assert s12[8:] == pytest.approx([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5])


# ---------------------------------------------------------------------------------------------
# entropy: InfoScale keeps H / ln n; plain softmax dilutes
# ---------------------------------------------------------------------------------------------


def _normalised_entropy(method, n, d=128, heads=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, d, generator=g)
    k = torch.randn(1, heads, n, d, generator=g)
    # RoPE rotations keep q, k isotropic; use ALiBi-free softmax attention without positions by
    # comparing at the logits level: the entropy of each row of the weights
    _, w = infoscale.attention(q, k, q[..., :1], method, train_len=64, return_weights=True)
    h = -(w * w.clamp(min=1e-30).log()).sum(-1)
    return float((h / math.log(n)).mean())


def test_infoscale_keeps_normalised_entropy():
    h64 = _normalised_entropy("softmax", 64)
    soft = _normalised_entropy("softmax", 4096)
    info = _normalised_entropy("infoscale", 4096)
    assert abs(info - h64) / h64 < 0.02
    assert abs(soft - h64) / h64 > 0.03  # dilution: plain softmax flattens toward uniform
    assert soft > h64


# ---------------------------------------------------------------------------------------------
# parsing and validation
# ---------------------------------------------------------------------------------------------


def test_parse_and_resolve():
    pm = parse_method("rerope(window=32)+infoscale", 64)
    assert [c.name for c in pm.components] == ["rerope", "infoscale"]
    assert pm.get("rerope").window == 32
    r = parse_method("rerope+window+pose", 64).resolved(64)
    assert r.get("rerope").window == 32 and r.get("window").width == 32 and r.get("pose").target == 4096
    lm = parse_method("lm_infinite", 64).resolved(64)
    assert (lm.get("lm_infinite").window, lm.get("lm_infinite").cap, lm.get("lm_infinite").sinks) == (63, 64, 10)
    # SelfExtend: W = L/4 (LongLM's 1024 at 4096), G per length; DCA: ChunkLlama's chunk_size 3L/4 and local_window
    # L/8 at L = 4096 are a chunk of 3072 − 512 = 2560 and the first 513 queries of a chunk at their distances
    se = parse_method("self_extend", 4096).resolved(4096).get("self_extend")
    assert (se.group, se.window) == (None, 1024)
    dca = parse_method("dca", 4096).resolved(4096).get("dca")
    assert (dca.chunk, dca.local) == (2560, 513) and dca.chunk + dca.local - 1 == 3072
    assert str(parse_method("softmax")) == "softmax"
    assert str(parse_method("softmax+infoscale")) == "infoscale(clamp=True)"


@settings(max_examples=60)
@given(st.sampled_from(sorted(REGISTRY)), st.data())
def test_roundtrip_string(name, data):
    """str(parse(x)) parses back to the same method, for random valid parameter values."""
    cls = REGISTRY[name].params
    kw = {}
    for f in dataclasses.fields(cls):
        typ = str(f.type)
        if "bool" in typ:
            kw[f.name] = data.draw(st.booleans())
        elif "int" in typ:
            kw[f.name] = data.draw(st.integers(2, 5000))
        else:
            kw[f.name] = data.draw(st.floats(1.0, 1000.0, allow_nan=False))
    if name == "yarn":
        kw["beta_fast"] = kw["beta_slow"] + 1.0
    if name == "infoscale" and kw["calibrated"]:  # a fixed dim or L and a calibrated dim are refused together
        kw["dim"] = kw["train_len"] = None
    if name == "pose":  # a target below L or more chunks than tokens are refused (tested below)
        kw["target"], kw["chunks"] = data.draw(st.integers(64, 5000)), data.draw(st.integers(1, 64))
    text = name + ("(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")" if kw else "")
    pm = parse_method(text, 64)
    assert parse_method(str(pm), 64) == pm


ERRORS = [
    ("nosuch", "unknown method 'nosuch'"),
    ("rerope(width=3)", "rerope: unknown parameter 'width'; its parameters: window"),
    ("rerope(window=2.5)", "rerope: parameter window must be int or None, got 2.5"),
    ("infoscale(clamp=1)", "infoscale: parameter clamp must be bool, got 1"),
    ("cosscale(s='big')", "cosscale: parameter s must be float, got 'big'"),
    ("cosscale(s=-1)", "cosscale: s must be a positive finite number"),
    ("rerope(3)", "rerope: parameters must be given as key=value"),
    ("rerope(window=x)", "rerope: parameter window must be a literal"),
    ("pi+yarn", "pi and yarn both set the attention positions and do not compose"),
    ("rerope+alibi", "rerope and alibi both set the attention positions"),
    ("infoscale+logn", "infoscale and logn are both length temperatures"),
    ("window+streamingllm", "window and streamingllm both set the attention mask"),
    ("lm_infinite+rerope", "lm_infinite and rerope both set the attention positions"),
    ("yarn(beta_fast=1, beta_slow=2)", "yarn: beta_fast (1.0) must exceed beta_slow (2.0)"),
    ("leaky_rerope(k=0.5)", "leaky_rerope: k must be >= 1"),
    ("infoscale(train_len=1)", "train_len must be an integer >= 2"),
    ("logn(train_len=1)", "train_len must be an integer >= 2 (log 1 = 0)"),
    ("infoscale(train_len=512, calibrated=True)", "give train_len or calibrated=True, not both"),
    ("streamingllm(sinks=-1)", "streamingllm: sinks must be >= 0"),
    ("", "a method must be a non-empty string"),
    ("infoscale+", "cannot parse method term ''"),
]


ERRORS += [
    ("softmax_plus(base=1)", "softmax_plus: base must be an integer >= 2"),
    ("pose(chunks=100)", "pose: chunks (100) cannot exceed the training length (64)"),
    ("pi(factor=1e-320)", "pi: parameter factor = 1e-320 is out of range"),
    ("cosscale(s=1e999)", "cosscale: parameter s = inf is out of range"),
    ("rerope(window=" + "9" * 1500 + ")", "rerope: parameter window = 9999"),
    ("rerope(window=" + "9" * 5000 + ")", "too long"),
    ("rerope(window=" + "-" * 1900 + "1)", "rerope: parameter window must be a literal"),
    ("rerope(window=3, window=4)", "rerope: parameter window is given twice"),
    ("self_extend(window=64)", "self_extend: window (64) must be below the training length (64)"),
    ("self_extend(group=0)", "self_extend: group must be a positive finite number"),
    ("self_extend(group=2.5)", "self_extend: parameter group must be int or None"),
    ("dca(chunk=0)", "dca: chunk must be a positive finite number"),
    ("self_extend+dca", "self_extend and dca both set the attention positions"),
    ("dca+rerope", "dca and rerope both set the attention positions"),
]


@pytest.mark.parametrize("spec,message", ERRORS)
def test_error_messages(spec, message):
    with pytest.raises(MethodError) as e:
        parse_method(spec, 64)
    assert message in str(e.value)


def test_values_are_checked_without_a_training_length():
    """A bad value is refused at parse time, not only once the training length is known."""
    for spec in ("cosscale(s=-1)", "rerope(window=-3)", "yarn(factor=0)", "pi(factor=-1)", "softmax_plus(base=1)"):
        with pytest.raises(MethodError):
            parse_method(spec)


def test_attention_input_errors():
    q = torch.randn(1, 1, 8, 6)
    with pytest.raises(ValueError, match="must be 4-D"):
        infoscale.attention(q[0], q[0], q[0], train_len=8)
    with pytest.raises(ValueError, match="v must be"):
        infoscale.attention(q, q, torch.randn(1, 1, 7, 6), train_len=8)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        infoscale.attention(q, q, q, train_len=8, key_padding_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="even"):
        infoscale.attention(torch.randn(1, 1, 8, 5), torch.randn(1, 1, 8, 5), q, train_len=8)
    with pytest.raises(MethodError, match="train_len must be a positive integer"):
        infoscale.attention(q, q, q, train_len=0)


def test_merge_with_training():
    assert str(merge_with_training("cosscale(s=32)", "infoscale")) == "cosscale(s=32.0)+infoscale(clamp=True)"
    assert str(merge_with_training("pose", "yarn")) == "yarn(factor=None, beta_fast=32.0, beta_slow=1.0)"
    assert str(merge_with_training("alibi", "softmax")) == "alibi(max_bias=8.0)"
    with pytest.raises(MethodError, match="train-time method"):
        merge_with_training("softmax", "cosscale")
    with pytest.raises(MethodError, match="trained with cosscale"):
        merge_with_training("cosscale(s=32)", "cosscale(s=128)")
    with pytest.raises(MethodError, match="trained with alibi"):
        merge_with_training("alibi", "yarn")
    # a length temperature used in training is inherited, and a second one is refused
    assert str(merge_with_training("softmax_plus", "rerope", 64)) == "softmax_plus(base=512)+rerope(window=None)"
    with pytest.raises(MethodError, match="trained with softmax_plus"):
        merge_with_training("softmax_plus", "infoscale")


def test_cli_methods_lists_everything(capsys):
    assert cli_main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, m in REGISTRY.items():
        assert f"{name}  [" in out
        assert m.source in out
        for f in dataclasses.fields(m.params):
            assert f"- {f.name}: " in out


def test_self_extend_default_group():
    """The default G is the smallest that keeps every grouped position below L. LongLM's README example: a 15,800-token
    input, Llama-2 (4096) and W = 1024 take G = 5, since 5·(4096 − 1024) + 1024 >= 15,800, and then use positions up
    to 3,979; inside the training length G = 1 (plain RoPE)."""
    from infoscale.attn.methods import _smallest_group

    assert _smallest_group(15800, 4096, 1024) == 5
    assert (15800 - 1) // 5 + 1024 - 1024 // 5 == 3979
    assert all(_smallest_group(n, 64, 16) == 1 for n in range(1, 65))
    for n, L, w in ((65, 64, 16), (1000, 64, 16), (300, 64, 63), (4096, 64, 5)):
        g = _smallest_group(n, L, w)
        assert (n - 1) // g + w - w // g <= L - 1
        assert g == 1 or (n - 1) // (g - 1) + w - w // (g - 1) > L - 1
