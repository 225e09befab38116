"""Every method against the independent naive implementation, and the paths against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import infoscale
from infoscale.attn.methods import REGISTRY
from infoscale.attn.rope import Rope

from .naive import naive_attention, self_extend_group

L = 8  # training length for these tests: n ∈ {L, 2L, 16L}
D = 8
H = 2


def _slopes(h):  # ALiBi, max_bias 8: 2^(-8·1/2), 2^(-8·2/2)
    return [2 ** (-8 * (i + 1) / h) for i in range(h)]


# method string -> the naive settings, with every default written out from its documented value
CASES = {
    "softmax": {},
    "infoscale": {"temp": "infoscale"},
    "logn": {"temp": "logn"},
    "softmax_plus": {"temp": "softmax_plus"},
    "llama4": {"temp": "llama4"},
    "llama4(beta=0.5, floor=4)+rerope(window=3)": {"temp": "llama4", "beta": 0.5, "floor": 4, "pos": "rerope", "w": 3},
    "cosscale": {"cos_s": 128.0},
    "pi": {"pos": "pi"},
    "ntk": {"pos": "ntk"},
    "yarn": {"pos": "yarn"},
    "rerope": {"pos": "rerope", "w": L // 2},
    "leaky_rerope": {"pos": "leaky", "w": L // 2, "k": None},
    "alibi": {"pos": "alibi", "slopes": _slopes(H)},
    "pose": {},
    "window": {"mask": "window", "w": L // 2},
    "streamingllm": {"mask": "sinks", "sinks": 4, "w": L // 2, "kept": True},
    "lm_infinite": {"mask": "sinks", "sinks": 10, "w": L - 1, "pos": "lminf", "cap": L},
    "hf_linear": {"pos": "pi", "factor": 2.0},
    "hf_dynamic": {"pos": "hf_dynamic", "factor": 2.0},
    "hf_yarn": {"pos": "yarn", "factor": 2.0},
    "self_extend": {"pos": "self_extend", "w": L // 4, "group": None},
    "dca": {"pos": "dca", "chunk": 3 * L // 4 - L // 8, "local": L // 8 + 1},
    # non-default parameters and combinations
    "infoscale(clamp=False)": {"temp": "infoscale_noclamp"},
    "cosscale(s=16)+infoscale": {"cos_s": 16.0, "temp": "infoscale"},
    "pi(factor=3.0)": {"pos": "pi", "factor": 3.0},
    "yarn(factor=4.0)+infoscale": {"pos": "yarn", "factor": 4.0, "temp": "infoscale"},
    "rerope(window=3)+logn": {"pos": "rerope", "w": 3, "temp": "logn"},
    "leaky_rerope(window=2, k=3.0)": {"pos": "leaky", "w": 2, "k": 3.0},
    "alibi(max_bias=2.0)+window(width=3)": {"pos": "alibi", "slopes": [2 ** -1, 2 ** -2], "mask": "window",
                                           "w": 3},
    "alibi(max_bias=2.0, right_bias=1.0)": {"pos": "alibi", "slopes": [2 ** -1, 2 ** -2],
                                            "right_slopes": [2 ** -0.5, 2 ** -1]},
    "alibi(max_bias=1.0, right_bias=-2.0)": {"pos": "alibi", "slopes": [2 ** -0.5, 2 ** -1],
                                             "right_slopes": [2.0, 4.0]},
    "alibi(right_bias=0.0)+infoscale(clamp=False)": {"pos": "alibi", "slopes": _slopes(H), "right_slopes": [1.0, 1.0],
                                                    "temp": "infoscale_noclamp"},
    "infoscale(dim=3.5)+rerope(window=3)": {"temp": "infoscale", "dim": 3.5, "pos": "rerope", "w": 3},
    # L in the temperature other than the model's (a model pretrained at 4L, fine-tuned at L)
    "infoscale(train_len=32)+rerope(window=3)": {"temp": "infoscale", "temp_len": 32, "pos": "rerope", "w": 3},
    "logn(train_len=32)": {"temp": "logn", "temp_len": 32},
    "infoscale(dim=3.5, train_len=32)": {"temp": "infoscale", "dim": 3.5, "temp_len": 32},
    "infoscale(clamp=False, train_len=32)": {"temp": "infoscale_noclamp", "temp_len": 32},
    "streamingllm(sinks=2, window=3)+infoscale": {"mask": "sinks", "sinks": 2, "w": 3, "temp": "infoscale",
                                                  "kept": True},
    "streamingllm(sinks=2, window=3, true_positions=True)": {"mask": "sinks", "sinks": 2, "w": 3},
    "ntk(factor=2.0)+streamingllm(sinks=3, window=2)": {"pos": "ntk", "factor": 2.0, "mask": "sinks", "sinks": 3,
                                                       "w": 2, "kept": True},
    "alibi(max_bias=2.0)+streamingllm(sinks=2, window=3)": {"pos": "alibi", "slopes": [2 ** -1, 2 ** -2],
                                                           "mask": "sinks", "sinks": 2, "w": 3, "kept": True},
    "lm_infinite(sinks=3, window=5, cap=6)": {"mask": "sinks", "sinks": 3, "w": 5, "pos": "lminf", "cap": 6},
    "self_extend(group=3, window=2)+infoscale": {"pos": "self_extend", "w": 2, "group": 3, "temp": "infoscale"},
    "self_extend(window=5)+infoscale": {"pos": "self_extend", "w": 5, "group": None, "temp": "infoscale"},
    "dca(chunk=3, local=2)+logn": {"pos": "dca", "chunk": 3, "local": 2, "temp": "logn"},
    "dca(chunk=4, local=6)+window(width=9)": {"pos": "dca", "chunk": 4, "local": 6, "mask": "window", "w": 9},
}

# positions that depend on where the sequence starts (groups, chunks), not only on p_j − p_i
ABSOLUTE = {m for m, c in CASES.items() if c.get("pos") in ("self_extend", "dca")}


def _causal_only(method) -> bool:
    return any(c.method.causal_only for c in infoscale.parse_method(method).components)


def test_every_registered_method_has_a_naive_case():
    assert set(REGISTRY) <= set(CASES), "register a naive case for each new method"


def _inputs(n, seed=0, b=2, dv=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, n, D, generator=g)
    k = torch.randn(b, H, n, D, generator=g)
    v = torch.randn(b, H, n, dv, generator=g)
    return q, k, v


def _pad(n):
    m = torch.ones(2, n, dtype=torch.bool)
    m[1, n - max(1, n // 3):] = False  # second sequence right-padded by a third
    return m


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("n", [L, 2 * L, 16 * L])
@pytest.mark.parametrize("method", list(CASES))
def test_matches_naive(method, n, causal, padded):
    q, k, v = _inputs(n, seed=n)
    pad = _pad(n) if padded else None
    if not causal and _causal_only(method):  # DCA: keys are assumed to precede their query
        with pytest.raises(infoscale.MethodError, match="causal attention only"):
            infoscale.attention(q, k, v, method, train_len=L, causal=causal, key_padding_mask=pad)
        return
    want, want_w = naive_attention(q.numpy(), k.numpy(), v.numpy(), CASES[method], L, causal=causal,
                                   pad=None if pad is None else pad.numpy())
    got, got_w = infoscale.attention(q, k, v, method, train_len=L, causal=causal, key_padding_mask=pad,
                                     return_weights=True)
    fast = infoscale.attention(q, k, v, method, train_len=L, causal=causal, key_padding_mask=pad, chunk_size=5)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got_w.numpy(), want_w, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(fast.numpy(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_fast_equals_reference_fp32_and_bf16(method, causal):
    if not causal and _causal_only(method):
        pytest.skip("causal only")
    n = 16 * L + 3  # not a multiple of the chunk
    q, k, v = _inputs(n, seed=1, dv=16)
    pad = _pad(n)
    ref = infoscale.attention(q, k, v, method, train_len=L, causal=causal, key_padding_mask=pad, impl="reference")
    for chunk in (7, 64, 1000):
        fast = infoscale.attention(q, k, v, method, train_len=L, causal=causal, key_padding_mask=pad,
                                   chunk_size=chunk)
        assert (fast - ref).abs().max().item() < 1e-5, chunk
    bf = infoscale.attention(q, k, v, method, train_len=L, causal=causal, key_padding_mask=pad, chunk_size=64,
                             bf16=True)
    # bf16 keeps 8 mantissa bits: the outputs (|v| ~ 1) move by ~1e-2 at most
    assert bf.dtype == torch.float32
    assert (bf - ref).abs().max().item() < 0.05
    assert (bf - ref).abs().mean().item() < 5e-3


@pytest.mark.parametrize("method", ["infoscale", "logn", "pi", "ntk", "yarn", "rerope(window=8)",
                                    "leaky_rerope(window=8)", "lm_infinite(sinks=0, window=7, cap=8)",
                                    "window(width=7)", "self_extend"])
@pytest.mark.parametrize("causal", [False, True])
def test_identity_within_training_length(method, causal):
    for n in (3, L):
        q, k, v = _inputs(n, seed=3)
        plain = infoscale.attention(q, k, v, "softmax", train_len=L, causal=causal)
        got = infoscale.attention(q, k, v, method, train_len=L, causal=causal)
        assert torch.equal(got, plain) or (got - plain).abs().max() < 1e-6
    # and beyond it they do change something (except the causal window, which sees at most L keys)
    q, k, v = _inputs(4 * L, seed=4)
    plain = infoscale.attention(q, k, v, "softmax", train_len=L, causal=causal)
    got = infoscale.attention(q, k, v, method, train_len=L, causal=causal)
    if not (causal and method.startswith("window")):
        assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method", [m for m in CASES if "cosscale" not in m and not CASES[m].get("sinks")
                                    and m not in ABSOLUTE])
def test_relative_position_invariance(method):
    """Shifting every position by a constant leaves the output unchanged: scores depend on p_j − p_i."""
    n = 4 * L
    q, k, v = _inputs(n, seed=5)
    base = infoscale.attention(q, k, v, method, train_len=L)
    shifted = infoscale.attention(q, k, v, method, train_len=L, positions=torch.arange(n) + 1000)
    assert (base - shifted).abs().max() < 1e-4


def test_sinks_are_the_first_positions():
    """Sink tokens are positions 0 .. sinks − 1: with every position shifted past them, StreamingLLM is
    its window alone; unshifted, it is not."""
    n = 4 * L
    q, k, v = _inputs(n, seed=6)
    pos = torch.arange(n) + 1000
    sinks = infoscale.attention(q, k, v, "streamingllm(sinks=2, window=3)", train_len=L, positions=pos)
    window = infoscale.attention(q, k, v, "window(width=3)", train_len=L, positions=pos)
    assert (sinks - window).abs().max() < 1e-6
    plain = infoscale.attention(q, k, v, "streamingllm(sinks=2, window=3)", train_len=L)
    assert (plain - window).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["rerope", "rerope(window=3)", "leaky_rerope(window=2, k=2.0)",
                                    "lm_infinite(sinks=2, window=5, cap=4)", "softmax",
                                    "self_extend(group=3, window=2)", "self_extend"])
def test_piecewise_positions_symmetric_in_sign(method):
    """With q = k, bidirectional logits are symmetric iff Δ'(i, j) = −Δ'(j, i). The official code's
    ReRoPE (q at +(w−1) on both sides) breaks this."""
    n = 6 * L
    q, _, _ = _inputs(n, seed=6)
    z = infoscale.attention_logits(q, q, method, train_len=L)
    finite = z > torch.finfo(z.dtype).min / 2
    assert torch.equal(finite, finite.transpose(-1, -2))
    zs = torch.where(finite, z, 0)
    assert (zs - zs.transpose(-1, -2)).abs().max() < 1e-4


def test_rerope_caps_distance_beyond_window():
    """Beyond the window every key scores as if it sat exactly w away, on its own side."""
    n, w = 40, 5
    q, k, _ = _inputs(n, seed=7, b=1)
    z = infoscale.attention_logits(q, k, f"rerope(window={w})", train_len=L)
    # key 30 seen from query 10 (Δ = +20) equals a plain-RoPE pair at Δ = +w: q at 0, k at w
    zq = infoscale.attention_logits(torch.cat([q[:, :, 10:11], k[:, :, 30:31]], 2),
                                    torch.cat([q[:, :, 10:11], k[:, :, 30:31]], 2), "softmax",
                                    train_len=L, positions=torch.tensor([0.0, w]))
    assert abs(z[0, 0, 10, 30].item() - zq[0, 0, 0, 1].item()) < 1e-5
    zl = infoscale.attention_logits(torch.cat([q[:, :, 30:31], k[:, :, 10:11]], 2),
                                    torch.cat([q[:, :, 30:31], k[:, :, 10:11]], 2), "softmax",
                                    train_len=L, positions=torch.tensor([float(w), 0.0]))
    assert abs(z[0, 0, 30, 10].item() - zl[0, 0, 0, 1].item()) < 1e-5  # Δ = −20 scores as −w


def _relative_positions(method, n, causal=True):
    """Each pair's effective relative position Δ' (p_j − p_i for plain RoPE), read back from the logits of one
    RoPE pair at frequency 0.1 (|Δ'| < 10π): with q = k = e0 the score is cos(0.1Δ'), with k = e1 it is −sin(0.1Δ')."""
    e0 = torch.tensor([1.0, 0.0]).expand(1, 1, n, 2)
    e1 = torch.tensor([0.0, 1.0]).expand(1, 1, n, 2)
    kw = dict(train_len=L, causal=causal, rope=Rope(2, inv_freq=(0.1,)), scale=1.0)
    c = infoscale.attention_logits(e0, e0, method, **kw)[0, 0].double()
    s = -infoscale.attention_logits(e0, e1, method, **kw)[0, 0].double()
    delta = torch.atan2(s, c) / 0.1
    return torch.where(c > -1e30, delta, torch.nan)


def test_relative_positions_read_back():
    got = _relative_positions("softmax", 6, causal=False)
    want = (torch.arange(6.0)[None, :] - torch.arange(6.0)[:, None]).double()
    assert torch.allclose(got, want, atol=1e-4)


def test_self_extend_positions_golden():
    """G = 2, W = 4, ten tokens, worked by hand from Δ' = ⌊j/G⌋ − (⌊i/G⌋ + W − ⌊W/G⌋) for i − j >= W: i − j
    below the diagonal reads 0 1 2 3 4 4 5 5 6 6 (row 9), the same matrix as LongLM's authors' own example."""
    want = [[0],
            [1, 0],
            [2, 1, 0],
            [3, 2, 1, 0],
            [4, 3, 2, 1, 0],
            [4, 4, 3, 2, 1, 0],
            [5, 5, 4, 3, 2, 1, 0],
            [5, 5, 4, 4, 3, 2, 1, 0],
            [6, 6, 5, 5, 4, 3, 2, 1, 0],
            [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]]
    got = -_relative_positions("self_extend(group=2, window=4)", 10)
    for i, row in enumerate(want):
        assert got[i, : i + 1].round().tolist() == row, i
        assert torch.allclose(got[i, : i + 1], torch.tensor(row, dtype=torch.float64), atol=1e-4)
    # bidirectional: the mirror image, Δ'(i, j) = −Δ'(j, i)
    both = _relative_positions("self_extend(group=2, window=4)", 10, causal=False)
    assert torch.allclose(both, -both.T, atol=1e-4)
    assert torch.allclose(-both.tril(), got.nan_to_num().tril(), atol=1e-4)


def test_dca_positions_golden():
    """The paper's running example (Figure 2: chunk s = 6, pretraining length c = 10, local window w = 4),
    18 tokens: P_k = P_q^Intra = [0..5] per chunk, P_q^Succ = [6, 7, 8, 9, 9, 9] per chunk, P_q^Inter = 9;
    M[i][j] = P_q[i] − P_k[j] with P_q chosen by ⌊i/s⌋ − ⌊j/s⌋ = 0, 1, >= 2 (Eq. 8)."""
    n, s = 18, 6
    pk = [0, 1, 2, 3, 4, 5] * 3
    intra, succ, inter = pk, [6, 7, 8, 9, 9, 9] * 3, [9] * n
    got = -_relative_positions("dca(chunk=6, local=4)", n)
    for i in range(n):
        for j in range(i + 1):
            gap = i // s - j // s
            pq = intra[i] if gap == 0 else succ[i] if gap == 1 else inter[i]
            assert abs(got[i, j].item() - (pq - pk[j])) < 1e-4, (i, j)
    assert torch.isnan(got.triu(1)[got.triu(1) != 0]).all()  # causal: nothing above the diagonal


@pytest.mark.parametrize("causal", [False, True])
def test_self_extend_group_one_is_plain_rope(causal):
    """G = 1 puts the grouped positions back at the plain ones (W − ⌊W/1⌋ = 0): plain RoPE for every window."""
    q, k, v = _inputs(4 * L, seed=13)
    plain = infoscale.attention(q, k, v, "softmax", train_len=L, causal=causal)
    for w in (1, 3, 40):
        got = infoscale.attention(q, k, v, f"self_extend(group=1, window={w})", train_len=L, causal=causal)
        assert (got - plain).abs().max() < 1e-5, w


def test_dca_one_chunk_is_plain_rope():
    """A chunk at least as long as the sequence: every pair is intra-chunk at its plain positions."""
    n = 4 * L
    q, k, v = _inputs(n, seed=14)
    plain = infoscale.attention(q, k, v, "softmax", train_len=L, causal=True)
    for chunk, local in ((n, 1), (n + 7, 3), (10 * n, n)):
        got = infoscale.attention(q, k, v, f"dca(chunk={chunk}, local={local})", train_len=L, causal=True)
        assert (got - plain).abs().max() < 1e-5, chunk
    assert (infoscale.attention(q, k, v, "dca", train_len=L, causal=True) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [3, L - 1])
def test_self_extend_with_one_group_is_rerope(window, causal):
    """With G above every position all grouped positions are 0 and ⌊W/G⌋ = 0, so beyond the window every key sits
    W away on its side: ReRoPE(w = W), exactly. (With W = L − 1 this is ReRoPE as the LongLM authors relate it to
    SelfExtend.) With a finite G they differ."""
    n = 4 * L
    q, k, v = _inputs(n, seed=15)
    rerope = infoscale.attention(q, k, v, f"rerope(window={window})", train_len=L, causal=causal)
    got = infoscale.attention(q, k, v, f"self_extend(group={n}, window={window})", train_len=L, causal=causal)
    assert (got - rerope).abs().max() < 1e-5
    finite = infoscale.attention(q, k, v, f"self_extend(group=4, window={window})", train_len=L, causal=causal)
    assert (finite - rerope).abs().max() > 1e-3


@pytest.mark.parametrize("method,period", [("self_extend(group=3, window=2)", 3), ("self_extend", None),
                                           ("dca(chunk=5, local=2)", 5)])
def test_grouped_and_chunked_positions_shift_by_their_period(method, period):
    """Groups and chunks are fixed on absolute positions: a shift by a multiple of G (of s) changes nothing, a shift
    by one does."""
    n = 4 * L
    q, k, v = _inputs(n, seed=16)
    base = infoscale.attention(q, k, v, method, train_len=L, causal=True)
    if period is None:  # the default group at n = 4L
        period = self_extend_group(n, L, L // 4)
        assert period > 1
    moved = infoscale.attention(q, k, v, method, train_len=L, causal=True, positions=torch.arange(n) + 7 * period,
                                seq_len=n)
    assert (base - moved).abs().max() < 1e-5
    off = infoscale.attention(q, k, v, method, train_len=L, causal=True, positions=torch.arange(n) + 1, seq_len=n)
    assert (base - off).abs().max() > 1e-3


def test_pi_divides_positions():
    """PI at s = 4 equals plain RoPE at positions / 4 (the official code multiplies)."""
    n = 4 * L
    q, k, v = _inputs(n, seed=8)
    pi = infoscale.attention(q, k, v, "pi", train_len=L)
    plain = infoscale.attention(q, k, v, "softmax", train_len=L, positions=torch.arange(n) / 4)
    assert (pi - plain).abs().max() < 1e-5


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(method, causal):
    """Right-padding a sequence changes nothing for its real tokens; padded keys get no weight."""
    if not causal and _causal_only(method):
        pytest.skip("causal only")
    n, extra = 3 * L, 5
    q, k, v = _inputs(n, seed=9, b=1)
    alone, _ = infoscale.attention(q, k, v, method, train_len=L, causal=causal, return_weights=True)
    z = torch.randn(1, H, extra, D)
    qp, kp = torch.cat([q, z], 2), torch.cat([k, z], 2)
    vp = torch.cat([v, torch.randn(1, H, extra, v.shape[-1])], 2)
    pad = torch.tensor([[True] * n + [False] * extra])
    padded, w = infoscale.attention(qp, kp, vp, method, train_len=L, causal=causal, key_padding_mask=pad,
                                    return_weights=True)
    assert (padded[:, :, :n] - alone).abs().max() < 1e-5
    assert w[..., n:].abs().max() == 0
    fast = infoscale.attention(qp, kp, vp, method, train_len=L, causal=causal, key_padding_mask=pad, chunk_size=4)
    assert (fast[:, :, :n] - alone).abs().max() < 1e-5


def test_fully_masked_row_is_zero_not_nan():
    q, k, v = _inputs(6, seed=10)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    out = infoscale.attention(q, k, v, "infoscale", train_len=L, key_padding_mask=pad)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_window_edge_counts():
    """window(width=w) lets an interior query see exactly 2w + 1 keys; sinks add their columns/rows."""
    n, w = 30, 3
    q, k, v = _inputs(n, seed=11, b=1)
    _, wt = infoscale.attention(q, k, v, f"window(width={w})", train_len=L, return_weights=True)
    assert int((wt[0, 0, 15] > 0).sum()) == 2 * w + 1
    _, wt = infoscale.attention(q, k, v, f"streamingllm(sinks=2, window={w})", train_len=L, return_weights=True)
    assert int((wt[0, 0, 15] > 0).sum()) == 2 * w + 1 + 2
    assert int((wt[0, 0, 1] > 0).sum()) == n  # a sink row attends everything
    _, wt = infoscale.attention(q, k, v, f"window(width={w})", train_len=L, causal=True, return_weights=True)
    assert int((wt[0, 0, 15] > 0).sum()) == w + 1


@pytest.mark.parametrize("method", [m for m in CASES if m != "pose"])
def test_fast_path_gradients_equal_reference_gradients(method):
    """Training runs the fast path: its gradients with respect to q, k and v equal the reference path's."""
    q, k, v = (t.requires_grad_() for t in _inputs(3 * L, seed=12))
    grads = {}
    for impl in ("fast", "reference"):
        out = infoscale.attention(q, k, v, method, train_len=L, impl=impl, chunk_size=5, causal=_causal_only(method))
        grads[impl] = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).square().sum(), (q, k, v))
    for a, b in zip(grads["fast"], grads["reference"], strict=True):
        assert torch.isfinite(a).all() and b.abs().sum() > 0
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_streamingllm_positions_are_those_of_the_kept_set(causal):
    """StreamingLLM's default positions: query i's output is plain attention over the tokens it keeps (the sinks
    and its window), re-indexed 0, 1, ... in order, as a bounded cache that rotates keys at their cache index
    holds them; up to sinks + window + 1 tokens nothing is dropped and it equals true positions."""
    S, W, n = 2, 3, 4 * L
    q, k, v = _inputs(n, seed=11, b=1)
    method = f"streamingllm(sinks={S}, window={W})"
    got = infoscale.attention(q, k, v, method, train_len=L, causal=causal, impl="reference")
    for i in range(n):
        keep = [j for j in range(n) if j < S or abs(i - j) <= W or i < S]
        keep = [j for j in keep if j <= i] if causal else keep
        idx = torch.tensor(keep)
        pos = torch.arange(len(keep), dtype=torch.float64)
        want = infoscale.attention(q[:, :, [i]], k[:, :, idx], v[:, :, idx], "softmax", train_len=L,
                                   positions=pos[[keep.index(i)]], key_positions=pos, impl="reference")
        np.testing.assert_allclose(got[:, :, i:i + 1].numpy(), want.numpy(), atol=1e-5)
    true_method = f"streamingllm(sinks={S}, window={W}, true_positions=True)"
    true = infoscale.attention(q, k, v, true_method, train_len=L, causal=causal)
    m = S + W + 1
    short = infoscale.attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], method, train_len=L, causal=causal)
    short_true = infoscale.attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], true_method, train_len=L, causal=causal)
    assert (short - short_true).abs().max() < 1e-6
    assert (got - true).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_piecewise_flag_says_whether_positions_come_in_regions(name):
    """The registry's ``piecewise`` is what the method's positions do (regions of pairs), so the parse-time refusal
    of StreamingLLM's cache positions with such a method covers exactly the combinations the plan cannot build."""
    m = REGISTRY[name]
    if m.positions is None or m.train_time:
        assert not m.piecewise
        return
    plan = infoscale.build_plan(name, n=4 * L, batch=1, heads=H, head_dim=D, train_len=L, causal=True)
    assert m.piecewise == (len(plan.regions) > 1)


@pytest.mark.parametrize("method", ["rerope+streamingllm", "dca+streamingllm(sinks=2)", "self_extend+streamingllm"])
def test_cache_positions_with_piecewise_positions_refused_at_parse(method):
    with pytest.raises(infoscale.MethodError, match="true_positions=True"):
        infoscale.parse_method(method, L)
    fixed = method.replace("streamingllm(sinks=2)", "streamingllm").replace("streamingllm",
                                                                             "streamingllm(true_positions=True)")
    infoscale.parse_method(fixed, L)
