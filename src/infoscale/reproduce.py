"""``infoscale reproduce --preset smoke|quick|paper``: the paper's experiment end to end.

Trains the softmax, CosScale, PoSE and ALiBi GAU-α models on the default corpus at L = 64, evaluates
every applicable method and the paper's combinations (InfoScale on each baseline, CosScale +
InfoScale) at L, 2L, … in both settings, measures attention entropy/dilution/CosScale-vs-window,
and writes records, tables and plots. Every stage resumes: rerunning the command continues a killed
run (training from its checkpoint, the sweep from its last record).

    runs/<preset>/{softmax,cosscale,pose,alibi}/   models
    results/<preset>.jsonl                         evaluation records
    report/<preset>/report.md + *.png              tables and plots (analysis/ for the attention study)

The causal track (``--preset clm-smoke|clm-quick``, :func:`reproduce_clm`) trains transformers' Llama with
softmax and PoSE at L = 64 (byte-level BPE, a share of short passkey samples), evaluates every
training-free method, alone and with ``+infoscale`` / ``+logn``, in the three causal tests of
:mod:`infoscale.evaluate_clm` (NLL by position, copying beyond L, passkey retrieval), measures each layer's
attention entropy and dilution inside the Llamas (:func:`infoscale.analysis.causal_entropy_records`), and writes
the same kind of report (paired Δ tables, entropy plots).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .io import check_output, read_records, write_records
from .options import SEED_RANGE, add_flags, from_args, option
from .train import TrainConfig, train

TRAIN_LEN = 64  # L of every preset's evaluated models (the paper's fine-tuning length)

HELP = "train the four models, evaluate every method to 64x, write records, report and plots"

# The training methods of the paper's testbed. ALiBi: the official symmetric bias with one head (slope
# 2^-8 by default, 1/16 with max_bias = 4) leaves a bidirectional single-head encoder blind to order
# (29.6% at L against softmax's 58.0% in the quick schedule); separate slopes for the two sides, 1/4 to the
# left and 1 to the right, train to 51% (the README's ALiBi table), so that is the baseline trained here.
MODELS = {
    "softmax": "softmax",
    "cosscale": "cosscale(s=128.0)",
    "pose": "pose",
    "alibi": "alibi(max_bias=2.0, right_bias=0.0)",
}

# Evaluation methods: the baselines, log-n scaling, and InfoScale alone and on each baseline. On the
# CosScale model every one of them runs on top of CosScale; RoPE methods are skipped on ALiBi.
METHODS = [
    "softmax", "infoscale", "logn", "softmax_plus",
    "pi", "pi+infoscale", "ntk", "ntk+infoscale", "yarn", "yarn+infoscale",
    "rerope", "rerope+infoscale", "leaky_rerope", "leaky_rerope+infoscale",
    "window", "streamingllm", "streamingllm+infoscale", "lm_infinite", "lm_infinite+infoscale",
    "infoscale(calibrated=True)", "rerope+infoscale(calibrated=True)",
]
# The paper's released fine-tunes (GAU-alpha_noCosScale, GAU-alpha_CosScale): the recipe presets train these two.
RECIPE_MODELS = {"softmax": "softmax", "cosscale": "cosscale(s=128.0)"}
CALIBRATED = "calibrated=True"  # methods that need the run's calibration.json (`infoscale calibrate`)


@dataclass
class Schedule:
    """What every preset fixes: model size, training schedule, and the evaluation sweep."""

    model_preset: str
    steps: int
    batch_size: int
    warmup_steps: int
    lr: float
    lengths: tuple
    methods: tuple
    predictions: int
    windows: int


@dataclass(frozen=True)
class Pretrain:
    """The paper's recipe: one model pretrained at a long length (GAU-α: 512 with ``softmax_plus``), from which
    every model of the preset is fine-tuned at L (``infoscale train --init-from``)."""

    train_len: int
    attention: str
    steps: int
    batch_size: int
    warmup_steps: int
    lr: float


@dataclass
class Preset(Schedule):
    compare_lengths: tuple  # lengths where the exact protocol is run next to the strided one
    compare_predictions: int
    analysis_lengths: tuple
    analysis_windows: int
    models: dict | None = None  # name -> training method; None: MODELS
    pretrain: Pretrain | None = None  # None: every model from scratch


PRESETS = {
    # CI: tiny models, a few methods, lengths to 16x; about two minutes
    "smoke": Preset("tiny", 300, 32, 30, 3e-3, (64, 256, 1024), ("softmax", "infoscale", "rerope+infoscale",
                                                                  "window", "yarn", "infoscale(calibrated=True)"),
                    256, 2, (64,), 128, (64, 256), 1),
    # a laptop: small models, every method, lengths to 64x; about 85 minutes on two cores. At least 32
    # windows per cell, for paired Δs: measured on the quick softmax model with 16 windows (512 predictions
    # each at 4096), a 95% CI of ±1 point at 4096 needs 1–9 windows for X + InfoScale (or log-n) vs X and
    # 21–33 for a position method vs softmax on contiguous text; on repeated text (tiled spans vary a lot
    # between windows) 61–178 for ReRoPE ± a temperature and up to 250 vs softmax, out of this preset's
    # reach (±2–3 points with 32). The half-width falls as 1/√windows:
    # the former 4 windows gave CIs 2.8× wider than 32. Cost: 8× the
    # evaluation time at 2048 and 4096, ≈ +45 min on two cores.
    "quick": Preset("small", 1000, 64, 100, 2e-3, (64, 128, 256, 512, 1024, 2048, 4096), tuple(METHODS),
                    1024, 32, (64, 1024), 1024, (64, 256, 1024, 4096), 2),
    # the recipe in CI: a tiny model pretrained at 256 with softmax_plus, fine-tuned at 64; about a minute
    "paper-smoke": Preset("tiny", 150, 32, 15, 1e-3, (64, 256, 1024), ("softmax", "infoscale", "rerope+infoscale"),
                          256, 2, (64,), 128, (64, 256), 1, models=RECIPE_MODELS,
                          pretrain=Pretrain(256, "softmax_plus", 200, 8, 20, 3e-3)),
    # The paper's recipe on two CPU cores (about 1.5 h, estimated from training 512 × 16 tokens per step at 0.9×
    # the per-token cost of 64 × 64): a small GAU-α pretrained at 512 with softmax_plus (33M tokens, 8 passes
    # over the training plays), then fine-tuned at 64 with softmax and with CosScale (s = 128), as the released
    # GAU-alpha_noCosScale and GAU-alpha_CosScale were; the same sweep as quick. Fine-tuning starts from trained
    # weights, so a lower peak rate than from scratch (the paper fine-tuned at 1e-5 for 400 epochs of a small set).
    "paper-cpu": Preset("small", 800, 64, 80, 5e-4, (64, 128, 256, 512, 1024, 2048, 4096), tuple(METHODS),
                        1024, 32, (64, 1024), 1024, (64, 256, 1024, 4096), 2, models=RECIPE_MODELS,
                        pretrain=Pretrain(512, "softmax_plus", 4000, 16, 400, 2e-3)),
    # a GPU: the same recipe at the official fine-tuning shape (6 layers, hidden 768, key 128)
    "paper": Preset("paper", 4000, 128, 400, 1e-4, (64, 128, 256, 512, 1024, 2048, 4096), tuple(METHODS),
                    8192, 10, (64, 1024, 4096), 4096, (64, 256, 1024, 4096), 8, models=RECIPE_MODELS,
                    pretrain=Pretrain(512, "softmax_plus", 20000, 64, 2000, 1e-3)),
    # a GPU, from scratch at the official shape (the quick preset's four models, larger)
    "paper-scratch": Preset("paper", 20000, 128, 2000, 1e-3, (64, 128, 256, 512, 1024, 2048, 4096),
                            tuple(METHODS), 8192, 10, (64, 1024, 4096), 4096, (64, 256, 1024, 4096), 8),
}


# The causal track: Llama (transformers) trained with softmax and PoSE; methods applied with infoscale.hf.
CLM_MODELS = {"softmax": "softmax", "pose": "pose"}
CLM_METHODS = [
    "softmax", "infoscale", "logn",
    "pi", "pi+infoscale", "ntk", "ntk+infoscale", "yarn", "yarn+infoscale", "yarn+logn",
    "rerope", "rerope+infoscale", "rerope+logn", "leaky_rerope", "leaky_rerope+infoscale",
    "window", "streamingllm", "streamingllm+infoscale", "lm_infinite", "lm_infinite+infoscale",
]

# The attention analysis of the causal track: the length temperatures alone and on ReRoPE.
CLM_ANALYSIS_METHODS = ("softmax", "infoscale", "logn", "rerope", "rerope+infoscale")


@dataclass
class ClmPreset(Schedule):  # predictions: least scored tokens per contiguous / copy cell
    passkey_trials: int
    passkey_share: float
    analysis_lengths: tuple
    analysis_windows: int
    copy_share: float = 0.0  # TrainConfig.copy_share: training windows replaced by tiled training spans


CLM_PRESETS = {
    # the test suite: tiny models, four methods, lengths to 8x; about two minutes
    "clm-smoke": ClmPreset("tiny", 60, 16, 10, 3e-3, (64, 128, 512), ("softmax", "infoscale", "rerope", "window"),
                           128, 2, 3, 0.05, (64, 128, 512), 2, copy_share=0.1),
    # a shared two-core CPU: the mini Llama (2 layers, hidden 128, head dim 64), every method of CLM_METHODS,
    # lengths to 64x. Copying: 1500 steps at batch 32 with 10% passkey left the model unable to copy even within L
    # (top-1 on a second copy 20-23% vs 23-26% on the first); adding 15% copy samples changed nothing at 1500
    # steps; 30% copy samples and 3000 steps give partial copying within L (36% vs 23% for spans of 8-32 tokens,
    # the trained distances; none at 49-60) and ReRoPE then beats a window by 3.7 points (CI 2.6-4.8) on copying
    # beyond L at n = 256 (1.8 at 1024), where they tie without copy samples. No induction head forms at this
    # size. 16 windows per contiguous / copy cell: paired Δs need several windows, and the CI half-width falls as
    # 1/√windows (2.8× narrower than 2).
    "clm-quick": ClmPreset("mini", 3000, 32, 100, 3e-3, (64, 256, 1024, 4096), tuple(CLM_METHODS), 256, 16, 6, 0.1,
                           (64, 256, 1024, 4096), 4, copy_share=0.3),
}


@dataclass
class ReproduceConfig:
    preset: str = option("quick", "smoke | quick | paper-cpu | paper | paper-scratch (GAU-α masked LM) | clm-smoke | "
                                  "clm-quick (Llama causal)")
    corpus: str = option("shakespeare", "training and evaluation corpus")
    runs: str = option("runs", "folder for the models")
    results: str = option("results", "folder for the records")
    report: str = option("report", "folder for the report")
    seed: int = option(0, "seed of everything", bounds=SEED_RANGE)
    progress: bool = option(True, "show progress bars")


def tag(cfg: ReproduceConfig) -> str:
    """The preset's name, with the corpus after it when it is not Shakespeare (``quick-sanguo``), so reproductions
    on two corpora keep apart (a model trained on one is never taken for the other's)."""
    if cfg.corpus == "shakespeare":
        return cfg.preset
    name = Path(cfg.corpus).stem if any(c in cfg.corpus for c in "/\\.") else cfg.corpus
    return f"{cfg.preset}-{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}"


def paths(cfg: ReproduceConfig) -> dict:
    t = tag(cfg)
    return {"runs": Path(cfg.runs) / t, "records": Path(cfg.results) / f"{t}.jsonl",
            "analysis": Path(cfg.results) / f"{t}-analysis.jsonl", "report": Path(cfg.report) / t}


def reproduce(cfg: ReproduceConfig, log=print) -> dict:
    from .analysis import AnalyzeConfig, analyze
    from .calibrate import FILE as CALIBRATION_FILE
    from .calibrate import CalibrateConfig, calibrate
    from .evaluate import EvalConfig, evaluate
    from .report import write_report

    where = paths(cfg)  # every output place is checked before any work
    for flag, folder in (("--runs", cfg.runs), ("--results", cfg.results), ("--report", cfg.report),
                         ("--runs", where["runs"]), ("--report", where["report"])):
        check_output(folder, flag, folder=True)
    for key in ("records", "analysis"):
        check_output(where[key], "--results", folder=False)
    if cfg.preset in CLM_PRESETS:
        return reproduce_clm(cfg, log)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {', '.join([*PRESETS, *CLM_PRESETS])}")
    p = PRESETS[cfg.preset]
    where = paths(cfg)
    t0 = time.perf_counter()

    def fit(out: Path, attention: str, s, train_len: int, init_from: str = "") -> str:
        if not (out / "model.safetensors").exists():
            log(f"== training {out.name} ({attention}, L = {train_len}{', from ' + init_from if init_from else ''})"
                f" -> {out}")
            train(TrainConfig(out=str(out), corpus=cfg.corpus, preset=p.model_preset, attention=attention,
                              train_len=train_len, steps=s.steps, batch_size=s.batch_size,
                              warmup_steps=s.warmup_steps, lr=s.lr, seed=cfg.seed, init_from=init_from,
                              eval_every=max(s.steps // 5, 1), save_every=max(s.steps // 10, 1),
                              resume=(out / "train_config.json").exists(), progress=cfg.progress))
        return str(out)

    init = "" if p.pretrain is None else fit(where["runs"] / "pretrain", p.pretrain.attention, p.pretrain,
                                              p.pretrain.train_len)
    models = [fit(where["runs"] / name, attention, p, TRAIN_LEN, init)
              for name, attention in (p.models or MODELS).items()]
    if any(CALIBRATED in m for m in p.methods):
        for m in models:  # InfoScale's per-layer effective dimension, fitted on unlabelled held-out windows
            if not (Path(m) / CALIBRATION_FILE).exists():
                log(f"== calibrating InfoScale on {m}")
                calibrate(CalibrateConfig(model=m, seed=cfg.seed), log=log)
    t_train = time.perf_counter() - t0
    log(f"== evaluating {len(models)} models x {len(p.methods)} methods x {len(p.lengths)} lengths x 2 settings")
    evaluate(EvalConfig(models=models, methods=list(p.methods), lengths=list(p.lengths), protocol="strided",
                        predictions=p.predictions, windows=p.windows, out=str(where["records"]), seed=cfg.seed,
                        progress=cfg.progress), log=log)
    # the paper's protocol (each position masked alone) next to the strided one, on the softmax model
    evaluate(EvalConfig(models=[models[0]], methods=["softmax", "infoscale"], lengths=list(p.compare_lengths),
                        protocol="exact", predictions=p.compare_predictions, windows=1,
                        out=str(where["records"]), seed=cfg.seed, progress=cfg.progress), log=log)
    t_eval = time.perf_counter() - t0 - t_train
    log("== analysing attention (entropy, dilution, CosScale vs window)")
    analysis_file = where["analysis"]
    if not analysis_file.exists():
        recs = []
        for i, m in enumerate([models[0], models[1]]):  # softmax and CosScale models, synthetic once
            recs += analyze(AnalyzeConfig(model=m, methods=["softmax", "infoscale", "logn"],
                                          lengths=list(p.analysis_lengths), windows=p.analysis_windows,
                                          synthetic=i == 0, seed=cfg.seed, progress=cfg.progress))
        write_records(analysis_file, recs)
    # the report lists models and methods in the preset's order (softmax first), whichever process wrote its
    # records first; records of anything else (an extra `infoscale eval`) follow in file order
    model_rank, method_rank = ({x: i for i, x in enumerate(xs)} for xs in (p.models or MODELS, p.methods))
    records = sorted(read_records(where["records"]), key=lambda r: (
        model_rank.get(r.get("model_name"), len(model_rank)), method_rank.get(r.get("method"), len(method_rank))))
    report = write_report(records + read_records(analysis_file), where["report"])
    timing = {"preset": cfg.preset, "corpus": cfg.corpus, "train_s": t_train, "eval_s": t_eval,
              "total_s": time.perf_counter() - t0}
    (where["report"] / "timing.json").write_text(json.dumps(timing, indent=1))
    log(f"== done in {timing['total_s'] / 60:.1f} min: {report}")
    return {"records": where["records"], "analysis": analysis_file, "report": report, "models": models, **timing}


def reproduce_clm(cfg: ReproduceConfig, log=print) -> dict:
    """The causal track: train the Llama models, evaluate every method in the three tests, measure attention
    entropy and dilution, write the report. Every stage resumes (the analysis is skipped when its file exists)."""
    from .analysis import AnalyzeConfig, analyze
    from .evaluate import EvalConfig, evaluate
    from .report import write_report

    p = CLM_PRESETS[cfg.preset]
    where = paths(cfg)
    t0 = time.perf_counter()
    models = []
    for name, attention in CLM_MODELS.items():
        out = where["runs"] / name
        if not (out / "model.safetensors").exists():
            log(f"== training llama {name} ({attention}) -> {out}")
            train(TrainConfig(out=str(out), arch="llama", corpus=cfg.corpus, preset=p.model_preset,
                              attention=attention, steps=p.steps, batch_size=p.batch_size,
                              warmup_steps=p.warmup_steps, lr=p.lr, seed=cfg.seed, passkey_share=p.passkey_share,
                              copy_share=p.copy_share,
                              val_windows=64, eval_every=max(p.steps // 3, 1), save_every=max(p.steps // 6, 1),
                              resume=(out / "train_config.json").exists(), progress=cfg.progress))
        models.append(str(out))
    t_train = time.perf_counter() - t0
    log(f"== evaluating {len(models)} models x {len(p.methods)} methods x {len(p.lengths)} lengths x 3 tests")
    evaluate(EvalConfig(models=models, methods=list(p.methods), lengths=list(p.lengths),
                        settings=["contiguous", "repeated", "passkey"], predictions=p.predictions,
                        windows=p.windows, passkey_trials=p.passkey_trials, out=str(where["records"]),
                        seed=cfg.seed, progress=cfg.progress), log=log)
    t_eval = time.perf_counter() - t0 - t_train
    analysis_file = where["analysis"]
    if not analysis_file.exists():  # written whole at the end: a killed analysis reruns from the start
        log(f"== analysing attention (entropy, dilution) of {len(models)} models x {len(CLM_ANALYSIS_METHODS)} methods")
        recs = []
        for m in models:
            recs += analyze(AnalyzeConfig(model=m, methods=list(CLM_ANALYSIS_METHODS), lengths=list(p.analysis_lengths),
                                          windows=p.analysis_windows, synthetic=False, seed=cfg.seed,
                                          progress=cfg.progress))
        write_records(analysis_file, recs)
    t_analysis = time.perf_counter() - t0 - t_train - t_eval
    report = write_report(read_records(where["records"]) + read_records(analysis_file), where["report"])
    timing = {"preset": cfg.preset, "corpus": cfg.corpus, "train_s": t_train, "eval_s": t_eval,
              "analysis_s": t_analysis, "total_s": time.perf_counter() - t0}
    (where["report"] / "timing.json").write_text(json.dumps(timing, indent=1))
    log(f"== done in {timing['total_s'] / 60:.1f} min: {report}")
    return {"records": where["records"], "analysis": analysis_file, "report": report, "models": models, **timing}


def add_arguments(parser) -> None:
    add_flags(parser, ReproduceConfig)


def run(args) -> int:
    reproduce(from_args(ReproduceConfig, args))
    return 0


__all__ = ["reproduce", "reproduce_clm", "ReproduceConfig", "PRESETS", "MODELS", "METHODS", "CLM_PRESETS",
           "CLM_METHODS", "CLM_ANALYSIS_METHODS"]
