"""The causal track: Llama training (resume, tokenizer, loading without infoscale), the three causal metrics
against hand computations, cached decoding against full forwards, and the clm-smoke reproduction."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import infoscale.hf as ihf
from infoscale.data import BPETokenizer, TokenDocs, load_tokenizer
from infoscale.evaluate_clm import contiguous_records, copy_records
from infoscale.tasks import clm

from .conftest import TINY, run_cli

LLAMA = [*TINY, "--arch", "llama", "--train-len", "96", "--vocab-size", "1000"]


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("clm") / "run"
    res = run_cli("train", "--out", str(out), "--corpus", str(corpus), "--steps", "40", "--passkey-share", "0.2",
                  *LLAMA)
    assert res.returncode == 0, res.stderr
    return out


def _model(run):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(run).eval()


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_llama_sigkill_then_resume_equals_uninterrupted(tmp_path, corpus):
    """PoSE + passkey samples + copy samples + dropout: SIGKILL after the step-10 checkpoint, --resume, same
    weights."""
    args = ["--corpus", str(corpus), "--steps", "20", "--save-every", "5", "--eval-every", "10", "--attention",
            "pose", "--passkey-share", "0.25", "--copy-share", "0.2", "--dropout", "0.1", *LLAMA]
    ref = run_cli("train", "--out", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    killed = run_cli("train", "--out", str(out), *args, env={"INFOSCALE_TEST_KILL_AFTER_SAVE": "10"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    res = run_cli("train", "--out", str(out), *args, "--resume")
    assert res.returncode == 0, res.stderr
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["max_position_embeddings"] == 96
    assert cfg["infoscale"]["train_method"] == "pose"
    tcfg = json.loads((out / "train_config.json").read_text())
    assert tcfg["arch"] == "llama" and tcfg["passkey_share"] == 0.25 and tcfg["tokenizer"] == "bpe"
    assert tcfg["copy_share"] == 0.2 and cfg["infoscale"]["copy_share"] == 0.2
    # a resume must keep the share: another one would change the data order of the remaining steps
    other = run_cli("train", "--out", str(out), *[a if a != "0.2" else "0.3" for a in args], "--resume",
                    "--steps", "25")
    assert other.returncode == 2 and "copy_share: run has 0.2, asked 0.3" in other.stderr


def _period(row: np.ndarray, most: int) -> int:
    """The least p ≤ most with row[t] == row[t − p] for every t ≥ p; 0 if there is none."""
    for q in range(1, most + 1):
        if np.array_equal(row[q:], row[:-q]):
            return q
    return 0


def _contains(arrays, span: np.ndarray) -> bool:
    """Whether ``span`` is a contiguous piece of one of ``arrays`` (a plain scan)."""
    m = len(span)
    for a in arrays:
        for s in np.flatnonzero(a[:len(a) - m + 1] == span[0]):
            if np.array_equal(a[s:s + m], span):
                return True
    return False


@pytest.fixture(scope="module")
def copy_setup(corpus):
    from infoscale.data import load_corpus

    docs = load_corpus(str(corpus))
    tok = BPETokenizer.train([d.text for d in docs[:4]], 1000)
    train, heldout = TokenDocs(docs[:4], tok), TokenDocs(docs[4:], tok)
    return tok, train, heldout


@pytest.mark.e2e
def test_copy_samples_are_tiled_training_spans_at_the_asked_share(copy_setup):
    """Over 250 batches of 32 rows at L = 96 with 10% passkey and 15% copy samples: every copy row is a span of
    m ∈ [8, 48] tokens of a training document tiled to L (token t = token t − m), the rows that are periodic
    with a period ≤ L/2 are exactly the rows marked as copies, and the counts of copy and passkey rows (found
    from the tokens, not the marks) are within 4 binomial standard deviations of the shares."""
    from infoscale.runtime import step_generator

    tok, train, heldout = copy_setup
    pk = clm.Passkey(tok)
    L, B, steps, p, c = 96, 32, 250, 0.1, 0.15
    lo, hi = clm.copy_span_range(L)
    assert (lo, hi) == (8, 48)
    copies = passkeys = 0
    spans = []
    for step in range(steps):
        b = clm.train_batch(train, [step_generator(0, step, i) for i in range(6)], batch_size=B, train_len=L,
                            passkey=pk, passkey_share=p, copy_share=c)
        x = b.input_ids.numpy()
        assert torch.equal(b.input_ids, b.labels)  # the loss is on every position, copies included
        for r in range(B):
            period = _period(x[r], L // 2)
            is_passkey = np.array_equal(x[r, L - clm.DIGITS - len(pk.question):L - clm.DIGITS], pk.question)
            passkeys += is_passkey
            assert (int(b.kind[r]) == clm.PASSKEY) == is_passkey
            assert (int(b.kind[r]) == clm.COPY) == (period > 0), (step, r)
            if period:
                m = int(b.span[r])
                assert lo <= m <= hi
                assert all(x[r, t] == x[r, t - m] for t in range(m, L))  # a plain loop: tiled with period m
                assert period == m  # (no shorter period: a real text span)
                assert _contains(train.arrays, x[r, :m])
                copies += 1
                spans.append(m)
            else:
                assert int(b.span[r]) == 0
    n = steps * B
    for count, share in ((copies, c), (passkeys, p)):
        assert abs(count - n * share) < 4 * math.sqrt(n * share * (1 - share)), (count, n * share)
    assert min(spans) == lo and max(spans) == hi  # both ends of the range are drawn


def test_copy_share_is_deterministic_and_leaves_the_other_rows_alone(copy_setup):
    """Same (seed, step): the same batch. With --copy-share 0 the sixth generator is never read (the batches of
    runs from before the option), and turning copies on changes only the rows that become copies."""
    from infoscale.runtime import step_generator

    tok, train, _ = copy_setup
    pk = clm.Passkey(tok)
    kw = {"batch_size": 32, "train_len": 96, "passkey": pk, "passkey_share": 0.2}
    for step in (0, 7, 1234):
        def gens(k, step=step):
            return [step_generator(3, step, i) for i in range(k)]

        a = clm.train_batch(train, gens(6), copy_share=0.3, **kw)
        b = clm.train_batch(train, gens(6), copy_share=0.3, **kw)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.span, b.span)
        off = clm.train_batch(train, gens(5), copy_share=0.0, **kw)  # gens[5] would raise IndexError
        assert not (off.kind == clm.COPY).any()
        keep = a.kind != clm.COPY
        assert torch.equal(a.input_ids[keep], off.input_ids[keep]) and torch.equal(a.kind[keep], off.kind[keep])
        assert (a.kind == clm.COPY).sum() > 0 and not torch.equal(a.input_ids, off.input_ids)


def test_training_copies_come_from_the_training_split(tmp_path, corpus, monkeypatch):
    """`infoscale train` hands its training documents to the batch builder: every copy span it trains on is a
    piece of a document of split.json's training list, drawn with the run's tokenizer."""
    from infoscale.cli import main as cli
    from infoscale.data import load_corpus

    seen = []
    real = clm.train_batch

    def spy(docs, gens, **kw):
        b = real(docs, gens, **kw)
        seen.append((docs.names, b))
        return b

    monkeypatch.setattr(clm, "train_batch", spy)
    out = tmp_path / "run"
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "3", "--copy-share", "0.5",
                "--passkey-share", "0", *LLAMA]) == 0
    split = json.loads((out / "split.json").read_text())
    tok = load_tokenizer(out)
    by_name = {d.name: d for d in load_corpus(str(corpus))}
    train_arrays = [np.asarray(tok.encode(by_name[n].text)) for n in split["train"]]
    held_arrays = [np.asarray(tok.encode(by_name[n].text)) for n in split["eval"]]
    assert len(seen) == 3 and all(names == split["train"] for names, _ in seen)
    spans = [b.input_ids[r, :int(b.span[r])].numpy() for _, b in seen for r in torch.nonzero(b.kind == clm.COPY)
             .flatten().tolist()]
    assert len(spans) >= 4  # 24 rows at one half
    assert all(_contains(train_arrays, s) for s in spans)
    assert not all(_contains(held_arrays, s) for s in spans)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert 0 <= last["copy_acc"] <= 1 and 0 <= last["copy_first_acc"] <= 1


def test_copy_accuracy_of_a_step_by_hand():
    """The logged copy accuracy: a model right exactly on the later copies (t ≥ m) of the copy rows."""
    from infoscale.tasks.clm import copy_accuracy as _copy_accuracy

    L, V = 12, 20
    labels = torch.randint(1, V, (3, L))
    kind = torch.tensor([clm.COPY, clm.TEXT, clm.COPY], dtype=torch.int8)
    span = torch.tensor([4, 0, 5])
    logits = torch.zeros(3, L, V)
    for r in range(3):
        for t in range(1, L):  # position t − 1 predicts target t
            right = kind[r] == clm.COPY and t >= span[r]
            logits[r, t - 1, labels[r, t] if right else (labels[r, t] + 1) % V] = 1.0
    got = _copy_accuracy(logits, labels, kind, span)
    assert got == {"copy_acc": 1.0, "copy_first_acc": 0.0}
    logits[0, 5, :] = 0  # row 0, target 6 (a later copy) now wrong: argmax is token 0, labels are ≥ 1
    logits[0, 5, 0] = 1.0
    later = (L - 4) + (L - 5)
    assert _copy_accuracy(logits, labels, kind, span)["copy_acc"] == pytest.approx((later - 1) / later)
    assert _copy_accuracy(logits, labels, torch.zeros(3, dtype=torch.int8), span) == {}


def test_pose_training_positions_reach_the_model(tmp_path, corpus):
    """PoSE's skipped positions reach RoPE and are not read as packed sequences (transformers'
    ``find_packed_sequence_indices`` looks at position jumps when no mask is given): the logits of a PoSE batch as
    training computes them equal those with an explicit causal mask over the whole window."""
    from transformers import LlamaForCausalLM

    from infoscale.models.llama import build_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(build_config("tiny", vocab_size=50, train_len=16)).eval()
    x = torch.randint(0, 50, (2, 16))
    pos = torch.cat([torch.arange(8), torch.arange(100, 108)])[None].expand(2, -1)
    a = model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=pos).logits
    # reference: the eager implementation with a 4-D causal mask (no packed-sequence detection)
    model.set_attn_implementation("eager")
    mask = torch.zeros(1, 1, 16, 16).masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
    b = model(input_ids=x, attention_mask=mask.expand(2, 1, -1, -1), position_ids=pos).logits
    assert (a - b).abs().max() < 1e-4
    # and the positions matter: the same window at 0..15 gives other logits
    assert (model(input_ids=x, attention_mask=mask.expand(2, 1, -1, -1)).logits[:, 8:] - b[:, 8:]).abs().max() > 1e-3


@pytest.mark.e2e
@pytest.mark.parametrize("flags,msg", [
    (["--arch", "llama", "--attention", "cosscale(s=32)"], "--arch llama trains with"),
    (["--arch", "gau", "--tokenizer", "bpe"], "--tokenizer bpe is for --arch llama"),
    (["--arch", "gpt"], "unknown --arch"),
    (["--arch", "llama", "--train-len", "16", "--passkey-share", "0.1"], "a passkey sample needs"),
    (["--arch", "gau", "--copy-share", "0.1"], "--copy-share is for --arch llama"),
    (["--arch", "llama", "--copy-share", "1"], "--copy-share must be in [0, 1)"),
    (["--arch", "llama", "--copy-share", "-0.1"], "--copy-share must be in [0, 1)"),
    (["--arch", "llama", "--passkey-share", "0.5", "--copy-share", "0.5"], "keep their sum below 1"),
])
def test_bad_arch_flags(tmp_path, corpus, flags, msg):
    res = run_cli("train", "--out", str(tmp_path / "r"), "--corpus", str(corpus), *TINY, "--vocab-size", "300",
                  *flags)
    assert res.returncode == 2
    assert msg in res.stderr


# ---------------------------------------------------------------------------------------------
# tokenizer and loading without infoscale
# ---------------------------------------------------------------------------------------------


def test_bpe_round_trip_and_saved_files(tmp_path):
    texts = ["To be, or not to be: that is the question.\n", "Whether 'tis nobler in the mind to suffer"] * 20
    tok = BPETokenizer.train(texts, 300)
    for s in ["To be, or not to be", "  spaces\n\nand newlines\t", "三国演义 and émigré 71432"]:
        assert tok.decode(tok.encode(s)) == s  # byte level: any text, no unknown token
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, BPETokenizer) and again.encode("the question") == tok.encode("the question")
    assert [again.tok.id_to_token(i) for i in (0, 1)] == ["<|endoftext|>", "<pad>"]


@pytest.mark.e2e
def test_run_loads_with_transformers_alone(llama_run):
    """AutoTokenizer and AutoModelForCausalLM load the run in a process that never imports infoscale, and give
    the ids and logits infoscale gives."""
    text = "ROMEO: But soft, what light through yonder window breaks? 12345"
    code = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(llama_run)!r})
model = AutoModelForCausalLM.from_pretrained({str(llama_run)!r}).eval()
ids = tok({text!r})["input_ids"]
import torch
import torch.nn.functional as F
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0, -1].tolist()
assert not any(m.startswith("infoscale") for m in sys.modules), "infoscale was imported"
print(json.dumps({{"ids": ids, "decoded": tok.decode(ids), "logits": logits, "cls": type(model).__name__,
                  "eos": tok.eos_token, "pad": tok.pad_token}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(llama_run)
    assert got["ids"] == tok.encode(text)
    assert got["decoded"] == text
    assert got["cls"] == "LlamaForCausalLM" and got["eos"] == "<|endoftext|>" and got["pad"] == "<pad>"
    with torch.no_grad():
        ref = _model(llama_run)(torch.tensor([tok.encode(text)])).logits[0, -1]
    assert (torch.tensor(got["logits"]) - ref).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# metrics against hand computations
# ---------------------------------------------------------------------------------------------


class RepeatLM(torch.nn.Module):
    """Logits c at the current token's id, 0 elsewhere: p(next = current) = e^c / (e^c + V − 1)."""

    def __init__(self, vocab: int, c: float):
        super().__init__()
        self.vocab, self.c = vocab, c

    def forward(self, input_ids, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(-1, input_ids[..., None], self.c)
        return type("Out", (), {"logits": logits})()


def _docs(arrays):
    docs = TokenDocs([], None)
    docs.arrays = [np.asarray(a, dtype=np.int32) for a in arrays]
    return docs


def test_token_nll_and_buckets_by_hand():
    V, c = 7, 2.0
    same, other = -math.log(math.exp(c) / (math.exp(c) + V - 1)), -math.log(1 / (math.exp(c) + V - 1))
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 3, 600)  # small alphabet: many repeats
    docs = _docs([doc])
    rows, used = contiguous_records(RepeatLM(V, c), docs, 256, 64, 3, 0, torch.device("cpu"), False, 512)
    assert used == 3
    from infoscale.data import make_windows

    wins = make_windows(docs, 256, "contiguous", 3, 64, None, 0)
    hand = [[same if w[t] == w[t - 1] else other for t in range(1, 256)] for w in wins]  # a plain loop
    got = {r[0]: r for r in rows}
    assert [r[0] for r in rows] == ["nll", "nll[0,64)", "nll[64,128)", "nll[128,256)"]
    assert got["nll"][1] == pytest.approx(np.mean(hand), abs=1e-5)
    for lo, hi in [(0, 64), (64, 128), (128, 256)]:
        part = [h[max(lo, 1) - 1:hi - 1] for h in hand]  # targets t in [lo, hi); t = 0 has none
        assert got[f"nll[{lo},{hi})"][1] == pytest.approx(np.mean(part), abs=1e-5)
        fields = got[f"nll[{lo},{hi})"][4]  # per-window fields of the record
        assert fields["window_means"] == pytest.approx([np.mean(p) for p in part], abs=1e-5)
        assert fields["window_counts"] == [len(p) for p in part] and "window_hits" not in fields
        assert got[f"nll[{lo},{hi})"][5]["bucket"] == [lo, hi]
    assert clm.bucket_edges(300, 64) == [(0, 64), (64, 128), (128, 256), (256, 300)]
    assert clm.bucket_edges(64, 64) == [(0, 64)]


class CopyLM(torch.nn.Module):
    """Predicts the token m positions back (m fixed), else token 0: accuracy 1 exactly on the copied tokens."""

    def __init__(self, vocab: int, m: int):
        super().__init__()
        self.vocab, self.m = vocab, m

    def forward(self, input_ids, **kw):
        B, n = input_ids.shape
        logits = torch.zeros(B, n, self.vocab)
        # the target of position t is x[t+1]; its copy sits at t+1−m
        src = torch.arange(n) + 1 - self.m
        ok = src >= 0
        logits[:, ok, :] = logits[:, ok, :].scatter(-1, input_ids[:, src[ok]][..., None], 10.0)
        logits[:, ~ok, 0] = 10.0
        return type("Out", (), {"logits": logits})()


def test_copy_metric_by_hand():
    L, n = 16, 100
    doc = np.arange(5, 5 + 400) % 50 + 1  # no token repeats within 50 tokens
    docs = _docs([doc])
    wins, spans = clm.copy_windows(docs, n, 4, L, 0)
    assert all(L < m <= 2 * L for m in spans)
    for w, m in zip(wins, spans, strict=True):
        assert np.array_equal(w[m:2 * m], w[:m])  # tiled
    m = spans[0]
    rows, _ = copy_records(CopyLM(51, m), docs, n, L, 4, 0, torch.device("cpu"), False, 10_000)
    got = {r[0]: r for r in rows}
    # a plain loop: window w is right at target t >= m_w iff its own period equals m (the model's lag)
    hand = [[1.0 if mw == m else 0.0 for t in range(mw, n)] for mw in spans]
    assert got["copy_accuracy"][1] == pytest.approx(np.concatenate(hand).mean())
    assert got["copy_accuracy"][4]["window_means"] == pytest.approx([np.mean(h) for h in hand])
    assert got["copy_accuracy"][4]["window_hits"] == [int(sum(h)) for h in hand]
    assert got["copy_accuracy"][4]["window_counts"] == [n - mw for mw in spans]  # targets t = m … n − 1
    assert got["copy_nll"][4]["window_means"][0] == pytest.approx(math.log1p(50 * math.exp(-10)), rel=1e-3)
    assert got["copy_accuracy"][5]["spans"] == spans
    with pytest.raises(Exception, match="n > 3L/2"):
        clm.copy_windows(docs, 20, 1, L, 0)


def test_cluster_mean_ci_by_hand():
    mean, lo, hi = clm.cluster_mean_ci([np.array([1.0, 2.0]), np.array([3.0, 5.0, 7.0])])
    # ȳ = 18/5; S − ȳN = (3 − 7.2, 15 − 10.8) = (−4.2, 4.2); se = sqrt(2 · 35.28) / 5 = 1.68
    assert mean == pytest.approx(3.6)
    assert (hi - lo) / 2 == pytest.approx(1.96 * 1.68)


@pytest.mark.e2e
def test_passkey_prompt_layout(llama_run):
    pk = clm.Passkey(load_tokenizer(llama_run))
    rng = np.random.default_rng(1)
    for n, depth in [(pk.min_length(), 0.5), (200, 0.0), (200, 1.0), (333, 0.3)]:
        p, a = clm.passkey_prompt(pk, n, rng, depth)
        assert len(p) == n and len(a) == clm.DIGITS
        key_at = [i for i in range(n - len(a) + 1) if np.array_equal(p[i:i + len(a)], a)]
        assert len(key_at) >= 2  # "The pass key is K. Remember it. K is the pass key."
        fill = n - pk.min_length()
        assert key_at[0] == round(depth * fill) + len(pk.pre)
        assert np.array_equal(p[-len(pk.question):], pk.question)


# ---------------------------------------------------------------------------------------------
# cached decoding == full forward, through infoscale.hf on the trained tiny model
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["softmax", "infoscale", "rerope+infoscale", "streamingllm", "pi(factor=4.0)"])
def test_cached_greedy_equals_full_forward(llama_run, method):
    model = _model(llama_run)
    ihf.apply(model, method)  # L from max_position_embeddings = 96
    pk = clm.Passkey(load_tokenizer(llama_run))
    prompt, _ = clm.passkey_prompt(pk, 250, np.random.default_rng(0), 0.5)
    gen = clm.passkey_generate(model, [prompt], device=torch.device("cpu"), bf16=False, new_tokens=6)[0]
    ids = torch.from_numpy(prompt)[None]
    with torch.no_grad():  # a plain loop of full forwards, no cache
        for _ in range(6):
            nxt = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
        full = model(ids, use_cache=False).logits[0]
        # the cached logits of the last step equal the full forward's
        out = model(ids[:, :-1], use_cache=True)
        cache = out["cache" if "cache" in out else "past_key_values"]
        step = model(ids[:, -1:], **{ihf.cache_kwarg(model): cache}, use_cache=True).logits[0, -1]
    assert gen.tolist() == ids[0, 250:].tolist()
    assert (step - full[-1]).abs().max() < 1e-4
    ihf.remove(model)


# ---------------------------------------------------------------------------------------------
# the sweep and the reproduction
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_eval_records_of_a_causal_run(llama_run, tmp_path):
    out = tmp_path / "r.jsonl"
    res = run_cli("eval", "--models", str(llama_run), "--methods", "softmax", "rerope", "pose", "--lengths", "96",
                  "300", "--windows", "2", "--predictions", "64", "--passkey-trials", "3", "--out", str(out),
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "skip pose" in res.stderr  # a softmax-trained model refuses the train-time method
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    metrics = {(r["method"], r["setting"], r["length"], r["metric"]) for r in recs}
    assert ("rerope", "contiguous", 300, "nll[192,300)") in metrics
    assert ("softmax", "repeated", 300, "copy_accuracy") in metrics
    assert ("softmax", "repeated", 96, "copy_nll") not in metrics  # no span longer than L fits in n = L
    assert ("rerope", "passkey", 96, "passkey_accuracy") in metrics
    for r in recs:
        c = r["window_counts"]
        assert len(c) == len(r["window_means"]) == r["windows_used"] and sum(c) == r["n_predictions"]
        assert sum(m * k for m, k in zip(r["window_means"], c, strict=True)) / sum(c) == pytest.approx(r["value"])
        if r["metric"].endswith(("accuracy", "exact")):
            assert sum(r["window_hits"]) / sum(c) == pytest.approx(r["value"])
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
        assert r["train"]["arch"] == "llama"
    keys = {(r["key"], r["metric"]) for r in recs}
    assert len(keys) == len(recs)  # one record per (cell, metric)
    by = {(r["method"], r["setting"], r["length"], r["metric"]): r for r in recs}
    for metric, setting in [("nll", "contiguous"), ("nll[96,192)", "contiguous"), ("copy_accuracy", "repeated"),
                            ("passkey_exact", "passkey")]:  # two methods' records pair window by window
        a, b = by["softmax", setting, 300, metric], by["rerope", setting, 300, metric]
        assert a["window_counts"] == b["window_counts"] and len(a["window_counts"]) >= 2
    from infoscale.report import write_report

    text = write_report(recs, tmp_path / "report").read_text()
    for metric in ("nll", "copy_nll", "copy_accuracy", "passkey_accuracy", "passkey_exact"):
        table = text.split(f"Δ {metric}\n\n")[1].split("\n\n")[0]  # the table under the heading
        row = next(line for line in table.splitlines() if line.startswith("| `rerope` − `softmax`"))
        assert row.count("±") >= 1, row  # a paired CI at every length with several windows
        assert "| *best* (vs runner-up) |" in table
    assert "No paired Δ" not in text
    assert "| *best* (Δ vs runner-up, 95% CI) |" in text  # the NLL-by-position table's best row
    again = run_cli("eval", "--models", str(llama_run), "--methods", "softmax", "--lengths", "96", "--windows", "2",
                    "--predictions", "64", "--passkey-trials", "3", "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "0 new cells" in again.stdout


@pytest.mark.e2e
def test_analyze_a_causal_run(llama_run, tmp_path):
    """`infoscale analyze --model RUN` on a Llama run: finite entropy and dilution records for every layer, method
    and length, in the report with its plots."""
    out = tmp_path / "an"
    res = run_cli("analyze", "--model", str(llama_run), "--no-synthetic", "--methods", "softmax", "logn",
                  "rerope+infoscale", "window", "--lengths", "96", "300", "--windows", "2", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(x) for x in (out / "analysis.jsonl").read_text().splitlines()]
    methods, layers = ["softmax", "logn", "rerope+infoscale", "window"], [0, 1]
    for kind, keys in (("entropy", ("H", "H_norm")), ("dilution", ("near_share",))):
        got = {(r["method"], r["length"], r["layer"]): r for r in recs if r["kind"] == kind}
        assert set(got) == {(m, n, li) for m in methods for n in (96, 300) for li in layers}
        for r in got.values():
            assert r["source"] == "run" and r["train_len"] == 96
            assert all(math.isfinite(r[k]) for k in keys)
            tol = 1e-6  # row_sums runs in float32
            assert (0 < r["H_norm"] <= 1 + tol and r["H"] > 0) if kind == "entropy" else 0 < r["near_share"] <= 1 + tol
    near = {(r["method"], r["length"]): r["near_share"] for r in recs if r["kind"] == "dilution" and r["layer"] == 0}
    assert near["window", 300] == pytest.approx(1.0)  # a window of L/2 attends near keys only
    assert near["softmax", 300] < near["softmax", 96]  # full attention spreads beyond L/2 as n grows
    report = (out / "analysis" / "report.md").read_text()
    assert "### Attention of run: H / ln l and near share" in report
    assert (out / "analysis" / "entropy_run.png").exists() and (out / "analysis" / "dilution_run.png").exists()


def test_clm_presets_are_valid_training_configs():
    """Every causal preset's schedule and shares pass TrainConfig's checks (passkey + copy < 1, llama only)."""
    from infoscale.reproduce import CLM_PRESETS
    from infoscale.train import TrainConfig

    for p in CLM_PRESETS.values():
        cfg = TrainConfig(out="x", arch="llama", preset=p.model_preset, steps=p.steps, batch_size=p.batch_size,
                          passkey_share=p.passkey_share, copy_share=p.copy_share)
        assert 0 <= cfg.copy_share < 1 and cfg.passkey_share + cfg.copy_share < 1
    assert CLM_PRESETS["clm-quick"].copy_share > 0 and CLM_PRESETS["clm-smoke"].copy_share > 0


@pytest.mark.e2e
def test_clm_smoke_reproduction(tmp_path):
    res = run_cli("reproduce", "--preset", "clm-smoke", "--runs", str(tmp_path / "runs"), "--results",
                  str(tmp_path / "results"), "--report", str(tmp_path / "report"), "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    report = (tmp_path / "report" / "clm-smoke" / "report.md").read_text()
    assert "NLL by position" in report and "passkey_accuracy" in report and "copy_accuracy" in report
    assert (tmp_path / "report" / "clm-smoke" / "nll_by_position.png").exists()
    recs = [json.loads(x) for x in (tmp_path / "results" / "clm-smoke.jsonl").read_text().splitlines()]
    assert {r["model_name"] for r in recs} == {"softmax", "pose"}
    assert all(np.isfinite(r["value"]) for r in recs)
    assert all(len(r["window_counts"]) == len(r["window_means"]) == r["windows_used"] for r in recs)
    assert "#### softmax: contiguous, teacher_forced protocol, Δ nll" in report
    assert "| `infoscale` − `softmax` |" in report and "No paired Δ" not in report
    an = [json.loads(x) for x in (tmp_path / "results" / "clm-smoke-analysis.jsonl").read_text().splitlines()]
    assert {(r["source"], r["kind"]) for r in an} == {(m, k) for m in ("softmax", "pose") for k in ("entropy",
                                                                                                      "dilution")}
    assert {r["layer"] for r in an} == {0, 1} and {r["length"] for r in an} == {64, 128, 512}
    assert "### Attention of softmax: H / ln l and near share" in report
    assert (tmp_path / "report" / "clm-smoke" / "entropy_softmax.png").exists()
    # rerunning resumes: nothing is trained, evaluated or analysed again
    again = run_cli("reproduce", "--preset", "clm-smoke", "--runs", str(tmp_path / "runs"), "--results",
                    str(tmp_path / "results"), "--report", str(tmp_path / "report"), "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "== training" not in again.stdout and "== analysing" not in again.stdout


def test_a_batch_holds_fewer_windows_where_the_logits_would_not_fit(monkeypatch):
    """--tokens-per-batch is the most a forward batch holds: a model with a large vocabulary (Gemma 3: 262k) gets
    fewer copies of a window per batch, halved until it fits, and a length where one window cannot fit is refused."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    import infoscale.runtime as runtime
    from infoscale.errors import DataError
    from infoscale.evaluate_clm import _check_causal_budget, causal_cost

    cfg_model = LlamaConfig(vocab_size=262144, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    run = SimpleNamespace(model=LlamaForCausalLM(cfg_model), name="big-vocab")
    cfg = SimpleNamespace(lengths=[512, 256], tokens_per_batch=16384, methods=["softmax"], windows=1,
                          predictions=1)
    free = causal_cost(run.model, 512, 4 * 512)[0] + 1  # four windows of 512 fit, eight do not
    monkeypatch.setattr(runtime, "available_memory", lambda device: free)
    logs = []
    batch = _check_causal_budget(run, cfg, logs.append)
    assert batch[512] == 4 * 512 and batch[256] == 8 * 256  # 64 and 32 windows halved to what fits
    assert any("holds 4 window(s)" in line for line in logs)
    monkeypatch.setattr(runtime, "available_memory", lambda device: causal_cost(run.model, 512, 512)[0] - 1)
    with pytest.raises(DataError, match="length 512 needs about .* per forward batch \\(one window\\)"):
        _check_causal_budget(run, cfg, logs.append)


def test_nll_with_the_head_applied_by_chunks_equals_the_whole_logits(monkeypatch):
    """token_nll applies the output head a chunk of positions at a time (the logits of a long window are the largest
    tensor of the forward): the same NLL and hits as the model's whole logits; a model that changes its logits after
    the head (Gemma 2's final soft-capping) is detected and scored from its whole logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    from infoscale.evaluate_clm import causal_cost

    torch.manual_seed(0)
    small = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=16)
    llama = LlamaForCausalLM(LlamaConfig(**small)).eval()
    gemma = Gemma2ForCausalLM(Gemma2Config(**small, head_dim=8, final_logit_softcapping=0.05)).eval()
    wins = [np.random.default_rng(i).integers(0, 50, 40) for i in range(3)]

    def whole(model):
        with torch.no_grad():
            x = torch.from_numpy(np.stack(wins)).long()
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none"), logits.argmax(-1) == x[:, 1:]

    monkeypatch.setattr(clm, "LOGIT_ROWS", 7)  # 39 targets: 6 chunks, the last one short
    calls = []
    real = clm._nll_by_chunks
    monkeypatch.setattr(clm, "_nll_by_chunks", lambda *a: calls.append(r := real(*a)) or r)
    for model, chunked in ((llama, True), (gemma, False)):
        calls.clear()
        nll, hits = clm.token_nll(model, wins, device=torch.device("cpu"), bf16=False)
        ce, ok = whole(model)
        assert np.allclose(np.stack(nll), ce.numpy(), atol=1e-5) and (np.stack(hits) == ok.numpy()).all()
        assert (calls[0] is not None) == chunked  # Gemma 2's head output is soft-capped after the head
    # the memory estimate counts the logits of LOGIT_ROWS positions where the head splits off, of all n where not
    saved = causal_cost(gemma, 32768, 32768)[0] - causal_cost(llama, 32768, 32768)[0]
    assert saved == pytest.approx(1.2 * 4 * 3 * 50 * (32768 - 7), rel=1e-6)
