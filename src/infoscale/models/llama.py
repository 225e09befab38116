"""The causal family: transformers' own ``LlamaForCausalLM``, built from a ``LlamaConfig``.

Nothing here subclasses or patches Llama: a run directory written by ``infoscale train --arch llama`` is a
stock transformers checkpoint (``config.json`` + ``model.safetensors``) that ``AutoModelForCausalLM`` loads
without infoscale. Extrapolation methods are applied at evaluation with :func:`infoscale.hf.apply`.

Llama (Touvron et al. 2023, arXiv 2302.13971): pre-norm RMSNorm blocks, SwiGLU MLP, RoPE on q and k
(``rotate_half`` layout, base 10000). ``max_position_embeddings`` is set to the training length L, which
:func:`infoscale.hf.train_len_of` reads back. The training method (softmax or PoSE) is recorded as
``config.infoscale = {"train_method": ...}`` so that ``infoscale.hf.apply`` keeps what training changed
and refuses train-time methods the model never saw.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from ..data.bpe import BPETokenizer
from ..data.tokenizers import PAD, SEP
from ..errors import ConfigError

__all__ = ["PRESETS", "build_config", "build_for_training", "LlamaForCausalLM", "TRAIN_METHODS"]

# head_dim = hidden / heads >= 32 so InfoScale's d-dependence (l^(-2/d)) matters.
PRESETS = {
    # tests: seconds on one core
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
    # a shared CPU: 2 layers, hidden 128, head dim 64
    "mini": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2),
    # about the size of the small GAU (4 layers, hidden 256, head dim 64): minutes on two cores
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4),
    # a GPU
    "paper": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                  num_key_value_heads=12),
}

# Training methods a Llama run supports: PoSE only changes the position ids fed to the model.
TRAIN_METHODS = ("softmax", "pose")


def build_config(preset: str, *, vocab_size: int, train_len: int, attention: str = "softmax", dropout: float = 0.0,
                 bos_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None
                 ) -> LlamaConfig:
    """A ``LlamaConfig`` of ``preset`` with ``max_position_embeddings = train_len`` and the training method
    recorded in ``config.infoscale["train_method"]``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=train_len, attention_dropout=dropout,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02,
                      bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      **PRESETS[preset])
    cfg.infoscale = {"train_method": attention, "train_len": train_len}
    return cfg


def build_for_training(cfg, tok, source=None) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` for an ``infoscale train`` config (seeded by the caller). Its
    special tokens are the tokenizer's: BPE's end-of-text as BOS/EOS and its pad, or the character vocabulary's
    [SEP] and [PAD]. ``source`` (--init-from) must have this preset's shape (its weights are loaded after)."""
    if isinstance(tok, BPETokenizer):
        ids = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    else:
        ids = {"bos_token_id": None, "eos_token_id": SEP, "pad_token_id": PAD}
    mcfg = build_config(cfg.preset, vocab_size=len(tok), train_len=cfg.train_len, attention=cfg.attention,
                        dropout=cfg.dropout, **ids)
    mcfg.infoscale["passkey_share"] = cfg.passkey_share
    mcfg.infoscale["copy_share"] = cfg.copy_share
    return LlamaForCausalLM(mcfg)
