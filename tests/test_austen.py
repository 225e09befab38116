"""The austen corpus: Jane Austen's six novels from Debian's r-cran-janeaustenr, read without R (ar, tar.xz, R's
XDR serialization), its sha256 checked; damaged files give one DataError, never another exception."""

from __future__ import annotations

import contextlib
import gzip
import shutil

import numpy as np
import pytest

from infoscale.data import austen as ja
from infoscale.data.corpora import cache_dir, load_corpus
from infoscale.errors import DataError


@pytest.fixture(scope="module")
def deb():
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get: the austen corpus comes from a Debian package")
    return ja.fetch_deb(cache_dir() / "archives")


def test_six_novels_as_documents(deb):
    docs = load_corpus("austen")
    assert [d.name for d in docs] == list(ja.NOVELS.values())
    lengths = {d.name: len(d.text) for d in docs}
    assert min(lengths.values()) > 430_000 and max(lengths.values()) < 890_000
    assert 4_000_000 < sum(lengths.values()) < 4_100_000
    pride = next(d.text for d in docs if d.name == "pride-and-prejudice")
    assert pride.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in " \
           "want of a wife." in pride  # a printed line break inside the paragraph became a space
    assert "\n\n\n" not in pride and "  " not in pride


def test_a_changed_deb_is_refused(deb, tmp_path):
    bad = tmp_path / ja.FILENAME
    bad.write_bytes(deb.read_bytes()[:-1] + b"x")
    with pytest.raises(DataError, match="sha256"):
        ja.fetch_deb(tmp_path)


def test_not_an_ar_archive():
    with pytest.raises(DataError, match="not an ar archive"):
        ja.ar_member(b"PK\x03\x04", "data.tar.xz")
    with pytest.raises(DataError, match="has no data.tar.xz"):
        ja.ar_member(b"!<arch>\n", "data.tar.xz")


def test_damaged_r_data_gives_data_errors_only(deb):
    import io
    import tarfile

    data = ja.ar_member(deb.read_bytes(), "data.tar.xz")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        rdx = gzip.decompress(tar.extractfile(ja.DATA_DIR + "Rdata.rdx").read())
    assert isinstance(ja._RReader(rdx).read()["variables"], dict)
    rng = np.random.default_rng(0)
    for trial in range(300):
        b = bytearray(rdx)
        if trial % 3 == 0:
            b = b[: int(rng.integers(0, len(b)))]
        else:
            for i in rng.integers(0, len(b), size=int(rng.integers(1, 4))):
                b[i] = int(rng.integers(0, 256))
        with contextlib.suppress(DataError):  # a damage that still parses is fine; any other exception is not
            ja._RReader(bytes(b)).read()
    with pytest.raises(DataError, match="claims"):
        ja._unzip_object(b"\xff\xff\xff\xff" + b"x", "emma")
    with pytest.raises(DataError, match="inflates"):
        ja._gunzip(gzip.compress(b"\0" * (ja.MAX_OBJECT + 10)))
