"""The causal track's attention analysis and its report: entropy and dilution of hand-built Llamas through the real
capture path (infoscale.hf.capture_attention inside transformers' forward), the captured attention against the
weights transformers returns, and the separation rule of the NLL-by-position table."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from infoscale import hf
from infoscale.analysis import AnalyzeConfig, causal_entropy_records, row_sums
from infoscale.data import TokenDocs
from infoscale.errors import ConfigError
from infoscale.rundir import Run

L, N, D = 32, 200, 32  # training length, analysed length, head dim
W = 16  # the default window of window / streamingllm / rerope at L = 32
TOL = 1e-6  # row_sums runs its softmax and per-row sums in float32


def _llama(one_hot: bool):
    """A 2-layer Llama whose attention is known by construction. Every weight is zero except the norms (1), so the
    residual stream is the token embedding at every layer: token 0 embeds as e_0, every other token as e_1.

    ``one_hot=False``: q = 0, so every logit is 0 and each row attends its l_i keys uniformly (H = ln l_i).
    ``one_hot=True``: q = 100·u (a bias) and k_j = 8·u for token 0 (RMSNorm makes e_0 into 8·e_0) and 0 otherwise, u
    on the lowest RoPE frequency of each head (10000^(−30/32) rad per position: cos > 0.99 over 200 positions),
    so the logit of the key at position 0 is ≈ 100·8/√32 ≈ 141 and every other logit is 0: every row that can see
    position 0 puts all its weight there (e^−141 on the others)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16, hidden_size=2 * D, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=L, attention_bias=one_hot,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            if one_hot:
                for h in range(2):
                    layer.self_attn.q_proj.bias[h * D + D // 2 - 1] = 100.0
                    layer.self_attn.k_proj.weight[h * D + D // 2 - 1, 0] = 1.0
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[1:, 1] = 1.0
        emb[0, 0] = 1.0
    return model


def _records(model, methods):
    """causal_entropy_records on one window: token 0 at position 0, other tokens after it."""
    doc = np.r_[0, np.arange(1, N) % 15 + 1].astype(np.int32)
    docs = TokenDocs([], None)
    docs.arrays = [doc]  # exactly N tokens: the window is the document
    cfg = AnalyzeConfig(methods=methods, lengths=[N], windows=2, synthetic=False)
    recs = causal_entropy_records(cfg, Run(Path("/x/hand"), model, None, {}), docs)
    out = {}
    for r in recs:
        assert r["source"] == "hand" and r["length"] == N and r["train_len"] == L
        out.setdefault((r["method"], r["layer"]), {}).update(r)
    assert {k[1] for k in out} == {0, 1} and {k[0] for k in out} == set(methods)
    return out


def test_uniform_attention_has_normalised_entropy_one():
    """Zero logits: H_i = ln l_i exactly, so H / ln l = 1; l_i is i + 1 for causal attention and the band for a
    window, and the near share is the share of the l_i keys within L/2. Rows i = 1 … N − 1 (row 0 has one key)."""
    got = _records(_llama(one_hot=False), ["softmax", "infoscale", "rerope+infoscale", "window"])
    for (method, layer), r in got.items():
        rows = range(1, N)
        keys = [(range(max(0, i - W), i + 1) if method == "window" else range(i + 1)) for i in rows]
        assert r["H_norm"] == pytest.approx(1.0, abs=TOL), (method, layer)
        assert r["H"] == pytest.approx(np.mean([math.log(len(k)) for k in keys]), abs=TOL), (method, layer)
        near = np.mean([sum(abs(i - j) <= L // 2 for j in k) / len(k) for i, k in zip(rows, keys, strict=True)])
        assert r["near_share"] == pytest.approx(near, abs=TOL), (method, layer)


def test_one_hot_attention_has_normalised_entropy_zero():
    """All weight on position 0: H = 0 on every row that sees it. A window of W hides position 0 from rows i > W,
    which then attend their W + 1 keys uniformly (H / ln l = 1); StreamingLLM keeps position 0 as a sink."""
    got = _records(_llama(one_hot=True), ["softmax", "infoscale", "rerope+infoscale", "window", "streamingllm"])
    for (method, layer), r in got.items():
        if method == "window":
            assert r["H_norm"] == pytest.approx((N - 1 - W) / (N - 1), abs=TOL), layer
            assert r["near_share"] == pytest.approx(1.0), layer
        else:
            assert r["H_norm"] < 1e-9 and r["H"] < 1e-9, (method, layer)
            # the weight sits on position 0, near (|i − 0| <= L/2) for rows 1 … L/2 only
            assert r["near_share"] == pytest.approx((L // 2) / (N - 1), abs=TOL), (method, layer)


@pytest.mark.parametrize("method", ["softmax", "infoscale", "rerope+infoscale", "streamingllm+logn", "yarn"])
def test_captured_attention_is_the_attention_the_model_runs(method):
    """softmax of the captured logits == the weights transformers returns with output_attentions (the reference
    path of infoscale_attention) on a random GQA Llama beyond L: temperatures, moved positions and masks are in."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                         initializer_range=0.2)).eval()
    ids = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="hf.apply"):
        hf.capture_attention(model, ids, lambda z, q, k: None)
    hf.apply(model, method)
    with torch.no_grad():
        want = model(ids, output_attentions=True).attentions
    got = hf.capture_attention(model, ids, lambda z, q, k: (torch.softmax(z.double(), -1), q.clone()), chunk=7)
    assert len(got) == len(want) == 2
    for w, chunks in zip(want, got, strict=True):
        assert len(chunks) == math.ceil(100 / 7)
        a = torch.cat([c[0] for c in chunks], 1)
        assert torch.equal(torch.cat([c[1] for c in chunks]), torch.arange(100, dtype=torch.float64))
        assert (a - w[0].double()).abs().max() < 1e-4
    if method != "softmax":  # the method changes the attention, so the comparison above could fail
        hf.apply(model, "softmax")
        plain = hf.capture_attention(model, ids, lambda z, q, k: torch.softmax(z.double(), -1))
        assert (torch.cat(plain[1], 1) - torch.cat([c[0] for c in got[1]], 1)).abs().max() > 1e-3
    hf.remove(model)


# ---------------------------------------------------------------------------------------------
# the NLL-by-position table: bold only when separated from the runner-up
# ---------------------------------------------------------------------------------------------


def _bucket(method, lo, hi, means, n=256):
    counts = [hi - max(lo, 1)] * len(means)
    v = float(np.mean(means))
    return {"model": "/x/m", "model_name": "m", "train": {"attention": "softmax", "train_len": 64}, "method": method,
            "length": n, "setting": "contiguous", "protocol": "teacher_forced", "protocol_params": {}, "windows": 4,
            "predictions": 64, "seed": 0, "metric": f"nll[{lo},{hi})", "bucket": [lo, hi], "value": v,
            "ci_low": v - 0.1, "ci_high": v + 0.1, "window_counts": counts, "window_means": list(means)}


def test_bucket_table_bolds_only_a_separated_best():
    from infoscale.report import bucket_tables

    base = np.array([3.0, 3.4, 3.1, 3.6, 3.2, 3.3])
    recs = [_bucket("rerope", 0, 64, base), _bucket("softmax", 0, 64, base + 0.5),  # 0.5 nats better everywhere
            _bucket("rerope", 64, 128, base), _bucket("softmax", 64, 128, base + [0.01, -0.01] * 3)]  # a tie
    text = "\n".join(bucket_tables(recs))
    assert "excludes 0" in text
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in text.splitlines() if line.startswith("| ")}
    assert rows["| `rerope`"][0].startswith("**3.267") and not rows["| `rerope`"][1].startswith("**")
    assert text.count("**3.") == 1  # only the separated best is bold
    best = rows["| *best* (Δ vs runner-up, 95% CI)"]
    assert best[0].startswith("**rerope** (`rerope` vs `softmax`: -0.500 [-0.500, -0.500])")
    assert best[1].startswith("none (") and "[-0.007, +0.007]" in best[1]  # the tie: a CI around 0


def test_bucket_and_length_tables_draw_one_way():
    """A bucket table and a length table are one table function: two records of one cell are averaged and marked †
    in both (not the last one shown), and a single method has nothing to be bold against."""
    from infoscale.report import bucket_tables, eval_tables

    base = np.array([3.0, 3.4, 3.1, 3.6])
    recs = [_bucket("softmax", 0, 64, base), _bucket("softmax", 0, 64, base + 1.0)]
    text = "\n".join(bucket_tables(recs))
    row = next(line for line in text.splitlines() if line.startswith("| `softmax`"))
    assert "3.775 ± 0.600†" in row and "**" not in text and "† = mean of several records" in text
    whole = [r | {"metric": "nll", "bucket": None} for r in recs]
    text = "\n".join(eval_tables(whole))
    row = next(line for line in text.splitlines() if line.startswith("| `softmax`"))
    assert "3.775 ± 0.600†" in row and "**" not in text


def test_report_gives_paired_deltas_per_position_bucket(tmp_path):
    """NLL by position gets its paired Δs per bucket (beyond L is where methods differ), buckets in position order;
    a cell of a single window shows its Δ without a CI instead of nothing."""
    from infoscale.report import write_report

    base = np.array([3.0, 3.4, 3.1, 3.6])
    recs = [_bucket("softmax", 0, 64, base), _bucket("rerope", 0, 64, base - 0.25),
            _bucket("softmax", 64, 128, base + 1), _bucket("rerope", 64, 128, base + 0.5),
            _bucket("softmax", 128, 512, [5.0], n=512), _bucket("rerope", 128, 512, [4.25], n=512)]
    text = write_report(recs, tmp_path).read_text()
    position = text[text.index("## NLL by position"):]
    heads = [line for line in position.splitlines() if line.startswith("#### ")]
    assert [h.split("Δ ")[-1] for h in heads] == ["nll[0,64)", "nll[64,128)", "nll[128,512)"]
    rows = [line for line in position.splitlines() if line.startswith("| `rerope` − `softmax`")]
    assert rows[0].startswith("| `rerope` − `softmax` | **-0.250 ± 0.000**")
    assert rows[1].startswith("| `rerope` − `softmax` | **-0.500 ± 0.000**")
    assert rows[2] == "| `rerope` − `softmax` | -0.750 (1 window) |"


def test_report_draws_the_passkey_heat_map(tmp_path):
    """Passkey records with their per-depth accuracy become a depth × length heat map, a panel per method."""
    from infoscale.report import write_report

    def rec(method, n, per_depth):
        return {"model": "/x/m", "model_name": "m", "train": {"attention": "softmax", "train_len": 64},
                "method": method, "length": n, "setting": "passkey", "protocol": "greedy",
                "protocol_params": {"depths": [0.1, 0.9], "digits": 5}, "windows": 1, "predictions": 2, "seed": 0,
                "metric": "passkey_accuracy", "value": sum(per_depth.values()) / 2, "per_depth": per_depth}

    recs = [rec(m, n, {"0.1": 1.0 if n == 64 else 0.0, "0.9": 0.4}) for m in ("softmax", "rerope") for n in (64, 256)]
    text = write_report(recs, tmp_path).read_text()
    assert "![passkey_heatmap_m](passkey_heatmap_m.png)" in text
    assert (tmp_path / "passkey_heatmap_m.png").stat().st_size > 1000


@pytest.mark.parametrize("layers", [2, 30])
def test_analysis_plot_stays_readable_for_many_layers(tmp_path, layers):
    """A panel per layer for a few layers (the measure against length); a pretrained LLM's 30 layers go on the x
    axis of one panel per measure instead, so the figure keeps a readable width."""
    from matplotlib.image import imread

    from infoscale.report.plots import MAX_LAYER_PANELS, plot_analysis

    recs = [{"kind": kind, "source": "m", "method": m, "length": n, "layer": li, "train_len": 64,
             **({"H": 3.0 + li / 10, "H_norm": 0.5} if kind == "entropy" else {"near_share": 0.7})}
            for kind in ("entropy", "dilution") for m in ("softmax", "infoscale") for n in (64, 128)
            for li in range(layers)]
    paths = plot_analysis(recs, tmp_path)
    assert [p.name for p in paths] == ["entropy_m.png", "dilution_m.png"]
    width = imread(paths[0]).shape[1] / 110  # inches at the report's dpi
    if layers > MAX_LAYER_PANELS:
        assert width < 0.3 * layers + 4  # one panel wide, not a panel per layer (3.6 in each)
    else:
        assert width > 3.6 * layers


# ---------------------------------------------------------------------------------------------
# the clm-quick preset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_method", ["softmax", "pose"])
def test_clm_quick_runs_every_method_on_both_llamas(train_method):
    """clm-quick evaluates every method of CLM_METHODS on enough windows for a paired Δ at 4096; each applies to
    a Llama of each training method and gives finite logits beyond L (so none is skipped from the sweep)."""
    from transformers import LlamaForCausalLM

    from infoscale.models.llama import build_config
    from infoscale.reproduce import CLM_ANALYSIS_METHODS, CLM_METHODS, CLM_MODELS, CLM_PRESETS

    quick = CLM_PRESETS["clm-quick"]
    assert quick.methods == tuple(CLM_METHODS) and quick.windows >= 8 and max(quick.lengths) == 64 * 64
    assert set(CLM_ANALYSIS_METHODS) <= set(CLM_METHODS) and train_method in CLM_MODELS.values()
    assert len(CLM_PRESETS["clm-smoke"].methods) <= 4  # the test suite's preset stays small
    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config("tiny", vocab_size=50, train_len=64, attention=train_method)).eval()
    ids = torch.randint(0, 50, (1, 200), generator=torch.Generator().manual_seed(0))
    for m in CLM_METHODS:
        hf.apply(model, m)
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all(), m
    hf.remove(model)


@pytest.mark.parametrize("per_depth", [{"x": 0.5}, {"0.5": 2.0}, [0.5], {"0.5": True}, {"-0.5": 0.5}])
def test_report_refuses_a_bad_per_depth_field(tmp_path, per_depth):
    """Records are untrusted: a per-depth field that is not depth -> accuracy is refused in one line."""
    import json

    from infoscale.errors import DataError
    from infoscale.report import load_records

    rec = {"model_name": "m", "method": "softmax", "length": 256, "setting": "passkey", "protocol": "greedy",
           "metric": "passkey_accuracy", "value": 0.5, "per_depth": per_depth}
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match="per_depth"):
        load_records([f])


def _naive_row_sums(logits, q_pos, k_pos, train_len):
    """The three measures straight from their definitions, in float64 over every key (masked ones included)."""
    allowed = logits > torch.finfo(logits.dtype).min / 2
    w = torch.softmax(logits.double(), -1)
    ent = -(w * w.clamp(min=1e-300).log()).sum(-1)
    l = allowed.sum(-1).double()
    share = (w * ((q_pos[:, None] - k_pos[None, :]).abs() <= train_len // 2)).sum(-1)
    keep = l >= 2
    return {"H": float(ent[keep].sum()), "H_norm": float((ent[keep] / l[keep].log()).sum()),
            "near_share": float(share[keep].sum()), "rows": int(keep.sum())}


@pytest.mark.parametrize("mask", ["causal", "window", "sinks", "none", "first_rows"])
def test_row_sums_match_the_float64_definition(mask):
    """The fast reduction (float32, masked edge columns dropped) against the definition in float64, on peaked
    random logits under the masks a causal chunk carries: the causal future, a band that leaves early keys behind,
    sinks plus a band (masked keys inside the row), no mask, and rows with fewer than two keys (left out)."""
    g = torch.Generator().manual_seed(0)
    H, r, n, Lt = 3, 40, 300, 64
    r0 = 0 if mask == "first_rows" else 150
    q = torch.arange(r0, r0 + r, dtype=torch.float64)
    k = torch.arange(n, dtype=torch.float64)
    z = torch.randn(H, r, n, generator=g) * 4
    dist = q[:, None] - k[None, :]
    allowed = {"causal": dist >= 0, "first_rows": dist >= 0, "none": torch.ones(r, n, dtype=torch.bool),
               "window": (dist >= 0) & (dist <= 20),
               "sinks": (dist >= 0) & ((dist <= 20) | (k[None, :] < 4))}[mask]
    z = z.masked_fill(~allowed, torch.finfo(z.dtype).min)
    got, want = row_sums(z, q, k, Lt), _naive_row_sums(z, q, k, Lt)
    assert got["rows"] == want["rows"] == (r - 1 if mask == "first_rows" else r) * H
    for m in ("H", "H_norm", "near_share"):
        assert got[m] == pytest.approx(want[m], rel=1e-5), m
