"""``infoscale convert``: a GAU-α checkpoint in the GAU-alpha-pytorch layout → an infoscale run directory.

Reads the layout of the PyTorch port of GAU-α (github.com/JunnYu/GAU-alpha-pytorch, e.g.
``junnyu/chinese_GAU-alpha-char_L-24_H-768``) and of the checkpoints fine-tuned from it for
"Information Entropy Invariance: Enhancing Length Extrapolation in Attention Mechanisms" (Li et al.
2025, arXiv 2501.08570; code github.com/HT-NEKO/Information-Entropy-Invariance, checkpoints
HT-NEKO/GAU-alpha_noCosScale and HT-NEKO/GAU-alpha_CosScale):

    config.json     GAUAlphaConfig fields (+ the paper code's ``norm_method`` and ``my_info_dict``)
    vocab.txt       BERT WordPiece vocabulary: [PAD]=0, [unused1..99], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103
    model.safetensors or pytorch_model.bin (read with ``torch.load(..., weights_only=True)`` only)

and writes a run directory ``infoscale eval`` can load (config.json + model.safetensors,
vocab.txt + tokenizer_config.json, train_config.json recording the source).

Parameter names (port → infoscale; everything else is refused):

    gau_alpha.embeddings.word_embeddings.weight            same (rows permuted, see below)
    gau_alpha.embeddings.token_type_embeddings.weight      same
    gau_alpha.encoder.layer.N.gau.i_dense.weight           same  ([u | v | z] = [e | e | s] rows)
    gau_alpha.encoder.layer.N.gau.o_dense.weight           same
    gau_alpha.encoder.layer.N.gau.q_scaleoffset.weight     gau_alpha.encoder.layer.N.gau.q_scaleoffset
    gau_alpha.encoder.layer.N.gau.k_scaleoffset.weight     gau_alpha.encoder.layer.N.gau.k_scaleoffset
    cls.predictions.decoder.weight                         dropped: our head is tied to the word
                                                           embeddings; it must equal them (else refused)
    gau_alpha.encoder.sin_pos / cos_pos (if saved)         dropped: RoPE is computed for any length

A checkpoint of the bare encoder (``embeddings.*``, ``encoder.*``) gets the ``gau_alpha.`` prefix.

Vocabulary: our tokenizer requires ids 0..4 = [PAD] [UNK] [CLS] [SEP] [MASK]; the port's vocabulary
has them at 0, 100, 101, 102, 103. The converter swaps each special with the token at its target
id (1↔100, 2↔101, 3↔102, 4↔103 for GAU-α) in vocab.txt and in the rows of the word embeddings, so
every other token keeps its id. The head is tied, so the output logits are permuted the same way:
the converted model computes exactly the port's function up to this relabelling of ids.

Attention (the port's ``normalization`` plus the paper code's CosScale flag):

    normalization "softmax_plus"  →  softmax_plus (logits × log n / log 512; n = unmasked keys)
    normalization "softmax"       →  softmax
    norm_method "CosScale", my_info_dict.train_norm_method.CosScale_value = s  →  cosscale(s=s)
                                     (combined with the above: cosscale(s=128) for the paper's run)

train_len (L of InfoScale & co.): ``--train-len``, else my_info_dict.train_len (64 for the paper's
checkpoints), else max_position_embeddings (512, GAU-α's pretraining length). The port only uses
max_position_embeddings as the size of its RoPE table; ours is computed for any length.

Where the converted model and the port can differ (none of them in ``infoscale eval``'s windows):

- the port builds a key mask from ``ids != pad`` when given none; ours masks only what
  ``attention_mask`` says, so pass it for padded batches;
- softmax_plus with one unmasked key: the port multiplies every logit, masked ones included, by
  log 1 = 0 and attends uniformly to all keys; ours gives that key weight 1;
- CosScale divides by ``|q| + 1e-9`` in the paper's code and by ``max(|q|, 1e-12)`` here;
- tokenization: the port's BertTokenizer lower-cases, strips accents and splits Latin words and
  numbers into the longest WordPiece pieces; :class:`CharTokenizer` does neither and splits every
  word into characters (``c``, ``##c``; a word with a character outside the vocabulary is one
  [UNK]). Chinese characters and punctuation are single tokens either way, with the same ids up to
  the relabelling above.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .data.tokenizers import SPECIALS, CharTokenizer
from .errors import ConfigError, DataError, MethodError
from .io import _nonfinite, atomic_write_json, check_parent_folders, os_error_in, sha256_file, write_error
from .models import check_model_size, family, is_out_of_memory, parameter_count

__all__ = ["HELP", "add_arguments", "run", "from_official", "convert", "Converted", "map_config",
           "map_state_dict", "vocab_permutation", "write_run"]

HELP = "convert a GAU-α checkpoint in the GAU-alpha-pytorch layout (e.g. the paper's) into a run directory"

PORT = "GAU-alpha-pytorch (github.com/JunnYu/GAU-alpha-pytorch)"

# GAUAlphaConfig's defaults in the port: a field missing from config.json takes these values there too.
PORT_DEFAULTS = {
    "vocab_size": 12000, "hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 24,
    "max_position_embeddings": 512, "type_vocab_size": 2, "attention_key_size": 128, "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "hidden_act": "swish",
    "use_bias": False, "normalization": "softmax_plus", "attention_scale": True, "embedding_size": None,
}
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "type_vocab_size",
              "attention_key_size", "max_position_embeddings", "pad_token_id")
NORMALIZATIONS = {"softmax": (), "softmax_plus": ("softmax_plus",)}  # normalization -> the terms of our method
DECODER = "cls.predictions.decoder.weight"
ROPE_BUFFERS = ("gau_alpha.encoder.sin_pos", "gau_alpha.encoder.cos_pos")
_LAYER_KEY = re.compile(r"^gau_alpha\.encoder\.layer\.(\d+)\.gau\.(i_dense\.weight|o_dense\.weight|"
                        r"q_scaleoffset\.weight|k_scaleoffset\.weight)$")


# --------------------------------------------------------------------------------------------
# reading the source
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); is this a {PORT} checkpoint?") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a JSON object; is this a {PORT} checkpoint?")
    return obj


def read_vocab(path: Path) -> list[str]:
    """One token a line (BERT's vocab.txt); a final newline is optional, a line may end in CR LF."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; expected a BERT vocab.txt (one token a line)") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab = [t[:-1] if t.endswith("\r") else t for t in lines]
    if not vocab:
        raise DataError(f"{path} is empty; expected a BERT vocab.txt (one token a line)")
    seen: dict[str, int] = {}
    for i, t in enumerate(vocab):
        if t in seen:
            raise DataError(f"{path}: token {t!r} appears twice (lines {seen[t] + 1} and {i + 1}); ids would be "
                            "ambiguous")
        seen[t] = i
    return vocab


def load_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of ``folder`` (model.safetensors first, else pytorch_model.bin) and the file name.

    A ``.bin`` is read with ``torch.load(weights_only=True)`` only: a pickle that would build any object
    other than tensors and plain containers (i.e. run code) is refused, never executed."""
    st, bin_ = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.exists():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(st), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DataError(f"cannot read {st}: {type(e).__name__}: {str(e)[:200]}; the file is damaged or not "
                            "safetensors") from None
        return sd, st.name
    if bin_.exists():
        try:
            sd = torch.load(str(bin_), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError (not weights-only), RuntimeError (damaged zip), EOFError, ...
            why = (str(e).splitlines() or [""])[0][:200]
            raise DataError(
                f"refusing {bin_}: it cannot be loaded as weights only ({type(e).__name__}: {why}). "
                "Either the file is damaged, or it is a pickle that needs objects other than tensors in plain "
                "containers: such a pickle could run code and is not unpickled. Re-save it as model.safetensors "
                "from a trusted environment") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise DataError(f"{bin_} does not hold a state dict (a mapping of parameter names to tensors)")
        return dict(sd), bin_.name
    sharded = [p.name for p in (folder / "model.safetensors.index.json", folder / "pytorch_model.bin.index.json")
               if p.exists()]
    if sharded:
        raise DataError(f"{folder} holds a sharded checkpoint ({sharded[0]}); this converter reads one "
                        "model.safetensors or pytorch_model.bin (GAU-α's ~100M parameters fit in one file)")
    raise DataError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _field(cfg: dict, name: str):
    return cfg.get(name, PORT_DEFAULTS[name])


def _name_of(entry):
    """``{"name": "CosScale", ...}`` or ``"CosScale"`` → ``"CosScale"``."""
    return entry.get("name") if isinstance(entry, dict) else entry


def training_attention(cfg: dict, where: str = "config.json") -> tuple[str, str]:
    """(our method string, how it was read) for a port config.json, with the paper code's CosScale."""
    info = cfg.get("my_info_dict") or {}
    if not isinstance(info, dict):
        raise DataError(f"{where}: my_info_dict must be a JSON object, got {type(info).__name__}")
    if info.get("task") not in (None, "train"):
        raise DataError(f"{where} was written by the paper code's evaluation (my_info_dict.task = "
                        f"{info.get('task')!r}), which overwrites the training fields; convert the checkpoint "
                        "as saved by training")
    norm = _field(cfg, "normalization")
    trained_norm = _name_of(info.get("train_normalization"))
    if trained_norm is not None and trained_norm != norm:
        raise DataError(f"{where}: normalization is {norm!r} but my_info_dict.train_normalization is "
                        f"{trained_norm!r}; the checkpoint's training attention is ambiguous")
    if norm not in NORMALIZATIONS:
        raise DataError(f"{where}: normalization {norm!r} is not supported (GAU-α checkpoints use "
                        f"{' or '.join(NORMALIZATIONS)}; 'squared_relu' and evaluation-only ones such as 'InfoScale' "
                        "have no infoscale training method)")
    terms, how = NORMALIZATIONS[norm], f"normalization={norm!r}"
    flag = cfg.get("norm_method")
    tnm = info.get("train_norm_method")
    names = {n for n in (flag, _name_of(tnm)) if n is not None}
    if len(names) > 1:
        raise DataError(f"{where}: norm_method {flag!r} and my_info_dict.train_norm_method {_name_of(tnm)!r} disagree")
    name = names.pop() if names else "noCosScale"
    if name == "CosScale":
        s = tnm.get("CosScale_value") if isinstance(tnm, dict) else None
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise DataError(f"{where}: the checkpoint was trained with CosScale but my_info_dict.train_norm_method."
                            f"CosScale_value is {s!r}; the scale s must be a positive number")
        s = float(s)
        cos = f"cosscale(s={int(s) if s.is_integer() else s})"
        terms = (cos, *terms)
        how += f", CosScale with s={s:g} (my_info_dict.train_norm_method)"
    elif name != "noCosScale":
        raise DataError(f"{where}: norm_method {name!r} is unknown (expected 'CosScale' or 'noCosScale')")
    return "+".join(terms) or "softmax", how


def map_config(cfg: dict, train_len: int | None = None, layers: int | None = None,
               where: str = "config.json") -> tuple[dict, dict]:
    """(GAUConfig keyword arguments, provenance notes) of a port config.json.

    ``train_len``: L for InfoScale & co.; default my_info_dict.train_len (the paper's fine-tuning
    length), else max_position_embeddings (512 for the released GAU-α: its pretraining length).
    ``layers``: keep the first N layers (the paper fine-tuned the first 6 of GAU-α's 24)."""
    if cfg.get("model_type", "gau_alpha") != "gau_alpha":
        raise DataError(f"{where}: model_type {cfg.get('model_type')!r} is not GAU-α ('gau_alpha')")
    if "attention" in cfg and "train_len" in cfg and "normalization" not in cfg:
        raise DataError(f"{where} is already an infoscale run directory's config; it needs no conversion")
    for name in INT_FIELDS:
        v = _field(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "pad_token_id" else 1):
            raise DataError(f"{where}: {name} must be a positive integer, got {v!r}")
    for name in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        v = _field(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise DataError(f"{where}: {name} must be a number in [0, 1), got {v!r}")
    hidden = _field(cfg, "hidden_size")
    checks = [
        (_field(cfg, "hidden_act") in ("swish", "silu"), "hidden_act", "'swish'"),
        (_field(cfg, "use_bias") is False, "use_bias", "false (GAU-α has no biases)"),
        (_field(cfg, "attention_scale") is True, "attention_scale", "true (logits / sqrt(s))"),
        (_field(cfg, "embedding_size") in (None, hidden), "embedding_size", f"hidden_size = {hidden} "
                                                                            "(no embedding projection)"),
    ]
    for ok, name, want in checks:
        if not ok:
            raise DataError(f"{where}: {name} = {_field(cfg, name)!r} is not supported; GAU-α has {want}")
    attention, how = training_attention(cfg, where)
    info = cfg.get("my_info_dict") or {}
    if train_len is not None:
        L, L_from = train_len, "--train-len"
    elif info.get("train_len") is not None:
        L, L_from = info["train_len"], "my_info_dict.train_len"
    else:
        L, L_from = _field(cfg, "max_position_embeddings"), "max_position_embeddings"
    if isinstance(L, bool) or not isinstance(L, int) or L < 2:
        fix = "" if L_from == "--train-len" else "; fix it in config.json or give --train-len"
        raise DataError(f"train_len (from {L_from}) must be an integer >= 2, got {L!r}{fix}")
    n_layers = _field(cfg, "num_hidden_layers")
    if layers is not None:
        if not 1 <= layers <= n_layers:
            raise DataError(f"--layers {layers}: the checkpoint has {n_layers} layers; keep 1 to {n_layers}")
        n_layers = layers
    kwargs = dict(vocab_size=_field(cfg, "vocab_size"), hidden_size=hidden,
                  intermediate_size=_field(cfg, "intermediate_size"),
                  attention_key_size=_field(cfg, "attention_key_size"), num_hidden_layers=n_layers,
                  type_vocab_size=_field(cfg, "type_vocab_size"),
                  hidden_dropout_prob=float(_field(cfg, "hidden_dropout_prob")),
                  attention_probs_dropout_prob=float(_field(cfg, "attention_probs_dropout_prob")),
                  layer_norm_eps=float(_field(cfg, "layer_norm_eps")), train_len=L, attention=attention,
                  pad_token_id=0)
    notes = {"attention_from": how, "train_len_from": L_from, "layers_kept": n_layers,
             "layers_in_checkpoint": _field(cfg, "num_hidden_layers")}
    return kwargs, notes


# --------------------------------------------------------------------------------------------
# weights and vocabulary
# --------------------------------------------------------------------------------------------


def vocab_permutation(vocab: list[str]) -> list[int]:
    """``perm`` with new_vocab[i] = vocab[perm[i]] and new_vocab[:5] = [PAD] [UNK] [CLS] [SEP] [MASK]:
    each special is swapped with the token at its target id, so every other token keeps its id."""
    missing = [s for s in SPECIALS if s not in vocab]
    if missing:
        raise DataError(f"vocab.txt has no {' '.join(missing)}; infoscale needs {' '.join(SPECIALS)}")
    perm = list(range(len(vocab)))
    where = {t: i for i, t in enumerate(vocab)}  # token -> its position in the new order
    for k, s in enumerate(SPECIALS):
        j = where[s]
        if j != k:
            other = vocab[perm[k]]
            perm[k], perm[j] = perm[j], perm[k]
            where[s], where[other] = k, j
    return perm


def map_state_dict(sd: dict[str, torch.Tensor], layers: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Port names → ours (see the module docstring); drops the tied decoder after checking it.
    Refuses unknown names. Layers ≥ ``layers`` are dropped (``--layers``)."""
    if sd and not any(k.startswith("gau_alpha.") for k in sd) and any(k.startswith(("embeddings.", "encoder."))
                                                                       for k in sd):
        sd = {"gau_alpha." + k: v for k, v in sd.items()}  # a bare GAUAlphaModel checkpoint
    out, unexpected, dropped_layers = {}, [], set()
    notes = {"decoder": "absent (tied to the word embeddings)"}
    for key, t in sd.items():
        if key in ("gau_alpha.embeddings.word_embeddings.weight", "gau_alpha.embeddings.token_type_embeddings.weight"):
            out[key] = t
        elif key == DECODER or key in ROPE_BUFFERS:
            continue
        elif m := _LAYER_KEY.match(key):
            if int(m.group(1)) >= layers:
                dropped_layers.add(int(m.group(1)))
                continue
            out[key.removesuffix(".weight") if "scaleoffset" in key else key] = t
        else:
            unexpected.append(key)
    if unexpected:
        raise DataError(f"unexpected parameters {unexpected[:5]}{' …' if len(unexpected) > 5 else ''} "
                        f"({len(unexpected)} in all): not GAU-α's masked-LM layout in {PORT} (biases, a classifier "
                        "or a prediction transform have no place in this model)")
    if DECODER in sd:
        emb = sd.get("gau_alpha.embeddings.word_embeddings.weight")
        dec = sd[DECODER]
        if emb is None or dec.shape != emb.shape or not torch.allclose(dec, emb, rtol=0, atol=0, equal_nan=True):
            diff = (f"max |difference| {(dec.float() - emb.float()).abs().max().item():.3g}"
                    if emb is not None and dec.shape == emb.shape else
                    f"shape {tuple(dec.shape)} vs {tuple(emb.shape) if emb is not None else 'missing'}")
            raise DataError(f"{DECODER} differs from the word embeddings ({diff}). GAU-α's MLM head is tied to "
                            "them and so is infoscale's: an untied head cannot be represented, so the checkpoint is "
                            "refused rather than converted to a different function")
        notes["decoder"] = "equal to the word embeddings; dropped (the head is tied)"
    if dropped_layers:
        notes["dropped_layers"] = sorted(dropped_layers)
    return out, notes


@dataclass
class Converted:
    model: object  # GAUForMaskedLM, eval mode
    tokenizer: CharTokenizer
    permutation: list[int]  # new id i = source id permutation[i]
    source: dict = field(default_factory=dict)  # provenance for train_config.json


def convert(path: str | Path, train_len: int | None = None, layers: int | None = None,
            vocab: str | Path | None = None) -> Converted:
    """Read a port checkpoint folder; the model uses our vocabulary order (see :func:`vocab_permutation`).

    ``vocab``: a vocab.txt to use when the folder has none (a checkpoint saved by a training run that
    did not save its tokenizer: take the one of the model it was fine-tuned from)."""
    # the class through the family registry: models/gau.py's from_official calls back into this module
    GAUForMaskedLM = family("gau_alpha").load_class()  # noqa: N806
    GAUConfig = GAUForMaskedLM.config_class  # noqa: N806

    src = Path(path)
    if not src.is_dir():
        raise DataError(f"{str(path)!r} is not a directory; give a checkpoint folder with config.json, vocab.txt and "
                        "model.safetensors or pytorch_model.bin (e.g. from `huggingface-cli download`)")
    if not (src / "config.json").exists():
        raise DataError(f"{src} has no config.json; expected a {PORT} checkpoint folder")
    vocab_file = Path(vocab) if vocab is not None else src / "vocab.txt"
    if not vocab_file.is_file():
        raise DataError(f"{vocab_file} does not exist" if vocab is not None else
                        f"{src} has no vocab.txt; expected a {PORT} checkpoint folder (if the checkpoint was saved "
                        "without its tokenizer, pass the vocab.txt of the model it was fine-tuned from with --vocab)")
    cfg = _read_json(src / "config.json")
    kwargs, notes = map_config(cfg, train_len, layers, where=str(src / "config.json"))
    check_model_size(SimpleNamespace(model_type="gau_alpha", **kwargs), "cpu", str(src / "config.json"))
    vocab = read_vocab(vocab_file)
    if len(vocab) != kwargs["vocab_size"]:
        raise DataError(f"{vocab_file} has {len(vocab)} tokens but config.json says vocab_size = "
                        f"{kwargs['vocab_size']}")
    pad = _field(cfg, "pad_token_id")
    if pad >= len(vocab) or vocab[pad] != "[PAD]":
        raise DataError(f"config.json's pad_token_id {pad} is not [PAD] in vocab.txt")
    sd, weights_file = load_weights(src)
    mapped, wnotes = map_state_dict(sd, kwargs["num_hidden_layers"])
    try:
        config = GAUConfig(**kwargs)
    except (ConfigError, MethodError) as e:
        raise DataError(f"{src / 'config.json'}: {e}") from None
    have, need = sum(t.numel() for t in mapped.values()), parameter_count(config)
    if need > 2 * have + 10**6:  # e.g. a num_hidden_layers far beyond the file's layers: nothing is built
        raise DataError(f"{src / 'config.json'} describes about {need:,} parameters but {src / weights_file} holds "
                        f"{have:,}; they do not belong together")
    with torch.device("meta"):  # the shapes the config implies, without memory
        want = GAUForMaskedLM(config).state_dict()
    missing = [k for k in want if k not in mapped]
    extra = [k for k in mapped if k not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' …' if len(extra) > 5 else ''} (config.json says "
                         f"num_hidden_layers = {_field(cfg, 'num_hidden_layers')})")
        raise DataError(f"{src / weights_file} does not match its config.json: " + "; ".join(parts))
    bad = [f"{k}: checkpoint {tuple(mapped[k].shape)}, config.json implies {tuple(want[k].shape)}"
           for k in want if mapped[k].shape != want[k].shape]
    if bad:
        raise DataError(f"{src / weights_file}: shape mismatch with config.json: " + "; ".join(bad[:3]))
    bad = [k for k, t in mapped.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise DataError(f"{src / weights_file}: {bad[:3]} are not finite floating-point tensors")
    perm = vocab_permutation(vocab)
    key = "gau_alpha.embeddings.word_embeddings.weight"
    mapped[key] = mapped[key][torch.tensor(perm)]
    try:
        model = GAUForMaskedLM(config)
    except Exception as e:
        if is_out_of_memory(e):
            raise DataError(f"not enough memory to build the model of {src} ({str(e).splitlines()[0][:120]})") from None
        raise
    model.load_state_dict(mapped, strict=True)
    model.eval()
    tok = CharTokenizer([vocab[i] for i in perm])
    moved = {str(perm[i]): i for i in range(len(perm)) if perm[i] != i}
    source = {"converted_from": str(src.resolve()), "source_layout": PORT, "weights_file": weights_file,
              "vocab_file": str(vocab_file.resolve()),
              "weights_sha256": sha256_file(src / weights_file), **notes, **wnotes,
              "vocab_remap": moved, "source_config": {k: cfg.get(k) for k in (
                  "normalization", "norm_method", "my_info_dict", "max_position_embeddings", "num_hidden_layers",
                  "vocab_size", "hidden_size", "attention_key_size") if k in cfg}}
    try:  # refused now, not when train_config.json is written
        json.dumps(source, allow_nan=False)
    except ValueError:
        raise DataError(f"{src / 'config.json'} holds a non-finite number (NaN or infinity): "
                        f"{_nonfinite(source)}; fix it and convert again") from None
    return Converted(model, tok, perm, source)


def from_official(path: str | Path, train_len: int | None = None, layers: int | None = None,
                  vocab: str | Path | None = None):
    """GAUForMaskedLM (eval mode) from a checkpoint folder in the GAU-alpha-pytorch layout
    (github.com/JunnYu/GAU-alpha-pytorch; also the checkpoints of arXiv 2501.08570).

    Token ids follow infoscale's vocabulary order: ids 1..4 and the ids of [UNK] [CLS] [SEP] [MASK]
    are swapped (see :func:`vocab_permutation`); :func:`convert` also returns the tokenizer."""
    return convert(path, train_len, layers, vocab).model


# --------------------------------------------------------------------------------------------
# the run directory
# --------------------------------------------------------------------------------------------


def write_run(conv: Converted, out: str | Path) -> Path:
    """Write a run directory; the model files last, so an interrupted conversion is not loadable."""
    from . import __version__

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} already exists and is not an empty directory; choose a new path")
    check_parent_folders(out, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # everything goes to a temporary folder beside --out, renamed at the end: a failure leaves nothing
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        conv.tokenizer.save(tmp)
        cfg = conv.model.config
        atomic_write_json(tmp / "train_config.json", {
            "converted": True, "attention": cfg.attention, "train_len": cfg.train_len,
            "corpus": None, "preset": None, "steps": None, "seed": None,
            "note": ("converted checkpoint: no infoscale corpus or split; evaluate it on held-out text "
                     "given explicitly (infoscale eval --corpus)"),
            "infoscale_version": __version__, **conv.source})
        conv.model.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = os_error_in(e)
        if err is not None:
            raise write_error(out, err) from None
        raise
    return out


def add_arguments(parser) -> None:
    parser.add_argument("src", help="checkpoint folder: config.json, vocab.txt, model.safetensors or "
                                    "pytorch_model.bin (GAU-alpha-pytorch layout)")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--train-len", type=int, default=None,
                        help="training length L used by InfoScale & co. (default: my_info_dict.train_len, "
                             "else max_position_embeddings)")
    parser.add_argument("--vocab", default=None,
                        help="vocab.txt to use when SRC has none (e.g. the one of "
                             "junnyu/chinese_GAU-alpha-char_L-24_H-768)")
    parser.add_argument("--layers", type=int, default=None,
                        help="keep only the first N layers (the paper fine-tuned the first 6 of 24)")


def run(args) -> int:
    conv = convert(args.src, args.train_len, args.layers, args.vocab)
    out = write_run(conv, args.out)
    cfg = conv.model.config
    print(f"wrote {out}: {cfg.num_hidden_layers} layers, attention {cfg.attention}, train_len {cfg.train_len}, "
          f"vocab {len(conv.tokenizer)} ({len(conv.source['vocab_remap'])} ids moved); decoder "
          f"{conv.source['decoder']}")
    return 0
