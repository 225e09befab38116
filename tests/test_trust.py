"""Every input path is trustworthy: a bad input gets one clear line (what is wrong, how to fix it) and
exit status 2, and nothing is lost, corrupted or overwritten."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import infoscale
from infoscale import MethodError, io
from infoscale.attn.methods import REGISTRY
from infoscale.cli import build_parser, interrupt_advice
from infoscale.cli import main as cli
from infoscale.data import corpora
from infoscale.errors import DataError
from infoscale.io import merge_records, read_records, write_records

from .conftest import TINY, write_corpus

PY = [sys.executable, "-m", "infoscale.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def refused(capsys, argv, *needles) -> str:
    """Run the command in-process; it must exit 2 with one line holding every needle."""
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def eval_rec(model="/x/run", method="softmax", length=64, metric="accuracy", value=0.5, **kw) -> dict:
    """A tidy evaluation record as `infoscale eval` writes it (the fields report uses)."""
    rec = {"model": model, "model_name": Path(model).name, "method": method, "length": length, "setting": "contiguous",
           "protocol": "strided", "metric": metric, "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1,
           "train": {"attention": "softmax", "train_len": 32}, "key": f"{model}|{method}|{length}|{kw.get('seed', 0)}"}
    return rec | kw


# ---------------------------------------------------------------------------------------------
# records: never lose one, never write NaN
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_two_evals_on_one_file_lose_no_record(tiny_run, tmp_path):
    out = tmp_path / "shared.jsonl"
    common = ["eval", "--models", str(tiny_run), "--lengths", "32", "48", "64", "96", "128", "--predictions", "48",
              "--no-progress", "--out", str(out)]
    procs = [subprocess.Popen([*PY, *common, "--methods", m], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV) for m in ("softmax", "infoscale")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    recs = read_records(out)
    cells = {(r["method"], r["length"], r["setting"], r["metric"]) for r in recs}
    want = {(m, n, s, k) for m in ("softmax", "infoscale") for n in (32, 48, 64, 96, 128)
            for s in ("contiguous", "repeated") for k in ("accuracy", "loss")}
    assert cells == want and len(recs) == len(want)
    assert all("10 new cells (20 records)" in o for o, _ in outs), outs  # each reports what it really added


def test_merge_keeps_records_added_by_another_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    a, b = eval_rec(method="a"), eval_rec(method="b")
    assert merge_records(path, [a]) == [a]
    path.write_text(path.read_text() + json.dumps(b) + "\n")  # another process added b meanwhile
    c = eval_rec(method="c")
    assert merge_records(path, [a, c]) == [c]  # a is there already
    assert [r["method"] for r in read_records(path)] == ["a", "b", "c"]
    assert not (tmp_path / "r.jsonl.lock").exists() and no_temp_files(tmp_path)  # the lock file is removed


def _merge_many(path: str, who: int) -> None:
    for i in range(15):
        merge_records(path, [eval_rec(method=f"m{who}", length=64 + i)])


def test_removing_the_lock_file_keeps_the_lock_exclusive(tmp_path):
    """Four processes merge 15 records each into one file: none is lost although each merge removes its lock
    file (a process waiting on a removed lock file locks the new one)."""
    import multiprocessing

    path = tmp_path / "r.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(read_records(path)) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_records_never_hold_nan(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, [eval_rec()])
    before = path.read_bytes()
    for bad in (math.nan, math.inf):
        with pytest.raises(DataError, match="non-finite number.*value = "):
            write_records(path, [eval_rec(value=bad)])
        with pytest.raises(DataError, match="non-finite"):
            merge_records(path, [eval_rec(method="other", value=bad)])
    assert path.read_bytes() == before and no_temp_files(tmp_path)
    (tmp_path / "nan.jsonl").write_text('{"value": NaN}\n')
    with pytest.raises(DataError, match="nan.jsonl:1 .*NaN"):
        read_records(tmp_path / "nan.jsonl")


def test_eval_refuses_a_method_that_gives_nan(tiny_run, tmp_path, capsys):
    """The grammar refuses the values known to give NaN (softmax_plus(base=1)); whatever still gives a
    non-finite logit (here a model with a NaN weight) is refused, never recorded."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "r.jsonl"
    refused(capsys, ["eval", "--models", tiny_run, "--methods", "softmax_plus(base=1)", "--lengths", "32",
                     "--predictions", "16", "--no-progress", "--out", out], "softmax_plus: base must be")
    assert not out.exists()
    bad = tmp_path / "nan-run"
    shutil.copytree(tiny_run, bad)
    sd = load_file(bad / "model.safetensors")
    key = next(k for k in sd if k.endswith("i_dense.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, ["eval", "--models", bad, "--methods", "softmax", "--lengths", "32", "--predictions", "16",
                     "--bf16", "off", "--no-progress", "--out", out], "softmax gives non-finite", "check the model")
    assert not out.exists()


def test_analyze_refuses_unknown_methods_and_skips_inapplicable_ones(tiny_run, tmp_path, capsys):
    out = tmp_path / "an"
    refused(capsys, ["analyze", "--model", tiny_run, "--methods", "softmax", "bogus", "--lengths", "32",
                     "--no-synthetic", "--out", out], "unknown method 'bogus'", "infoscale methods")
    assert not out.exists()
    refused(capsys, ["analyze", "--methods", "rerope(window=0)", "--lengths", "32", "--out", out], "window")
    assert cli(["analyze", "--model", str(tiny_run), "--methods", "cosscale", "infoscale", "--lengths", "32",
                "--scales", "8", "--windows", "1", "--no-synthetic", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skip cosscale" in err and "train-time method" in err
    recs = read_records(out / "analysis.jsonl")
    assert {r["method"] for r in recs if r["kind"] == "entropy"} == {"infoscale"}


# ---------------------------------------------------------------------------------------------
# report: any records file gives tables or one line
# ---------------------------------------------------------------------------------------------


def test_report_handles_several_records_per_cell(tmp_path):
    recs = [eval_rec(value=0.4, seed=0), eval_rec(value=0.6, seed=1),  # two seeds: one cell
            eval_rec(model="/a/run", method="infoscale", value=0.2),  # two folders named run
            eval_rec(model="/b/run", method="infoscale", value=0.9),
            eval_rec(model="/x/run", method="window", value=0.3, predictions=100),  # a rerun at other --predictions
            eval_rec(model="/x/run", method="window", value=0.5, predictions=200, key="other")]
    write_records(tmp_path / "r.jsonl", recs)
    assert cli(["report", str(tmp_path / "r.jsonl"), str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| `softmax` | **50.0 ± 20.0†** |" in md  # mean of the two seeds, marked; the file named twice counts once
    assert "| `window` | 40.0 ± 20.0† |" in md
    assert "### a/run:" in md and "### b/run:" in md  # the two folders keep their own tables
    # each alone in its table: nothing to be best against, so not bold
    assert "| `infoscale` | 20.0" in md and "| `infoscale` | 90.0" in md


@pytest.mark.parametrize("content, needle", [
    (b"[1, 2]\n", "r.jsonl:2 is an array, not a record"),
    (b'"text"\n', "r.jsonl:2 is a string, not a record"),
    (b'{"metric": "accuracy", "value": 1}\n', "r.jsonl:2: incomplete eval record (missing model_name"),
    (b'{"accuracy": 0.5}\n', "r.jsonl:2 is a record of the first format without the field 'ci_low'"),
    (b'\xff\xfe{"a": 1}\n', "r.jsonl:2 is not UTF-8"),
    (b'{"kind": "entropy", "source": "s"}\n', "r.jsonl:2: incomplete entropy record"),
    (b'{"kind": "mystery"}\n', "kind 'mystery', which report does not draw"),
    (b"{not json\n", "r.jsonl:2 is not a JSON record"),
])
def test_report_refuses_bad_lines(tmp_path, capsys, content, needle):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(eval_rec()).encode() + b"\n" + content)
    refused(capsys, ["report", path, "--out", tmp_path / "rep"], needle, "fix or remove that line"
            if "kind" not in needle else "")
    assert not (tmp_path / "rep" / "report.md").exists()


def test_report_of_a_missing_file(tmp_path, capsys):
    refused(capsys, ["report", tmp_path / "nope.jsonl", "--out", tmp_path / "rep"], "does not exist")


# ---------------------------------------------------------------------------------------------
# train: bad flags and damaged runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, needle", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--mask-prob", "0"], "--mask-prob must be between 0 and 1"),
    (["--eval-every", "0"], "--eval-every must be a positive integer"),
    (["--save-every", "0"], "--save-every must be a positive integer"),
    (["--train-len", "-5"], "--train-len must be an integer >= 2"),
    (["--attention", "pose(chunks=100)"], "pose: chunks (100) cannot exceed the training length (32)"),
    (["--device", "foo"], "--device 'foo' is not a device"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--train-len", "100000"], "no training document has --train-len 100000 tokens"),
])
def test_train_refuses_bad_flags_before_writing(tmp_path, capsys, corpus, flags, needle):
    out = tmp_path / "run"
    refused(capsys, ["train", "--out", out, "--corpus", corpus, *TINY, *flags], needle)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_refuses_cuda_without_cuda(tmp_path, capsys, corpus):
    refused(capsys, ["train", "--out", tmp_path / "run", "--corpus", corpus, *TINY, "--device", "cuda:0"],
            "no CUDA device is available", "--device cpu")


def test_train_refuses_an_out_that_is_a_file(tmp_path, capsys, corpus):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    refused(capsys, ["train", "--out", f, "--corpus", corpus, *TINY], "is an existing file")
    assert f.read_text() == "keep"


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "2", *TINY]) == 0
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage, needle", [
    ("shape", "does not fit the model of this run (Error(s) in loading state_dict"),
    ("missing", "Missing key(s)"),
    ("step", "holds a bad step value"),
    ("bool-step", "holds a bad step value"),
])
def test_damaged_checkpoints_are_refused(tmp_path, capsys, corpus, two_step_run, damage, needle):
    out = _copy_run(two_step_run, tmp_path / "run")
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    if damage == "shape":
        ckpt["model"][next(iter(ckpt["model"]))] = torch.zeros(3, 3)
    elif damage == "missing":
        del ckpt["model"][next(iter(ckpt["model"]))]
    else:
        ckpt["step"] = 10**12 if damage == "step" else True
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    refused(capsys, ["train", "--out", out, "--corpus", corpus, "--steps", "4", "--resume", *TINY], needle,
            "delete it to restart")
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_updates_config_and_never_duplicates_metrics(tmp_path, corpus, two_step_run):
    out = _copy_run(two_step_run, tmp_path / "run")
    early = (out / "checkpoint.pt").read_bytes()  # step 2
    args = ["train", "--out", str(out), "--corpus", str(corpus), "--resume", "--eval-every", "2", "--save-every",
            "2", *TINY]
    assert cli([*args, "--steps", "6"]) == 0
    assert json.loads((out / "train_config.json").read_text())["steps"] == 6
    ref = (out / "metrics.jsonl").read_text()
    (out / "checkpoint.pt").write_bytes(early)  # back to step 2: steps 3..6 are replayed
    assert cli([*args, "--steps", "6"]) == 0
    assert (out / "metrics.jsonl").read_text().count('"val_acc"') == ref.count('"val_acc"')
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], "val_acc" in r) for r in lines]
    assert len(keys) == len(set(keys))


def test_resume_accepts_any_spelling_of_out_and_a_moved_folder(tmp_path, corpus, two_step_run, monkeypatch):
    out = _copy_run(two_step_run, tmp_path / "runs" / "x")
    monkeypatch.chdir(tmp_path)
    base = ["--corpus", str(corpus), "--resume", *TINY]
    for i, spelling in enumerate(["runs/x/", "./runs/x", str(out)]):
        assert cli(["train", "--out", spelling, *base, "--steps", str(3 + i)]) == 0, spelling
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    assert cli(["train", "--out", "elsewhere", *base, "--steps", "6"]) == 0
    cfg = json.loads((moved / "train_config.json").read_text())
    assert cfg["steps"] == 6 and cfg["out"] == "elsewhere" and cfg["resume"] is False


def test_overwrite_replaces_a_crashed_run_only_after_checks(tmp_path, capsys, corpus):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text("{}")  # what a run that crashed at its start leaves
    (out / "vocab.txt").write_text("[PAD]\n")
    refused(capsys, ["train", "--out", out, "--corpus", corpus, *TINY], "--overwrite to replace it")
    refused(capsys, ["train", "--out", out, "--corpus", tmp_path / "nope", "--overwrite", *TINY],
            "neither a known corpus")
    assert (out / "train_config.json").read_text() == "{}"  # a bad new config removes nothing
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "2", "--overwrite", *TINY]) == 0
    assert json.loads((out / "train_config.json").read_text())["overwrite"] is False
    assert (out / "model.safetensors").exists()
    (out / "my-notes.md").write_text("mine")
    refused(capsys, ["train", "--out", out, "--corpus", corpus, "--overwrite", *TINY],
            "did not write (my-notes.md)", "nothing was removed")
    assert (out / "model.safetensors").exists() and (out / "my-notes.md").read_text() == "mine"


def test_interrupt_advice_is_right_for_each_command(tmp_path):
    ns = argparse.Namespace
    run = tmp_path / "run"
    assert "nothing was written" in interrupt_advice(ns(command="train", out=str(run), resume=False, overwrite=False))
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    assert "with --resume to continue" in interrupt_advice(ns(command="train", out=str(run), resume=False,
                                                              overwrite=False))
    assert "--resume (instead of --overwrite)" in interrupt_advice(ns(command="train", out=str(run), resume=False,
                                                                     overwrite=True))
    assert interrupt_advice(ns(command="train", out=str(run), resume=True, overwrite=False)).startswith(
        "rerun the same command to continue")
    assert "are skipped" in interrupt_advice(ns(command="eval", out="r.jsonl"))
    assert "nothing was written" in interrupt_advice(ns(command="analyze"))


def test_ctrl_c_prints_the_advice(tmp_path, capsys, monkeypatch):
    from infoscale import evaluate

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    assert cli(["eval", "--models", "m", "--out", str(tmp_path / "r.jsonl")]) == 130
    assert "interrupted; finished cells are in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# eval: bad flags, damaged runs, lengths that cannot fit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, needle", [
    (["--stride", "0"], "--stride must be at least 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--windows", "0", "--predictions", "0"], "--windows must be at least 1"),
    (["--predictions", "-1"], "--predictions must be >= 0"),
])
def test_eval_refuses_bad_flags(tiny_run, tmp_path, capsys, flags, needle):
    refused(capsys, ["eval", "--models", tiny_run, "--out", tmp_path / "r.jsonl", *flags], needle)


@pytest.mark.parametrize("damage, needle", [
    ("split", "has no split.json"),
    ("config", "has no train_config.json"),
    ("vocab-short", "has 20 tokens but the model has"),
    ("vocab-specials", "must start with the special tokens"),
    ("vocab-duplicate", "twice"),
])
def test_eval_refuses_damaged_runs(tiny_run, tmp_path, capsys, damage, needle):
    run = _copy_run(tiny_run, tmp_path / "run")
    vocab = (run / "vocab.txt").read_text().splitlines()
    if damage == "split":
        (run / "split.json").unlink()
    elif damage == "config":
        (run / "train_config.json").unlink()
    elif damage == "vocab-short":
        (run / "vocab.txt").write_text("\n".join(vocab[:20]) + "\n")
    elif damage == "vocab-specials":
        (run / "vocab.txt").write_text("\n".join(vocab[2:]) + "\n")
    else:
        (run / "vocab.txt").write_text("\n".join(vocab[:-1] + [vocab[10]]) + "\n")
    out = tmp_path / "r.jsonl"
    refused(capsys, ["eval", "--models", run, "--lengths", "32", "--predictions", "16", "--no-progress", "--out", out],
            needle)
    assert not out.exists()


def test_a_length_that_cannot_fit_is_refused_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    from infoscale import evaluate

    monkeypatch.setattr(evaluate, "available_memory", lambda device: 2**30)  # 1 GiB free
    out = tmp_path / "r.jsonl"
    err = refused(capsys, ["eval", "--models", tiny_run, "--lengths", "64", "100000", "--settings", "repeated",
                           "--no-progress", "--out", out], "length 100000 needs about",
                  "GiB is free on cpu (the limit)",
                  "the longest length that fits now is about", "--chunk-size")
    fits = int(err.split("fits now is about ")[1].split(":")[0])
    assert 64 < fits < 100000
    assert not out.exists()  # refused before the length-64 cells ran
    cfg = evaluate.EvalConfig(models=["m"], settings=["repeated"])
    run = evaluate.load_run(tiny_run)
    assert evaluate.cell_cost(run.model.config, cfg, fits)[0] <= 2**30 < evaluate.cell_cost(run.model.config, cfg,
                                                                                              2 * fits)[0]


def test_the_sweep_time_is_estimated(tiny_run, tmp_path, monkeypatch):
    from infoscale import evaluate as ev
    from infoscale.evaluate import EvalConfig, evaluate

    monkeypatch.setattr(ev, "device_flops", lambda device: 1e3)  # a very slow device: the estimate is shown
    logs = []
    evaluate(EvalConfig(models=[str(tiny_run)], methods=["softmax"], lengths=[32], out=str(tmp_path / "r.jsonl"),
                        predictions=16, progress=False), log=logs.append)
    assert any("2 cells, estimated" in s and " h on cpu" in s for s in logs), logs


def test_contiguous_lengths_beyond_the_documents_are_refused_first(tiny_run, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    refused(capsys, ["eval", "--models", tiny_run, "--lengths", "32", "100000", "--no-progress", "--out", out],
            "the contiguous setting cannot run at n=100000", "--settings repeated")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------


class FullDisk:
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            self.f.write(bytes(b[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(io.os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real(fd, mode, *a, **k), 100))


def test_full_disk_keeps_records(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    write_records(path, [eval_rec()])
    before = path.read_bytes()
    monkeypatch.setattr(io.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(DataError, match=f"cannot write {path}: no space left"):
        merge_records(path, [eval_rec(method="new")])
    assert path.read_bytes() == before and no_temp_files(tmp_path)


def test_full_disk_keeps_checkpoints(tmp_path, full_disk):
    from infoscale.train import atomic_torch_save

    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(DataError, match="checkpoint.pt: no space left"):
        atomic_torch_save({"step": 2, "w": torch.zeros(10_000)}, path)
    assert path.read_bytes() == before and no_temp_files(tmp_path)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_full_disk_during_training_is_one_line(tmp_path, capsys, corpus, two_step_run, monkeypatch):
    out = _copy_run(two_step_run, tmp_path / "run")
    before = (out / "checkpoint.pt").read_bytes()
    real = os.fdopen

    def fdopen(fd, mode="r", *a, **k):  # only the checkpoint's disk is full
        f = real(fd, mode, *a, **k)
        return FullDisk(f, 0) if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(io.os, "fdopen", fdopen)
    refused(capsys, ["train", "--out", out, "--corpus", corpus, "--resume", "--steps", "4", "--save-every", "4",
                     *TINY], "checkpoint.pt: no space left")
    assert no_temp_files(out)
    assert (out / "checkpoint.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# friction
# ---------------------------------------------------------------------------------------------


def test_a_single_text_file_trains_and_evaluates(tmp_path, capsys):
    text = "\n\n".join(d.text[:8000] for d in corpora.shakespeare()[:3])
    one = tmp_path / "one.txt"
    one.write_text(text, encoding="utf-8")
    docs = corpora.user_corpus(one)
    assert [d.name for d in docs] == [f"one.txt#{i}" for i in range(1, 9)]
    assert "".join(d.text for d in docs).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert all(d.text[0].strip() for d in docs)  # cut at paragraph boundaries, no part starts with a space
    out = tmp_path / "run"
    assert cli(["train", "--out", str(out), "--corpus", str(one), "--steps", "2", *TINY]) == 0
    assert all(n.startswith("one.txt#") for n in json.loads((out / "split.json").read_text())["eval"])
    assert cli(["eval", "--models", str(out), "--lengths", "32", "--predictions", "16", "--no-progress", "--out",
                str(tmp_path / "r.jsonl")]) == 0


def test_split_text_properties():
    assert corpora.split_text("") == []
    parts = corpora.split_text("word " * 40000)  # 200000 chars, no paragraphs
    assert len(parts) == 13 and max(map(len, parts)) - min(map(len, parts)) < 100
    paras = "\n\n".join(f"paragraph {i} " + "x" * 1000 for i in range(100))
    assert all(p.startswith("paragraph") for p in corpora.split_text(paras))


def test_a_relative_corpus_works_from_any_folder(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    write_corpus(home / "texts", 6000)
    monkeypatch.chdir(home)
    assert cli(["train", "--out", "run", "--corpus", "texts", "--steps", "2", *TINY]) == 0
    assert json.loads((home / "run" / "train_config.json").read_text())["corpus"] == str(home / "texts")
    # a resume spelling the corpus relatively is the same run
    assert cli(["train", "--out", "run", "--corpus", "texts", "--steps", "3", "--resume", *TINY]) == 0
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--models", "home/run", "--lengths", "32", "--predictions", "16", "--no-progress"]
    assert cli([*args, "--out", "a.jsonl"]) == 0
    # a run of an earlier version stored the relative path: found beside the run
    capsys.readouterr()
    cfg = json.loads((home / "run" / "train_config.json").read_text())
    (home / "run" / "train_config.json").write_text(json.dumps(cfg | {"corpus": "texts"}))
    assert cli([*args, "--out", "b.jsonl"]) == 0
    (home / "run" / "train_config.json").write_text(json.dumps(cfg | {"corpus": "gone"}))
    refused(capsys, [*args, "--out", "c.jsonl"], "the corpus 'gone'", "absolute path")


@pytest.mark.e2e
def test_no_progress_silences_transformers(tiny_run, tmp_path, corpus):
    r = subprocess.run([*PY, "eval", "--models", str(tiny_run), "--lengths", "32", "--predictions", "16",
                        "--no-progress", "--out", str(tmp_path / "r.jsonl")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    t = subprocess.run([*PY, "train", "--out", str(tmp_path / "run"), "--corpus", str(corpus), "--steps", "2", *TINY],
                       capture_output=True, text=True, env=ENV)
    assert t.returncode == 0, t.stderr
    for text in (r.stderr, r.stdout, t.stderr, t.stdout):
        assert "it/s" not in text and "Loading weights" not in text and "Writing model" not in text, text


def test_help_shows_list_defaults():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    text = sub["eval"].format_help().replace("\n", " ")
    text = " ".join(text.split())
    assert "(default: 64 128 256 512 1024 2048 4096)" in text
    assert "(default: softmax infoscale)" in text and "(default: contiguous repeated passkey)" in text
    a = " ".join(sub["analyze"].format_help().split())
    assert "(default: 4.0 8.0 16.0 32.0 64.0 128.0 256.0)" in a



# ---------------------------------------------------------------------------------------------
# the method grammar, fuzzed from its own tokens
# ---------------------------------------------------------------------------------------------

FUZZ_L = 8
_PARAMS = sorted({f.name for m in REGISTRY.values() for f in dataclasses.fields(m.params)})
_NUMBERS = ["0", "1", "2", "3", "7", "8", "9", "16", "0.5", "1.5", "-0.0", "1e-320", "2.5e-300", "1e308", "1e999",
            "-1e999", "nan", "inf", "float('nan')", "True", "False", "None", "'a'", "[1]", "1j", "0x10", "2**31",
            "9223372036854775808"]


@st.composite
def _literal(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(_NUMBERS))
    if kind == 4:
        return repr(draw(st.floats(allow_nan=True, allow_infinity=True)))
    if kind == 1:  # huge or small integers
        return str(draw(st.integers(-(10**40), 10**40)))
    if kind == 2:  # nested unary minus
        return "-" * draw(st.integers(1, 4000)) + draw(st.sampled_from(["1", "2.0", "8"]))
    if kind == 3:  # nested parentheses
        d = draw(st.integers(1, 260))
        return "(" * d + draw(st.sampled_from(["1", "8", "-1"])) + ")" * d
    return str(draw(st.integers(1, 2 * FUZZ_L)))  # plausible values


@st.composite
def _term(draw):
    name = draw(st.sampled_from([*REGISTRY, "bogus", "", "Softmax"]) if draw(st.integers(0, 9)) == 0
                else st.sampled_from(list(REGISTRY)))
    if draw(st.integers(0, 3)) == 0:
        return name
    own = [f.name for f in dataclasses.fields(REGISTRY[name].params)] if name in REGISTRY else []
    args = []
    for _ in range(draw(st.integers(0, 3))):
        lit = draw(_literal())
        pick = st.sampled_from(own) if own and draw(st.integers(0, 5)) else st.sampled_from([*_PARAMS, "x"])
        args.append(lit if draw(st.integers(0, 9)) == 0 else f"{draw(pick)}={lit}")
    text = f"{name}(" + ", ".join(args) + ")"
    cut = draw(st.integers(0, 19))  # unbalanced parentheses now and then
    return text[:-1] if cut == 0 else "(" + text if cut == 1 else text + ")" if cut == 2 else text


method_strings = st.lists(_term(), min_size=1, max_size=4).map("+".join) | st.sampled_from(
    ["+", "++", "softmax+", "+infoscale", "softmax+" * 300 + "softmax", "infoscale(", "(infoscale)"])

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(method_strings)
@example("ntk(w=2, 1, c=" + "(" * 200 + "1" + ")" * 200 + ")")
@example("rerope(window=" + "-" * 4000 + "1)")
def test_fuzz_every_parse_failure_is_a_method_error(s):
    with contextlib.suppress(MethodError):
        infoscale.parse_method(s, train_len=FUZZ_L)


@FUZZ
@given(method_strings, st.integers(1, 4 * FUZZ_L), st.integers(0, 2**16))
@example("window(width=99999999999999999999999999)", 1, 0)
@example("softmax_plus(base=0)", 1, 0)
@example("softmax_plus(base=1)", 1, 0)
@example("cosscale(s=1e999)", 1, 0)
@example("yarn(factor=1e-320)", 1, 0)
@example("ntk(factor=1e308)", 1, 0)
@example("yarn(beta_slow=1e-320)", 1, 0)
def test_fuzz_every_accepted_method_gives_finite_attention(s, n, seed):
    try:
        pm = infoscale.parse_method(s, train_len=FUZZ_L)
    except MethodError:  # what is refused is the test above's business
        return
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    causal = any(c.method.causal_only for c in pm.components)  # DCA refuses bidirectional attention
    out = infoscale.attention(q, k, v, pm, train_len=FUZZ_L, causal=causal)
    assert torch.isfinite(out).all(), (s, n)


# ---------------------------------------------------------------------------------------------
# infoscale.attention: an input that would give NaN or a wrong answer is refused
# ---------------------------------------------------------------------------------------------


def _qkv(n=6, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, n, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("change, needle", [
    ({"method": "infoscale", "train_len": 1}, "training length >= 2"),
    ({"method": "logn", "train_len": 1}, "training length >= 2"),
    ({"scale": math.nan}, "scale must be a positive finite number"),
    ({"scale": math.inf}, "scale must be a positive finite number"),
    ({"scale": "0.5"}, "scale must be a positive finite number"),
    ({"positions": torch.tensor([0.0, 1, 2, math.nan, 4, 5])}, "positions holds NaN or infinite"),
    ({"positions": torch.tensor([0.0, 1, 2, 3, 4, math.inf])}, "positions holds NaN or infinite"),
    ({"method": "ntk", "seq_len": math.nan}, "seq_len must be a finite number >= 1"),
    ({"method": "ntk", "seq_len": 0}, "seq_len must be a finite number >= 1"),
    ({"method": "ntk", "seq_len": -5}, "seq_len must be a finite number >= 1"),
    ({"chunk_size": 1.5}, "chunk_size must be a positive integer"),
    ({"chunk_size": "4"}, "chunk_size must be a positive integer"),
    ({"key_padding_mask": torch.full((2, 6), 0.5)}, "float key_padding_mask is additive"),
])
def test_attention_refuses_inputs_that_would_be_wrong(change, needle):
    q, k, v = _qkv()
    kw = {"method": "softmax", "train_len": 4} | change
    with pytest.raises(MethodError, match=needle):
        infoscale.attention(q, k, v, kw.pop("method"), **kw)


@pytest.mark.parametrize("make, needle", [
    (lambda t: t.numpy(), "q must be a torch.Tensor, got numpy.ndarray"),
    (lambda t: torch.complex(t, t), "q is complex"),
    (lambda t: t.to("meta"), "q is on the meta device"),
])
def test_attention_refuses_tensors_it_cannot_use(make, needle):
    q, k, v = _qkv()
    with pytest.raises(MethodError, match=needle):
        infoscale.attention(make(q), k, v, "infoscale", train_len=4)


def test_an_additive_float_padding_mask_means_what_transformers_means():
    q, k, v = _qkv()
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    want = infoscale.attention(q, k, v, "infoscale", train_len=4, key_padding_mask=keep)
    for drop in (-math.inf, torch.finfo(torch.float32).min):
        additive = torch.zeros(2, 6).masked_fill(~keep, drop)
        got = infoscale.attention(q, k, v, "infoscale", train_len=4, key_padding_mask=additive)
        torch.testing.assert_close(got, want)


def test_infoscale_factor_refuses_what_has_no_value():
    with pytest.raises(MethodError, match="train_len >= 2"):
        infoscale.infoscale_factor(8, train_len=1, head_dim=64)
    with pytest.raises(MethodError, match="finite n >= 1"):
        infoscale.infoscale_factor(math.nan, train_len=4, head_dim=64)
    with pytest.raises(MethodError, match="n_q and n_k.*got n_q=8"):
        infoscale.build_plan("softmax", n_q=8, batch=1, heads=1, head_dim=8, train_len=4)


# ---------------------------------------------------------------------------------------------
# crafted sizes: refused from the config and the weights' header, before anything is built
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, needle", [
    ("num_hidden_layers", 100_000_000, "describes a model of about"),
    ("intermediate_size", 10**9, "describes a model of about"),
    ("attention_key_size", 10**9, "describes a model of about"),
    ("num_hidden_layers", 40_000, "describes about"),  # fits in memory, but not what the file holds
    ("num_hidden_layers", 3, "missing ['gau_alpha.encoder.layer.2"),
    ("intermediate_size", 130, "shape mismatch gau_alpha.encoder.layer.0.gau.i_dense.weight"),
])
def test_crafted_model_sizes_are_refused_before_building(tiny_run, corpus, tmp_path, capsys, monkeypatch, field,
                                                          value, needle):
    from infoscale import rundir

    monkeypatch.setattr("infoscale.runtime.available_memory", lambda device: 8 * 2**30)
    built = []
    monkeypatch.setattr(rundir, "is_out_of_memory", lambda e: built.append(e) or False)
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(cfg | {field: value}))
    out = tmp_path / "r.jsonl"
    refused(capsys, ["eval", "--models", run, "--lengths", "32", "--predictions", "16", "--bf16", "off",
                     "--no-progress", "--out", out], needle)
    assert not out.exists() and not built
    refused(capsys, ["train", "--out", tmp_path / "ft", "--corpus", corpus, "--init-from", run,
                     *TINY], needle)
    assert not (tmp_path / "ft").exists()


def test_running_out_of_memory_while_loading_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    from infoscale.models.gau import GAUForMaskedLM

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried "
                           "to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(GAUForMaskedLM, "from_pretrained", no_memory)
    refused(capsys, ["eval", "--models", tiny_run, "--lengths", "32", "--bf16", "off", "--no-progress", "--out",
                     tmp_path / "r.jsonl"], "not enough memory on cpu to load the model", "tried to allocate")


# ---------------------------------------------------------------------------------------------
# corpora: regular files only, bounded sizes
# ---------------------------------------------------------------------------------------------


def test_a_corpus_that_is_not_a_regular_file_is_refused_before_opening(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    for bad in ("/dev/zero", fifo):
        refused(capsys, ["train", "--out", tmp_path / "run", "--corpus", bad, *TINY], "is not a regular file")
    assert not (tmp_path / "run").exists()


def test_the_corpus_of_a_run_is_checked_at_eval_time_too(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps(cfg | {"corpus": "/dev/zero"}))
    out = tmp_path / "r.jsonl"
    refused(capsys, ["eval", "--models", run, "--lengths", "32", "--bf16", "off", "--no-progress", "--out", out],
            "/dev/zero is not a regular file")
    assert not out.exists()


def test_corpus_sizes_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(corpora, "MAX_CORPUS_BYTES", 50_000)
    long_line = tmp_path / "c.jsonl"
    long_line.write_text(json.dumps({"text": "ab" * 400}) + "\n" + json.dumps({"text": "x" * 2000}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:2 is longer than"):
        corpora.load_corpus(str(long_line))
    big = tmp_path / "big.txt"
    big.write_text("word " * 20_000)
    with pytest.raises(DataError, match="more than the .* GiB a corpus may hold"):
        corpora.load_corpus(str(big))
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("word " * 4000)
    with pytest.raises(DataError, match="more than the"):
        corpora.load_corpus(str(folder))


# ---------------------------------------------------------------------------------------------
# calibration.json: read only for a calibrated method, checked
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{oops", "{}", '{"dims": [0, 16]}', '{"dims": ["a", 16]}', '{"dims": [16]}',
                                     '[1, 2]', '{"dims": [NaN, 16]}'])
def test_a_damaged_calibration_stops_only_calibrated_methods(tiny_run, tmp_path, capsys, content):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "calibration.json").write_text(content)
    out = tmp_path / "r.jsonl"
    flags = ["--lengths", "32", "--predictions", "16", "--settings", "repeated", "--bf16", "off", "--no-progress",
             "--out", str(out)]
    assert cli(["eval", "--models", str(run), "--methods", "softmax", *flags]) == 0, capsys.readouterr().err
    assert {r["method"] for r in read_records(out)} == {"softmax"}
    capsys.readouterr()
    refused(capsys, ["eval", "--models", run, "--methods", "infoscale(calibrated=True)", *flags],
            str(run / "calibration.json"), "infoscale calibrate")
    assert {r["method"] for r in read_records(out)} == {"softmax"}


def test_a_recalibration_measures_calibrated_cells_again(tiny_run, tmp_path):
    """A calibrated cell names the dims it ran with (their digest in method_resolved, hence in its key): a rerun with
    the same calibration reuses it, a rerun after a recalibration measures it again, and uncalibrated cells are
    reused either way."""
    from infoscale.io import method_identity

    run = _copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "r.jsonl"
    flags = ["--models", str(run), "--methods", "softmax", "infoscale(calibrated=True)", "--lengths", "32",
             "--predictions", "16", "--settings", "repeated", "--bf16", "off", "--no-progress", "--out", str(out)]
    for dims in ([3.0, 5.0], [3.0, 5.0], [3.0, 7.0]):
        (run / "calibration.json").write_text(json.dumps({"dims": dims}))
        assert cli(["eval", *flags]) == 0
    recs = read_records(out)
    cal = [r for r in recs if r["method"] == "infoscale(calibrated=True)"]
    ran = {r["method_resolved"] for r in cal}
    assert len({r["key"] for r in cal}) == 2 and len(ran) == 2, ran  # measured once per calibration, not thrice
    spec = cal[0]["method_resolved"].split(" [")[0]
    assert {method_identity(spec, True, [3.0, 5.0]), method_identity(spec, True, [3.0, 7.0])} == ran
    assert len({r["key"] for r in recs if r["method"] == "softmax"}) == 1


# ---------------------------------------------------------------------------------------------
# flags checked at parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train", "--corpus", "shakespeare", "--out"], ["eval", "--models", "m", "--out"],
                                     ["analyze", "--out"], ["calibrate", "--model"], ["reproduce", "--runs"]])
@pytest.mark.parametrize("seed", ["-1", str(2**32), "100000000000000000000"])
def test_seeds_are_range_checked_before_anything_is_written(tmp_path, capsys, command, seed):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli([*command, str(out), "--seed", seed])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    want = f"infoscale {command[0]}: error: argument --seed: must be an integer with 0 <= value < {2**32}, got {seed}"
    assert last == want, last
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["eval", "--models", "{run}", "--lengths", "32", "--out", "{file}/r.jsonl"],
    ["eval", "--models", "{run}", "--lengths", "32", "--out", "{folder}"],
    ["report", "{records}", "--out", "{file}"],
    ["report", "{records}", "--out", "{file}/rep"],
    ["analyze", "--lengths", "32", "--out", "{file}/an"],
    ["reproduce", "--preset", "smoke", "--runs", "{file}/runs"],
    ["reproduce", "--preset", "smoke", "--runs", "{file}"],
    ["train", "--corpus", "shakespeare", "--bf16", "off", "--out", "{file}/run"],
])
def test_an_output_under_a_file_is_refused_before_work(tiny_run, tmp_path, capsys, argv):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    records = tmp_path / "r.jsonl"
    write_records(records, [eval_rec()])
    before = sorted(p.name for p in tmp_path.iterdir())
    subs = {"{run}": str(tiny_run), "{file}": str(notes), "{folder}": str(tmp_path), "{records}": str(records)}
    args = [next((a.replace(k, v) for k, v in subs.items() if k in a), a) for a in argv]
    refused(capsys, args, "notes.txt" if "{file}" in " ".join(argv) else "is a folder")
    assert notes.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("content, needle", [
    ("[" * 100_000 + "]" * 100_000, "r.jsonl:2 is nested too deeply"),
    (json.dumps(eval_rec(length=10**400)), "r.jsonl:2: length 1000"),
    (json.dumps(eval_rec(length=-64)), "r.jsonl:2: length -64 is out of range"),
    (json.dumps(eval_rec(value=1e308)), "r.jsonl:2: value = 1e+308 is not a finite number"),
    (json.dumps(eval_rec(ci_high=1e308)), "r.jsonl:2: ci_high = 1e+308"),
    (json.dumps(eval_rec(window_means="0.5", window_counts=[1])), "r.jsonl:2: window_means must be a list"),
    (json.dumps(eval_rec(window_means=[0.5, 1e308], window_counts=[1, 1])), "window_means must be a list of finite"),
    (json.dumps(eval_rec(metric="bogus")), "r.jsonl:2: unknown metric 'bogus'"),
    (json.dumps(eval_rec(method="soft\nmax")), "r.jsonl:2: method 'soft\\nmax' is not a name"),
    (json.dumps(eval_rec(method="a | b")), "r.jsonl:2: method 'a | b' is not a name"),
    (json.dumps(eval_rec(model_name="")), "r.jsonl:2: model_name '' is not a name"),
    (json.dumps(eval_rec(train="x")), "r.jsonl:2: train must be a JSON object"),
])
def test_report_validates_every_record(tmp_path, capsys, content, needle):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(eval_rec()) + "\n" + content + "\n")
    refused(capsys, ["report", path, "--out", tmp_path / "rep"], needle, "fix or remove that line")
    assert not (tmp_path / "rep" / "report.md").exists()


def test_report_file_names_stay_in_the_report_folder(tmp_path):
    path = tmp_path / "r.jsonl"
    write_records(path, [eval_rec(setting="../../escaped", length=n) for n in (32, 64)])
    assert cli(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    pngs = [p for p in tmp_path.rglob("*.png")]
    assert pngs and all(p.parent == tmp_path / "rep" for p in pngs), pngs
    assert not (tmp_path / "escaped_strided.png").exists()


def test_analyze_refuses_a_length_that_cannot_fit_before_any_work(tmp_path, capsys, monkeypatch):
    from infoscale import analysis

    monkeypatch.setattr("infoscale.runtime.available_memory", lambda device: 2**30)  # 1 GiB free
    out = tmp_path / "an"
    err = refused(capsys, ["analyze", "--lengths", "64", "100000000", "--out", out], "length 100000000 needs about",
                  "GiB is free on cpu", "the longest length that fits now is about")
    fits = int(err.split("fits now is about ")[1].split(":")[0])
    assert analysis.analysis_bytes(fits, 4) <= 2**30 < analysis.analysis_bytes(2 * fits, 4)
    assert not out.exists()


def test_settings_that_apply_to_no_model_are_an_error(tiny_run, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    refused(capsys, ["eval", "--models", tiny_run, "--settings", "passkey", "--lengths", "32", "--bf16", "off",
                     "--no-progress", "--out", out], "--settings passkey has nothing for the masked-LM runs (run)",
            "contiguous and repeated", "passkey applies to causal (Llama) runs only")
    assert not out.exists()


def test_one_new_cell_is_singular(tiny_run, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert cli(["eval", "--models", str(tiny_run), "--methods", "softmax", "--settings", "repeated", "--lengths", "32",
                "--predictions", "16", "--bf16", "off", "--no-progress", "--out", str(out)]) == 0
    assert "1 new cell (2 records) in" in capsys.readouterr().out


@pytest.mark.parametrize("content, needle", [('{"a": 1}\n', "r.jsonl:1: incomplete eval record"),
                                             ("notes\n", "r.jsonl:1 is not a JSON record")])
def test_eval_does_not_append_to_a_file_that_is_not_a_record_file(tiny_run, tmp_path, capsys, content, needle):
    out = tmp_path / "r.jsonl"
    out.write_text(content)
    refused(capsys, ["eval", "--models", tiny_run, "--lengths", "32", "--bf16", "off", "--no-progress", "--out", out],
            "is not a record file infoscale can append to", needle, "give another --out")
    assert out.read_text() == content


def test_resume_keeps_the_precision_auto_chose(tmp_path, corpus, capsys, monkeypatch):
    from infoscale import train as train_mod

    auto = [a if a != "off" else "auto" for a in TINY]
    chosen = []
    monkeypatch.setattr(train_mod, "use_bf16", lambda flag, device: chosen.append(flag) or False)  # auto -> fp32
    out = tmp_path / "run"
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "1", *auto]) == 0
    assert json.loads((out / "train_config.json").read_text())["precision"] == "fp32" and chosen == ["auto"]
    monkeypatch.setattr(train_mod, "use_bf16", lambda flag, device: chosen.append(flag) or True)  # now it would be bf16
    assert cli(["train", "--out", str(out), "--corpus", str(corpus), "--steps", "2", "--resume", *auto]) == 0
    assert chosen == ["auto"]  # not measured again
    assert json.loads((out / "train_config.json").read_text())["precision"] == "fp32"


# ---------------------------------------------------------------------------------------------
# a newcomer's first steps
# ---------------------------------------------------------------------------------------------


def test_rope_is_exported_as_the_readme_uses_it():
    from infoscale.attn.rope import Rope

    assert infoscale.Rope is Rope and "Rope" in infoscale.__all__
    q, k, v = _qkv(d=8)
    infoscale.attention(q, k, v, "rerope", train_len=4, rope=infoscale.Rope(8, 10000.0, layout="halves"))


def test_help_marks_required_flags_and_hides_empty_defaults():
    sub = build_parser()._subparsers._group_actions[0].choices
    assert "(default: )" not in sub["calibrate"].format_help()
    usage = " ".join(sub["train"].format_usage().split())
    assert "--out OUT" in usage and "[--out OUT]" not in usage
    assert "not comparable to `infoscale eval`" in " ".join(sub["train"].format_help().split())


def test_train_logs_that_its_heldout_accuracy_is_not_evals(tmp_path, corpus, capsys):
    assert cli(["train", "--out", str(tmp_path / "run"), "--corpus", str(corpus), "--steps", "1", *TINY]) == 0
    out = capsys.readouterr()
    assert "80/10/10 masking, so not comparable to `infoscale eval`" in out.out + out.err


@pytest.mark.parametrize("kw, passed", [({"n": 0}, "got n=0"), ({"n_q": 8}, "got n_q=8"), ({}, "got none of them")])
def test_a_missing_length_says_what_was_passed(kw, passed):
    with pytest.raises(MethodError, match=f"n \\(queries and keys\\) or both n_q and n_k.*{passed}"):
        infoscale.build_plan("softmax", batch=1, heads=1, head_dim=8, train_len=4, **kw)


def test_running_out_of_memory_anywhere_is_one_line(tmp_path, capsys, monkeypatch):
    from infoscale import analysis

    def no_memory(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 GiB")

    monkeypatch.setattr(analysis, "analyze", no_memory)
    refused(capsys, ["analyze", "--lengths", "32", "--out", tmp_path / "an"], "out of memory (CUDA out of memory",
            "use shorter lengths")
    monkeypatch.setattr(analysis, "analyze", lambda cfg: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        cli(["analyze", "--lengths", "32", "--out", str(tmp_path / "an")])


def test_a_config_size_of_the_wrong_type_names_the_file(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(cfg | {"type_vocab_size": 2.5}))
    refused(capsys, ["eval", "--models", run, "--lengths", "32", "--bf16", "off", "--no-progress", "--out",
                     tmp_path / "r.jsonl"], "config.json: type_vocab_size must be a non-negative integer, got 2.5")


def _cell_rec(windows: int, **change) -> dict:
    """One record of a causal cell with ``windows`` windows (the fields the sweep's growth reads)."""
    r = {"model": "/m", "method_resolved": "softmax", "length": 64, "setting": "contiguous",
         "protocol": "teacher_forced", "protocol_params": {}, "seed": 0, "predictions": 0, "windows": windows,
         "windows_used": windows, "precision": "fp32", "metric": "nll", "window_counts": [63] * windows,
         "window_means": [1.0 + i for i in range(windows)], "n_predictions": 63 * windows}
    r["key"] = io.cell_key(r)
    return r | change


@pytest.mark.parametrize("damage", [
    {"window_counts": None}, {"window_counts": [63, 0]}, {"window_counts": [63]}, {"window_means": [1.0]},
    {"window_means": [1.0, math.nan]}, {"window_means": [1.0, "2"]}, {"windows_used": 0}, {"windows_used": True},
    {"windows_used": -1}, {"metric": ["nll"]}, {"key": None}, {"key": ["k"]}, {"window_hits": [1]},
    {"spans": 3}, {"n_predictions": "126"}, {"precision": "bf16"},
])
def test_a_damaged_smaller_cell_is_measured_anew_never_joined(damage):
    """The records file is untrusted: a smaller cell whose per-window results are not whole and consistent (or were
    measured at another precision) is not grown from, so the cell is measured whole instead of joined wrongly."""
    from infoscale.sweep import smaller_cell

    cell = _cell_rec(4)
    good = _cell_rec(2)
    assert smaller_cell([good], cell, 4, "fp32") == [good]
    assert smaller_cell([good | damage], cell, 4, "fp32") == []


def test_the_largest_smaller_cell_is_grown_from():
    from infoscale.sweep import smaller_cell

    two, three, other = _cell_rec(2), _cell_rec(3), _cell_rec(2, method_resolved="pi")
    other["key"] = io.cell_key(other)
    cell = _cell_rec(4)
    assert smaller_cell([two, other, three], cell, 4, "fp32") == [three]
    assert smaller_cell([two, three], cell, 3, "fp32") == [two]  # no new window beyond three's
    assert smaller_cell([two], cell, 2, "fp32") == []
    assert smaller_cell([_cell_rec(4)], _cell_rec(2), 4, "fp32") == []  # a larger cell is not a smaller one


def test_tables_show_a_cell_with_its_most_windows(tmp_path):
    """The same cell with 2 and 4 windows (grown, or measured twice): tables show the 4-window one alone, never a
    mean of both; records with an unusable key are left alone and do not break the report."""
    two, four = _cell_rec(2), _cell_rec(4)
    assert io.superseded([four, two]) == io.superseded([two, four]) == {two["key"]}
    assert io.superseded([two | {"key": ["k"]}, four]) == set()
    assert io.superseded([two | {"windows": "2"}, four]) == set()
    base = {"model_name": "m", "method": "softmax", "train": {}, "ci_low": None, "ci_high": None}
    recs = [base | r | {"value": r["window_means"][-1]} for r in (two, four)] + [base | two | {"key": [1], "value": 9}]
    write_records(tmp_path / "r.jsonl", recs)
    assert cli(["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| `softmax` | 6.500† |" in md  # the 4-window record (4.0) and the unkeyed one (9.0); not the 2-window one


def test_a_cell_measured_again_keeps_its_row(tmp_path):
    """A cell grown (or measured again) later is appended to the records file; the report shows it where its
    smaller version stood, so the order of methods does not depend on when each cell was last measured."""
    def cell(method, windows):
        r = _cell_rec(windows, method_resolved=method)
        return r | {"key": io.cell_key(r), "method": method, "model_name": "m", "train": {}, "ci_low": None,
                    "ci_high": None, "value": r["window_means"][-1]}

    a2, b2, c2, b4, a4 = cell("softmax", 2), cell("pi", 2), cell("yarn", 2), cell("pi", 4), cell("softmax", 4)
    loose = {"kind": "entropy", "model_name": "m"}  # no usable key: stays where it is
    assert io.latest_cells([a2, b2, loose, c2, b4, a4]) == [a4, b4, loose, c2]
    assert io.latest_cells([a2, b2, c2]) == [a2, b2, c2]  # nothing superseded: the order is the file's
    assert io.latest_cells([b4, b2]) == [b4]
    write_records(tmp_path / "r.jsonl", [a2, b2, c2, b4, a4])
    assert cli(["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = [m for m in ("`softmax` |", "`pi` |", "`yarn` |") if m in md]
    assert len(rows) == 3 and md.index("`softmax` |") < md.index("`pi` |") < md.index("`yarn` |")


def test_tables_say_where_cells_of_two_precisions_meet():
    from infoscale.report.tables import precision_note

    base = {"model_name": "m", "length": 64, "setting": "contiguous", "protocol": "teacher_forced"}
    recs = [base | {"method": "softmax", "precision": "bf16"}, base | {"method": "pi", "precision": "fp32"},
            base | {"method": "yarn", "precision": "fp32", "length": 128},
            base | {"method": "ntk", "precision": ["x"]}]
    note = precision_note(recs)
    assert len(note) == 2 and "64: bf16 `softmax`; fp32 `pi`" in note[0] and "128" not in note[0]
    assert precision_note(recs[1:]) == []
