"""The encoder family: transformers' own ``ModernBertForMaskedLM`` trained with our masked-LM task.

ModernBERT (Warner et al. 2024, arXiv 2412.13663) is the BERT-style encoder in transformers with RoPE: pre-norm
blocks, GeGLU MLP, RoPE on q and k. It is here because the paper's later version evaluates BERT-style encoders,
and because it is a second masked LM beside GAU-α that our methods reach only through :mod:`infoscale.hf` (no
code of ours inside the model). A run directory is a stock transformers checkpoint that ``AutoModelForMaskedLM``
loads without infoscale.

Set for the experiment: every layer global (ModernBERT alternates sliding-window layers of 128 keys with global
ones; a window would hide what the methods do beyond L), RoPE base 10 000 as GAU-α and Llama, the character
vocabulary's special tokens, ``max_position_embeddings`` = L (read back by :func:`infoscale.models.train_len_of`),
and the training method recorded as ``config.infoscale["train_method"]`` for :func:`infoscale.hf.apply`.

Methods reach the model through :func:`infoscale.hf.apply` (the family is not ``per_call_methods``: GAU-α's
forward takes ``method=``, a transformers model's does not); :class:`infoscale.rundir.Run` does that for evaluation.
"""

from __future__ import annotations

from transformers import ModernBertConfig, ModernBertForMaskedLM

from ..data.tokenizers import CLS, MASK, PAD, SEP
from ..errors import ConfigError

__all__ = ["PRESETS", "TRAIN_METHODS", "ModernBertForMaskedLM", "build_config", "build_for_training"]

# The sizes of GAU-α's presets (head dim 32 and 64), so the two masked LMs compare at one scale.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
    "paper": dict(hidden_size=768, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12),
}

# Training methods: the stock attention, and PoSE (it only changes the position ids fed to the model).
TRAIN_METHODS = ("softmax", "pose")


def build_config(preset: str, *, vocab_size: int, train_len: int, attention: str = "softmax",
                 dropout: float = 0.0, **shape) -> ModernBertConfig:
    """A ``ModernBertConfig`` of ``preset``: all layers global, RoPE base 10 000, ``max_position_embeddings`` = L,
    the character vocabulary's special tokens, the training method in ``config.infoscale["train_method"]``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    p = {**PRESETS[preset], **shape}
    cfg = ModernBertConfig(vocab_size=vocab_size, max_position_embeddings=train_len, global_attn_every_n_layers=1,
                           layer_types=["full_attention"] * p["num_hidden_layers"],
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                           attention_dropout=dropout, mlp_dropout=dropout, embedding_dropout=dropout,
                           pad_token_id=PAD, cls_token_id=CLS, sep_token_id=SEP, bos_token_id=CLS, eos_token_id=SEP,
                           **p)
    cfg.infoscale = {"train_method": attention, "train_len": train_len, "mask_token_id": MASK}
    return cfg


# What a model initialised from another run (--init-from) takes from that run's config: its shape.
SHAPE = tuple(PRESETS["tiny"])


def build_for_training(cfg, tok, source=None) -> ModernBertForMaskedLM:
    """A freshly initialised ModernBERT masked LM for an ``infoscale train`` config (seeded by the caller): the
    preset's size, or ``source``'s shape (--init-from)."""
    shape = {k: getattr(source.config, k) for k in SHAPE} if source is not None else {}
    return ModernBertForMaskedLM(build_config(cfg.preset, vocab_size=len(tok), train_len=cfg.train_len,
                                              attention=cfg.attention, dropout=cfg.dropout, **shape))
