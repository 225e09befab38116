"""The fused-SDPA path (one call per position region and column block, merged by log-sum-exp) against the reference
path, for every method of the naive cases: prefill, a cached prefill chunk and decoding, GQA, left padding, bf16."""

from __future__ import annotations

import pytest
import torch

from infoscale.attn import attention_reference, build_plan
from infoscale.attn import sdpa as sdpa_mod
from infoscale.attn.sdpa import _longest_run, _segments, attention_sdpa, supported

from .test_attention import CASES, L, _causal_only

HEADS, KV_HEADS, D = 4, 2, 8
N = 600  # several query chunks (256 rows), so the far side's unmasked column blocks are used
# the fast tier (make test-fast) runs one method of each kind; make test runs every naive case
FAST = {"softmax", "infoscale", "yarn", "rerope", "leaky_rerope", "self_extend", "dca", "streamingllm",
        "lm_infinite", "cosscale", "alibi", "window"}
ALL = [m if m in FAST else pytest.param(m, marks=pytest.mark.e2e) for m in CASES]


def _qkv(n_q, n_k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, n_q, D, generator=g)
    k = torch.randn(2, KV_HEADS, n_k, D, generator=g)
    v = torch.randn(2, KV_HEADS, n_k, 16, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _reference(plan, q, k, v):
    r = HEADS // KV_HEADS
    out, _ = attention_reference(q.float(), k.float().repeat_interleave(r, 1), v.float().repeat_interleave(r, 1),
                                 train_len=L, plan=plan)
    return out


def _plan(method, n_q, n_k, causal, pad=None, positions=None, key_positions=None):
    return build_plan(method, batch=2, heads=HEADS, head_dim=D, train_len=L, n_q=n_q, n_k=n_k, causal=causal,
                      key_padding_mask=pad, positions=positions, key_positions=key_positions)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_equals_reference(method, causal):
    if not causal and _causal_only(method):
        pytest.skip("causal only")
    q, k, v = _qkv(N, N, seed=3)
    pad = torch.ones(2, N, dtype=torch.bool)
    pad[1, :37] = False  # a left-padded row
    pos = (pad.long().cumsum(-1) - 1).clamp(min=0)
    for p, kw in ((None, {}), (pad, {"positions": pos})):
        plan = _plan(method, N, N, causal, pad=p, **kw)
        got = attention_sdpa(plan, q, k, v)
        if not supported(plan, q):
            assert got is None
            continue
        want = _reference(plan, q, k, v)
        assert (got - want).abs().max().item() < 1e-4, p is not None  # fp32 rounding (CosScale logits reach 128)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("n_q", [1, 3, 100])
def test_cached_queries_equal_reference(method, n_q):
    """The last n_q queries against every key (decoding: query heads stacked on their key/value head, only the keys
    a region scores rotated; a cached prefill chunk: the prefill layout)."""
    q, k, v = _qkv(n_q, N, seed=4)
    plan = _plan(method, n_q, N, causal=True)
    got = attention_sdpa(plan, q, k, v)
    if not supported(plan, q):
        assert got is None
        return
    want = _reference(plan, q, k, v)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", ["rerope(window=64)", "self_extend(group=4, window=32)", "yarn+infoscale",
                                    "dca(chunk=96, local=16)", "lm_infinite(sinks=4, window=63, cap=64)"])
def test_bf16_is_near_the_fp32_reference(method):
    q, k, v = _qkv(N, N, seed=5, dtype=torch.bfloat16)
    plan = _plan(method, N, N, causal=True)
    got = attention_sdpa(plan, q, k, v)
    assert got.dtype == torch.bfloat16
    err = (got.float() - _reference(plan, q, k, v)).abs()
    assert err.max().item() < 0.05 and err.mean().item() < 5e-3


def test_far_side_runs_without_a_mask(monkeypatch):
    """ReRoPE's keys before a chunk's band are one block that every row scores: the fused kernel gets no mask."""
    calls = []
    kernel = sdpa_mod._lse_kernel(torch.device("cpu"))

    def spy(q, k, v, *args, attn_mask=None, **kw):
        calls.append((k.shape[2], attn_mask is None))
        return kernel(q, k, v, *args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(sdpa_mod, "_lse_kernel", lambda device: spy)
    n = 4096
    q, k, v = _qkv(n, n, seed=6)
    attention_sdpa(_plan("rerope(window=16)", n, n, causal=True), q, k, v)
    unmasked = sum(c for c, free in calls if free)
    masked = sum(c for c, free in calls if not free)
    assert unmasked > 2 * masked > 0  # the lower triangle, less the band and each chunk's edge


def test_gradients_or_dropout_leave_merging_to_the_caller():
    q, k, v = _qkv(N, N, seed=7)
    plan = _plan("rerope(window=16)", N, N, causal=True)
    assert attention_sdpa(plan, q, k, v, dropout_p=0.1) is None
    assert attention_sdpa(plan, q.requires_grad_(), k, v) is None
    one = _plan("yarn", N, N, causal=True)  # one region: the public, differentiable SDPA
    out = attention_sdpa(one, q, k, v)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_longest_run_and_segments():
    f = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert _longest_run(f) == (4, 7)
    assert _longest_run(torch.zeros(3, dtype=torch.bool)) == (0, 0)
    assert _longest_run(torch.ones(3, dtype=torch.bool)) == (0, 3)
    rows = torch.arange(300)[:, None]
    cols = torch.arange(400)[None, :]
    m = (cols <= rows + 50)[None, None]  # a causal edge: columns 0..50 every row scores
    blocks = [(lo, hi, mm is None) for lo, hi, mm in _segments(m, 400, split=False)]
    assert blocks == [(0, 350, False)]
    m = (cols <= rows + 200)[None, None]  # columns 0..200 every row scores: a block without a mask
    blocks = [(lo, hi, mm is None) for lo, hi, mm in _segments(m, 400, split=True)]
    assert blocks == [(0, 201, True), (201, 400, False)]
    assert list(_segments(torch.zeros(1, 1, 3, 4, dtype=torch.bool), 4, split=True)) == []


@pytest.mark.parametrize("method", ["rerope(window=64)", "yarn"])
def test_autocast_with_mixed_input_dtypes(method):
    """Under bf16 autocast a transformers layer hands fp32 q, k (rotated by fp32 cos, sin) beside a bf16 v: the
    products run in bf16, as torch's SDPA runs them under autocast."""
    q, k, v = _qkv(N, N, seed=8)
    plan = _plan(method, N, N, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_sdpa(plan, q, k, v.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    err = (got.float() - _reference(plan, q, k, v)).abs()
    assert err.max().item() < 0.05 and err.mean().item() < 5e-3


def test_memo_shares_the_layout_between_calls(monkeypatch):
    q, k, v = _qkv(N, N, seed=9)
    plan = _plan("self_extend(group=4, window=32)", N, N, causal=True)
    calls = []
    real = sdpa_mod._chunk_layout
    monkeypatch.setattr(sdpa_mod, "_chunk_layout", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    memo = {}
    first = attention_sdpa(plan, q, k, v, memo=memo)
    chunks = len(calls)
    second = attention_sdpa(plan, q * 0.5, k, v, memo=memo)  # another layer: other q, the same geometry
    assert len(calls) == chunks > 1
    assert torch.equal(first, attention_sdpa(plan, q, k, v))
    assert (second - _reference(plan, q * 0.5, k, v)).abs().max().item() < 1e-4


def _padded_llama(method: str, n: int):
    """A 3-layer tiny Llama with ``method`` applied, two rows of n token ids and a mask of ones (pad it yourself)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import infoscale.hf as hf

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = hf.apply(LlamaForCausalLM(cfg).eval(), method)
    return model, torch.randint(0, 100, (2, n)), torch.ones(2, n, dtype=torch.long)


def test_layers_of_one_forward_share_the_layout(monkeypatch):
    """In a transformers model the masks of a query chunk are computed once per forward, not once per layer, and the
    logits are those computed without sharing."""
    import infoscale.hf.attention as hf_attention

    model, ids, mask = _padded_llama("rerope+infoscale", 700)
    mask[1, :50] = 0  # left padding: the mask transformers builds holds the memo
    calls = []
    real = sdpa_mod._chunk_layout
    monkeypatch.setattr(sdpa_mod, "_chunk_layout", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for mode in (torch.no_grad, torch.inference_mode):  # inference tensors keep no version counter
        with mode():
            for am in (None, mask):
                calls.clear()
                shared = model(ids, attention_mask=am).logits
                assert len(calls) == 3  # 700 rows in chunks of 256, once for the three layers
                calls.clear()
                again = model(ids, attention_mask=am).logits
                assert len(calls) == 3  # a new forward computes its own
                monkeypatch.setattr(hf_attention, "_layout_memo", lambda *a, **kw: None)
                alone = model(ids, attention_mask=am).logits
                monkeypatch.undo()
                monkeypatch.setattr(sdpa_mod, "_chunk_layout", lambda *a, **kw: calls.append(1) or real(*a, **kw))
                assert torch.equal(shared, alone) and torch.equal(again, alone)
    assert hf_attention._FORWARDS.get() == ()  # every forward's memo dropped when it ended


def test_layers_of_one_forward_count_a_masks_keys_once(monkeypatch):
    """A temperature over the model's mask (padding): the key counts l_i are summed once per forward for all layers
    (a sum over a long mask costs seconds), and the logits are those counted per layer."""
    import infoscale.hf.attention as hf_attention

    model, ids, mask = _padded_llama("infoscale", 200)
    mask[1, :30] = 0
    calls = []
    real = hf_attention._row_lengths
    monkeypatch.setattr(hf_attention, "_row_lengths", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        shared = model(ids, attention_mask=mask).logits
        assert len(calls) == 1
        monkeypatch.setattr(hf_attention, "_forward_memo", lambda *a, **kw: None)
        calls.clear()
        alone = model(ids, attention_mask=mask).logits
        assert len(calls) == 3
    assert torch.equal(shared, alone)


def test_a_forward_that_raises_drops_its_memo():
    from transformers import LlamaConfig, LlamaForCausalLM

    import infoscale.hf as hf
    import infoscale.hf.attention as hf_attention

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = hf.apply(LlamaForCausalLM(cfg).eval(), "rerope")
    with torch.no_grad(), pytest.raises(IndexError):
        model(torch.tensor([[5, 200]]))  # a token id past the vocabulary
    assert hf_attention._FORWARDS.get() == ()
    hf.remove(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6]]))
    assert hf_attention._FORWARDS.get() == ()  # remove took the hooks off


@pytest.mark.parametrize("method,far_rotated", [
    ("yarn(factor=4)", True), ("leaky_rerope(window=32, k=8)", True), ("self_extend(window=4)", True),
    ("dca(chunk=96, local=16)", True), ("ntk+infoscale", True),
    ("rerope(window=64)", False),  # the far side's keys sit at position 0: nothing to rotate, with or without store
])
def test_a_key_store_rotates_only_new_keys(method, far_rotated, monkeypatch):
    """Decoding with a layer's key store (as RotatedKeysCache keeps it): every step equals the reference, and a step
    rotates its own key and the few a short region scores, not every cached key. A store handed other positions
    (the dynamic factor moved) or another batch starts over and stays exact."""
    n0, steps = 1400, 4  # a far side longer than STORE_FROM
    q, k, v = _qkv(n0 + steps, n0 + steps, seed=11)
    rows = []
    real = sdpa_mod._rotate
    monkeypatch.setattr(sdpa_mod, "_rotate", lambda plan, x, pos: rows.append(x.shape[2]) or real(plan, x, pos))
    seq = torch.full((2,), float(n0), dtype=torch.float64)  # dynamic factors fixed at the prompt's n, as hf does

    def plan_at(n_q, n_k, seq_len):
        return build_plan(method, batch=2, heads=HEADS, head_dim=D, train_len=L, n_q=n_q, n_k=n_k, causal=True,
                          positions=torch.arange(n_k - n_q, n_k, dtype=torch.float64)[None], seq_len=seq_len)

    store = {}
    attention_sdpa(plan_at(n0, n0, seq), q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], rotated=store)
    assert not store  # prefill keeps nothing: the first decoding step stores what decoding takes from it
    for t in range(1, steps + 1):
        n = n0 + t
        plan = plan_at(1, n, seq)
        rows.clear()
        got = attention_sdpa(plan, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], rotated=store)
        stored = sum(rows)
        want = _reference(plan, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n])
        assert (got - want).abs().max().item() < 1e-4
        rows.clear()
        attention_sdpa(plan, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n])
        if t > 1:  # the far side: 1 new key rotated instead of n
            assert stored < 300 and (sum(rows) > n) == far_rotated
    # the factor moved (no prompt length kept): positions differ, the store starts over, the output stays exact
    n = n0 + steps
    moved = plan_at(1, n, torch.full((2,), float(4 * n0), dtype=torch.float64))
    got = attention_sdpa(moved, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], rotated=store)
    assert (got - _reference(moved, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n])).abs().max().item() < 1e-4
    # another batch in the same store (one row): starts over
    one = build_plan(method, batch=1, heads=HEADS, head_dim=D, train_len=L, n_q=1, n_k=n, causal=True,
                     positions=torch.tensor([[n - 1.0]], dtype=torch.float64), seq_len=seq[:1])
    got = attention_sdpa(one, q[:1, :, n - 1:n], k[:1, :, :n], v[:1, :, :n], rotated=store)
    r = HEADS // KV_HEADS
    want, _ = attention_reference(q[:1, :, n - 1:n], k[:1].repeat_interleave(r, 1)[:, :, :n],
                                  v[:1].repeat_interleave(r, 1)[:, :, :n], train_len=L, plan=one)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("method,stores", [("dca(chunk=96, local=16)", 1), ("self_extend(group=4, window=32)", 1)])
def test_regions_that_place_keys_alike_share_one_store(method, stores, monkeypatch):
    """DCA's three regions put keys at p mod s: one rotated copy, not one per region (SelfExtend: one, its grouped
    side's; its W neighbours are rotated afresh), and decoding from the shared copy equals the reference. DCA's
    short regions (its chunk and the one before) take their keys from the copy its long one keeps: a step rotates
    its query (once per region) and its own key, nothing else."""
    n0 = 1400  # older chunks: more keys than STORE_FROM
    q, k, v = _qkv(n0 + 3, n0 + 3, seed=12)
    rows = []
    real = sdpa_mod._rotate
    monkeypatch.setattr(sdpa_mod, "_rotate", lambda plan, x, pos: rows.append(x.shape[2]) or real(plan, x, pos))
    store = {}
    for n in range(n0 + 1, n0 + 4):
        plan = build_plan(method, batch=2, heads=HEADS, head_dim=D, train_len=L, n_q=1, n_k=n, causal=True,
                          positions=torch.tensor([[n - 1.0]], dtype=torch.float64))
        rows.clear()
        got = attention_sdpa(plan, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], rotated=store)
        assert (got - _reference(plan, q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n])).abs().max().item() < 1e-4
    assert len(store) == stores
    if method.startswith("dca"):
        assert sum(rows) == 3 + 1
