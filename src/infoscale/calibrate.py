"""``infoscale calibrate``: InfoScale with a per-layer effective dimension fitted on the model's own attention.

InfoScale (Li et al. 2025, arXiv 2501.08570) multiplies the logits of a query that attends l keys by

    t_d(l) = sqrt(1 − l^(−2/d)) / sqrt(1 − L^(−2/d)),

derived for isotropic random q, k of dimension d: it then holds the attention entropy H / ln l at its
training-length value. A trained model's q, k are far from isotropic (a few directions carry the scores),
and the closed form with d = head dim under-corrects: on the quick softmax model, layer 3, H / ln l rises
from 0.287 at 64 to 0.365 at 4096 with InfoScale (0.485 without). Here d is treated as an *effective*
dimension and fitted per layer:

    d_ℓ = argmin_d Σ_n ( mean_i H_ℓ,n,i(t_d) / ln l_i − mean_i H_ℓ,L,i / ln l_i )²

over a few lengths n > L, on a few unlabelled held-out windows, where H_ℓ,n,i(t) is the entropy of query i's
attention in layer ℓ at length n with its logits × t. Layers are fitted in order, each on inputs that went
through the already-calibrated earlier layers. The family t_d is bounded: as d → ∞,
t_d(l) → sqrt(ln l / ln L) (the square root of log-n's factor), and t_d → 1 as d → 0. A layer that needs more
than sqrt(ln l / ln L) cannot be matched by any d; its fit saturates at :data:`D_MAX` (≈ that limit) and
the calibration file says so (``saturated``).

The fitted law is saved as ``calibration.json`` in the run directory; ``infoscale(calibrated=True)`` then
uses d_ℓ in layer ℓ (:func:`infoscale.models.gau.attach` sets it on a loaded model; ``load_run`` does it
for run directories).
:func:`infoscale.hf.calibrate` does the same for a transformers model through ``infoscale.hf.apply``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .calfit import D_MAX, D_MIN, Sample, calibrate_layers, fit_dim, h_norm, infoscale_t, sample_rows
from .errors import ConfigError
from .io import atomic_write_bytes
from .options import SEED_RANGE, add_flags, from_args, option
from .runtime import quiet_libraries

# the fit itself lives in infoscale.calfit (pure: logits in, dimension out), shared with infoscale.hf.calibrate
__all__ = ["CalibrateConfig", "calibrate", "calibrate_pretrained", "gau_capture", "FILE", "D_MAX", "D_MIN", "Sample",
           "calibrate_layers", "fit_dim", "h_norm", "infoscale_t", "sample_rows"]

HELP = "fit InfoScale's effective dimension per layer on held-out text (for infoscale(calibrated=True))"
FILE = "calibration.json"
# ---------------------------------------------------------------------------------------------
# GAU runs
# ---------------------------------------------------------------------------------------------


def gau_capture(model, windows_by_n: dict[int, list[np.ndarray]]):
    """``capture`` for :func:`calibrate_layers` on a GAU model."""
    from .attn import attention_logits
    from .models.gau import attach, attention_inputs

    cfg = model.config
    L = cfg.train_len

    def capture(dims, n, w, upto=None):
        head = cfg.attention_key_size
        attach(model, {"dims": [head if d is None else d for d in dims]})
        ids = torch.from_numpy(windows_by_n[n][w])[None]
        method = model.resolve_method("infoscale(calibrated=True)")
        plain = model.resolve_method("softmax")
        out = []
        for q, k in attention_inputs(model, ids, method):
            z = attention_logits(q, k, plain, train_len=L)[0, 0]
            allowed = z > torch.finfo(z.dtype).min / 2
            out.append((z, allowed.sum(-1).double()))
            if upto is not None and len(out) > upto:  # later layers cannot change this one's inputs
                break
        return out

    return capture


@dataclass
class CalibrateConfig:
    model: str = option(dataclasses.MISSING, "run directory written by `infoscale train`, or a pretrained causal LM: "
                                             "a transformers model directory or a .gguf file")
    lengths: list[int] = option((), "lengths n > L to fit on; default 4L, 16L, 64L (those the held-out text allows)")
    windows: int = option(2, "unlabelled held-out windows per length")
    rows: int = option(256, "query rows per window used in the fit (a seeded subset at long lengths)")
    seed: int = option(0, "seed of the windows and rows", bounds=SEED_RANGE)
    corpus: str = option("", "held-out text for runs without split.json (converted checkpoints) and pretrained "
                              "models")
    train_len: int = option(0, "pretrained models: the training length L (0 = the config's)")
    progress: bool = option(True, "show progress bars (loading a GGUF file)")

    def __post_init__(self):
        for name in ("windows", "rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")


def calibrate_pretrained(cfg: CalibrateConfig, log=print) -> dict:
    """A pretrained transformers model: :func:`infoscale.hf.calibrate` on windows of ``--corpus``, written to
    :func:`infoscale.models.pretrained.calibration_path` (beside the model, never inside the user's files), where
    ``infoscale eval`` finds it for ``infoscale(calibrated=True)``. Default lengths 2L and 4L (a pretrained
    model's L is thousands of tokens: 16L would cost hours per forward on a CPU)."""
    from . import hf
    from .data import make_windows
    from .models.pretrained import calibration_path, load_pretrained

    quiet_libraries(cfg.progress)
    run = load_pretrained(cfg.model, train_len=cfg.train_len or None, progress=cfg.progress)
    L = run.train_len
    docs = run.heldout_docs(cfg.corpus or None)
    longest = max(len(a) for a in docs.arrays)
    lengths = list(cfg.lengths) or [n for n in (2 * L, 4 * L) if n <= longest]
    bad = [n for n in lengths if n <= L or n > longest]
    if bad or not lengths:
        raise ConfigError(f"lengths must be above L = {L} and at most the longest document of the corpus ({longest} "
                          f"tokens); got {bad or lengths or 'none (the corpus is too short for 2L)'}")
    ids = np.stack(make_windows(docs, max(lengths), "contiguous", cfg.windows, L, None, cfg.seed + 17))
    t0 = time.perf_counter()
    cal = hf.calibrate(run.model, torch.from_numpy(ids), lengths=lengths, train_len=L, rows=cfg.rows, seed=cfg.seed,
                       log=log)
    cal |= {"model": str(Path(cfg.model).resolve()), "sha256": run.train_config.get("sha256"),
            "corpus": cfg.corpus, "seconds": time.perf_counter() - t0, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = calibration_path(cfg.model)
    atomic_write_bytes(path, (json.dumps(cal, indent=1) + "\n").encode("utf-8"))
    log(f"wrote {path} ({cal['seconds']:.0f} s); evaluate with --methods 'infoscale(calibrated=True)'")
    return cal


def calibrate(cfg: CalibrateConfig, log=print) -> dict:
    from .data import make_windows
    from .models.pretrained import is_pretrained
    from .rundir import load_run

    if is_pretrained(cfg.model):
        return calibrate_pretrained(cfg, log)
    if cfg.train_len:
        raise ConfigError(f"--train-len is for pretrained models; {cfg.model} is a run directory (its L is known)")
    run = load_run(cfg.model)
    model, L = run.model, run.train_len
    if not run.family.calibration_file:
        raise ConfigError(f"{cfg.model}: calibrate writes calibration.json for GAU-α runs; for a "
                          f"{model.config.model_type} run use infoscale.hf.calibrate(model, input_ids)")
    docs = run.heldout_docs(cfg.corpus or None)
    longest = max(len(a) for a in docs.arrays)
    lengths = list(cfg.lengths) or [n for n in (4 * L, 16 * L, 64 * L) if n <= longest]
    bad = [n for n in lengths if n <= L or n > longest]
    if bad or not lengths:
        raise ConfigError(f"lengths must be above L = {L} and at most the longest held-out document ({longest}); "
                          f"got {bad or lengths}")
    wins = {n: make_windows(docs, n, "contiguous", cfg.windows, L, None, cfg.seed + 17) for n in [L, *lengths]}
    t0 = time.perf_counter()
    with torch.no_grad():
        cal = calibrate_layers(gau_capture(model, wins), model.config.num_hidden_layers, lengths, cfg.windows, L,
                               model.config.attention_key_size, cfg.rows, cfg.seed, log=log)
    cal |= {"model": str(Path(cfg.model).resolve()), "seconds": time.perf_counter() - t0,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = Path(cfg.model) / FILE
    atomic_write_bytes(path, (json.dumps(cal, indent=1) + "\n").encode("utf-8"))
    log(f"wrote {path} ({cal['seconds']:.0f} s); evaluate with --methods 'infoscale(calibrated=True)'")
    return cal


def add_arguments(parser) -> None:
    add_flags(parser, CalibrateConfig)


def run(args) -> int:
    calibrate(from_args(CalibrateConfig, args), log=lambda s: print(s, file=sys.stderr))
    return 0
