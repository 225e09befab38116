"""Tokenizers: a character-level BERT vocabulary (``vocab.txt``), readable by transformers' BertTokenizerFast."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from ..errors import DataError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


_SPACE, _DROP, _ALONE, _WORD = range(4)
_CHAR_CLASS: dict[str, int] = {}


def _char_class(ch: str) -> int:
    c = _CHAR_CLASS.get(ch)
    if c is None:
        cp, cat = ord(ch), unicodedata.category(ch)
        if ch in " \t\n\r" or cat == "Zs":
            c = _SPACE
        elif cp == 0 or cp == 0xFFFD or cat.startswith("C"):
            c = _DROP
        elif _is_punctuation(ch) or _is_cjk(cp):
            c = _ALONE
        else:
            c = _WORD
        _CHAR_CLASS[ch] = c
    return c


def bert_words(text: str) -> list[str]:
    """BERT's basic tokenization without lower-casing: drop control characters, split on white space,
    isolate punctuation and CJK characters (Devlin et al. 2019; transformers' BertTokenizer)."""
    words, cur = [], []
    for ch in text:
        c = _char_class(ch)
        if c == _WORD:
            cur.append(ch)
        elif c != _DROP:
            if cur:
                words.append("".join(cur))
                cur = []
            if c == _ALONE:
                words.append(ch)
    if cur:
        words.append("".join(cur))
    return words


class CharTokenizer:
    """Character-level BERT vocabulary: a word's first character is ``c``, the others ``##c``.

    The text is split into words as BERT does (white space dropped, punctuation and CJK characters
    alone), then each word into characters, as WordPiece does with a vocabulary of single characters;
    a word with a character outside the vocabulary (or over 100 characters) becomes one [UNK], as in
    WordPiece. So ``BertTokenizerFast.from_pretrained(model_dir)`` (with the saved
    ``tokenizer_config.json``: no lower-casing, no accent stripping) gives the same ids as ``encode``.
    Ids: the five specials, then tokens by descending count (ties by text).
    """

    MAX_WORD = 100  # WordPiece's max_input_chars_per_word

    def __init__(self, vocab: list[str], source: str = "vocab.txt"):
        if vocab[:5] != SPECIALS:
            raise DataError(f"{source} must start with the special tokens " + " ".join(SPECIALS)
                            + "; it is damaged: restore it from the run it came from")
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab)}
        if len(self.ids) != len(vocab):
            dup = next(t for i, t in enumerate(vocab) if self.ids[t] != i)
            raise DataError(f"{source} lists {dup!r} twice; it is damaged: restore it from the run it came from")

    @staticmethod
    def _pieces(word: str) -> list[str]:
        return [word[0]] + ["##" + c for c in word[1:]]

    @classmethod
    def train(cls, texts, min_count: int = 3) -> CharTokenizer:
        counts: dict[str, int] = {}
        for t in texts:
            for w in bert_words(t):
                for p in cls._pieces(w):
                    counts[p] = counts.get(p, 0) + 1
        toks = sorted((c for c, k in counts.items() if k >= min_count and c not in SPECIALS),
                      key=lambda c: (-counts[c], c))
        if not toks:
            raise DataError(f"no character occurs {min_count} times in the training split; lower --min-count")
        return cls(SPECIALS + toks)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids, get = [], self.ids.get
        for w in bert_words(text):
            if len(w) > self.MAX_WORD:
                ids.append(UNK)
                continue
            piece_ids = [get(p) for p in self._pieces(w)]
            ids.extend([UNK] if None in piece_ids else piece_ids)
        return ids

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            t = self.vocab[int(i)]
            out.append(t[2:] if t.startswith("##") else (" " + t if out else t))
        return "".join(out)

    def save(self, folder: str | Path) -> None:
        from ..io import atomic_write_bytes

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "vocab.txt", "".join(t + "\n" for t in self.vocab).encode("utf-8"))
        cfg = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": False, "tokenize_chinese_chars": True,
               "strip_accents": False, "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 1_000_000}
        atomic_write_bytes(folder / "tokenizer_config.json", json.dumps(cfg, indent=1).encode("utf-8"))

    @classmethod
    def load(cls, folder: str | Path) -> CharTokenizer:
        path = Path(folder) / "vocab.txt"
        if not path.exists():
            raise DataError(f"{folder} has no vocab.txt; is it a model directory written by `infoscale train`?")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8; it is damaged: restore it from the run it came from") from None
        return cls(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), str(path))
