"""``infoscale train``: training at a short length: GAU-α masked LM (``--arch gau``, the default), transformers'
own ``LlamaForCausalLM`` with next-token loss (``--arch llama``) or ``ModernBertForMaskedLM`` with the masked-LM
objective (``--arch modernbert``). The loop knows a family only through its ``infoscale.models.Family`` entry and
module (which builds the model) and the objective only through its ``infoscale.tasks.Task`` (batches, forward,
metrics): setup, step, log, evaluate, save.

Deterministic by construction: the batch, the masking and the dropout seed of step t are functions
of (seed, t) alone, so a resumed run (``--resume``) continues with exactly the data order and RNG
state of an uninterrupted one, and ``torchrun --nproc_per_node=N`` splits the same global batch over
N processes (DistributedDataParallel; gloo on CPU, nccl on GPU) with no other change.

The run directory holds ``train_config.json``, ``split.json``, the tokenizer (``vocab.txt``),
``metrics.jsonl``, ``checkpoint.pt`` (written atomically every ``--save-every`` steps) and, at the
end, the model (``config.json`` + ``model.safetensors``), loadable with
``GAUForMaskedLM.from_pretrained(run_dir)``. A Llama run has a byte-level BPE ``tokenizer.json`` (``--tokenizer
bpe``, the default for llama) or ``vocab.txt`` (``--tokenizer char``) and loads with ``AutoTokenizer`` and
``AutoModelForCausalLM`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attn import REGISTRY, parse_method
from .data import CORPORA, BPETokenizer, CharTokenizer, TokenDocs, load_corpus, load_tokenizer, split_documents
from .errors import ConfigError, DataError, MethodError
from .io import atomic_write, atomic_write_bytes, atomic_write_json, check_parent_folders, os_error_in, write_error
from .models import ARCHS
from .options import SEED_RANGE, add_flags, from_args, option
from .runtime import (
    choose_precision,
    dist_info,
    precision_info,
    quiet_libraries,
    resolve_device,
    step_generator,
    use_bf16,
)
from .tasks import task

MODEL_PRESETS = ("tiny", "mini", "small", "paper")  # mini: llama only

HELP = ("train a masked LM (GAU-α, ModernBERT) or a Llama causal LM at a short length (resumable; torchrun for "
        "several processes)")


@dataclass
class TrainConfig:
    out: str = option("", "run directory to create (or continue with --resume)", required=True)
    arch: str = option("gau", "gau (GAU-α masked LM) | llama (transformers' LlamaForCausalLM, next-token loss) | "
                              "modernbert (transformers' ModernBertForMaskedLM, masked LM)")
    tokenizer: str = option("auto", "auto (char for gau, bpe for llama) | char | bpe (byte-level BPE, llama only)")
    vocab_size: int = option(2048, "bpe: vocabulary size, trained on the training split")
    passkey_share: float = option(-1.0, "llama: share of training windows replaced by passkey samples of L tokens "
                                        "(-1: 0.05 for llama, 0 for gau)")
    copy_share: float = option(0.0, "llama: share of training windows replaced by copy samples: a training span of m "
                                    "tokens, m uniform in [min(8, L/2), L/2], tiled to L (teaches copying at L)")
    corpus: str = option("shakespeare", "shakespeare | sanguo | peoples-daily | a .txt file, folder or .jsonl")
    preset: str = option("small", "model size: " + ", ".join(MODEL_PRESETS))
    attention: str = option("softmax", "training method: softmax, cosscale(s=..), alibi, pose(target=..)")
    train_len: int = option(64, "training length L (tokens per window)")
    steps: int = option(1600, "optimizer steps (the small preset: about 8 minutes on two CPU cores)")
    batch_size: int = option(64, "global batch (windows per step), split over processes")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(150, "linear warm-up steps; then linear decay to 10% of the peak")
    weight_decay: float = option(0.01, "AdamW weight decay on matrices and embeddings")
    dropout: float = option(0.0, "hidden and attention dropout (GAU-α used 0.1; short CPU runs underfit)")
    mask_prob: float = option(0.15, "share of tokens chosen for MLM (80% [MASK], 10% random, 10% kept)")
    min_count: int = option(3, "least count for a character to enter the vocabulary")
    eval_docs: int = option(4, "documents held out for evaluation")
    val_windows: int = option(256, "held-out windows for the periodic accuracy at the training length (masked-LM: "
                                   "masked as in training, 80/10/10, so not comparable to `infoscale eval`'s accuracy)")
    eval_every: int = option(400, "steps between held-out evaluations")
    save_every: int = option(400, "steps between checkpoints")
    seed: int = option(0, "seed of the split, init, data order, masking and dropout", bounds=SEED_RANGE)
    init_from: str = option("", "start from another run's weights and tokenizer (pretrain long, fine-tune short: a "
                                "new --train-len, --attention and optimizer; the model's shape comes from that run)")
    bf16: str = option("auto", "bf16 autocast: auto (when the device supports it), on, off")
    cosscale_init: str = option("apart", "CosScale init of γ_q, γ_k: apart (random signs) or ones (GAU-α)")
    device: str = option("auto", "auto | cpu | cuda")
    resume: bool = option(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = option(False, "replace the run in --out (e.g. a crashed one): its files are removed once the "
                                    "new settings and corpus have been checked")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "save_every", "val_windows", "eval_docs", "min_count"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not isinstance(self.train_len, int) or self.train_len < 2:
            raise ConfigError(f"--train-len must be an integer >= 2, got {self.train_len!r}")
        if not 0 < self.mask_prob < 1:
            raise ConfigError(f"--mask-prob must be between 0 and 1 (exclusive), got {self.mask_prob}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown --preset {self.preset!r}; choose from {', '.join(MODEL_PRESETS)}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"--bf16 must be auto, on or off, got {self.bf16!r}")
        if self.cosscale_init not in ("apart", "ones"):
            raise ConfigError(f"--cosscale-init must be apart or ones, got {self.cosscale_init!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it; give one of them")
        self._check_arch()
        pm = parse_method(self.attention, self.train_len)
        for c in pm.components:
            if not c.method.trainable:
                trainable = ", ".join(n for n, m in REGISTRY.items() if m.trainable)
                raise MethodError(f"{c.name} is an evaluation method; train with one of {trainable} and give "
                                  f"{c.name} to `infoscale eval`")


    def _check_arch(self) -> None:
        """--arch, --tokenizer and the task's own options (--passkey-share, --copy-share), from the family's and the
        task's facts; resolves the 'auto' values (so train_config.json records what ran)."""
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {self.arch!r}; choose {' or '.join(ARCHS)}")
        fam = ARCHS[self.arch]
        if self.tokenizer == "auto":
            self.tokenizer = fam.tokenizers[0]
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"--tokenizer must be auto, char or bpe, got {self.tokenizer!r}")
        if self.tokenizer not in fam.tokenizers:
            archs = " or ".join(a for a, f in ARCHS.items() if self.tokenizer in f.tokenizers)
            raise ConfigError(f"--tokenizer {self.tokenizer} is for --arch {archs}; --arch {self.arch} uses "
                              f"{' or '.join(fam.tokenizers)}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 258:
            raise ConfigError(f"--vocab-size must be an integer >= 258 (256 bytes + 2 specials), got "
                              f"{self.vocab_size!r}")
        own = task(fam.task).options
        for name in dict.fromkeys(k for f in ARCHS.values() for k in task(f.task).options):
            flag = "--" + name.replace("_", "-")
            if getattr(self, name) == -1.0:
                setattr(self, name, own.get(name, 0.0))
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ConfigError(f"{flag} must be in [0, 1) (or -1 for the default), got {v}")
            if v and name not in own:
                archs = " or ".join(a for a, f in ARCHS.items() if name in task(f.task).options)
                raise ConfigError(f"{flag} is for --arch {archs} (its task reads it; --arch {self.arch}'s does not); "
                                  f"drop {flag} or give --arch {archs}")
        if self.passkey_share + self.copy_share >= 1:
            raise ConfigError(f"--passkey-share {self.passkey_share} + --copy-share {self.copy_share} leaves no text "
                              "windows; keep their sum below 1")
        module = fam.import_module()
        if self.preset not in module.PRESETS:
            raise ConfigError(f"--preset {self.preset} is not a size of --arch {self.arch}; it has "
                              f"{', '.join(module.PRESETS)}")
        if module.TRAIN_METHODS is not None:
            names = [c.name for c in parse_method(self.attention, self.train_len).components] or ["softmax"]
            bad = [n for n in names if n not in module.TRAIN_METHODS]
            if bad:
                raise MethodError(f"--arch {self.arch} trains with {' or '.join(module.TRAIN_METHODS)}; {bad[0]} is "
                                  f"not supported for its training (evaluate a run of --arch {self.arch} with it, or "
                                  "train with another --arch)")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 1.0 - 0.9 * min(frac, 1.0)


def make_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`infoscale.io.atomic_write`: a full disk leaves the old checkpoint
    and no temporary file, and is one clear error."""
    atomic_write(path, lambda f: torch.save(obj, f))


# Fields that may change when a run is resumed (they do not change the trajectory of the weights).
RESUMABLE_CHANGES = ("out", "resume", "overwrite", "progress", "steps", "eval_every", "save_every", "device")

# Files `infoscale train` writes into a run directory (--overwrite removes nothing else).
RUN_FILES = ("runtime.json", "train_config.json", "split.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json",
             "metrics.jsonl", "checkpoint.pt", "config.json", "model.safetensors", "generation_config.json",
             ".final.tmp")


def load_checkpoint(path: Path) -> dict:
    """The training state; tensors and plain containers only (``weights_only``: no code from the file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["model"], ckpt["optimizer"], ckpt["scheduler"]  # noqa: B018 - checks the keys exist
    except Exception as e:  # a truncated, foreign or unsafe file
        raise DataError(f"{path} is unreadable or not an infoscale checkpoint ({type(e).__name__}); delete it to "
                        "restart the run from step 0") from None
    step = ckpt.get("step")
    last = ckpt["scheduler"].get("last_epoch") if isinstance(ckpt["scheduler"], dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or (last is not None and last != step):
        raise DataError(f"{path} holds a bad step value ({step!r}; its learning-rate schedule is at {last!r}); "
                        "the checkpoint is damaged: delete it to restart the run from step 0")
    return ckpt


def restore(model, opt, sched, ckpt: dict, path: Path) -> None:
    """Load a checkpoint's state into a freshly built model, optimizer and schedule, one clear error if it
    does not fit (other shapes, missing or extra keys)."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()
        detail = " ".join(x.strip() for x in first[:3])[:240]
        raise DataError(f"{path} does not fit the model of this run ({detail}); it is damaged or from another run: "
                        "delete it to restart from step 0") from None


def corpus_ref(corpus: str) -> str:
    """A named corpus as is, a path as an absolute path (so the run can be evaluated from any folder)."""
    if corpus in CORPORA:
        return corpus
    return str(Path(corpus).expanduser().resolve())


def same_corpus(old: str | None, new: str) -> bool:
    """Whether a saved ``corpus`` field names the corpus asked for now (old runs stored relative paths)."""
    if old is None or old == new:
        return old is not None
    if old in CORPORA or new in CORPORA:
        return False
    if Path(old).is_absolute() or Path(old).exists():
        return corpus_ref(old) == corpus_ref(new)
    return Path(corpus_ref(new)).parts[-len(Path(old).parts):] == Path(old).parts


def _check_out(cfg: TrainConfig, out: Path) -> None:
    """Refuse an --out that cannot be used, before anything is read or written."""
    check_parent_folders(out, "--out")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file, not a run directory; choose another --out "
                        "(nothing was overwritten)")
    saved_cfg = out / "train_config.json"
    if cfg.resume:
        if not saved_cfg.exists():
            raise DataError(f"--resume: {out} has no train_config.json; start a new run without --resume")
        try:
            old = json.loads(saved_cfg.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"--resume: {saved_cfg} is damaged; start again with --overwrite") from None
        asked = dataclasses.asdict(cfg)
        diff = {k: (old.get(k), v) for k, v in asked.items()
                if k not in RESUMABLE_CHANGES and k != "corpus" and k in old and old.get(k) != v}
        if not same_corpus(old.get("corpus"), cfg.corpus):
            diff["corpus"] = (old.get("corpus"), cfg.corpus)
        if diff:
            detail = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"--resume: the settings differ from the run in {out} ({detail}); give the run's "
                            "settings, or start a new run with another --out or --overwrite")
    elif out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise DataError(f"{out} already exists and is not empty; add --resume to continue that run, --overwrite "
                            "to replace it, or choose another --out (nothing was overwritten)")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
        if foreign:
            raise DataError(f"--overwrite: {out} holds files `infoscale train` did not write ({', '.join(foreign[:3])}"
                            f"); refusing to delete them: choose another --out (nothing was removed)")


def _clear_run(out: Path) -> None:
    for p in out.iterdir():
        if p.name in RUN_FILES or p.name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# The fields of a GAU config that fix the weights' shapes (taken from the --init-from run).


def _init_run_dir(path: str) -> Path:
    p = Path(path)
    if not (p / "config.json").exists() or not (p / "model.safetensors").exists():
        raise DataError(f"--init-from {path}: not a finished run directory (config.json + model.safetensors); give a "
                        "run written by `infoscale train` or `infoscale convert`")
    return p


def _init_source(cfg: TrainConfig):
    """The model of the --init-from run, whose family must be the one trained here."""
    from .rundir import load_run

    src = load_run(_init_run_dir(cfg.init_from)).model
    want = ARCHS[cfg.arch].model_type
    if src.config.model_type != want:
        raise ConfigError(f"--init-from {cfg.init_from} holds a {src.config.model_type!r} model but --arch {cfg.arch} "
                          f"trains {want!r}; give a run of the same family")
    return src


def _precision_field(bf16: bool | None) -> dict:
    return {} if bf16 is None else {"precision": "bf16" if bf16 else "fp32"}


def run_precision(cfg: TrainConfig, device) -> bool:
    """Whether the run computes in bf16. A resumed run keeps the precision it started with (``precision`` in
    train_config.json), so ``--bf16 auto`` is not measured again and cannot switch half-way."""
    if cfg.resume:
        try:
            saved = json.loads((Path(cfg.out) / "train_config.json").read_text(encoding="utf-8")).get("precision")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            saved = None  # _check_out names the problem
        if saved in ("bf16", "fp32"):
            if cfg.bf16 != "auto" and (cfg.bf16 == "on") != (saved == "bf16"):
                raise ConfigError(f"--resume: the run in {cfg.out} computes in {saved}, but --bf16 {cfg.bf16} asks "
                                  f"for the other precision; resume with --bf16 auto (or "
                                  f"{'on' if saved == 'bf16' else 'off'})")
            choose_precision("on" if saved == "bf16" else "off", device)  # for runtime.json, without measuring
            return saved == "bf16"
    return use_bf16(cfg.bf16, device)


def prepare_run(cfg: TrainConfig, rank: int, device):
    """Create (or reopen with --resume, or replace with --overwrite) the run directory; returns
    (task, train docs, eval docs, ckpt, bf16). Everything is checked before the first file is written
    (a bad corpus or a training length no document reaches leaves no folder behind) and before the precision
    is chosen (``--bf16 auto`` measures, and says so)."""
    if not cfg.out:
        raise ConfigError("--out is required: the run directory to create")
    out = Path(cfg.out)
    _check_out(cfg, out)
    docs = load_corpus(cfg.corpus)
    saved_cfg = out / "train_config.json"
    if cfg.resume:
        split_file = out / "split.json"
        try:
            split = json.loads(split_file.read_text(encoding="utf-8"))
            split["train"], split["eval"]  # noqa: B018 - checks the keys exist
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError):
            raise DataError(f"--resume: {split_file} is missing or damaged; start again with --overwrite") from None
        tok = load_tokenizer(out)
    else:
        split = split_documents(docs, cfg.seed, cfg.eval_docs)
        train_texts = [d.text for d in docs if d.name in set(split["train"])]
        if cfg.init_from:  # the weights' vocabulary: the token ids must mean what they meant
            from .rundir import check_sizes

            check_sizes(_init_run_dir(cfg.init_from))  # before the run directory is written
            tok = load_tokenizer(_init_run_dir(cfg.init_from))
        elif cfg.tokenizer == "bpe":
            tok = BPETokenizer.train(train_texts, cfg.vocab_size)
        else:
            tok = CharTokenizer.train(train_texts, cfg.min_count)
    run_task = task(ARCHS[cfg.arch].task)(cfg, tok)
    run_task.check_run()
    by_name = {d.name: d for d in docs}
    missing = [n for n in split["train"] + split["eval"] if n not in by_name]
    if missing:
        raise DataError(f"the corpus no longer has documents {missing[:3]} named in {out / 'split.json'}")
    train_docs = TokenDocs([by_name[n] for n in split["train"]], tok)
    eval_docs = TokenDocs([by_name[n] for n in split["eval"]], tok)
    for what, d in (("training", train_docs), ("held-out", eval_docs)):
        longest = max((len(a) for a in d.arrays), default=0)
        if longest < cfg.train_len:
            raise DataError(f"no {what} document has --train-len {cfg.train_len} tokens (the longest has {longest}); "
                            "use a shorter --train-len or a corpus with longer documents")
    ckpt = load_checkpoint(out / "checkpoint.pt") if cfg.resume and (out / "checkpoint.pt").exists() else None
    if ckpt is not None and ckpt["step"] > cfg.steps and not (out / "model.safetensors").exists():
        raise ConfigError(f"--resume: the checkpoint in {out} is at step {ckpt['step']}; --steps must be at least that")
    bf16 = run_precision(cfg, device)
    if not cfg.resume and rank == 0:
        if cfg.overwrite and out.exists():
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        tok.save(out)
        atomic_write_json(out / "split.json", split)
        atomic_write_json(saved_cfg, dataclasses.asdict(cfg) | {"corpus": corpus_ref(cfg.corpus), "overwrite": False}
                          | _precision_field(bf16))
    return run_task, train_docs, eval_docs, ckpt, bf16


def run(args) -> int:
    return train(from_args(TrainConfig, args))


def add_arguments(parser) -> None:
    add_flags(parser, TrainConfig)


def train(cfg: TrainConfig) -> int:
    """Train (or resume) one run; returns 0. Works alone or under torchrun."""
    from tqdm import tqdm

    quiet_libraries(cfg.progress)
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    fam = ARCHS[cfg.arch]
    run_task, train_docs, eval_docs, ckpt, bf16 = prepare_run(cfg, rank, device)
    out = Path(cfg.out)
    if rank == 0:  # how this run computes (for the record; a resumed run rewrites it)
        atomic_write_json(out / "runtime.json", {"precision": precision_info(device), "torch": torch.__version__,
                                                 "threads": torch.get_num_threads(), "world_size": world})
    if ckpt is not None and ckpt["step"] >= cfg.steps and (out / "model.safetensors").exists():
        if rank == 0:
            print(f"{out}: already trained for {ckpt['step']} steps; nothing to do (give a larger --steps with "
                  "--resume to train on)")
        return 0

    torch.manual_seed(cfg.seed)
    source = _init_source(cfg) if cfg.init_from and ckpt is None else None
    model = fam.import_module().build_for_training(cfg, run_task.tok, source).to(device)
    if source is not None:
        try:
            model.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise ConfigError(f"--init-from {cfg.init_from}: its weights do not fit this model "
                              f"({str(e).splitlines()[0][:150]}); use that run's --arch and --preset") from None
    opt, sched = make_optimizer(model, cfg)
    start = 0
    if ckpt is not None:
        restore(model, opt, sched, ckpt, out / "checkpoint.pt")
        start = ckpt["step"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    model.train()
    positions = parse_method(cfg.attention, cfg.train_len).training_positions(cfg.train_len)
    kill_at = int(os.environ.get("INFOSCALE_TEST_KILL_AFTER_SAVE", "0"))  # fault injection for the resume test

    def save_checkpoint(step: int) -> None:
        if rank == 0:
            atomic_torch_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "format": "infoscale-train-1"}, out / "checkpoint.pt")
            if kill_at and step == kill_at:
                os.kill(os.getpid(), 9)

    def log(rec: dict) -> None:
        if rank == 0:
            try:
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, allow_nan=False) + "\n")
            except OSError as e:
                raise write_error(out / "metrics.jsonl", e) from None

    if rank == 0:
        keep_metrics_until(out / "metrics.jsonl", start)
        if cfg.resume:  # a resume may ask for more steps (or the folder moved): record what this run is now
            atomic_write_json(out / "train_config.json", dataclasses.asdict(cfg) | {
                "resume": False, "overwrite": False, "corpus": corpus_ref(cfg.corpus)} | _precision_field(bf16))
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress or rank != 0, dynamic_ncols=True,
               mininterval=2.0, desc=f"train {cfg.attention}")
    t0, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        b = run_task.batch(train_docs, [step_generator(cfg.seed, step, i) for i in range(run_task.streams)],
                           positions)
        shard = slice(rank, None, world)
        x, y = b.input_ids[shard].to(device), b.labels[shard].to(device)
        pos = b.positions[shard].to(device) if b.positions is not None else None
        n_global = run_task.targets(b.labels)
        torch.manual_seed(step_generator(cfg.seed, step, 3).initial_seed() % 2**31 + rank)  # dropout of this step
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            res = run_task.forward(net, x, y, pos)
        n_local = run_task.targets(y)
        # DDP averages gradients over processes: scale so the step equals one on the global batch.
        loss = res.loss * (n_local * world / max(n_global, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += b.input_ids.numel()
        done = step + 1
        loss_value = float(res.loss.detach())
        if not math.isfinite(loss_value):
            raise DataError(f"the loss became {loss_value} at step {done}; lower --lr")
        if done % 20 == 0 or done == cfg.steps:
            metrics = run_task.step_metrics(res.logits.detach(), y, b, shard)
            acc = metrics.pop("acc")
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.3f}", tok_s=f"{rate:,.0f}")
            log({"step": done, "loss": loss_value, "acc": acc, "lr": sched.get_last_lr()[0], "tok_s": rate,
                 **metrics})
        if done % cfg.eval_every == 0 or done == cfg.steps:
            rec = {"step": done, **run_task.heldout(model, eval_docs, device=device, bf16=bf16)}
            log(rec)
            bar.write(f"step {done}: held-out {run_task.noun} accuracy at L={cfg.train_len}: {rec['val_acc']:.4f} "
                      f"(loss {rec['val_loss']:.3f}, {rec['val_n']} predictions){run_task.heldout_note}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(done)
        bar.update(1)
    bar.close()
    if rank == 0:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = os_error_in(e)
            if err is None:
                raise
            raise write_error(out / "model.safetensors", err) from None
        print(f"saved {out} ({fam.load_hint.format(out=out)})")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metrics logged after ``step`` (a resume from an earlier checkpoint replays those steps)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    def step_of(line: str) -> float:
        try:
            rec = json.loads(line)
            return rec.get("step", 0) if isinstance(rec, dict) else math.inf
        except ValueError:  # a line cut short by a crash
            return math.inf

    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip() and step_of(line) <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))
