"""The encoder family: transformers' ModernBERT trained with our masked-LM task (``infoscale train --arch
modernbert``), evaluated with every method through infoscale.hf, reported like GAU-α's runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from infoscale import hf
from infoscale.attn.errors import MethodError
from infoscale.models import ARCHS
from infoscale.rundir import Run

from .conftest import run_cli


def _tiny(train_len=16, vocab=40):
    torch.manual_seed(0)
    cfg = SimpleNamespace(preset="tiny", train_len=train_len, attention="softmax", dropout=0.0)
    model = ARCHS["modernbert"].import_module().build_for_training(cfg, range(vocab)).eval()
    with torch.no_grad():  # sharper attention than a fresh init's, so that methods visibly differ
        for name, p in model.named_parameters():
            if "Wqkv" in name:
                p.mul_(30)
    return Run(Path("tiny"), model, None, {})


def test_the_family_builds_a_stock_model_at_the_training_length():
    run = _tiny()
    cfg = run.model.config
    assert type(run.model).__name__ == "ModernBertForMaskedLM" and cfg.model_type == "modernbert"
    assert run.train_len == 16 and cfg.infoscale["train_method"] == "softmax"
    assert set(cfg.layer_types) == {"full_attention"}  # no sliding layer hides what a method does beyond L


def test_methods_reach_the_model_through_hf():
    """A run's method is applied with infoscale.hf.apply: the same logits as applying it by hand to a copy of the
    stock model; methods differ beyond L; the causal-only ones are refused (evaluation skips them)."""
    run = _tiny()
    stock = copy.deepcopy(run.model)
    ids = torch.randint(5, 40, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = stock(ids).logits
        for m in ("softmax", "infoscale", "rerope(window=8)+infoscale", "yarn"):
            got = run.logits_with(str(run.resolve_method(m).resolved(16)))(ids)
            want = hf.apply(copy.deepcopy(stock), m, train_len=16)(ids).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if m == "softmax":
                torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)
            else:
                assert (got - plain).abs().max() > 1e-3, m
    with pytest.raises(MethodError, match="causal attention only"):
        run.resolve_method("dca")
    with pytest.raises(MethodError, match="train-time method|trained"):  # what hf.apply refuses is skipped too
        run.resolve_method("cosscale")
    with pytest.raises(MethodError, match="per-layer-type rotaries|rotar"):  # a ConfigError of hf.apply, skipped
        run.resolve_method("hf_yarn(factor=2.0)")
    with pytest.raises(MethodError, match="calibration"):  # refused before the sweep, not at its first forward
        run.resolve_method("infoscale(calibrated=True)")


@pytest.mark.e2e
def test_train_eval_report_end_to_end(tmp_path, corpus):
    """train --arch modernbert, eval with methods, report: the run loads as a stock checkpoint, the records are
    masked-LM cells like GAU-α's, the report has their table."""
    out = tmp_path / "mb"
    res = run_cli("train", "--arch", "modernbert", "--preset", "tiny", "--out", str(out), "--corpus", str(corpus),
                  "--train-len", "16", "--steps", "20", "--batch-size", "8", "--eval-every", "10", "--save-every",
                  "10", "--val-windows", "8", "--eval-docs", "1")
    assert res.returncode == 0, res.stderr
    assert "AutoModelForMaskedLM.from_pretrained" in res.stdout
    from transformers import AutoModelForMaskedLM

    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == "ModernBertForMaskedLM"
    recs = tmp_path / "r.jsonl"
    res = run_cli("eval", "--models", str(out), "--methods", "softmax", "infoscale", "rerope", "dca", "--lengths",
                  "16", "64", "--windows", "2", "--predictions", "32", "--out", str(recs))
    assert res.returncode == 0, res.stderr
    assert "skip dca" in res.stdout + res.stderr
    cells = [json.loads(x) for x in recs.read_text().splitlines()]
    assert {(r["method"], r["length"]) for r in cells} == {(m, n) for m in ("softmax", "infoscale", "rerope")
                                                           for n in (16, 64)}
    assert {r["metric"] for r in cells} == {"accuracy", "loss"}
    res = run_cli("report", str(recs), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "`rerope`" in report and "| 64 |" in report
    # what does not reach this family yet says so in one line
    for args, msg in ((["analyze", "--model", str(out), "--no-synthetic", "--lengths", "16", "--out",
                        str(tmp_path / "an")], "not supported yet"),
                      (["calibrate", "--model", str(out)], "infoscale.hf.calibrate")):
        res = run_cli(*args)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_init_from_takes_the_source_runs_shape():
    """--init-from (pretrain long, fine-tune short): the new model has the source's shape, whatever --preset says,
    so its weights load."""
    build = ARCHS["modernbert"].import_module().build_for_training
    source = build(SimpleNamespace(preset="small", train_len=64, attention="softmax", dropout=0.0), range(40))
    model = build(SimpleNamespace(preset="tiny", train_len=16, attention="softmax", dropout=0.0), range(40), source)
    model.load_state_dict(source.state_dict())
    assert model.config.hidden_size == 256 and model.config.max_position_embeddings == 16
