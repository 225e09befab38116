"""``infoscale analyze``: why methods extrapolate, measured on attention itself.

Three measurements, each as tidy records (``kind`` field) that ``infoscale report`` draws:

- ``entropy``: per layer, the mean attention entropy H_i = −Σ_j a_ij ln a_ij and the normalised
  entropy H_i / ln l_i (l_i = keys query i may attend) against length, per method. Dilution shows as
  H/ln l creeping toward 1 (uniform) as n grows; InfoScale is built to hold it at its training level.
- ``dilution``: the share of each query's attention on its nearest keys, |i − j| <= L/2 (the
  neighbourhood every query saw in training), against length, per method.
- ``cos_window``: for CosScale scales s, the attention mass outside the window |i − j| <= w and the
  Jensen–Shannon divergence (nats) between CosScale attention and windowed attention (the same logits
  restricted to the window), against s. Large s should make CosScale approach the window (the paper).

Sources: a trained model (its per-layer q, k on held-out text) or synthetic q, k: isotropic Gaussian
(d = 128) for entropy and dilution, and q_i = u + ε_i, k_j = u + ε'_j with a shared u for the
window measurement (with RoPE, cos(R_i u, R_j u) decays with |i − j|, so nearby keys score highest).

A causal run (``--arch llama``, transformers' Llama) is measured inside the stock model: each method is applied
with :func:`infoscale.hf.apply` and every layer's logits under it come from :func:`infoscale.hf.capture_attention`
(the reference path's logits with the model's own q, k, positions and masks), per head and query row, on held-out
contiguous windows. Causal attention has l_i = i + 1 keys (fewer under a window, StreamingLLM's sinks and band);
rows with l_i = 1 (the first token: H = ln 1 = 0) are left out of the means. The records have the same shape as a
masked-LM run's, so ``infoscale report`` draws both with the same code. No ``cos_window`` measurement on a causal
run: CosScale is a train-time method these runs do not have (the synthetic one still applies).
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attn import attention_logits, parse_method
from .data import make_windows
from .errors import ConfigError, DataError, MethodError
from .io import check_output
from .options import SEED_RANGE, add_flags, from_args, option

HELP = "attention entropy, dilution and CosScale-vs-window measurements (records + plots)"


@dataclass
class AnalyzeConfig:
    model: str = option("", "run directory of a trained model, a transformers causal LM directory or a .gguf file "
                            "(empty: synthetic q, k only)")
    corpus: str = option("", "held-out text for a pretrained model (it has no split): a named corpus or a path")
    train_len: int = option(0, "pretrained models: the training length L (0 = the config's)")
    methods: list[str] = option(("softmax", "infoscale", "logn"), "methods for entropy and dilution")
    lengths: list[int] = option((64, 256, 1024, 4096), "sequence lengths")
    scales: list[float] = option((4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0), "CosScale values s")
    windows: int = option(2, "held-out windows (or synthetic draws) per length")
    synthetic: bool = option(True, "also measure on synthetic q, k")
    out: str = option("report", "folder: analysis.jsonl and the plots")
    seed: int = option(0, "seed of windows and synthetic draws", bounds=SEED_RANGE)
    progress: bool = option(True, "show transformers' progress bars while loading the model")

    def __post_init__(self):
        for name in ("windows",):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for n in self.lengths:
            if n < 2:
                raise ConfigError(f"length {n} is too short; --lengths must be at least 2")
        for s in self.scales:
            if not (math.isfinite(s) and s > 0):
                raise ConfigError(f"--scales must be positive numbers, got {s}")
        if not self.methods:
            raise ConfigError("--methods needs at least one method")
        for m in self.methods:  # an unknown name or a bad parameter is refused, not skipped
            parse_method(m)


# ---------------------------------------------------------------------------------------------
# statistics of one attention matrix
# ---------------------------------------------------------------------------------------------


MEASURES = ("H", "H_norm", "near_share")


def row_sums(logits: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, train_len: int) -> dict:
    """Sums over the query rows of ``logits`` (..., r, n_k) of three measures of the row's attention
    a_ij = softmax_j(z_ij), and the number of rows summed (``rows``):

        H_i = −Σ_j a_ij ln a_ij,   H_i / ln l_i,   Σ_{j : |p_i − p_j| <= L/2} a_ij  (near share)

    with l_i the keys row i may attend (its entries above the dtype's minimum, where
    :func:`infoscale.attention_logits` puts masked keys) and p the positions ``q_pos`` (r,), ``k_pos`` (n_k,).
    H / ln l is 1 for uniform attention over the l keys and 0 for attention on one key. Rows with l_i < 2 are
    left out (one key: H = ln l = 0, nothing to normalise; the first token of a causal window).

    Precision: the softmax and the per-row sums run in float32 (relative error ~1e-6 per row, far below any
    difference the measures are read for); the sums over rows in float64. At 16k keys a float64 pass over every
    key of every head and row made this the slowest stage of a causal analysis."""
    allowed = logits > torch.finfo(logits.dtype).min / 2
    # keys no row of the chunk may attend (a causal chunk's future, the part of a window left behind) have zero
    # weight and add nothing to any sum: drop the masked columns at both ends before the work that counts
    cols = allowed.flatten(0, -2).any(0).nonzero()
    if len(cols):
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        logits, allowed, k_pos = logits[..., lo:hi], allowed[..., lo:hi], k_pos[lo:hi]
    w = torch.softmax(logits.float(), -1)
    ent = torch.special.entr(w).sum(-1).double()  # entr(a) = −a ln a, 0 at a = 0
    l = allowed.sum(-1, dtype=torch.int32).double()
    near = ((q_pos.double()[:, None] - k_pos.double()[None, :]).abs() <= train_len // 2).to(w)
    share = torch.einsum("...rk,rk->...r", w, near).double()
    keep = l >= 2
    return {"H": float(ent[keep].sum()), "H_norm": float((ent[keep] / l[keep].log()).sum()),
            "near_share": float(share[keep].sum()), "rows": int(keep.sum())}


def row_stats(logits: torch.Tensor, train_len: int) -> dict:
    """Mean entropy, normalised entropy and near-key share (:func:`row_sums`) of the attention of ``logits``
    (..., n, n) at positions 0 … n − 1, masked entries at the dtype's minimum."""
    i = torch.arange(logits.shape[-1], dtype=torch.float64)
    s = row_sums(logits, i, i, train_len)
    if not s["rows"]:
        raise MethodError("every query attends fewer than two keys: its attention entropy is not defined")
    return {k: s[k] / s["rows"] for k in MEASURES}


def window_distance(logits: torch.Tensor, width: int) -> dict:
    """Mass outside |i − j| <= width, and JS(softmax(logits) ‖ windowed softmax(logits)), both row means."""
    n = logits.shape[-1]
    i = torch.arange(n)
    inside = (i[:, None] - i[None, :]).abs() <= width
    p = torch.softmax(logits.double(), -1)
    q = torch.softmax(logits.double().masked_fill(~inside, -math.inf), -1)
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.clamp(min=1e-300).log()), 0.0).sum(-1)

    js = (kl(p, m) + kl(q, m)) / 2
    return {"outside_mass": float((p * ~inside).sum(-1).mean()), "js": float(js.mean())}


# ---------------------------------------------------------------------------------------------
# sources of q, k
# ---------------------------------------------------------------------------------------------


def synthetic_isotropic(n: int, d: int = 128, heads: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 7919 + n)
    return torch.randn(1, heads, n, d, generator=g), torch.randn(1, heads, n, d, generator=g)


def synthetic_local(n: int, d: int = 128, noise: float = 1.0, seed: int = 0):
    """q_i = u + ε_i, k_j = u + ε'_j: RoPE makes nearby pairs the most similar."""
    g = torch.Generator().manual_seed(seed * 104729 + n)
    u = torch.randn(1, 1, 1, d, generator=g)
    return u + noise * torch.randn(1, 1, n, d, generator=g), u + noise * torch.randn(1, 1, n, d, generator=g)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def entropy_dilution_records(cfg: AnalyzeConfig, model=None, docs=None, name="synthetic") -> list[dict]:
    """Records of kinds ``entropy`` and ``dilution`` for each method, length and layer."""
    from .models.gau import attention_inputs

    recs = []
    train_len = model.config.train_len if model is not None else 64
    for m in cfg.methods:
        parse_method(m, train_len)  # a bad value for this training length is an error
        if model is not None:
            try:  # a method that does not apply to this model (RoPE methods on ALiBi, ...) is skipped
                method = model.resolve_method(m)
            except MethodError as e:
                print(f"skip {m} on {name}: {e}", file=sys.stderr)
                continue
        else:
            method = m
        for n in cfg.lengths:
            acc: dict[int, list[dict]] = {}
            for w in range(cfg.windows):
                if model is None:
                    layers = [synthetic_isotropic(n, seed=cfg.seed + w)]
                else:
                    ids = make_windows(docs, n, "contiguous", cfg.windows, train_len, None, cfg.seed)[w]
                    layers = attention_inputs(model, torch.from_numpy(ids)[None], method)
                for li, (q, k) in enumerate(layers):
                    z = attention_logits(q, k, method, train_len=train_len)
                    acc.setdefault(li, []).append(row_stats(z, train_len))
            for li, stats in acc.items():
                mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
                base = {"source": name, "method": m, "method_resolved": str(method), "length": n, "layer": li,
                        "train_len": train_len}
                recs.append({"kind": "entropy", **base, "H": mean["H"], "H_norm": mean["H_norm"]})
                recs.append({"kind": "dilution", **base, "near_share": mean["near_share"]})
    return recs


def causal_entropy_records(cfg: AnalyzeConfig, run, docs) -> list[dict]:
    """Records of kinds ``entropy`` and ``dilution`` for a causal run (see the module docstring): per method,
    length and layer, the means over heads and query rows (l_i >= 2) of all ``cfg.windows`` windows of
    :func:`row_sums`, from the logits :func:`infoscale.hf.capture_attention` hands over."""
    from . import hf
    from .evaluate_clm import applied_method

    model, L = run.model, run.train_len
    reduce = functools.partial(row_sums, train_len=L)
    recs = []
    for m in cfg.methods:
        parse_method(m, L)  # a bad value for this training length is an error
        try:  # a method that does not apply to this model (a train-time method it was not trained with) is skipped
            hf.apply(model, m, train_len=L)
            resolved = applied_method(model)  # a calibrated method: with its calibration's digest
        except MethodError as e:
            hf.remove(model)
            print(f"skip {m} on {run.name}: {e}", file=sys.stderr)
            continue
        try:
            for n in cfg.lengths:
                totals: dict[int, dict] = {}
                for ids in make_windows(docs, n, "contiguous", cfg.windows, L, None, cfg.seed):
                    layers = hf.capture_attention(model, torch.from_numpy(ids)[None], reduce)
                    for li, chunks in enumerate(layers):
                        acc = totals.setdefault(li, dict.fromkeys((*MEASURES, "rows"), 0.0))
                        for c in chunks:
                            for k in acc:
                                acc[k] += c[k]
                for li, acc in totals.items():
                    mean = {k: acc[k] / acc["rows"] for k in MEASURES}
                    base = {"source": run.name, "method": m, "method_resolved": resolved, "length": n, "layer": li,
                            "train_len": L}
                    recs.append({"kind": "entropy", **base, "H": mean["H"], "H_norm": mean["H_norm"]})
                    recs.append({"kind": "dilution", **base, "near_share": mean["near_share"]})
        finally:
            hf.remove(model)
    return recs


def cos_window_records(cfg: AnalyzeConfig, model=None, docs=None, name="synthetic") -> list[dict]:
    """Records of kind ``cos_window``: CosScale attention vs windowed attention, against s."""
    from .attn.rope import rope_inv_freq, rotate
    from .models.gau import attention_inputs

    recs = []
    train_len = model.config.train_len if model is not None else 64
    width = train_len // 2
    for n in cfg.lengths:
        samples = []  # (q, k) pairs before RoPE
        for w in range(cfg.windows):
            if model is None:
                samples.append(synthetic_local(n, seed=cfg.seed + w))
            else:
                ids = make_windows(docs, n, "contiguous", cfg.windows, train_len, None, cfg.seed)[w]
                samples += attention_inputs(model, torch.from_numpy(ids)[None])
        for s in cfg.scales:
            vals = []
            for q, k in samples:
                d = q.shape[-1]
                ang = torch.arange(n, dtype=torch.float64)[:, None] * rope_inv_freq(d)[None]
                qn, kn = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
                cos = rotate(qn, ang) @ rotate(kn, ang).transpose(-1, -2)
                vals.append(window_distance(s * cos[0, 0], width))
            recs.append({"kind": "cos_window", "source": name, "s": s, "length": n, "width": width,
                         "train_len": train_len,
                         "outside_mass": float(np.mean([v["outside_mass"] for v in vals])),
                         "js": float(np.mean([v["js"] for v in vals]))})
    return recs


def check_finite(recs: list[dict]) -> None:
    """Refuse records with NaN or infinity, naming the method that produced them."""
    for r in recs:
        bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            what = f"method {r['method']!r}" if "method" in r else f"CosScale s = {r.get('s')}"
            raise MethodError(f"{what} gives non-finite {', '.join(bad)} ({r['kind']}, {r['source']}, n={r['length']})"
                              f": its parameters make attention undefined; choose other parameters (nothing written)")


# Bytes per (head, query, key) of one measurement: the fp32 logits and several float64 n × n matrices
# (weights, their logarithms, products, masks); measured peak about 38 at n = 2048 with 4 heads.
BYTES_PER_PAIR = 48


def analysis_bytes(n: int, heads: int) -> int:
    """Peak bytes of measuring one window at length n: every measurement holds whole n × n matrices."""
    return BYTES_PER_PAIR * heads * n * n


def check_lengths_fit(cfg: AnalyzeConfig, device) -> None:
    """Refuse, before any work, a length whose n × n matrices would not fit in the memory free on ``device``
    (as ``infoscale eval`` refuses a length whose forward batch would not fit)."""
    from .runtime import available_memory

    heads = 4 if cfg.synthetic else 1  # synthetic q, k have 4 heads; a model's are measured a head at a time
    avail = available_memory(device)
    for n in sorted(cfg.lengths, reverse=True)[:1]:
        need = analysis_bytes(n, heads)
        if avail is not None and need > avail:
            fits = math.isqrt(avail // (BYTES_PER_PAIR * heads))
            raise DataError(f"length {n} needs about {need / 2**30:.1f} GiB for its n × n attention matrices but "
                            f"{avail / 2**30:.1f} GiB is free on {device.type} (the limit); the longest length that "
                            f"fits now is about {fits}: use shorter --lengths")


def analyze(cfg: AnalyzeConfig) -> list[dict]:
    from .runtime import quiet_libraries

    quiet_libraries(cfg.progress)
    if not cfg.synthetic and not cfg.model:
        raise ConfigError("nothing to measure: give --model or drop --no-synthetic")
    check_lengths_fit(cfg, torch.device("cpu"))
    recs = []
    if cfg.synthetic:
        recs += entropy_dilution_records(cfg)
        recs += cos_window_records(cfg)
    if cfg.model:
        from .rundir import load_model
        from .tasks import task

        run = load_model(cfg.model, "cpu", cfg.train_len or None, cfg.progress)
        docs = run.heldout_docs(cfg.corpus or None)
        if task(run.task).causal:
            recs += causal_entropy_records(cfg, run, docs)
        elif not run.family.per_call_methods:
            raise ConfigError(f"{cfg.model}: analyze measures GAU-α masked LMs and causal models; a "
                              f"{run.model.config.model_type} masked LM is not supported yet")
        else:
            recs += entropy_dilution_records(cfg, run.model, docs, run.name)
            recs += cos_window_records(cfg, run.model, docs, run.name)
    check_finite(recs)
    return recs


def add_arguments(parser) -> None:
    add_flags(parser, AnalyzeConfig)


def run(args) -> int:
    from .io import write_records
    from .report import write_report

    cfg = from_args(AnalyzeConfig, args)
    check_output(cfg.out, "--out", folder=True)
    recs = analyze(cfg)
    out = Path(cfg.out)
    write_records(out / "analysis.jsonl", recs)
    path = write_report(recs, out / "analysis")
    print(f"{len(recs)} records in {out / 'analysis.jsonl'}; plots in {path.parent}")
    return 0
