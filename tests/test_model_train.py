"""GAU-α, the corpora, the tokenizer and training: real, small runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from infoscale import data
from infoscale.cli import main as cli
from infoscale.data import corpora
from infoscale.models.gau import GAUForMaskedLM, build_config

from .conftest import TINY, run_cli

# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GAUForMaskedLM(build_config("tiny", vocab_size=40, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, train_len=16))
    ids = torch.randint(5, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs, labels = ids.clone(), ids.clone()
    inputs[:, ::3] = data.MASK
    labels[:, 1::3] = -100
    labels[:, 2::3] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model(inputs, labels=labels)
    assert out.loss < 0.05
    assert out.logits.shape == (4, 16, 40)  # transformers' MaskedLMOutput: (B, n, vocab)
    sel = labels != -100
    assert bool((out.logits[sel].argmax(-1) == labels[sel]).all())


@pytest.mark.parametrize("attention", ["softmax", "cosscale(s=32)", "alibi(max_bias=4.0)", "pose"])
def test_save_load_identical_logits(tmp_path, attention):
    torch.manual_seed(0)
    model = GAUForMaskedLM(build_config("tiny", vocab_size=30, attention=attention, train_len=16)).eval()
    x = torch.randint(5, 30, (2, 50))
    before = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = GAUForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention == model.config.attention
    assert torch.equal(loaded(x).logits, before)
    # an evaluation method chosen at load time is merged with the training method
    info = GAUForMaskedLM.from_pretrained(tmp_path, eval_attention="infoscale").eval()
    method = str(info.resolve_method())
    assert "infoscale" in method
    if attention.startswith(("cosscale", "alibi")):  # the train-time part is kept
        assert method.startswith(attention.split("(")[0])
    if attention == "pose":  # PoSE only changes training positions
        assert method == "infoscale(clamp=True)"
    assert not torch.equal(info(x).logits, before)  # n = 50 > L = 16: InfoScale changes something


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = GAUForMaskedLM(build_config("tiny", vocab_size=30, train_len=16, eval_attention="infoscale")).eval()
    x = torch.randint(5, 30, (1, 20))
    alone = model(x).logits
    padded = torch.cat([x, torch.zeros(1, 7, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 20), torch.zeros(1, 7)], 1).bool()
    assert (model(padded, attention_mask=mask).logits[:, :20] - alone).abs().max() < 1e-5


@torch.no_grad()
def _self_attention_share(init: str) -> float:
    torch.manual_seed(0)
    cfg = build_config("tiny", vocab_size=30, attention="cosscale(s=128)", train_len=32, cosscale_init=init)
    model = GAUForMaskedLM(cfg).eval()
    x = torch.randint(5, 30, (4, 32))
    from infoscale import attention
    from infoscale.models.gau import attention_inputs

    q, k = attention_inputs(model, x)[0]
    _, w = attention(q, k, q, "cosscale(s=128)", train_len=32, return_weights=True)
    return float(w.diagonal(dim1=-2, dim2=-1).mean())


def test_cosscale_init_apart_breaks_self_attention_lock():
    """With GAU-α's init (γ_q = γ_k = 1) q_i = k_i, and at s = 128 every token attends to itself; the
    default init (random signs) removes that lock."""
    assert _self_attention_share("ones") > 0.99
    assert _self_attention_share("apart") < 0.5


def test_pose_positions():
    g = torch.Generator().manual_seed(0)
    from infoscale.attn.rope import pose_positions

    pos = pose_positions(g, 200, 64, 4096, chunks=2)
    assert pos.shape == (200, 64)
    assert bool((pos[:, 0] == 0).all())
    assert bool((pos.diff(dim=1) >= 1).all())
    assert int(pos.max()) <= 4095
    assert int(pos[:, -1].max()) > 3000  # skips reach far
    jumps = (pos.diff(dim=1) > 1).sum(1)
    assert int(jumps.max()) <= 1  # two chunks: at most one skip


# ---------------------------------------------------------------------------------------------
# tokenizer and corpora
# ---------------------------------------------------------------------------------------------


def test_tokenizer_matches_bert_tokenizer_fast(tmp_path):
    from transformers import BertTokenizerFast

    docs = corpora.shakespeare()[:2]
    zh = "话说天下大势，分久必合，合久必分。周末七国分争，并入于秦。"
    tok = data.CharTokenizer.train([d.text for d in docs] + [zh * 3], min_count=2)
    tok.save(tmp_path)
    hf = BertTokenizerFast.from_pretrained(tmp_path)
    text = docs[1].text[:5000] + "\n\n" + zh + " naïve café x\u200by ☃ " + "a" * 130
    ours = tok.encode(text)
    assert ours == hf(text, add_special_tokens=False)["input_ids"]
    assert data.UNK in ours  # the unseen snowman and the 130-letter word
    assert tok.decode(tok.encode("Enter ORLANDO, and Adam.")) == "Enter ORLANDO , and Adam ."
    assert data.CharTokenizer.load(tmp_path).vocab == tok.vocab


def test_shakespeare_markup_removed():
    docs = corpora.shakespeare()
    assert len(docs) == 38
    text = docs[0].text
    assert "**" not in text and "\n#" not in text and not text.startswith("#")
    assert "THESEUS" in text and "Enter THESEUS" in text


def test_spaces_corpus_gives_every_character_a_token():
    docs = data.load_corpus("shakespeare-spaces")
    plain = data.load_corpus("shakespeare")
    assert [d.name for d in docs] == [d.name for d in plain]
    text = docs[0].text[:2000]
    assert " " not in text and corpora.SPACE in text and corpora.NEWLINE in text
    tok = data.CharTokenizer.train([d.text for d in docs[:5]])
    ids = tok.encode(text)
    # one token per character (spaces and line breaks included), none unknown
    assert len(ids) == len(text) and 1 not in ids
    space_ids = {tok.ids[corpora.SPACE], tok.ids["##" + corpora.SPACE]}
    assert sum(i in space_ids for i in ids) == text.count(corpora.SPACE) > 200


def test_split_by_document_holds_out_long_documents():
    docs = corpora.shakespeare()
    split = corpora.split_documents(docs, seed=0, eval_docs=4)
    assert len(split["eval"]) == 4 and not set(split["eval"]) & set(split["train"])
    assert len(split["train"]) == 34
    assert corpora.split_documents(docs, seed=0) == split  # seeded
    assert corpora.split_documents(docs, seed=1)["eval"] != split["eval"]


def test_user_corpus_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one doc"}\n\n{"text": "two"}\n', encoding="utf-8")
    assert [d.text for d in corpora.user_corpus(tmp_path / "a.jsonl")] == ["one doc", "two"]
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.txt").write_text("x  \r\n\n\n\ny", encoding="utf-8")
    assert corpora.user_corpus(tmp_path / "f")[0].text == "x\n\ny"


# ---------------------------------------------------------------------------------------------
# bad input: one clear message, exit 2, nothing overwritten
# ---------------------------------------------------------------------------------------------


def test_bad_corpora(tmp_path, capsys):
    cases = {}
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    cases["empty.txt"] = "is empty"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases["latin1.txt"] = "is not UTF-8 (invalid byte at offset 3)"
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    cases["notext.jsonl"] = "notext.jsonl:2 has no string field 'text'"
    (tmp_path / "two").mkdir()  # a folder keeps one document per file: two are too few
    for i in range(2):
        (tmp_path / "two" / f"{i}.txt").write_text("a document " * 50, encoding="utf-8")
    cases["two"] = "too few to hold out 4"
    cases["missing.txt"] = "neither a known corpus"
    for name, msg in cases.items():
        code = cli(["train", "--out", str(tmp_path / f"run-{name}"), "--corpus", str(tmp_path / name), *TINY])
        err = capsys.readouterr().err
        assert code == 2, name
        assert msg in err and "Traceback" not in err, (name, err)
        assert err.count("\n") == 1


def test_existing_output_without_resume_is_refused(tmp_path, capsys, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), *TINY]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_train_only_methods_and_resume_mismatch(tmp_path, capsys, corpus):
    assert cli(["train", "--out", str(tmp_path / "r"), "--corpus", str(corpus), "--attention", "rerope",
                *TINY]) == 2
    assert "rerope is an evaluation method" in capsys.readouterr().err
    assert cli(["train", "--out", str(tmp_path / "r2"), "--corpus", str(corpus), "--steps", "2", *TINY]) == 0
    capsys.readouterr()
    assert cli(["train", "--out", str(tmp_path / "r2"), "--corpus", str(corpus), "--steps", "4", "--resume",
                "--lr", "1e-4", *TINY]) == 2
    assert "settings differ" in capsys.readouterr().err


def test_corrupt_checkpoint(tmp_path, capsys, corpus):
    out = tmp_path / "r"
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "2", *TINY]) == 0
    (out / "checkpoint.pt").write_bytes(b"\x00garbage")
    capsys.readouterr()
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "4", "--resume", *TINY]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is unreadable or not an infoscale checkpoint" in err
    assert (out / "checkpoint.pt").read_bytes() == b"\x00garbage"  # left for the user to inspect


# ---------------------------------------------------------------------------------------------
# resume and DDP
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, corpus):
    """SIGKILL right after the step-15 checkpoint (a real kill, at a fixed point), then --resume."""
    args = ["--corpus", str(corpus), "--steps", "40", "--save-every", "5", "--eval-every", "20", *TINY]
    ref = run_cli("train", "--out", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    killed = run_cli("train", "--out", str(out), *args, env={"INFOSCALE_TEST_KILL_AFTER_SAVE": "15"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 15
    res = run_cli("train", "--out", str(out), *args, "--resume")
    assert res.returncode == 0, res.stderr
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k
    # the metrics log continues rather than restarting, with no step logged twice
    ref_steps = [json.loads(x)["step"] for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps


@pytest.mark.e2e
def test_ddp_two_processes_equal_one(tmp_path, corpus):
    args = ["--corpus", str(corpus), "--steps", "3", "--dropout", "0", "--save-every", "3", "--warmup-steps", "1",
            *TINY]
    one = run_cli("train", "--out", str(tmp_path / "one"), *args)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "infoscale.cli", "train", "--out", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    torch.manual_seed(0)  # the run's init, to check that the steps moved the weights at all
    init = GAUForMaskedLM(build_config("tiny", vocab_size=a["gau_alpha.embeddings.word_embeddings.weight"].shape[0],
                                      train_len=32))
    init = init.state_dict()
    moved = 0.0
    for k in a:
        assert (a[k] - b[k]).abs().max() < 2e-5, k
        moved = max(moved, float((a[k] - init[k]).abs().max()))
    assert moved > 1e-3


@pytest.mark.e2e
def test_init_from_starts_from_another_runs_weights(tmp_path, tiny_run, corpus, capsys):
    """Pretrain long, fine-tune short: the new run starts from the other run's weights and tokenizer,
    with its own training length, attention and optimizer; the shape comes from that run."""
    out = tmp_path / "ft"
    res = run_cli("train", "--out", str(out), "--corpus", str(corpus), *TINY, "--init-from", str(tiny_run),
                  "--preset", "small", "--train-len", "16", "--attention", "cosscale(s=32)", "--steps", "1",
                  "--lr", "1e-9", "--warmup-steps", "0", "--eval-every", "1", "--save-every", "1")
    assert res.returncode == 0, res.stderr
    assert (out / "vocab.txt").read_text() == (tiny_run / "vocab.txt").read_text()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train_len"] == 16 and cfg["attention"] == "cosscale(s=32.0)" and cfg["hidden_size"] == 64
    a, b = load_file(tiny_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # one step at lr 1e-9
    assert cli(["train", "--out", str(tmp_path / "bad"), "--corpus", str(corpus), *TINY,
                "--init-from", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
