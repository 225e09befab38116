"""Numbers that rank methods: paired Δ statistics, per-window records, the Δ report, calibrated InfoScale
and asymmetric ALiBi."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from infoscale.stats import paired_delta, windows_for_halfwidth

# ---------------------------------------------------------------------------------------------
# paired Δ with a cluster bootstrap
# ---------------------------------------------------------------------------------------------


def _windows(rng, w=40, per=64, p=0.6, spread=0.15):
    """Per-window hits of one method: windows differ in difficulty (a cluster effect)."""
    pw = np.clip(p + spread * rng.standard_normal(w), 0.02, 0.98)
    hits = rng.binomial(per, pw)
    return hits.astype(float), np.full(w, per, float), pw


def test_identical_methods_give_zero_with_zero_width():
    hits, counts, _ = _windows(np.random.default_rng(0))
    assert paired_delta(hits, hits, counts) == (0.0, 0.0, 0.0)


def test_known_shift_is_recovered():
    rng = np.random.default_rng(1)
    hits, counts, _ = _windows(rng, w=60)
    shifted = hits + 0.05 * counts  # exactly +5 points in every window
    d, lo, hi = paired_delta(shifted, hits, counts)
    assert d == pytest.approx(0.05) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    # a noisy shift: the CI covers it and excludes 0
    b = np.minimum(counts, hits + rng.binomial(counts.astype(int), 0.08))
    d, lo, hi = paired_delta(b, hits, counts)
    assert lo < d < hi and lo > 0 and abs(d - 0.08) < 0.015


def test_pairing_removes_the_shared_window_effect():
    """Two methods sharing the windows' difficulty: the paired CI is far narrower than either method's own."""
    rng = np.random.default_rng(2)
    a, counts, pw = _windows(rng, spread=0.25)
    b = rng.binomial(counts.astype(int), np.clip(pw + 0.02, 0, 1)).astype(float)
    d, lo, hi = paired_delta(b, a, counts)
    _, lo_a, hi_a = paired_delta(a, np.zeros_like(a), counts)  # a's own CI (Δ to a constant 0)
    assert hi - lo < 0.6 * (hi_a - lo_a)


def test_bootstrap_is_seeded_and_checks_its_input():
    hits, counts, _ = _windows(np.random.default_rng(3))
    other = np.roll(hits, 1)
    assert paired_delta(other, hits, counts, seed=5) == paired_delta(other, hits, counts, seed=5)
    with pytest.raises(ValueError):
        paired_delta(hits, hits[:-1], counts)
    with pytest.raises(ValueError):
        paired_delta(hits, hits, counts * 0)


def test_coverage_on_simulated_windows():
    """95% intervals cover the true Δ in roughly 95% of simulated experiments (percentile cluster bootstrap,
    40 windows: expect 0.90–0.99 over 200 experiments)."""
    rng = np.random.default_rng(4)
    w, per, true = 40, 64, 0.03
    cover = 0
    for _ in range(200):
        pw = np.clip(0.5 + 0.15 * rng.standard_normal(w), 0.05, 0.9)
        eff = true + 0.04 * rng.standard_normal(w)  # the effect itself varies between windows
        a = rng.binomial(per, pw).astype(float)
        b = rng.binomial(per, np.clip(pw + eff, 0, 1)).astype(float)
        # the true pooled Δ of this design: E[b − a] summed over windows / predictions
        truth = float(np.sum(np.clip(pw + eff, 0, 1) - pw) / w)
        _, lo, hi = paired_delta(b, a, np.full(w, per, float), resamples=500, seed=int(rng.integers(1 << 30)))
        cover += lo <= truth <= hi
    assert 0.88 <= cover / 200 <= 0.995, cover


def test_windows_for_halfwidth_reaches_its_target():
    rng = np.random.default_rng(6)
    a, counts, pw = _windows(rng, w=30, per=512)
    b = rng.binomial(512, np.clip(pw + 0.03 + 0.05 * rng.standard_normal(30), 0, 1)).astype(float)
    need = windows_for_halfwidth(b, a, counts, 0.01)
    d, lo, hi = paired_delta(b, a, counts)
    half = (hi - lo) / 2
    assert need == pytest.approx(30 * (half / 0.01) ** 2, rel=0.35)  # the variance law behind the estimate


# ---------------------------------------------------------------------------------------------
# records and the report
# ---------------------------------------------------------------------------------------------


def _rec(method, n, hits, counts, value=None, metric="accuracy", model="m", **kw):
    r = {"model": f"/x/{model}", "model_name": model, "train": {"attention": "softmax", "train_len": 64},
         "method": method, "length": n, "setting": "contiguous", "protocol": "strided",
         "protocol_params": {"stride": 8}, "windows": 4, "predictions": 64, "seed": 0,
         "key": f"{model}-{method}-{n}", "metric": metric,
         "value": value if value is not None else float(np.sum(hits) / np.sum(counts)),
         "ci_low": None, "ci_high": None}
    if counts is not None:
        r |= {"window_counts": list(counts), "window_hits": list(hits)}
    return r | kw


def test_report_delta_table_and_best_only_when_distinguishable(tmp_path):
    from infoscale.report import delta_tables, eval_tables

    rng = np.random.default_rng(0)
    counts = [64] * 30
    base = rng.binomial(64, 0.3, 30)
    good = np.minimum(64, base + 20)  # far better everywhere
    close = np.minimum(64, good + rng.integers(-1, 2, 30))  # indistinguishable from good
    recs = [_rec("softmax", 128, base, counts), _rec("window", 128, good, counts),
            _rec("rerope", 128, base + 1, counts), _rec("rerope+infoscale", 128, base + 3, counts),
            _rec("softmax", 256, base, counts), _rec("window", 256, good, counts),
            _rec("rerope+infoscale", 256, close, counts)]
    text = "\n".join(delta_tables(recs))
    assert "`window` − `softmax`" in text and "`rerope+infoscale` − `rerope`" in text
    assert "**+31.2 ± 0.0**" in text  # exactly +20 of 64 in every window
    best_row = next(line for line in text.splitlines() if line.startswith("| *best*"))
    cells = best_row.split(" | ")
    assert cells[1].startswith("**window**") and cells[2].startswith("none")
    table = "\n".join(eval_tables(recs))
    assert "excludes 0" in table and table.count("**") == 2  # only the distinguishable best is bold


def test_old_records_without_windows_still_report(tmp_path):
    from infoscale.report import load_records, write_report

    f = tmp_path / "old.jsonl"
    f.write_text("".join(json.dumps(_rec(m, n, None, None, value=v)) + "\n"
                         for m, v in (("softmax", 0.5), ("window", 0.6)) for n in (64, 128)))
    text = write_report(load_records([f]), tmp_path / "rep").read_text()
    assert "**60.0**" in text  # the old rule: best value in bold
    assert "No paired Δ for m (contiguous, strided, accuracy)" in text


def test_eval_records_carry_per_window_fields(tiny_run, tmp_path):
    from infoscale.evaluate import EvalConfig, evaluate
    from infoscale.io import read_records
    from infoscale.report import delta_tables

    out = tmp_path / "r.jsonl"
    evaluate(EvalConfig(models=[str(tiny_run)], methods=["softmax", "infoscale", "window"], lengths=[32, 64],
                        settings=["contiguous"], predictions=32, windows=3, out=str(out), progress=False),
             log=lambda s: None)
    recs = read_records(out)
    for r in recs:
        c = r["window_counts"]
        assert len(c) == r["windows_used"] and sum(c) == r["n_predictions"]
        mean = sum(m * k for m, k in zip(r["window_means"], c, strict=True)) / sum(c)
        assert mean == pytest.approx(r["value"], abs=1e-6)
        if r["metric"] == "accuracy":
            assert sum(r["window_hits"]) / sum(c) == pytest.approx(r["value"])
    by = {(r["method"], r["length"], r["metric"]): r for r in recs}
    # the same windows and masked positions for every method of a cell
    assert by["softmax", 64, "accuracy"]["window_counts"] == by["window", 64, "accuracy"]["window_counts"]
    text = "\n".join(delta_tables(recs))
    # at L (32) InfoScale is the identity: Δ exactly 0
    assert "| `infoscale` − `softmax` | +0.0 ± 0.0 |" in text


# ---------------------------------------------------------------------------------------------
# calibrated InfoScale
# ---------------------------------------------------------------------------------------------


def test_calibration_on_isotropic_qk_agrees_with_the_closed_form():
    """Random isotropic q, k are InfoScale's own assumption: the fitted d gives the closed form's factors (the
    entropy is flat in d near the head dim, so compare factors, not d) and holds H / ln l at its L value."""
    import torch

    from infoscale.calibrate import calibrate_layers, infoscale_t

    d, L = 32, 16

    def capture(dims, n, w, upto=None):
        g = torch.Generator().manual_seed(1000 * n + w)
        q, k = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        return [(q @ k.T / d ** 0.5, torch.full((n,), float(n), dtype=torch.float64))]

    cal = calibrate_layers(capture, 1, [64, 256], 2, L, d, rows=128, log=lambda s: None)
    fit = cal["layers"][0]
    assert not fit["saturated"] and d / 2 < fit["dim"] < 2 * d
    for n in (64, 256):
        got = float(infoscale_t(torch.tensor([float(n)]), L, fit["dim"])[0])
        closed = float(infoscale_t(torch.tensor([float(n)]), L, d)[0])
        assert got == pytest.approx(closed, rel=0.03)
        stats = fit["lengths"][str(n)]
        assert abs(stats["H_norm_calibrated"] - fit["target_H_norm"]) < 0.01
        assert stats["H_norm_plain"] > fit["target_H_norm"] + 0.01  # unscaled attention does drift


def test_calibration_saturates_when_no_dimension_is_enough():
    """A layer that needs more than sqrt(log-n) (logits that must sharpen a lot) hits the d → ∞ limit."""
    import torch

    from infoscale.calibrate import D_MAX, Sample, fit_dim, h_norm

    L = 16
    g = torch.Generator().manual_seed(0)
    z_l = 4 * torch.randn(16, L, generator=g)
    target = h_norm(z_l, torch.full((16,), float(L)))
    z_n = 0.3 * torch.randn(64, 1024, generator=g)  # nearly uniform at n: far above the target
    fit = fit_dim(target, [Sample(1024, z_n, torch.full((64,), 1024.0))], L)
    assert fit["saturated"] and fit["dim"] >= D_MAX / 2
    assert fit["lengths"]["1024"]["needed_factor"] > fit["lengths"]["1024"]["sqrt_logn_limit"]


def test_calibrated_method_uses_per_layer_dims(tiny_run, tmp_path):
    import shutil

    import torch

    from infoscale.calibrate import CalibrateConfig, calibrate
    from infoscale.errors import MethodError
    from infoscale.models.gau import attach
    from infoscale.rundir import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    model = load_run(run_dir).model
    ids = torch.randint(5, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MethodError, match="infoscale calibrate"):
        model(ids, method="infoscale(calibrated=True)")
    head = model.config.attention_key_size

    def logits(m):
        with torch.no_grad():
            return model(ids, method=m).logits

    attach(model, {"dims": [head, head]})
    assert torch.allclose(logits("infoscale(calibrated=True)"), logits("infoscale"), atol=1e-5)
    attach(model, {"dims": [3.0, 3.0]})
    same = logits("infoscale(calibrated=True)")
    assert torch.allclose(same, logits("infoscale(dim=3.0)"), atol=1e-5)
    attach(model, {"dims": [3.0, 1e4]})  # per layer: neither uniform choice
    mixed = logits("infoscale(calibrated=True)")
    assert not torch.allclose(mixed, same, atol=1e-4) and not torch.allclose(mixed, logits("infoscale(dim=10000.0)"),
                                                                              atol=1e-4)
    cal = calibrate(CalibrateConfig(model=str(run_dir), lengths=[64, 128], windows=1, rows=32), log=lambda s: None)
    saved = json.loads((run_dir / "calibration.json").read_text())
    assert saved["dims"] == cal["dims"] and len(saved["dims"]) == 2 and all(d > 0 for d in saved["dims"])
    reloaded = load_run(run_dir).model  # load_run attaches the saved law
    with torch.no_grad():
        reloaded(ids, method="infoscale(calibrated=True)")
    with pytest.raises(MethodError, match="not both"):
        reloaded(ids, method="infoscale(calibrated=True, dim=4.0)")


def test_hf_calibrate_on_a_transformers_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from infoscale import hf
    from infoscale.errors import ConfigError, MethodError
    from infoscale.evaluate_clm import applied_method

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                         initializer_range=0.3)).eval()
    ids = torch.randint(3, 64, (2, 128), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="apply"):
        applied_method(model)
    hf.apply(model, "infoscale(calibrated=True)")
    with pytest.raises(MethodError, match="hf.calibrate"):
        model(ids[:, :32])
    with pytest.raises(MethodError, match="calibrate"):  # nothing could run it: no record may name it
        applied_method(model)
    cal = hf.calibrate(model, ids, lengths=[32, 128], rows=16)
    assert len(cal["dims"]) == 2 and model.config.infoscale["dims"] == cal["dims"]
    ran = applied_method(model)  # the resolved method and its calibration's digest
    assert ran.startswith(f"{model.config.infoscale['method']} [calibration ") and len(ran.split()[-1]) == 13
    model.config.infoscale["dims"] = [d + 1 for d in cal["dims"]]
    assert applied_method(model) != ran
    model.config.infoscale["dims"] = cal["dims"]
    hf.apply(model, "hf_yarn(factor=2.0)+infoscale")  # a component the model's rotary runs is part of what ran
    assert applied_method(model) == model.config.infoscale["method"] == "hf_yarn(factor=2.0)+infoscale(clamp=True)"
    hf.apply(model, "infoscale(calibrated=True)")
    assert str(model.config.infoscale["method"]).startswith("infoscale(")
    with torch.no_grad():
        out = model(ids[:, :64]).logits
        model.config.infoscale["dims"] = [8.0, 8.0]  # the head dim: the closed form
        closed = model(ids[:, :64]).logits
        hf.apply(model, "infoscale")
        assert torch.allclose(model(ids[:, :64]).logits, closed, atol=1e-5)
    assert torch.isfinite(out).all()
    assert all(r["lengths"]["128"]["H_norm_calibrated"] is not None for r in cal["layers"])


# ---------------------------------------------------------------------------------------------
# asymmetric ALiBi and method strings
# ---------------------------------------------------------------------------------------------


def test_asymmetric_alibi_tells_left_from_right():
    """With content-free q, k the symmetric bias weighs i − 1 and i + 1 alike; separate slopes do not."""
    import torch

    import infoscale

    q = k = torch.zeros(1, 1, 9, 4)
    v = torch.randn(1, 1, 9, 2)
    _, w = infoscale.attention(q, k, v, "alibi(max_bias=2.0)", train_len=8, return_weights=True)
    assert torch.allclose(w[0, 0, 4, 3], w[0, 0, 4, 5])
    _, w = infoscale.attention(q, k, v, "alibi(max_bias=2.0, right_bias=0.0)", train_len=8, return_weights=True)
    assert w[0, 0, 4, 3] / w[0, 0, 4, 5] == pytest.approx(math.exp(1 - 0.25), rel=1e-5)


def test_new_parameters_keep_old_method_strings():
    """Record keys are built from resolved method strings: parameters at their defaults stay out of them."""
    from infoscale.attn import parse_method

    assert str(parse_method("alibi").resolved(64)) == "alibi(max_bias=8.0)"
    assert str(parse_method("rerope+infoscale").resolved(64)) == "rerope(window=32)+infoscale(clamp=True)"
    assert str(parse_method("alibi(right_bias=0.0)").resolved(64)) == "alibi(max_bias=8.0, right_bias=0.0)"
    assert parse_method("infoscale(calibrated=True)").short() == "infoscale(calibrated=True)"


def test_single_window_cells_get_a_delta_without_a_ci():
    """One window: nothing to bootstrap, so no CI and never bold, but the Δ itself (50/64 − 30/64), marked."""
    from infoscale.report import delta_tables

    recs = [_rec("softmax", 1024, [30], [64]), _rec("window", 1024, [50], [64])]
    text = "\n".join(delta_tables(recs))
    assert "| `window` − `softmax` | +31.2 (1 window) |" in text and "**" not in text


def test_two_mask_densities_never_share_a_table():
    from infoscale.report import eval_tables

    def rec(stride, value):
        return {"protocol": "strided", "protocol_params": {"stride": stride}, "setting": "contiguous",
                "model_name": "m", "metric": "accuracy", "method": "softmax", "length": 64, "value": value,
                "ci_low": value - 0.01, "ci_high": value + 0.01, "train": {}}

    lines = eval_tables([rec(8, 0.5), rec(64, 0.7)])
    heads = [x for x in lines if x.startswith("### ")]
    assert heads == ["### m: contiguous, strided protocol, accuracy",
                     "### m: contiguous, strided (1 in 64) protocol, accuracy"]
    assert "†" not in "\n".join(lines)  # no cell averages the two densities


def test_delta_rows_pair_each_temperature_with_its_reference():
    from infoscale.report import delta_pairs

    labels = ["softmax", "infoscale", "logn", "rerope", "rerope+infoscale", "infoscale(train_len=512)",
              "logn(train_len=512)", "rerope+infoscale(train_len=512)", "cosscale+infoscale"]
    rows = delta_pairs(labels)
    assert [r for r in rows if r[1] != "softmax"] == [
        ("rerope+infoscale", "rerope"),
        ("infoscale(train_len=512)", "infoscale"),
        ("logn(train_len=512)", "logn"),
        ("rerope+infoscale(train_len=512)", "rerope"),
        ("rerope+infoscale(train_len=512)", "rerope+infoscale"),
    ]
    assert {m for m, ref in rows if ref == "softmax"} == set(labels) - {"softmax"}


def test_every_registered_length_temperature_gets_its_delta_row():
    """X + T pairs with X for every method the registry puts in the temperature slot (llama4 and softmax_plus
    too, not only InfoScale and log-n); two temperatures or none give no such row."""
    from infoscale.attn.methods import REGISTRY
    from infoscale.report import delta_pairs

    temps = [name for name, m in REGISTRY.items() if "temperature" in m.slots]
    assert {"infoscale", "logn", "softmax_plus", "llama4"} <= set(temps)
    for t in temps:
        labels = ["softmax", "yarn", f"yarn+{t}", f"yarn+{t}(x=1)"]
        rows = [r for r in delta_pairs(labels) if r[1] != "softmax"]
        assert rows == [(f"yarn+{t}", "yarn"), (f"yarn+{t}(x=1)", "yarn"), (f"yarn+{t}(x=1)", f"yarn+{t}")], rows
    assert [r for r in delta_pairs(["softmax", "yarn", "window+rerope"]) if r[1] != "softmax"] == []


def test_cell_keys_stay_what_earlier_records_hold():
    """A record's key identifies its cell across runs (resuming skips cells whose key is there): the same fields
    must give the same key as before, for both tracks (which share one sweep)."""
    from infoscale import evaluate, evaluate_clm, io, sweep

    rec = {"model": "runs/quick/softmax", "method_resolved": "rerope(window=32)+infoscale(clamp=True)", "length": 1024,
           "setting": "contiguous", "protocol": "strided", "protocol_params": {"stride": 64}, "seed": 0,
           "windows": 32, "predictions": 1024}
    assert io.cell_key(rec) == "1977397f0b08eeb4"
    assert sweep.cell_key is io.cell_key
    assert evaluate.sweep is sweep.sweep and evaluate_clm.sweep is sweep.sweep


def test_hf_calibration_stops_each_forward_at_the_layer_it_fits(monkeypatch):
    """Layer ℓ's inputs depend only on the layers before it, so each fitting forward ends at ℓ: the same
    calibration as with whole forwards, in about half the layer calls."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from infoscale import hf
    from infoscale.hf import calibration, capture

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                                            initializer_range=0.3)).eval()

    ids = torch.randint(3, 64, (2, 128), generator=torch.Generator().manual_seed(1))
    calls = []
    record = capture.record_rows
    monkeypatch.setattr(capture, "record_rows", lambda view, module, *a: calls.append(module.layer_idx) or
                        record(view, module, *a))
    stopped = hf.calibrate(model(), ids, lengths=[32, 128], rows=16)
    n_stopped, calls[:] = len(calls), []
    whole_forwards = calibration.capturing
    monkeypatch.setattr(calibration, "capturing", lambda **k: whole_forwards(**(k | {"upto": None})))
    whole = hf.calibrate(model(), ids, lengths=[32, 128], rows=16)
    assert stopped["dims"] == whole["dims"] and stopped["layers"] == whole["layers"]
    # reference at L: 2 windows x 3 layers; fits: 2 lengths x 2 windows x (1 + 2 + 3) layers, not x 3 x 3
    assert (n_stopped, len(calls)) == (2 * 3 + 4 * 6, 2 * 3 + 4 * 9)


def test_causal_cells_of_different_window_counts_pair_on_their_shared_windows(tmp_path):
    """A causal teacher-forced cell's windows are the first of any larger cell's: a 4-window cell and a 2-window
    cell of another method pair on windows 0 and 1 (marked in the Δ table); masked-LM cells never pair that way."""
    from infoscale.cli import main
    from infoscale.io import write_records
    from infoscale.ranking import cell_groups, paired, shared_windows
    from infoscale.stats import paired_delta

    def rec(method, means, task="clm"):
        return {"model": "/m", "model_name": "m", "method": method, "method_resolved": method, "length": 64,
                "setting": "contiguous", "protocol": "teacher_forced", "protocol_params": {}, "seed": 0,
                "predictions": 0, "windows": len(means), "task": task, "metric": "nll", "train": {},
                "value": sum(means) / len(means), "ci_low": None, "ci_high": None,
                "window_counts": [63] * len(means), "window_means": means, "key": f"{method}{len(means)}"}

    four, two = rec("softmax", [3.0, 3.4, 2.9, 3.1]), rec("pi", [3.5, 3.6])
    assert len(shared_windows(two, four)[2]) == 2
    want = paired_delta([3.5 * 63, 3.6 * 63], [3.0 * 63, 3.4 * 63], [63, 63], resamples=2000, seed=0)
    assert paired(two, four) == pytest.approx(want)
    assert set(cell_groups([four, two])[64]) == {"softmax", "pi"}
    mlm = [rec("softmax", [3.0, 3.4, 2.9, 3.1], task="mlm"), rec("pi", [3.5, 3.6], task="mlm")]
    assert shared_windows(mlm[1], mlm[0]) is None and len(cell_groups(mlm)[64]) == 1
    write_records(tmp_path / "r.jsonl", [four, two])
    assert main(["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"| `pi` − `softmax` | **{want[0]:+.3f} ± " in md and "(first 2 windows) |" in md
    assert "| `pi` | 3.550 (2 of 4 windows) |" in md and "| `softmax` | **3.100** |" in md  # its mean: other text
