"""``infoscale eval`` for causal runs (``--arch llama``): perplexity by position, copying, passkey retrieval.

Every method runs inside the stock transformers model through :func:`infoscale.hf.apply` (and
:func:`infoscale.hf.remove` after it). Settings (the same ``--settings`` names as the masked-LM sweep):

- ``contiguous``: n contiguous held-out tokens, teacher-forced; metric ``nll`` over every target position
  1 … n−1, and ``nll[lo,hi)`` per target-position bucket [0, L), [L, 2L), [2L, 4L), … (field ``bucket``), so a
  plot shows where a method breaks (Press et al. 2022, arXiv 2108.12409, Fig. 1).
- ``repeated``: a held-out span of m tokens, L < m ≤ 2L, tiled to n; metrics ``copy_nll`` and ``copy_accuracy``
  (top-1) over positions t ≥ m, whose exact source is m > L tokens back (Su, kexue.fm/archives/9708: a method
  that cannot reach beyond L cannot copy). Needs n > 3L/2.
- ``passkey``: the landmark-attention prompt (Mohtashami & Jaggi 2023, arXiv 2305.16300) of n tokens with a
  5-digit key at depths ``--depths``; the digits are generated greedily with ``model.generate`` and its KV
  cache; metrics ``passkey_accuracy`` (share of correct digits) and ``passkey_exact`` (all five right).

Records are tidy (one per metric) with a cell key per (model, method, length, setting, protocol, parameters,
seed, windows, predictions). Like the masked-LM records they keep per-window results in window order
(:func:`infoscale.stats.window_fields`: ``window_counts``, ``window_means``, and ``window_hits`` for 0/1
outcomes; a passkey trial is a window of 5 digits, or of 1 outcome for ``passkey_exact``). The windows, copy
spans and passkey prompts of a cell depend only on (model, length, setting, seed), so two methods' records pair
window by window and the report's paired Δ tables (:func:`infoscale.stats.paired_delta`) apply. 95% CIs treat
windows as clusters (:func:`infoscale.stats.cluster_ci` for 0/1 outcomes, :func:`infoscale.tasks.clm.cluster_mean_ci`
for NLL).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .errors import DataError, MethodError
from .io import cell_key, method_identity, read_records
from .rundir import load_model
from .runtime import use_bf16
from .stats import cluster_ci, window_fields
from .sweep import smaller_cell, sweep
from .tasks import clm

__all__ = ["CLM_SETTINGS", "evaluate_clm", "is_causal_run"]

CLM_SETTINGS = ("contiguous", "repeated", "passkey")


def is_causal_run(path) -> bool:
    """Whether ``--models`` names a causal model: a run directory whose family's task is causal, or a
    pretrained model (a transformers model directory or a ``.gguf`` file, :mod:`infoscale.models.pretrained`)."""
    import json
    from pathlib import Path

    from .models import FAMILIES
    from .models.pretrained import is_pretrained
    from .tasks import task

    if is_pretrained(path):
        return True
    f = Path(path) / "config.json"
    try:
        mt = json.loads(f.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False  # load_run gives the clear error later
    fam = FAMILIES.get(mt)
    return fam is not None and task(fam.task).causal


def _count(cfg, n: int) -> int:
    """Windows of one cell: at least ``--windows``, more at short lengths to reach ``--predictions``."""
    return max(cfg.windows, math.ceil(cfg.predictions / max(n - 1, 1)))


def _finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise MethodError(f"{what} gives non-finite logits (NaN or infinity): its parameters make attention "
                          "undefined; choose other parameters (nothing was written for this cell)")


def contiguous_records(model, docs, n: int, L: int, count: int, seed: int, device, bf16, tokens_per_batch,
                       start: int = 0):
    """(metric, value, ci_low, ci_high, per-window fields, extra) tuples of the contiguous setting, over the
    cell's windows from the ``start``-th on (a cell grown by windows measures only its new ones)."""
    from .data import make_windows

    wins = make_windows(docs, n, "contiguous", count, L, None, seed)[start:]
    nll, _ = clm.token_nll(model, wins, device=device, bf16=bf16, tokens_per_batch=tokens_per_batch)
    _finite(np.concatenate(nll), "the method")
    total = int(sum(map(len, nll)))
    out = [("nll", *clm.cluster_mean_ci(nll), window_fields(nll), {"n_predictions": total})]
    for lo, hi in clm.bucket_edges(n, L):
        # entry t−1 is target position t; bucket [lo, hi) of target positions, position 0 has no target
        part = [v[max(lo, 1) - 1:hi - 1] for v in nll]
        if not len(part[0]):
            continue
        out.append((f"nll[{lo},{hi})", *clm.cluster_mean_ci(part), window_fields(part),
                    {"bucket": [lo, hi], "n_predictions": int(sum(map(len, part)))}))
    return out, len(wins)


def copy_records(model, docs, n: int, L: int, count: int, seed: int, device, bf16, tokens_per_batch,
                 start: int = 0):
    wins, spans = clm.copy_windows(docs, n, count, L, seed)
    wins, spans = wins[start:], spans[start:]
    nll, hits = clm.token_nll(model, wins, device=device, bf16=bf16, tokens_per_batch=tokens_per_batch)
    _finite(np.concatenate(nll), "the method")
    cn = [v[m - 1:] for v, m in zip(nll, spans, strict=True)]  # target positions t >= m
    ch = [h[m - 1:].astype(float) for h, m in zip(hits, spans, strict=True)]
    extra = {"spans": spans, "n_predictions": int(sum(map(len, cn)))}
    acc = float(np.concatenate(ch).mean())
    return [("copy_nll", *clm.cluster_mean_ci(cn), window_fields(cn), extra),
            ("copy_accuracy", acc, *cluster_ci(ch), window_fields(ch, binary=True), extra)], len(wins)


def passkey_records(model, pk, n: int, depths, trials: int, seed: int, device, bf16, tokens_per_batch):
    rng = np.random.default_rng([seed, n, 3])
    prompts, answers, used = [], [], []
    for i in range(trials):
        d = float(depths[i % len(depths)])
        p, a = clm.passkey_prompt(pk, n, rng, d)
        prompts.append(p)
        answers.append(a)
        used.append(d)
    gen = clm.passkey_generate(model, prompts, device=device, bf16=bf16, tokens_per_batch=tokens_per_batch)
    right = [(g == a).astype(float) for g, a in zip(gen, np.stack(answers), strict=True)]
    exact = [np.array([float(r.all())]) for r in right]
    per_depth = {str(d): float(np.mean([r.mean() for r, dd in zip(right, used, strict=True) if dd == d]))
                 for d in depths}
    extra = {"depth_of_window": used, "per_depth": per_depth, "n_predictions": int(sum(map(len, right)))}
    acc = float(np.concatenate(right).mean())
    ex = float(np.mean([e[0] for e in exact]))
    return [("passkey_accuracy", acc, *cluster_ci(right), window_fields(right, binary=True), extra),
            ("passkey_exact", ex, *cluster_ci(exact), window_fields(exact, binary=True),
             extra | {"n_predictions": trials})], trials  # one outcome per trial, not per digit


def causal_cost(model, n: int, tokens_per_batch: int) -> tuple[int, float]:
    """(peak bytes of one forward batch beyond the weights, floating-point operations per window of n tokens) of
    a decoder at length n. Memory: per token the hidden states of a layer (a few copies of hidden and MLP
    widths) and the logits over the vocabulary in float32 (the model's and our float copy), for at most
    ``clm.LOGIT_ROWS`` positions per window where the head is applied by chunks (:func:`infoscale.tasks.clm.
    split_head`); attention in query chunks of 1024 rows against n keys (the reference path's scores; torch's SDPA
    needs less). FLOPs: 2 per weight and token, plus q·k and weights·v over the causal half of an n × n matrix per
    layer."""
    c = model.config
    h = int(getattr(c, "hidden_size", 0) or 0)
    inter = int(getattr(c, "intermediate_size", 4 * h) or 4 * h)
    layers = int(getattr(c, "num_hidden_layers", 1) or 1)
    heads = int(getattr(c, "num_attention_heads", 1) or 1)
    vocab = int(getattr(c, "vocab_size", 0) or 0)
    copies = max(1, tokens_per_batch // n)
    tokens = copies * n
    logit_rows = copies * min(n, clm.LOGIT_ROWS) if clm.split_head(model) is not None else tokens
    act = 4 * tokens * (6 * h + 3 * inter) + 4 * logit_rows * 3 * vocab
    attn = 4 * copies * heads * min(1024, n) * n * 4
    weights = sum(p.numel() for p in model.parameters())
    flops = 2.0 * weights * n + 2.0 * layers * h * n * n
    return int(1.2 * (act + attn)), flops


def _check_causal_budget(run, cfg, log) -> dict[int, int]:
    """Per length, the tokens per forward batch that fit in the free memory (``--tokens-per-batch`` is the most; a
    batch holds fewer copies of a window when the model's logits would not fit, e.g. Gemma's 262k-token
    vocabulary); refuse a length where one window does not fit."""
    from .runtime import available_memory

    device = next(run.model.parameters()).device
    avail = available_memory(device)
    batch = {}
    for n in cfg.lengths:
        tokens = max(cfg.tokens_per_batch, n)
        while avail is not None and tokens > n and causal_cost(run.model, n, tokens)[0] > avail:
            tokens = max(n, (tokens // n) // 2 * n)  # half the copies of the window
        need, _ = causal_cost(run.model, n, tokens)
        if avail is not None and need > avail:
            raise DataError(f"{run.name}: length {n} needs about {need / 2**30:.1f} GiB per forward batch (one window) "
                            f"but {avail / 2**30:.1f} GiB is free on {device.type}; use shorter --lengths")
        if tokens < cfg.tokens_per_batch and tokens // n < cfg.tokens_per_batch // n:
            log(f"{run.name}: at n={n} a forward batch holds {tokens // n} window(s) ({tokens} tokens, not "
                f"{cfg.tokens_per_batch}) to fit in the {avail / 2**30:.1f} GiB free")
        batch[n] = tokens
    return batch


def _say_time_left(run, cfg, cells: list[dict], batch: dict, bf16: bool, log) -> None:
    """Log how long the cells still to measure may take: cells already in ``--out`` cost nothing, a cell that grows
    from a smaller one (:func:`infoscale.sweep.sweep`) only its new windows; forward passes of n tokens at the fp32
    matmul rate measured now (an estimate: the attention paths and the machine's load move it)."""
    from .runtime import device_flops, duration

    have = read_records(cfg.out)
    done = {r.get("key") for r in have}
    precision = "bf16" if bf16 else "fp32"
    flops, todo, growing = 0.0, 0, 0
    for cell in cells:
        if cell_key(cell) in done:
            continue
        n, grows = cell["length"], _windows_of(cfg, cell)
        count = grows or cfg.passkey_trials
        prior = smaller_cell(have, cell, count, precision) if grows else []
        start = prior[0]["windows_used"] if prior else 0
        todo, growing = todo + 1, growing + bool(prior)
        flops += (count - start) * causal_cost(run.model, n, batch[n])[1]
    seconds = flops / device_flops(next(run.model.parameters()).device)
    if todo and seconds > 60:
        grown = f", {growing} of them growing from fewer windows" if growing else ""
        log(f"{run.name}: {todo} cell{'s' if todo > 1 else ''} to measure{grown} ({len(cells) - todo} already in "
            f"{cfg.out}): about {duration(seconds)} (fp32 matmul rate measured now)")


def _windows_of(cfg, cell: dict) -> int:
    """The windows a teacher-forced cell measures (it can grow by windows); 0 for a passkey cell, measured whole
    (its trials cycle through the depths)."""
    return _count(cfg, cell["length"]) if cell["setting"] != "passkey" else 0


def applied_method(model) -> str:
    """The method :func:`infoscale.hf.apply` set on ``model``, as records name it (``method_resolved``,
    :func:`infoscale.io.method_identity`): the resolved method string, and for a calibrated method the digest of
    the per-layer dims it runs with (MethodError without them)."""
    from .attn import parse_method
    from .errors import ConfigError

    settings = getattr(model.config, "infoscale", None)
    if not isinstance(settings, dict) or not settings.get("method"):
        raise ConfigError("no method is applied to this model: call infoscale.hf.apply(model, method) first")
    # the whole method: a component the model's rotary computes (hf_yarn) is part of what ran
    calibrated = parse_method(settings["method"], settings["train_len"]).calibrated()
    return method_identity(settings["method"], calibrated, settings.get("dims"))


def evaluate_clm(cfg, models: list[str], log=print) -> list[dict]:
    """The causal part of the sweep (``cfg`` is :class:`infoscale.evaluate.EvalConfig`); returns the new records."""
    from . import hf

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(cfg.bf16, device)
    read_records(cfg.out)  # checks the file is readable, before any work
    new: list[dict] = []
    settings = [s for s in cfg.settings if s in CLM_SETTINGS]
    for path in models:
        run = load_model(path, device, cfg.train_len or None, cfg.progress)
        model, L = run.model, run.train_len
        batch = _check_causal_budget(run, cfg, log)
        docs = run.heldout_docs(cfg.corpus or None)
        longest = max((len(a) for a in docs.arrays), default=0)
        if "contiguous" in settings and any(n > longest for n in cfg.lengths):
            raise DataError(f"{run.name}: the longest held-out document has {longest} tokens, so the contiguous "
                            f"setting cannot run at n={max(cfg.lengths)}; use --lengths up to {longest} or other "
                            "--settings")
        pk = clm.Passkey(run.tokenizer) if "passkey" in settings else None
        todo = []
        for m in cfg.methods:
            try:
                hf.apply(model, m, train_len=L)
                try:
                    resolved = applied_method(model)  # a calibrated method: with its calibration's digest
                finally:
                    hf.remove(model)
            except MethodError as e:
                log(f"skip {m} on {run.path}: {e}")
                continue
            for setting in settings:
                for n in cfg.lengths:
                    if setting == "repeated" and n <= L + L // 2:
                        continue  # no span longer than L with a second copy fits
                    if setting == "passkey" and n < pk.min_length():
                        log(f"skip passkey at n={n}: the prompt needs {pk.min_length()} tokens")
                        continue
                    todo.append((m, resolved, setting, n))
        cells = []
        for m, resolved, setting, n in todo:
            params = ({"depths": [float(d) for d in cfg.depths], "digits": clm.DIGITS} if setting == "passkey"
                      else ({"span": [L + 1, 2 * L]} if setting == "repeated" else {}))
            cells.append(({"model": str(run.path.resolve()), "model_name": run.name,
                           "train": run.training_summary(("arch", "tokenizer", "passkey_share", "copy_share")),
                           "method": m, "method_resolved": resolved, "length": n, "setting": setting,
                           "protocol": "greedy" if setting == "passkey" else "teacher_forced",
                           "protocol_params": params, "windows": cfg.windows,
                           "predictions": cfg.predictions if setting != "passkey" else cfg.passkey_trials,
                           "seed": cfg.seed, "task": "clm"}, f"{m} {setting} n={n}"))
        _say_time_left(run, cfg, [c for c, _ in cells], batch, bf16, log)
        applied = []  # the method applied to the model now (applied once per method, when a cell needs it)

        def measure(cell: dict, start: int = 0, run=run, docs=docs, pk=pk, batch=batch, applied=applied):
            m, setting, n, L = cell["method"], cell["setting"], cell["length"], run.train_len
            if applied != [m]:
                hf.apply(run.model, m, train_len=L)
                applied[:] = [m]
            count = cfg.passkey_trials if setting == "passkey" else _count(cfg, n)
            args = (device, bf16, batch[n])
            try:
                if setting == "contiguous":
                    rows, used = contiguous_records(run.model, docs, n, L, count, cfg.seed, *args, start=start)
                elif setting == "repeated":
                    rows, used = copy_records(run.model, docs, n, L, count, cfg.seed, *args, start=start)
                else:
                    rows, used = passkey_records(run.model, pk, n, cfg.depths, count, cfg.seed, *args)
            except MethodError as e:
                raise MethodError(f"{m} on {run.name} at n={n} ({setting}): {e}") from None
            return ({"windows_used": used, "tiled": setting == "repeated"},
                    [extra | fields | {"metric": metric, "value": float(v), "ci_low": float(lo), "ci_high": float(hi)}
                     for metric, v, lo, hi, fields, extra in rows])

        try:
            # teacher-forced cells grow by windows (a rerun with more --windows measures only the new ones)
            new += sweep(cfg.out, cells, measure, device=device, bf16=bf16, desc=run.name, progress=cfg.progress,
                         windows_of=functools.partial(_windows_of, cfg))
        finally:
            hf.remove(model)
    return new
