"""Jane Austen's six novels, read from Debian's ``r-cran-janeaustenr`` package without R.

Long running English text for the perplexity of pretrained language models far beyond their context (PG-19,
the usual benchmark, is books too, but no package ships it): *Sense and Sensibility*, *Pride and Prejudice*,
*Mansfield Park*, *Emma*, *Northanger Abbey* and *Persuasion*, 433 k to 883 k characters each (about 100 k to
200 k tokens of a 49 k-vocabulary BPE). The texts are public domain (Project Gutenberg); the R package
(Julia Silge, MIT) stores each novel as a character vector, one element per printed line.

The ``.deb`` is fetched with ``apt-get download`` into the cache folder and checked against a recorded sha256;
it is never installed (installing it pulls in R). Reading it needs only the standard library:

* a ``.deb`` is an ``ar`` archive whose member ``data.tar.xz`` holds the files;
* the package's data is an R lazy-load database: ``Rdata.rdx`` (gzip, as saveRDS writes) is a serialized
  index mapping each object's name to (offset, length) in ``Rdata.rdb``, where each object is again 4 bytes of
  length and a zlib stream of R's XDR serialization (R Internals, "Serialization Formats";
  ``src/main/serialize.c``). Only what this data uses is read: character vectors, generic vectors, pair lists,
  symbols, references and the integer/real/logical vectors of attributes.

Each novel is one document: blank lines separate paragraphs; the printed line breaks inside a paragraph become
spaces.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

from ..errors import DataError

PACKAGE, VERSION = "r-cran-janeaustenr", "1.0.0-1"
FILENAME = f"{PACKAGE}_{VERSION}_all.deb"
SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
DATA_DIR = "./usr/lib/R/site-library/janeaustenr/data/"
NOVELS = {"sensesensibility": "sense-and-sensibility", "prideprejudice": "pride-and-prejudice",
          "mansfieldpark": "mansfield-park", "emma": "emma", "northangerabbey": "northanger-abbey",
          "persuasion": "persuasion"}
MAX_OBJECT = 64 << 20  # no novel's serialized text is near this: a larger claim means a damaged file


def fetch_deb(folder: Path) -> Path:
    """The pinned ``.deb`` in ``folder`` (downloaded once with ``apt-get download``), its sha256 checked."""
    from ..io import sha256_file

    path = folder / FILENAME
    if not path.exists():
        if shutil.which("apt-get") is None:
            raise DataError(f"the austen corpus comes from Debian's {PACKAGE} {VERSION} and this machine has no "
                            f"apt-get; download {FILENAME} from a Debian mirror and put it in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=folder, capture_output=True,
                           text=True)
        if r.returncode != 0 or not path.exists():
            raise DataError(f"could not download {PACKAGE}={VERSION} for the austen corpus (apt-get said: "
                            f"{r.stderr.strip()[-300:] or 'nothing'}); run `apt-get update` once, or put {FILENAME} "
                            f"in {folder}")
    digest = sha256_file(path)
    if digest != SHA256:
        raise DataError(f"{path} has sha256 {digest}, expected {SHA256}; delete it and run again")
    return path


def ar_member(blob: bytes, name: str) -> bytes:
    """One member of an ``ar`` archive (the ``.deb`` container: "!<arch>\\n", then 60-byte headers)."""
    if not blob.startswith(b"!<arch>\n"):
        raise DataError("not an ar archive (a .deb starts with '!<arch>')")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos:pos + 60]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DataError("a damaged .deb (an ar header without a size)") from None
        if member == name:
            return blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise DataError(f"the .deb has no {name}")


class _RReader:
    """R's XDR serialization (format versions 2 and 3), the subset a character-vector data package uses."""

    NIL, SYM, LIST, CLO, ENV, CHAR, LGL, INT, REAL, STR, VEC = 0, 1, 2, 3, 4, 9, 10, 13, 14, 16, 19
    REF, NILVALUE, GLOBALENV, EMPTYENV, BASEENV = 255, 254, 253, 242, 241
    SCALAR_SIZE = {LGL: 4, INT: 4, REAL: 8}

    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    def _int(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise DataError("a damaged R data file (it ends inside an object)")
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def _length(self) -> int:
        n = self._int()
        if n < 0 or n > len(self.buf):
            raise DataError("a damaged R data file (an impossible vector length)")
        return n

    def read(self):
        if self.buf[:2] != b"X\n":
            raise DataError("not an R XDR serialization")
        self.pos = 2
        version = self._int()
        self._int(), self._int()  # the R versions that wrote it and can read it
        if version == 3:
            n = self._length()  # the native encoding's name (read before pos is used: _length moves it)
            self.pos += n
        elif version != 2:
            raise DataError(f"R serialization version {version} is not supported")
        return self._item(0)

    def _item(self, depth: int):
        if depth > 200:
            raise DataError("a damaged R data file (objects nested too deep)")
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (self.NILVALUE, self.GLOBALENV, self.EMPTYENV, self.BASEENV, self.NIL):
            return None
        if kind == self.REF:
            i = flags >> 8 or self._int()
            if not 1 <= i <= len(self.refs):
                raise DataError("a damaged R data file (a reference to nothing)")
            return self.refs[i - 1]
        if kind == self.SYM:
            name = self._item(depth + 1)
            self.refs.append(name)
            return name
        if kind == self.CHAR:
            n = self._int()
            if n == -1:  # NA_character_
                return None
            if n < 0 or self.pos + n > len(self.buf):
                raise DataError("a damaged R data file (a string past its end)")
            s = self.buf[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if kind == self.LIST:  # a pair list: attributes, tag, value, the rest
            out = []
            while True:
                if has_attr:
                    self._item(depth + 1)
                tag = self._item(depth + 1) if has_tag else None
                out.append((tag, self._item(depth + 1)))
                flags = self._int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if kind != self.LIST:
                    self.pos -= 4
                    self._item(depth + 1)  # the terminating NILVALUE
                    return out
        if kind in (self.STR, self.VEC):
            value = [self._item(depth + 1) for _ in range(self._length())]
        elif kind in self.SCALAR_SIZE:
            n = self._length()
            size = self.SCALAR_SIZE[kind]
            if self.pos + n * size > len(self.buf):
                raise DataError("a damaged R data file (a vector past its end)")
            value = list(struct.unpack_from(f">{n}{'d' if kind == self.REAL else 'i'}", self.buf, self.pos))
            self.pos += n * size
        else:
            raise DataError(f"R object type {kind} is not supported in this reader")
        if has_attr:
            raw = self._item(depth + 1)
            if not isinstance(raw, list) or not all(isinstance(x, tuple) for x in raw):
                raise DataError("a damaged R data file (attributes that are not a pair list)")
            attrs = {t: v for t, v in raw if isinstance(t, str)}
            names = attrs.get("names")
            if isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value, strict=True))
        return value


def _unzip_object(blob: bytes, what: str) -> bytes:
    if len(blob) < 4:
        raise DataError(f"a damaged R data file ({what} is empty)")
    (size,) = struct.unpack(">I", blob[:4])
    if size > MAX_OBJECT:
        raise DataError(f"a damaged R data file ({what} claims {size} bytes)")
    d = zlib.decompressobj()
    out = d.decompress(blob[4:], size + 1)
    if len(out) != size:
        raise DataError(f"a damaged R data file ({what} is {len(out)} bytes, its header says {size})")
    return out


def _gunzip(blob: bytes) -> bytes:
    """The index, written by R's saveRDS: a gzip stream (capped: a damaged file cannot inflate without bound)."""
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(blob, MAX_OBJECT)
    if d.unconsumed_tail:
        raise DataError("a damaged R data file (the index inflates beyond any real index)")
    return out


def novels(deb: Path) -> dict[str, str]:
    """{name: the novel's lines joined by newlines} from the package's lazy-load database."""
    data = ar_member(deb.read_bytes(), "data.tar.xz")
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        for name in ("Rdata.rdx", "Rdata.rdb"):
            f = tar.extractfile(DATA_DIR + name)
            if f is None:
                raise DataError(f"the .deb has no {DATA_DIR}{name}")
            files[name] = f.read()
    index = _RReader(_gunzip(files["Rdata.rdx"])).read()
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise DataError("the R data index has no variables")
    out = {}
    for name in NOVELS:
        where = variables.get(name)
        if not (isinstance(where, list) and len(where) == 2 and all(isinstance(x, int) and x >= 0 for x in where)):
            raise DataError(f"the R data index has no {name}")
        off, length = (int(x) for x in where)
        lines = _RReader(_unzip_object(files["Rdata.rdb"][off:off + length], name)).read()
        if not isinstance(lines, list):
            raise DataError(f"{name} is not a character vector")
        out[name] = "\n".join(x or "" for x in lines)
    return out


def unwrap(text: str) -> str:
    """Paragraphs (blank-line separated) on one line each: the printed line breaks inside become spaces."""
    paras = [" ".join(p.split()) for p in text.replace("\r", "").split("\n\n")]
    return "\n\n".join(p for p in paras if p)
