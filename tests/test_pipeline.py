"""Evaluation, records, report, analysis and the smoke reproduction, end to end on real (small) runs."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from infoscale import analysis, data
from infoscale.cli import main as cli
from infoscale.data import make_windows
from infoscale.errors import DataError
from infoscale.evaluate import EvalConfig, evaluate
from infoscale.io import read_records
from infoscale.stats import cluster_ci
from infoscale.tasks.mlm import mask_groups


def test_windows_and_masks():
    docs = data.TokenDocs([], data.CharTokenizer(data.SPECIALS + ["a"]))
    docs.arrays = [np.arange(5, 400, dtype=np.int32)]  # no repeats of its own
    rep = make_windows(docs, 100, "repeated", 3, 8, 4, seed=0)
    for w in rep:
        m = next(p for p in range(8, 17) if np.array_equal(w[p:], w[:-p]))  # the tiled span's length
        assert m % 4 != 0  # strided masks never hit a copy of a masked token
    con = make_windows(docs, 50, "contiguous", 2, 8, None, seed=0)
    assert all(len(w) == 50 for w in con)
    with pytest.raises(DataError, match="no held-out document has 1000 tokens"):
        make_windows(docs, 1000, "contiguous", 1, 8, None, seed=0)
    rng = np.random.default_rng(0)
    assert [g.tolist() for g in mask_groups(6, "exact", rng)] == [[i] for i in range(6)]
    s = mask_groups(20, "sampled", rng, samples=5)
    assert len(s) == 5 and len({int(g[0]) for g in s}) == 5
    (st,) = mask_groups(20, "strided", rng, stride=4)
    assert np.all(np.diff(st) == 4) and st[0] < 4


def test_cluster_ci_widens_with_between_window_spread():
    same = [np.array([1, 0] * 50), np.array([1, 0] * 50)]
    spread = [np.ones(100), np.zeros(100)]
    lo1, hi1 = cluster_ci(same)
    lo2, hi2 = cluster_ci(spread)
    assert lo1 < 0.5 < hi1 and hi2 - lo2 > hi1 - lo1
    lo, hi = cluster_ci([np.array([1] * 30 + [0] * 70)])  # one window: Wilson
    assert lo == pytest.approx(0.2189, abs=1e-3) and hi == pytest.approx(0.3958, abs=1e-3)


def test_exact_protocol_matches_a_plain_loop(tiny_run, tmp_path):
    """The batched exact protocol equals masking each position by hand, one forward pass each."""
    out = tmp_path / "r.jsonl"
    cfg = EvalConfig(models=[str(tiny_run)], methods=["softmax"], lengths=[40], settings=["contiguous"],
                     protocol="exact", windows=1, predictions=1, out=str(out), bf16="off", progress=False)
    recs = {r["metric"]: r for r in evaluate(cfg, log=lambda s: None)}
    from infoscale.rundir import load_run

    run = load_run(tiny_run)
    model = run.model
    (w,) = make_windows(run.heldout_docs(), 40, "contiguous", 1, 32, None, 0)
    hits = []
    with torch.no_grad():
        for i in range(40):
            x = torch.from_numpy(w.copy())[None]
            x[0, i] = data.MASK
            hits.append(int(model(x).logits[0, i].argmax()) == int(w[i]))
    assert recs["accuracy"]["n_predictions"] == 40
    assert recs["accuracy"]["value"] == pytest.approx(np.mean(hits))


def test_inapplicable_methods_are_skipped_with_a_reason(tiny_run, tmp_path):
    logs = []
    cfg = EvalConfig(models=[str(tiny_run)], methods=["cosscale", "infoscale"], lengths=[32], out=str(tmp_path / "r"),
                     progress=False, predictions=16)
    new = evaluate(cfg, log=logs.append)
    assert {r["method"] for r in new} == {"infoscale"}
    assert any("skip cosscale" in s and "train-time method" in s for s in logs)


def test_bad_model_directories(tmp_path, capsys, tiny_run):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "foreign" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "broken").mkdir()
    for f in ("config.json", "vocab.txt", "split.json", "train_config.json"):
        (tmp_path / "broken" / f).write_bytes((tiny_run / f).read_bytes())
    (tmp_path / "broken" / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes()[:100])
    # a directory with config.json but no train_config.json may be a pretrained model: it is judged as one
    for d, msg in [("missing", "is not a directory"), ("foreign", "no tokenizer.json (it is not a run directory"),
                   ("broken", "cannot load the model")]:
        assert cli(["eval", "--models", str(tmp_path / d), "--out", str(tmp_path / "r.jsonl")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err


@pytest.mark.e2e
def test_interrupted_sweep_resumes_without_duplicates(tiny_run, tmp_path):
    args = [sys.executable, "-m", "infoscale.cli", "eval", "--models", str(tiny_run), "--methods", "softmax",
            "infoscale", "rerope", "--lengths", "32", "64", "128", "256", "--predictions", "64", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref.jsonl")], capture_output=True, text=True, env=env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "cut.jsonl"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(read_records(out)) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_records(out)
    want = read_records(tmp_path / "ref.jsonl")
    assert 3 <= len(partial) < len(want) == 48
    again = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    got = read_records(out)
    assert len(got) == len({(r["key"], r["metric"]) for r in got}) == len(want)
    assert len({r["key"] for r in got}) == 24
    by_key = {(r["key"], r["metric"]): r for r in want}
    for r in got:
        assert r["value"] == by_key[r["key"], r["metric"]]["value"]
    # a third run adds nothing
    third = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, env=env)
    assert "0 new cells" in third.stdout and len(read_records(out)) == len(want)


@pytest.mark.e2e
def test_report_from_records(tiny_run, tmp_path):
    res = tmp_path / "r.jsonl"
    evaluate(EvalConfig(models=[str(tiny_run)], methods=["softmax", "window"], lengths=[32, 64], out=str(res),
                        predictions=32, progress=False), log=lambda s: None)
    assert cli(["report", str(res), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("| `softmax` |") == 4 and md.count("| `window` |") == 4  # one table per setting and metric
    # every cell of every table is the record it came from (value, CI half-width), and the bold one is the best
    recs = read_records(res)
    tables = md.split("### ")[1:]
    checked = 0
    for t in tables:
        head = t.splitlines()[0]
        if not re.fullmatch(r".+: (contiguous|repeated), strided protocol, (accuracy|loss)", head.strip()):
            continue
        setting = "contiguous" if "contiguous" in head else "repeated"
        metric = head.rsplit(", ", 1)[1].strip()
        rows = [line for line in t.splitlines() if line.startswith("| `")]
        header = next(line for line in t.splitlines() if line.startswith("| method"))
        lengths = [int(x) for x in header.split("|")[2:-1]]
        best = {}
        for line in rows:
            method = line.split("`")[1]
            cells = [c.strip() for c in line.split("|")[2:-1]]
            for n, cell in zip(lengths, cells, strict=True):
                (r,) = [r for r in recs if r["method"] == method and r["length"] == n and r["setting"] == setting
                        and r["metric"] == metric]
                shown = cell.strip("*").split(" ± ")
                scale = 100 if metric == "accuracy" else 1
                assert float(shown[0]) == pytest.approx(scale * r["value"], abs=0.051 if scale == 100 else 5e-4)
                if r["ci_low"] is not None:
                    assert float(shown[1]) == pytest.approx(scale * (r["ci_high"] - r["ci_low"]) / 2, abs=0.051)
                if cell.startswith("**"):
                    best[n] = r["value"]
                checked += 1
        for n, v in best.items():
            vals = [r["value"] for r in recs if r["length"] == n and r["setting"] == setting and r["metric"] == metric]
            assert v == (max(vals) if metric == "accuracy" else min(vals))
    assert checked == 2 * 2 * 2 * 2  # methods × lengths × settings × metrics
    # new records carry per-window results: bold only a best whose paired CI excludes 0, and a Δ table
    assert "only where its paired 95% CI against the runner-up excludes 0" in md
    assert "| `window` − `softmax` |" in md and "| *best* (vs runner-up) |" in md
    for s in ("contiguous", "repeated"):
        png = tmp_path / "rep" / f"accuracy_{s}_strided.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# the analysis: synthetic facts
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_synthetic_entropy_infoscale_holds_softmax_drifts():
    cfg = analysis.AnalyzeConfig(methods=["softmax", "infoscale"], lengths=[64, 4096], windows=1)
    recs = {(r["method"], r["length"]): r for r in analysis.entropy_dilution_records(cfg) if r["kind"] == "entropy"}
    info = recs["infoscale", 4096]["H_norm"] / recs["infoscale", 64]["H_norm"]
    soft = recs["softmax", 4096]["H_norm"] / recs["softmax", 64]["H_norm"]
    assert abs(info - 1) < 0.02
    assert soft - 1 > 0.03


def test_cosscale_mass_outside_window_decreases_with_s():
    cfg = analysis.AnalyzeConfig(lengths=[512], scales=[4.0, 16.0, 64.0, 256.0], windows=2)
    recs = sorted(analysis.cos_window_records(cfg), key=lambda r: r["s"])
    mass = [r["outside_mass"] for r in recs]
    js = [r["js"] for r in recs]
    assert all(a > b for a, b in zip(mass, mass[1:], strict=False))
    assert all(a > b for a, b in zip(js, js[1:], strict=False))
    assert mass[0] > 0.5 and mass[-1] < 0.05


def test_window_distance_zero_for_a_window():
    logits = torch.full((10, 10), -1e9)
    for i in range(10):
        for j in range(max(0, i - 2), min(10, i + 3)):
            logits[i, j] = float(i * j % 3)
    d = analysis.window_distance(logits, 2)
    assert d["outside_mass"] < 1e-6 and d["js"] < 1e-6


# ---------------------------------------------------------------------------------------------
# the smoke reproduction (the same pipeline as `make reproduce`, small)
# ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("preset", ["smoke", pytest.param("quick", marks=pytest.mark.slow)])
def test_reproduce(tmp_path, preset):
    from infoscale.attn.methods import MethodError, merge_with_training
    from infoscale.reproduce import MODELS, PRESETS, ReproduceConfig, reproduce

    cfg = ReproduceConfig(preset=preset, runs=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                          report=str(tmp_path / "report"), progress=False)
    res = reproduce(cfg, log=lambda s: None)
    recs = read_records(res["records"])
    p = PRESETS[preset]
    strided = [r for r in recs if r["protocol"] == "strided" and r["metric"] == "accuracy"]
    cells = Counter((r["model_name"], r["method"], r["setting"], r["length"]) for r in strided)
    assert max(cells.values()) == 1  # no duplicates
    expected = set()
    for name, trained in MODELS.items():
        for m in p.methods:
            try:
                merge_with_training(trained, m)
            except MethodError:
                continue  # e.g. RoPE methods on the ALiBi model
            expected |= {(name, m, s, n) for s in ("contiguous", "repeated") for n in p.lengths}
    assert set(cells) == expected
    assert sum(1 for c in expected if c[0] == "alibi") < sum(1 for c in expected if c[0] == "softmax")
    for r in recs:
        assert math.isfinite(r["value"]) and r["n_predictions"] > 0
        if r["metric"] == "accuracy":
            assert r["ci_low"] <= r["value"] <= r["ci_high"]
    # at the training length every model beats chance (a uniform guess) fivefold, and the softmax
    # model beats always answering the most frequent token
    from infoscale.rundir import load_run

    run = load_run(res["models"][0])
    tok = run.tokenizer
    tokens = np.concatenate(run.heldout_docs().arrays)
    majority = Counter(tokens.tolist()).most_common(1)[0][1] / len(tokens)
    acc = {r["model_name"]: r["value"] for r in strided
           if r["method"] == "softmax" and r["length"] == 64 and r["setting"] == "contiguous"}
    for name in MODELS:
        assert acc[name] > 5 / len(tok), (name, acc[name])
    assert acc["softmax"] > majority + 0.03, (acc, majority)
    assert any(r["protocol"] == "exact" for r in recs)
    md = Path(res["report"]).read_text()
    assert "### softmax: contiguous, strided protocol" in md and "Protocols compared" in md
    assert (Path(res["report"]).parent / "cos_window.png").exists()
    # rerun with the records in another order (as parallel evaluations write them): nothing is recomputed and the
    # report still lists the models in the preset's order
    lines = Path(res["records"]).read_text().splitlines(keepends=True)
    Path(res["records"]).write_text("".join(lines[::-1]))
    reproduce(cfg, log=lambda s: None)
    assert len(Path(res["records"]).read_text().splitlines()) == len(lines)
    md = Path(res["report"]).read_text()
    heading = ": contiguous, strided protocol, accuracy"
    tables = [h for h in md.splitlines() if h.startswith("### ") and h.endswith(heading)]
    assert [h.split()[1].rstrip(":") for h in tables] == list(MODELS), tables
    rows = md.split(tables[0])[1].split("\n\n")[2].splitlines()[2:]  # the softmax model's table, after its header
    assert [row.split("`")[1] for row in rows] == list(p.methods), rows


def test_reproductions_on_two_corpora_keep_apart(tmp_path):
    from infoscale.reproduce import ReproduceConfig, paths

    def where(corpus):
        return paths(ReproduceConfig(preset="quick", corpus=corpus, runs=str(tmp_path / "r")))

    assert where("shakespeare")["runs"] == tmp_path / "r" / "quick"
    assert where("sanguo")["runs"] == tmp_path / "r" / "quick-sanguo"
    assert where("sanguo")["records"].name == "quick-sanguo.jsonl"
    assert where(str(tmp_path / "my text.txt"))["report"].name == "quick-my_text"


@pytest.mark.e2e
def test_paper_recipe_pretrains_long_then_fine_tunes_short(tmp_path):
    """paper-smoke: pretrain at 256 with softmax_plus, fine-tune at 64 from those weights, evaluate both models."""
    from infoscale.reproduce import PRESETS, RECIPE_MODELS, ReproduceConfig, reproduce
    from infoscale.rundir import load_run

    cfg = ReproduceConfig(preset="paper-smoke", runs=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                          report=str(tmp_path / "report"), progress=False)
    res = reproduce(cfg, log=lambda s: None)
    p = PRESETS["paper-smoke"]
    runs = tmp_path / "runs" / "paper-smoke"
    pre = json.loads((runs / "pretrain" / "train_config.json").read_text())
    assert (pre["train_len"], pre["attention"], pre["steps"]) == (256, "softmax_plus", p.pretrain.steps)
    pre_w = load_run(runs / "pretrain").model.state_dict()
    fresh = build_model_like(load_run(runs / "pretrain").model)
    for name, attention in RECIPE_MODELS.items():
        ft = json.loads((runs / name / "train_config.json").read_text())
        assert (ft["train_len"], ft["attention"], ft["init_from"]) == (64, attention, str(runs / "pretrain"))
        run = load_run(runs / name)
        assert run.train_len == 64
        # the fine-tune starts from the pretrained weights: it ends far nearer them than a fresh init is
        w = run.model.state_dict()
        key = next(k for k in w if k.endswith("word_embeddings.weight"))
        assert (w[key] - pre_w[key]).norm() < 0.5 * (fresh[key] - pre_w[key]).norm()
    recs = read_records(res["records"])
    models = {r["model_name"] for r in recs}
    assert models == set(RECIPE_MODELS)  # the fine-tunes are evaluated, not the pretrained model
    assert {r["length"] for r in recs if r["protocol"] == "strided"} == set(p.lengths)
    assert "### cosscale: contiguous, strided protocol" in Path(res["report"]).read_text()
    assert f"({p.steps} steps, fine-tuned from `pretrain`)" in Path(res["report"]).read_text()  # the recipe shows


def build_model_like(model):
    """A freshly initialised model of the same configuration (the same seed as a run's init is not needed:
    any fresh init is far from trained weights)."""
    torch.manual_seed(123)
    return type(model)(model.config).state_dict()
