"""``infoscale convert``: checkpoints in the GAU-alpha-pytorch layout (github.com/JunnYu/GAU-alpha-pytorch,
and the CosScale / noCosScale checkpoints of arXiv 2501.08570) against a plain re-implementation of
that port's forward pass, written out below."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from infoscale import DataError, MethodError
from infoscale import convert as conv
from infoscale.data import SPECIALS
from infoscale.models.gau import GAUConfig, GAUForMaskedLM
from infoscale.rundir import load_run

H, E, S, LAYERS = 32, 64, 16, 2
CHARS = list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你")
# BERT layout as in the port's vocab.txt: [PAD], [unusedN]…, then [UNK] [CLS] [SEP] [MASK], then tokens
VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(1, 10)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CHARS
         + ["a", "b", "##a", "##b", "##的"])
V = len(VOCAB)
WORD = "gau_alpha.embeddings.word_embeddings.weight"
DECODER = "cls.predictions.decoder.weight"

# the field set of the port's chinese_GAU-alpha-char_L-24_H-768/config.json, at a tiny size
PORT_CONFIG = {
    "architectures": ["GAUAlphaForMaskedLM"], "attention_key_size": S, "attention_probs_dropout_prob": 0.1,
    "attention_scale": True, "classifier_dropout": 0.1, "embedding_size": H, "gradient_checkpointing": False,
    "hidden_act": "swish", "hidden_dropout_prob": 0.1, "hidden_size": H, "initializer_range": 0.02,
    "intermediate_size": E, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "gau_alpha",
    "normalization": "softmax_plus", "num_hidden_layers": LAYERS, "pad_token_id": 0, "torch_dtype": "float32",
    "transformers_version": "4.17.0", "type_vocab_size": 2, "use_bias": False, "vocab_size": V,
}
# what the paper's training script adds (model/train.py: config.norm_method, config.my_info_dict)
COSSCALE = {"normalization": "softmax", "max_position_embeddings": 64, "norm_method": "CosScale", "use_cache": False,
            "my_info_dict": {"task": "train", "dataset": "WanJuan", "train_len": 64,
                             "train_norm_method": {"name": "CosScale", "CosScale_value": 128},
                             "train_normalization": {"name": "softmax"}}}
NO_COSSCALE = {"normalization": "softmax", "max_position_embeddings": 64, "norm_method": "noCosScale",
               "my_info_dict": {"task": "train", "dataset": "WanJuan", "train_len": 64,
                                "train_norm_method": {"name": "noCosScale"},
                                "train_normalization": {"name": "softmax"}}}
VARIANTS = {"softmax_plus": {}, "softmax": NO_COSSCALE, "cosscale": COSSCALE}


def port_state_dict(seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    """Random weights with the port's names and shapes (nn.Linear weights are (out, in); ScaleOffset
    keeps γ as ``.weight``; the decoder is a separate tensor equal to the word embeddings)."""
    g = torch.Generator().manual_seed(seed)
    sd = {WORD: torch.randn(V, H, generator=g) * 0.5,
          "gau_alpha.embeddings.token_type_embeddings.weight": torch.randn(2, H, generator=g) * 0.5}
    for i in range(layers):
        p = f"gau_alpha.encoder.layer.{i}.gau."
        sd[p + "i_dense.weight"] = torch.randn(2 * E + S, H, generator=g) * 1.5 / math.sqrt(H)
        sd[p + "o_dense.weight"] = torch.randn(H, E, generator=g) / math.sqrt(E)
        sd[p + "q_scaleoffset.weight"] = 1 + 0.5 * torch.randn(S, generator=g)
        sd[p + "k_scaleoffset.weight"] = 1 + 0.5 * torch.randn(S, generator=g)
    sd[DECODER] = sd[WORD].clone()
    return sd


def write_checkpoint(folder: Path, cfg: dict, sd: dict, vocab=VOCAB, fmt: str = "bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    if fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:  # safetensors cannot hold the shared decoder; transformers drops tied weights when saving
        save_file({k: v.contiguous() for k, v in sd.items() if k != DECODER}, str(folder / "model.safetensors"))
    return folder


def port_forward(sd: dict, cfg: dict, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The port's GAUAlphaForMaskedLM forward in eval mode, in float64 (dropout is the identity):

    embeddings: E_tok[ids] + E_seg[0] → Norm (then Dropout); Norm(y) = y / sqrt(mean(y²) + eps);
    per layer: swish(x W_iᵀ) → [u | v | z]; q = z ⊙ γ_q, k = z ⊙ γ_k (the paper's CosScale: q, k over
    their norms + 1e-9, q × s·sqrt(d)); RoPE from a sin/cos table on adjacent pairs, written as
    [rotated evens ; rotated odds]; a = q kᵀ / sqrt(d); masked keys → −1e12; softmax_plus multiplies a
    by log(n)/log(512) with n = number of unmasked keys; x = Norm(x + (u ⊙ A v) W_oᵀ);
    logits = x Wᵀ with W the decoder (tied to E_tok). Without a mask the port masks ids == pad.
    """
    f = {k: v.double() for k, v in sd.items()}
    e, s, eps = cfg["intermediate_size"], cfg["attention_key_size"], cfg["layer_norm_eps"]
    if mask is None:
        mask = ids != cfg["pad_token_id"]
    mask = mask.double()[:, None, :]  # (B, 1, n): a key mask, the same for every query row

    def norm(y):
        return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)

    n = ids.shape[1]
    angle = torch.arange(n, dtype=torch.float64)[:, None] * 10000.0 ** (-2 * torch.arange(s // 2).double() / s)
    sin, cos = angle.sin(), angle.cos()

    def rope(t):
        t1, t2 = t[..., 0::2], t[..., 1::2]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    info = cfg.get("my_info_dict") or {}
    cos_s = info["train_norm_method"]["CosScale_value"] if cfg.get("norm_method") == "CosScale" else None
    x = norm(f[WORD][ids] + f["gau_alpha.embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)])
    for i in range(cfg["num_hidden_layers"]):
        p = f"gau_alpha.encoder.layer.{i}.gau."
        u, v, z = F.silu(x @ f[p + "i_dense.weight"].T).split([e, e, s], dim=-1)
        q, k = z * f[p + "q_scaleoffset.weight"], z * f[p + "k_scaleoffset.weight"]
        if cos_s is not None:
            q = q / (q.norm(dim=-1, keepdim=True) + 1e-9) * cos_s * s**0.5
            k = k / (k.norm(dim=-1, keepdim=True) + 1e-9)
        a = rope(q) @ rope(k).transpose(-1, -2) / s**0.5
        a = a.masked_fill(mask == 0, -1e12)
        if cfg.get("normalization", "softmax_plus") == "softmax_plus":
            a = a * torch.log(mask.sum(-1, keepdim=True)) / math.log(512)
        x = norm(x + (u * (torch.softmax(a, dim=-1) @ v)) @ f[p + "o_dense.weight"].T)
    return x @ f.get(DECODER, f[WORD]).T


def our_logits(model, perm, ids, mask=None) -> torch.Tensor:
    """Our model on the same text: source ids relabelled to ours; logits back in the source order."""
    new_id = torch.empty(len(perm), dtype=torch.long)
    new_id[torch.tensor(perm)] = torch.arange(len(perm))
    with torch.no_grad():
        out = model(new_id[ids], attention_mask=mask).logits.double()
    back = torch.empty_like(out)
    back[..., torch.tensor(perm)] = out
    return back


def sample_ids(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(14, V, (batch, n), generator=g)
    ids[:, 0] = VOCAB.index("[CLS]")
    ids[:, -1] = VOCAB.index("[SEP]")
    ids[:, n // 2] = VOCAB.index("[MASK]")
    ids[:, 3] = VOCAB.index("[UNK]")
    return ids


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_the_port(tmp_path, variant, fmt):
    cfg = {**PORT_CONFIG, **VARIANTS[variant]}
    sd = port_state_dict()
    src = write_checkpoint(tmp_path / "src", cfg, sd, fmt=fmt)
    c = conv.convert(src)
    expected = {"softmax_plus": "softmax_plus(base=512)", "softmax": "softmax", "cosscale": "cosscale(s=128.0)"}
    assert c.model.config.attention == expected[variant]
    assert c.model.config.train_len == (512 if variant == "softmax_plus" else 64)

    ids = sample_ids(2, 40)  # no padding: the port's mask is all ones, ours is None
    ref = port_forward(sd, cfg, ids)
    got = our_logits(c.model, c.permutation, ids)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()

    ids = sample_ids(3, 40, seed=2)  # padding: rows of 40, 31 and 6 real tokens
    mask = torch.ones_like(ids)
    for row, length in ((1, 31), (2, 6)):
        ids[row, length:] = 0
        mask[row, length:] = 0
    ref = port_forward(sd, cfg, ids, mask)
    got = our_logits(c.model, c.permutation, ids, mask)
    assert (got - ref).abs().max() < 1e-4 * ref.abs().max()

    # the comparison can tell the attention variants apart: the test is not blind to the mapping
    other = {**cfg, "normalization": "softmax" if cfg["normalization"] == "softmax_plus" else "softmax_plus"}
    assert (port_forward(sd, other, ids, mask) - ref).abs().max() > 1e-2 * ref.abs().max()


def test_cosscale_with_softmax_plus_and_train_len_override(tmp_path):
    cfg = {**PORT_CONFIG, **COSSCALE, "normalization": "softmax_plus",
           "my_info_dict": {**COSSCALE["my_info_dict"], "train_normalization": {"name": "softmax_plus"}}}
    sd = port_state_dict(seed=3)
    c = conv.convert(write_checkpoint(tmp_path / "src", cfg, sd), train_len=128)
    assert c.model.config.attention == "cosscale(s=128.0)+softmax_plus(base=512)"
    assert c.model.config.train_len == 128 and c.source["train_len_from"] == "--train-len"
    ids = sample_ids(2, 24)
    ref = port_forward(sd, cfg, ids)
    assert (our_logits(c.model, c.permutation, ids) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_bare_encoder_names_and_layer_subset(tmp_path):
    """A bare GAUAlphaModel state dict (no ``gau_alpha.`` prefix) converts; ``layers`` keeps the first N,
    as the paper kept 6 of GAU-α's 24."""
    sd = port_state_dict(seed=4)
    bare = {k.removeprefix("gau_alpha."): v for k, v in sd.items() if k != DECODER}
    c = conv.convert(write_checkpoint(tmp_path / "src", PORT_CONFIG, bare), layers=1)
    assert c.model.config.num_hidden_layers == 1 and c.source["dropped_layers"] == [1]
    ids = sample_ids(2, 20)
    ref = port_forward(sd, {**PORT_CONFIG, "num_hidden_layers": 1}, ids)
    assert (our_logits(c.model, c.permutation, ids) - ref).abs().max() < 1e-4 * ref.abs().max()


def test_vocab_from_elsewhere(tmp_path):
    """A fine-tuned checkpoint saved without its tokenizer takes the base model's vocab.txt (--vocab)."""
    sd = port_state_dict(seed=6)
    src = write_checkpoint(tmp_path / "src", PORT_CONFIG, sd)
    (src / "vocab.txt").rename(tmp_path / "base-vocab.txt")
    with pytest.raises(DataError, match="--vocab"):
        conv.convert(src)
    c = conv.convert(src, vocab=tmp_path / "base-vocab.txt")
    ids = sample_ids(1, 16)
    ref = port_forward(sd, PORT_CONFIG, ids)
    assert (our_logits(c.model, c.permutation, ids) - ref).abs().max() < 1e-4 * ref.abs().max()
    with pytest.raises(DataError, match="does not exist"):
        conv.convert(src, vocab=tmp_path / "nope.txt")


def test_vocab_permutation():
    perm = conv.vocab_permutation(VOCAB)
    new = [VOCAB[i] for i in perm]
    assert new[:5] == SPECIALS
    moved = {i for i in range(V) if perm[i] != i}
    assert moved == {1, 2, 3, 4, 10, 11, 12, 13}  # only the specials and the tokens they displaced
    assert sorted(perm) == list(range(V))
    assert conv.vocab_permutation(SPECIALS + CHARS) == list(range(5 + len(CHARS)))
    # specials in any order, including one already in place
    odd = ["[PAD]", "x", "[MASK]", "[CLS]", "y", "[SEP]", "[UNK]"]
    assert [odd[i] for i in conv.vocab_permutation(odd)][:5] == SPECIALS


def test_cli_writes_a_loadable_run_directory(tmp_path):
    cfg = {**PORT_CONFIG, **COSSCALE}
    sd = port_state_dict(seed=5)
    src = write_checkpoint(tmp_path / "src", cfg, sd)
    parser = argparse.ArgumentParser()
    conv.add_arguments(parser)
    out = tmp_path / "run"
    assert conv.run(parser.parse_args([str(src), "--out", str(out)])) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.txt",
                                               "tokenizer_config.json", "train_config.json"}
    run = load_run(out)
    assert run.train_len == 64 and run.model.config.attention == "cosscale(s=128.0)"
    assert run.tokenizer.vocab[:5] == SPECIALS and run.tokenizer.vocab[10:14] == [f"[unused{i}]" for i in range(1, 5)]
    # CJK text: one token a character, the same tokens the port's BertTokenizer gives (relabelled)
    text = "我们的国人"
    perm = conv.vocab_permutation(VOCAB)
    assert [perm[i] for i in run.tokenizer.encode(text)] == [VOCAB.index(ch) for ch in text]
    ids = sample_ids(1, 30)
    ref = port_forward(sd, cfg, ids)
    assert (our_logits(run.model, perm, ids) - ref).abs().max() < 1e-4 * ref.abs().max()
    tcfg = run.train_config
    assert tcfg["converted"] and tcfg["corpus"] is None and tcfg["weights_file"] == "pytorch_model.bin"
    assert tcfg["decoder"].startswith("equal")
    assert tcfg["vocab_remap"] == {"10": 1, "11": 2, "12": 3, "13": 4, "1": 10, "2": 11, "3": 12, "4": 13}
    assert tcfg["source_config"]["my_info_dict"]["train_norm_method"]["CosScale_value"] == 128
    # no split.json: `infoscale eval` needs held-out text named explicitly (see the report)
    with pytest.raises(DataError, match="split.json"):
        run.heldout_docs()
    # an existing non-empty --out is never overwritten
    with pytest.raises(DataError, match="already exists"):
        conv.run(parser.parse_args([str(src), "--out", str(out)]))


def test_training_temperature_is_inherited_at_evaluation():
    """GAUConfig(attention="softmax_plus") evaluates with softmax_plus: a length temperature used in
    training is part of the function the model computes. So the converted GAU-α (pretrained with
    softmax_plus) cannot add InfoScale (two temperatures); the paper's checkpoints (softmax, CosScale) can."""
    model = GAUForMaskedLM(GAUConfig(attention="softmax_plus", vocab_size=20, hidden_size=16, intermediate_size=32,
                                     attention_key_size=8, num_hidden_layers=1, train_len=512)).eval()
    assert str(model.resolve_method()) == "softmax_plus(base=512)"
    assert str(model.resolve_method("softmax")) == "softmax_plus(base=512)"
    with pytest.raises(MethodError, match="softmax_plus"):
        model.resolve_method("infoscale")
    cos = GAUForMaskedLM(GAUConfig(attention="cosscale(s=128)", vocab_size=20, hidden_size=16, intermediate_size=32,
                                   attention_key_size=8, num_hidden_layers=1, train_len=64)).eval()
    assert str(cos.resolve_method()) == "cosscale(s=128.0)"
    assert str(cos.resolve_method("infoscale")) == "cosscale(s=128.0)+infoscale(clamp=True)"


def test_bidirectional_gau_refuses_causal_only_methods():
    """DCA assumes every key precedes its query: GAU (bidirectional) refuses it when resolving, which evaluation reports
    as a method that does not apply; SelfExtend, symmetric in |i − j|, runs."""
    model = GAUForMaskedLM(GAUConfig(vocab_size=20, hidden_size=16, intermediate_size=32, attention_key_size=8,
                                     num_hidden_layers=1, train_len=8)).eval()
    with pytest.raises(MethodError, match="dca is defined for causal attention only"):
        model.resolve_method("dca+logn")
    ids = torch.randint(3, 20, (1, 40))
    with torch.no_grad():
        assert torch.isfinite(model(ids, method="self_extend+infoscale").logits).all()


class _OpensAFile:
    """Unpickling this calls open(path, "w"), i.e. creates a file: code run by a pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("container", ["zip", "raw-pickle"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, container):
    src = write_checkpoint(tmp_path / "src", PORT_CONFIG, port_state_dict())
    marker = tmp_path / "pwned"
    bad = {**port_state_dict(), "extra": _OpensAFile(marker)}
    if container == "zip":
        torch.save(bad, src / "pytorch_model.bin")
    else:
        (src / "pytorch_model.bin").write_bytes(pickle.dumps(bad, protocol=2))
    # the crafted file really runs code when unpickled without weights_only (a control copy, other marker)
    control, control_marker = tmp_path / "control.bin", tmp_path / "control-marker"
    bad["extra"] = _OpensAFile(control_marker)
    if container == "zip":
        torch.save(bad, control)
        torch.load(control, weights_only=False)
    else:
        control.write_bytes(pickle.dumps(bad, protocol=2))
        pickle.loads(control.read_bytes())
    assert control_marker.exists()

    with pytest.raises(DataError, match="weights only"):
        conv.convert(src)
    assert not marker.exists()


def _edit_config(**fields):
    def edit(src: Path):
        cfg = json.loads((src / "config.json").read_text())
        for k, v in fields.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (src / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_weights(fn):
    def edit(src: Path):
        sd = torch.load(src / "pytorch_model.bin", weights_only=True)
        fn(sd)
        torch.save(sd, src / "pytorch_model.bin")
    return edit


def _edit_vocab(fn):
    def edit(src: Path):
        (src / "vocab.txt").write_text("\n".join(fn(list(VOCAB))) + "\n", encoding="utf-8")
    return edit


BAD = {
    "no config": (lambda s: (s / "config.json").unlink(), "no config.json"),
    "no vocab": (lambda s: (s / "vocab.txt").unlink(), "no vocab.txt"),
    "no weights": (lambda s: (s / "pytorch_model.bin").unlink(), "neither model.safetensors nor pytorch_model.bin"),
    "config not json": (lambda s: (s / "config.json").write_text("{oops"), "not valid JSON"),
    "other model type": (_edit_config(model_type="bert"), "not GAU-α"),
    "squared_relu": (_edit_config(normalization="squared_relu"), "normalization 'squared_relu' is not supported"),
    "eval-time config": (_edit_config(normalization="InfoScale"), "not supported"),
    "cosscale without s": (_edit_config(norm_method="CosScale"), "CosScale_value"),
    "unknown norm_method": (_edit_config(norm_method="norm"), "norm_method 'norm' is unknown"),
    "saved by evaluation": (_edit_config(my_info_dict={"task": "eval"}), "evaluation"),
    "biases": (_edit_config(use_bias=True), "use_bias"),
    "no attention scale": (_edit_config(attention_scale=False), "attention_scale"),
    "relu": (_edit_config(hidden_act="relu"), "hidden_act"),
    "shape mismatch": (_edit_config(intermediate_size=2 * E), "shape mismatch"),
    "more layers in config": (_edit_config(num_hidden_layers=3), "missing"),
    "bad int": (_edit_config(hidden_size="32"), "hidden_size must be a positive integer"),
    "unexpected key": (_edit_weights(lambda sd: sd.__setitem__("cls.predictions.bias", torch.zeros(V))),
                       "unexpected parameters"),
    "missing key": (_edit_weights(lambda sd: sd.pop("gau_alpha.encoder.layer.1.gau.o_dense.weight")), "missing"),
    "untied decoder": (_edit_weights(lambda sd: sd[DECODER].add_(1e-3)), "differs from the word embeddings"),
    "nan weight": (_edit_weights(lambda sd: (sd[WORD].__setitem__((5, 0), float("nan")),
                                            sd[DECODER].__setitem__((5, 0), float("nan")))), "not finite"),
    "not a state dict": (lambda s: torch.save([1, 2], s / "pytorch_model.bin"), "does not hold a state dict"),
    "truncated bin": (lambda s: (s / "pytorch_model.bin").write_bytes((s / "pytorch_model.bin").read_bytes()[:500]),
                      "weights only"),
    "garbage safetensors": (lambda s: (s / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                            "cannot read"),
    "sharded": (lambda s: ((s / "pytorch_model.bin").unlink(), (s / "pytorch_model.bin.index.json").write_text("{}")),
                "sharded"),
    "vocab size": (_edit_vocab(lambda v: v[:-1]), "tokens but config.json says vocab_size"),
    "vocab without [MASK]": (_edit_vocab(lambda v: [t if t != "[MASK]" else "[unused99]" for t in v]), r"no \[MASK\]"),
    "duplicate token": (_edit_vocab(lambda v: v[:-1] + ["的"]), "appears twice"),
    "pad not [PAD]": (_edit_config(pad_token_id=5), "pad_token_id"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_give_one_data_error(tmp_path, case):
    edit, message = BAD[case]
    src = write_checkpoint(tmp_path / "src", PORT_CONFIG, port_state_dict())
    edit(src)
    with pytest.raises(DataError, match=message):
        conv.convert(src)


@pytest.mark.parametrize("kwargs, message", [({"layers": 3}, "--layers"), ({"train_len": 1}, "train_len")])
def test_bad_options(tmp_path, kwargs, message):
    src = write_checkpoint(tmp_path / "src", PORT_CONFIG, port_state_dict())
    with pytest.raises(DataError, match=message):
        conv.convert(src, **kwargs)


def test_not_a_directory_and_our_own_run(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        conv.convert(tmp_path / "missing")
    src = write_checkpoint(tmp_path / "src", PORT_CONFIG, port_state_dict())
    out = conv.write_run(conv.convert(src), tmp_path / "run")
    shutil.copy(src / "pytorch_model.bin", out / "pytorch_model.bin")
    with pytest.raises(DataError, match="already an infoscale run"):
        conv.convert(out)


@pytest.mark.parametrize("fields, needle", [
    ({"num_hidden_layers": 100_000_000}, "describes a model of about"),
    ({"intermediate_size": 10**9}, "describes a model of about"),
    ({"attention_key_size": 10**9}, "describes a model of about"),
    ({"num_hidden_layers": 50_000}, "describes about"),  # fits in memory, but the file has 2 layers
])
def test_crafted_sizes_are_refused_before_building(tmp_path, capsys, monkeypatch, fields, needle):
    from infoscale.cli import main as cli

    monkeypatch.setattr("infoscale.runtime.available_memory", lambda device: 8 * 2**30)
    src = write_checkpoint(tmp_path / "src", PORT_CONFIG, port_state_dict())
    _edit_config(**fields)(src)
    out = tmp_path / "run"
    assert cli(["convert", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_fractional_train_len_is_refused_not_ignored(tmp_path):
    info = {**NO_COSSCALE["my_info_dict"], "train_len": 64.5}
    src = write_checkpoint(tmp_path / "src", {**PORT_CONFIG, **NO_COSSCALE, "my_info_dict": info}, port_state_dict())
    with pytest.raises(DataError, match=r"from my_info_dict.train_len\) must be an integer >= 2, got 64.5"):
        conv.convert(src)
    assert conv.convert(src, train_len=64).model.config.train_len == 64  # --train-len overrides it


def test_a_failed_conversion_leaves_nothing_and_can_be_rerun(tmp_path, capsys, monkeypatch):
    from infoscale.cli import main as cli

    info = {**NO_COSSCALE["my_info_dict"], "dataset": float("nan")}
    src = write_checkpoint(tmp_path / "src", {**PORT_CONFIG, **NO_COSSCALE, "my_info_dict": info}, port_state_dict())
    out = tmp_path / "run"
    assert cli(["convert", str(src), "--out", str(out)]) == 2
    assert "my_info_dict.dataset = nan" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".run*"))
    good = write_checkpoint(tmp_path / "good", PORT_CONFIG, port_state_dict())

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(GAUForMaskedLM, "save_pretrained", disk_full)
    assert cli(["convert", str(good), "--out", str(out)]) == 2
    capsys.readouterr()
    assert not out.exists() and not list(tmp_path.glob(".run*"))
    monkeypatch.undo()
    assert cli(["convert", str(good), "--out", str(out)]) == 0  # the rerun is not blocked
    assert load_run(out).model.config.num_hidden_layers == LAYERS
