"""Shared fixtures: a small real corpus and a tiny trained run, and helpers to call the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infoscale.cli import main as cli
from infoscale.data import corpora

# flags of a tiny, fast training run
TINY = ["--preset", "tiny", "--bf16", "off", "--no-progress", "--batch-size", "8", "--train-len", "32",
        "--val-windows", "16", "--min-count", "1"]


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command line in a fresh process (one thread, so tests running side by side stay fast)."""
    return subprocess.run([sys.executable, "-m", "infoscale.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def write_corpus(folder: Path, chars: int) -> Path:
    """Six real documents: the openings of six plays."""
    folder.mkdir(parents=True, exist_ok=True)
    for d in corpora.shakespeare()[:6]:
        (folder / (d.name.replace("/", "_") + ".txt")).write_text(d.text[:chars], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 6000)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny softmax model trained for a few seconds on six real documents."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(root / "corpus", 9000)
    out = root / "run"
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "30", *TINY]) == 0
    return out
