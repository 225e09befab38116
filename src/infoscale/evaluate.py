"""``infoscale eval``: masked-token accuracy of models × methods × lengths on held-out text.

Settings (as in Jianlin Su's experiments, kexue.fm/archives/9708 and 9859):

- ``contiguous``: n contiguous tokens of a held-out document: does the model stay sane at length n?
- ``repeated``: a held-out span of m ∈ [L, 2L] tokens tiled to fill n, so a masked token can be
  copied from a distant copy: does the method still *use* distant context? (Windowed attention
  cannot.) Tiling happens only here, and the records say so.

Protocols (the metric is always: mask positions with [MASK], predict them, accuracy and cross-entropy):

- ``exact``: every position of a window masked alone, n forward passes per window (the paper's);
- ``sampled``: K seeded random positions per window, each masked alone: an unbiased estimate of the
  same metric at K/n of the cost;
- ``strided``: one pass masks every r-th position from a random offset (n/r predictions per pass).
  In ``repeated`` windows the span length m is drawn with m mod r ≠ 0, so a masked token's copies
  are never masked with it.

95% confidence intervals treat windows as clusters (predictions in one window are correlated).
Records are tidy: one JSON line per (model, method, length, setting, protocol, metric) with
``metric``, ``value``, ``ci_low``, ``ci_high``. A rerun skips cells already there. Each new cell is
merged into the file under a lock (:func:`infoscale.io.merge_records`), so several ``eval`` processes
can share one ``--out`` without losing records. A method whose attention gives NaN or infinity is
refused, never recorded. Before any work, each length's peak memory is estimated and a length that
cannot fit in the free memory is refused; the sweep's time is estimated and printed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .attn import parse_method
from .data import make_windows
from .errors import ConfigError, DataError, MethodError
from .io import check_output, method_identity, read_records
from .options import SEED_RANGE, add_flags, from_args, option
from .rundir import load_run
from .runtime import available_memory, device_flops, duration, quiet_libraries, use_bf16
from .stats import cluster_ci, window_fields
from .sweep import sweep
from .tasks import mlm

HELP = "evaluate models × methods × lengths (contiguous and repeated text) into JSONL records"

SETTINGS = ("contiguous", "repeated")
PROTOCOLS = ("exact", "sampled", "strided")


@dataclass
class EvalConfig:
    models: list[str] = option(dataclasses.MISSING, "run directories written by `infoscale train`, transformers "
                               "causal LM directories (config.json, model.safetensors, tokenizer.json) or .gguf files")
    train_len: int = option(0, "pretrained models: the training length L (0 = the config's "
                               "original_max_position_embeddings or max_position_embeddings)")
    methods: list[str] = option(("softmax", "infoscale"), "methods to evaluate with (train-time parts are inherited)")
    lengths: list[int] = option((64, 128, 256, 512, 1024, 2048, 4096), "sequence lengths n")
    settings: list[str] = option(SETTINGS + ("passkey",), "contiguous, repeated, passkey (causal runs only)")
    protocol: str = option("strided", "exact | sampled | strided")
    windows: int = option(4, "least windows per (length, setting), from held-out documents")
    predictions: int = option(2048, "least predictions per record: short lengths use more windows to reach it")
    samples: int = option(32, "sampled: positions per window")
    stride: int = option(8, "strided: mask every r-th position")
    out: str = option("results/results.jsonl", "JSONL file the records are appended to")
    seed: int = option(0, "seed of the windows and masked positions", bounds=SEED_RANGE)
    bf16: str = option("auto", "bf16 autocast and bf16 attention: auto, on, off")
    chunk_size: int = option(0, "query rows per attention chunk; 0 = the kernel's default (256 in fp32, 512 in bf16)")
    tokens_per_batch: int = option(16384, "tokens per forward batch (copies of a window × n)")
    corpus: str = option("", "held-out text for runs without split.json (converted checkpoints): a named corpus "
                              "or a path; every document is held out")
    progress: bool = option(True, "show a progress bar")
    depths: list[float] = option((0.1, 0.5, 0.9), "causal runs, passkey: depths of the key in the filler (0 = start)")
    passkey_trials: int = option(12, "causal runs, passkey: prompts per length (depths taken in turn)")

    def __post_init__(self):
        for s in self.settings:
            if s not in SETTINGS + ("passkey",):
                raise ConfigError(f"unknown setting {s!r}; use contiguous, repeated or passkey")
        for d in self.depths:
            if not 0 <= d <= 1:
                raise ConfigError(f"--depths must be between 0 and 1, got {d}")
        if self.passkey_trials < 1:
            raise ConfigError(f"--passkey-trials must be at least 1, got {self.passkey_trials}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; use exact, sampled or strided")
        for n in self.lengths:
            if n < 2:
                raise ConfigError(f"length {n} is too short; lengths must be at least 2")
        if self.chunk_size < 0:
            raise ConfigError(f"--chunk-size must be >= 0 (0 = the kernel's default), got {self.chunk_size}")
        for name in ("windows", "samples", "stride", "tokens_per_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.train_len < 0 or self.train_len == 1:
            raise ConfigError(f"--train-len must be at least 2 (or 0: from the model's config), got {self.train_len}")
        if self.predictions < 0:
            raise ConfigError(f"--predictions must be >= 0, got {self.predictions}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"--bf16 must be auto, on or off, got {self.bf16!r}")


def windows_needed(cfg: EvalConfig, n: int) -> tuple[int, int]:
    """(windows, masked groups per window) of one cell at length n."""
    per_window = {"exact": n, "sampled": min(cfg.samples, n), "strided": math.ceil(n / cfg.stride)}[cfg.protocol]
    count = max(cfg.windows, math.ceil(cfg.predictions / per_window))
    groups = {"exact": n, "sampled": min(cfg.samples, n), "strided": 1}[cfg.protocol]
    return count, groups


def cell_cost(config, cfg: EvalConfig, n: int) -> tuple[int, float]:
    """(peak bytes of one forward batch, floating-point operations of one cell) at length n.

    Peak memory: per token the layer activations (input projection u, v, z; q, k; the output) and the
    logits over the vocabulary; per query chunk the scores, weights and relative positions against
    all n keys. An upper bound: windowed methods touch fewer keys."""
    # GAU-α's q and k have attention_key_size dims; a multi-head encoder's (ModernBERT) have hidden_size in all
    s = getattr(config, "attention_key_size", None) or config.hidden_size
    h, e, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layers = config.num_hidden_layers
    copies = max(1, cfg.tokens_per_batch // n)
    tokens = copies * n
    chunk = min(cfg.chunk_size or 512, n)
    act = 4 * tokens * (4 * h + 3 * (2 * e + s) + 2 * v)
    attn = copies * chunk * n * (4 * 4 + 8 * 2)
    peak = int(1.5 * (act + attn))
    count, groups = windows_needed(cfg, n)
    per_pass = 2 * n * (layers * (h * (2 * e + s) + e * h + n * (s + e)) + h * v)
    return peak, float(count * groups * per_pass)


def max_length_that_fits(config, cfg: EvalConfig, avail: int) -> int:
    lo, hi = 1, 1
    while cell_cost(config, cfg, hi * 2)[0] <= avail and hi < 2**40:
        hi *= 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cell_cost(config, cfg, mid)[0] <= avail else (lo, mid - 1)
    return lo


def check_length_fits(config, cfg: EvalConfig, n: int, device) -> None:
    """Refuse a length whose forward batch would not fit in the memory free on ``device``, before
    anything is allocated; the message names the limit and the longest length that fits."""
    need = cell_cost(config, cfg, n)[0]
    avail = available_memory(device)
    if avail is None or need <= avail:
        return
    fits = max_length_that_fits(config, cfg, avail)
    fix = ("lower --chunk-size" if max(1, cfg.tokens_per_batch // n) == 1 else "lower --tokens-per-batch")
    raise DataError(f"length {n} needs about {need / 2**30:.1f} GiB per forward batch but {avail / 2**30:.1f} GiB "
                    f"is free on {device.type} (the limit); the longest length that fits now is about {fits}: use "
                    f"shorter --lengths or {fix}")


def _split_causal(cfg: EvalConfig):
    """(causal run directories, the config of the masked-LM part: its runs and its settings)."""
    from .evaluate_clm import is_causal_run

    causal = [m for m in cfg.models if is_causal_run(m)]
    rest = dataclasses.replace(cfg, models=[m for m in cfg.models if m not in causal],
                               settings=[s for s in cfg.settings if s in SETTINGS])
    return causal, rest


def per_window(hits: list[np.ndarray], losses: list[np.ndarray]) -> tuple[dict, dict]:
    """Per-window fields of the accuracy and loss records, in window order (the windows and masked
    positions of a cell depend only on model, length, setting, protocol and seed, so two methods' lists
    pair window by window: :func:`infoscale.stats.paired_delta`). ``window_means`` is the metric's mean
    in each window, ``window_counts`` its predictions; accuracy also keeps the exact ``window_hits``."""
    return window_fields(hits, binary=True), window_fields(losses)


def check_record_file(path: str) -> None:
    """Refuse to append to an existing file whose lines are not records ``report`` reads (a file that is not
    a record file, or a damaged one), before any work."""
    from .io import iter_records
    from .report import check_record

    try:
        for i, rec in iter_records(path):
            check_record(rec, f"{path}:{i}")
    except DataError as e:
        raise DataError(f"--out {path} is not a record file infoscale can append to ({e}); give another "
                        "--out") from None


def evaluate(cfg: EvalConfig, log=print) -> list[dict]:
    """Run the sweep; returns the new records (all records are in ``cfg.out``). Causal runs (Llama) are
    evaluated by :func:`infoscale.evaluate_clm.evaluate_clm`, masked-LM runs here."""
    quiet_libraries(cfg.progress)
    check_output(cfg.out, "--out", folder=False)
    check_record_file(cfg.out)
    causal, mlm_cfg = _split_causal(cfg)
    if mlm_cfg.models and not mlm_cfg.settings:  # e.g. --settings passkey on a masked-LM run
        names = ", ".join(Path(m).name for m in mlm_cfg.models)
        why = (f"--settings {' '.join(cfg.settings)} has nothing for the masked-LM runs ({names}): they take "
               f"{' and '.join(SETTINGS)}; passkey applies to causal (Llama) runs only")
        if not causal:
            raise ConfigError(why)
        log(f"skip: {why}")
        mlm_cfg = dataclasses.replace(mlm_cfg, models=[])
    new_causal = []
    if causal:
        from .evaluate_clm import evaluate_clm

        new_causal = evaluate_clm(cfg, causal, log)
    if not mlm_cfg.models:
        return new_causal
    return new_causal + _evaluate_mlm(mlm_cfg, log)


def _evaluate_mlm(cfg: EvalConfig, log=print) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for m in cfg.methods:  # a bad method or value is refused before anything is measured or loaded
        parse_method(m)
    read_records(cfg.out)  # checks the file is readable, before any work
    new: list[dict] = []
    runs = [load_run(m, device) for m in cfg.models]
    for m in cfg.methods:  # a bad method or value is an error, before any work
        for run in runs:
            if parse_method(m, run.train_len).calibrated():
                run.load_calibration()
    heldout = {}
    for run in runs:  # lengths that cannot run are refused before any work
        for n in cfg.lengths:
            check_length_fits(run.model.config, cfg, n, device)
        heldout[run.path] = docs = run.heldout_docs(cfg.corpus or None)
        longest = max((len(a) for a in docs.arrays), default=0)
        too_long = [n for n in cfg.lengths if n > longest]
        if "contiguous" in cfg.settings and too_long:
            raise DataError(f"{run.name}: the longest held-out document has {longest} tokens, so the contiguous "
                            f"setting cannot run at n={too_long[0]}; use --lengths up to {longest}, "
                            "--settings repeated, or a corpus with longer documents")
    bf16 = use_bf16(cfg.bf16, device)  # measured once the runs and lengths are known to be usable
    for run in runs:
        model, L = run.model, run.train_len
        docs = heldout[run.path]
        todo = []
        for m in cfg.methods:
            try:  # a method that does not apply to this model (RoPE methods on ALiBi, ...) is skipped
                pm = run.resolve_method(m).resolved(L)
                # a calibrated method: with its calibration's digest (refused without one: MethodError, skipped)
                dims = run.calibration_dims() if pm.calibrated() else None  # read only when it is needed
                resolved = method_identity(str(pm), pm.calibrated(), dims)
            except MethodError as e:
                log(f"skip {m} on {run.path}: {e}")
                continue
            todo += [(m, resolved, setting, n) for setting in cfg.settings for n in cfg.lengths]
        params = {"samples": cfg.samples} if cfg.protocol == "sampled" else (
            {"stride": cfg.stride} if cfg.protocol == "strided" else {})
        seconds = sum(cell_cost(model.config, cfg, n)[1] for _, _, _, n in todo) / device_flops(device)
        if seconds > 60:  # worth knowing before it starts
            log(f"{run.name}: {len(todo)} cells, estimated {duration(seconds)} on {device.type} at most (less for "
                f"cells already in {cfg.out})")
        cells = [({"model": str(run.path.resolve()), "model_name": run.name, "train": run.training_summary(),
                   "method": m, "method_resolved": resolved, "length": n, "setting": setting,
                   "protocol": cfg.protocol, "protocol_params": params, "windows": cfg.windows,
                   "predictions": cfg.predictions, "seed": cfg.seed}, f"{m} {setting} n={n}")
                 for m, resolved, setting, n in todo]
        new += sweep(cfg.out, cells, functools.partial(_measure, cfg, run, docs, device, bf16), device=device,
                     bf16=bf16, desc=run.name, progress=cfg.progress)
    return new


def _measure(cfg: EvalConfig, run, docs, device, bf16: bool, cell: dict) -> tuple[dict, list[dict]]:
    """One masked-LM cell (:func:`infoscale.sweep.sweep`'s ``measure``): its windows masked by the protocol, scored
    with the cell's method; accuracy and loss, each with its per-window fields."""
    m, setting, n = cell["method"], cell["setting"], cell["length"]
    resolved = str(run.resolve_method(m).resolved(run.train_len))  # method_resolved may carry a calibration digest
    count, _ = windows_needed(cfg, n)
    wins = make_windows(docs, n, setting, count, run.train_len, cfg.stride if cfg.protocol == "strided" else None,
                        cfg.seed)
    rng = np.random.default_rng([cfg.seed, n, 7])
    groups = [mlm.mask_groups(n, cfg.protocol, rng, samples=cfg.samples, stride=cfg.stride) for _ in wins]
    forward = run.logits_with(resolved, {"chunk_size": cfg.chunk_size or None, "bf16": bf16})
    hits, losses = mlm.score_windows(forward, wins, groups, cfg.tokens_per_batch, device, bf16)
    allc, alll = np.concatenate(hits), np.concatenate(losses)
    if not np.isfinite(alll).all():
        raise MethodError(f"{m} gives non-finite logits (NaN or infinity) on {run.name} at n={n} ({setting}): "
                          f"its parameters or the model's weights make the output undefined (resolved: "
                          f"{resolved}); choose other parameters or check the model (nothing was written for "
                          f"this cell)")
    lo_ci, hi_ci = cluster_ci(hits)
    acc_win, loss_win = per_window(hits, losses)
    fields = {"windows_used": len(wins), "n_predictions": int(allc.size), "tiled": setting == "repeated"}
    return fields, [{"metric": "accuracy", "value": float(allc.mean()), "ci_low": lo_ci, "ci_high": hi_ci} | acc_win,
                    {"metric": "loss", "value": float(alll.mean()), "ci_low": None, "ci_high": None} | loss_win]


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


def add_arguments(parser) -> None:
    add_flags(parser, EvalConfig)


def run(args) -> int:
    cfg = from_args(EvalConfig, args)
    new = evaluate(cfg, log=lambda s: print(s, file=sys.stderr))
    cells = len({r["key"] for r in new})
    print(f"{_count(cells, 'new cell')} ({_count(len(new), 'record')}) in {cfg.out}")
    return 0
