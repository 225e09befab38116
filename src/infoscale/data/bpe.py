"""A byte-level BPE tokenizer trained on the training split with the ``tokenizers`` library.

Byte-level BPE (Radford et al. 2019, GPT-2; Sennrich et al. 2016): text is mapped to bytes shown as printable
characters, and merges of the most frequent adjacent pairs are learned until the vocabulary has ``vocab_size``
entries. Every byte is in the initial alphabet, so any text encodes without an unknown token and
``decode(encode(text)) == text``.

Saved as ``tokenizer.json`` (the ``tokenizers`` format) and ``tokenizer_config.json`` naming
``PreTrainedTokenizerFast`` and its special tokens, so ``transformers.AutoTokenizer.from_pretrained(run_dir)``
gives the same ids with nothing of infoscale imported. No token is added around a text (no BOS/EOS
post-processor): training windows are cut from the middle of documents.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError

EOS = "<|endoftext|>"  # also BOS, as in GPT-2
PAD_TOKEN = "<pad>"
BPE_SPECIALS = [EOS, PAD_TOKEN]


class BPETokenizer:
    """``encode``/``decode``/``len`` over a ``tokenizers.Tokenizer`` (ids 0, 1 are the specials)."""

    def __init__(self, tok, source: str = "tokenizer.json"):
        self.tok = tok
        for i, s in enumerate(BPE_SPECIALS):
            if tok.token_to_id(s) != i:
                raise DataError(f"{source} does not have {s!r} as token {i}; it is not an infoscale BPE tokenizer: "
                                "restore it from the run it came from")

    @property
    def eos_id(self) -> int:
        return 0

    @property
    def pad_id(self) -> int:
        return 1

    @classmethod
    def train(cls, texts, vocab_size: int = 2048, min_frequency: int = 2) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(BPE_SPECIALS):
            raise DataError(f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs at least "
                            f"{256 + len(BPE_SPECIALS)} (256 bytes and the special tokens)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=BPE_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(texts), trainer)
        return cls(tok)

    def __len__(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        from ..io import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "tokenizer.json", self.tok.to_str().encode("utf-8"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS, "unk_token": None,
               "pad_token": PAD_TOKEN, "clean_up_tokenization_spaces": False, "add_bos_token": False,
               "add_eos_token": False, "model_max_length": 1_000_000}
        atomic_write_bytes(folder / "tokenizer_config.json", json.dumps(cfg, indent=1).encode("utf-8"))

    @classmethod
    def load(cls, folder: str | Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise DataError(f"{folder} has no tokenizer.json; is it a model directory written by `infoscale train`?")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path} is not a readable tokenizers file ({type(e).__name__}); it is damaged: restore "
                            "it from the run it came from") from None
        return cls(tok, str(path))


def load_tokenizer(folder: str | Path):
    """The run's tokenizer: ``tokenizer.json`` (byte-level BPE) if present, else ``vocab.txt`` (characters)."""
    from .tokenizers import CharTokenizer

    if (Path(folder) / "tokenizer.json").exists():
        return BPETokenizer.load(folder)
    return CharTokenizer.load(folder)
