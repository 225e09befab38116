"""``infoscale train``: masked-language-model training of GAU-α at a short length.

Deterministic by construction: the batch, the masking and the dropout seed of step t are functions
of (seed, t) alone, so a resumed run (``--resume``) continues with exactly the data order and RNG
state of an uninterrupted one, and ``torchrun --nproc_per_node=N`` splits the same global batch over
N processes (DistributedDataParallel; gloo on CPU, nccl on GPU) with no other change.

The run directory holds ``train_config.json``, ``split.json``, the tokenizer (``vocab.txt``),
``metrics.jsonl``, ``checkpoint.pt`` (written atomically every ``--save-every`` steps) and, at the
end, the model (``config.json`` + ``model.safetensors``), loadable with
``GAUForMaskedLM.from_pretrained(run_dir)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attention import bf16_supported
from .data import CharTokenizer, DataError, TokenDocs, load_corpus, mask_tokens, pose_positions, split_documents
from .methods import MethodError, parse_method
from .model import PRESETS, GAUForMaskedLM, build_config

HELP = "train a GAU-α masked language model (resumable; torchrun for several processes)"


def doc(default, text: str, **kw):
    return field(default=default, metadata={"doc": text, **kw})


@dataclass
class TrainConfig:
    out: str = doc("", "run directory to create (or continue with --resume)")
    corpus: str = doc("shakespeare", "shakespeare | sanguo | peoples-daily | a .txt file, folder or .jsonl")
    preset: str = doc("small", "model size: " + ", ".join(PRESETS))
    attention: str = doc("softmax", "training method: softmax, cosscale(s=..), alibi, pose(target=..)")
    train_len: int = doc(64, "training length L (tokens per window)")
    steps: int = doc(1600, "optimizer steps (the small preset: about 8 minutes on two CPU cores)")
    batch_size: int = doc(64, "global batch (windows per step), split over processes")
    lr: float = doc(2e-3, "peak learning rate (AdamW)")
    warmup_steps: int = doc(150, "linear warm-up steps; then linear decay to 10% of the peak")
    weight_decay: float = doc(0.01, "AdamW weight decay on matrices and embeddings")
    dropout: float = doc(0.0, "hidden and attention dropout (GAU-α used 0.1; short CPU runs underfit)")
    mask_prob: float = doc(0.15, "share of tokens chosen for MLM (80% [MASK], 10% random, 10% kept)")
    min_count: int = doc(3, "least count for a character to enter the vocabulary")
    eval_docs: int = doc(4, "documents held out for evaluation")
    val_windows: int = doc(256, "held-out windows for the periodic accuracy at the training length")
    eval_every: int = doc(400, "steps between held-out evaluations")
    save_every: int = doc(400, "steps between checkpoints")
    seed: int = doc(0, "seed of the split, init, data order, masking and dropout")
    bf16: str = doc("auto", "bf16 autocast: auto (when the device supports it), on, off")
    cosscale_init: str = doc("apart", "CosScale init of γ_q, γ_k: apart (random signs) or ones (GAU-α)")
    device: str = doc("auto", "auto | cpu | cuda")
    resume: bool = doc(False, "continue the run in --out from its last checkpoint")
    progress: bool = doc(True, "show a progress bar")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """The RNG of one (step, purpose): independent of anything that happened before."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 8 + stream) % (2**63))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def use_bf16(flag: str, device: torch.device) -> bool:
    if flag not in ("auto", "on", "off"):
        raise DataError(f"--bf16 must be auto, on or off, got {flag!r}")
    return flag == "on" or (flag == "auto" and bf16_supported(device))


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


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None


def make_batch(docs: TokenDocs, cfg: TrainConfig, vocab_size: int, step: int) -> Batch:
    """The global batch of ``step`` (every process builds the same one and keeps its shard)."""
    ids = docs.windows(step_generator(cfg.seed, step, 0), cfg.batch_size, cfg.train_len)
    inputs, labels = mask_tokens(ids, step_generator(cfg.seed, step, 1), vocab_size, cfg.mask_prob)
    pose = parse_method(cfg.attention).resolved(cfg.train_len).get("pose")
    positions = None
    if pose is not None:
        positions = pose_positions(step_generator(cfg.seed, step, 2), cfg.batch_size, cfg.train_len, pose.target,
                                   pose.chunks)
    return Batch(inputs, labels, positions)


@torch.no_grad()
def heldout_accuracy(model, docs: TokenDocs, cfg: TrainConfig, vocab_size: int, device, bf16: bool) -> dict:
    """Masked accuracy and loss on fixed held-out windows at the training length (15% masking)."""
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    ids = docs.windows(gen, cfg.val_windows, cfg.train_len)
    inputs, labels = mask_tokens(ids, gen, vocab_size, cfg.mask_prob)
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(inputs), 128):
        x, y = inputs[i:i + 128].to(device), labels[i:i + 128].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, labels=y)
        sel = y[y != -100]
        correct += int((out.logits.argmax(-1) == sel).sum())
        loss_sum += float(out.loss) * sel.numel()
        total += sel.numel()
    model.train(was)
    return {"val_acc": correct / max(total, 1), "val_loss": loss_sum / max(total, 1), "val_n": total}


# ---------------------------------------------------------------------------------------------
# the run directory
# ---------------------------------------------------------------------------------------------


def prepare_run(cfg: TrainConfig, rank: int):
    """Create (or reopen with --resume) the run directory; returns (tokenizer, train docs, eval docs, ckpt)."""
    out = Path(cfg.out)
    if not cfg.out:
        raise DataError("--out is required: the run directory to create")
    saved_cfg = out / "train_config.json"
    if cfg.resume:
        if not saved_cfg.exists():
            raise DataError(f"--resume: {out} has no train_config.json; start a new run without --resume")
        old = json.loads(saved_cfg.read_text())
        diff = {k: (old.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                if k not in ("resume", "progress", "steps", "eval_every", "save_every", "device") and old.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise DataError(f"--resume: the settings differ from the run in {out} ({detail})")
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} already exists and is not empty; add --resume to continue that run, or choose "
                        "another --out (nothing was overwritten)")
    parse_method(cfg.attention, cfg.train_len)
    for c in parse_method(cfg.attention).components:
        if c.name not in ("cosscale", "alibi", "pose"):
            raise MethodError(f"{c.name} is an evaluation method; train with softmax, cosscale(s=..), alibi or "
                              f"pose(target=..), and give {c.name} to `infoscale eval`")
    if cfg.cosscale_init not in ("apart", "ones"):
        raise DataError("--cosscale-init must be apart or ones")

    docs = load_corpus(cfg.corpus)
    if cfg.resume:
        split = json.loads((out / "split.json").read_text())
        tok = CharTokenizer.load(out)
    else:
        split = split_documents(docs, cfg.seed, cfg.eval_docs)
        train_texts = [d.text for d in docs if d.name in set(split["train"])]
        tok = CharTokenizer.train(train_texts, cfg.min_count)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            tok.save(out)
            atomic_write_json(out / "split.json", split)
            atomic_write_json(saved_cfg, dataclasses.asdict(cfg))
    by_name = {d.name: d for d in docs}
    missing = [n for n in split["train"] + split["eval"] if n not in by_name]
    if missing:
        raise DataError(f"the corpus no longer has documents {missing[:3]} named in {out / 'split.json'}")
    train_docs = TokenDocs([by_name[n] for n in split["train"]], tok)
    eval_docs = TokenDocs([by_name[n] for n in split["eval"]], tok)
    ckpt = None
    if cfg.resume and (out / "checkpoint.pt").exists():
        try:
            ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
            ckpt["step"], ckpt["model"], ckpt["optimizer"]  # noqa: B018 - checks the keys exist
        except Exception as e:  # a truncated or foreign file
            raise DataError(f"{out / 'checkpoint.pt'} is unreadable or not an infoscale checkpoint "
                            f"({type(e).__name__}); delete it to restart the run from step 0") from None
    return tok, train_docs, eval_docs, ckpt


def run(args) -> int:
    from .cli import dataclass_from_args

    return train(dataclass_from_args(TrainConfig, args))


def add_arguments(parser) -> None:
    from .cli import add_dataclass_flags

    add_dataclass_flags(parser, TrainConfig)


def train(cfg: TrainConfig) -> int:
    """Train (or resume) one run; returns 0. Works alone or under torchrun."""
    from tqdm import tqdm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if cfg.batch_size % world:
            raise DataError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    bf16 = use_bf16(cfg.bf16, device)
    tok, train_docs, eval_docs, ckpt = prepare_run(cfg, rank)
    out = Path(cfg.out)
    if ckpt is not None and ckpt["step"] >= cfg.steps and (out / "model.safetensors").exists():
        if rank == 0:
            print(f"{out}: already trained for {ckpt['step']} steps; nothing to do")
        return 0

    torch.manual_seed(cfg.seed)
    mcfg = build_config(cfg.preset, vocab_size=len(tok), train_len=cfg.train_len, attention=cfg.attention,
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                        cosscale_init=cfg.cosscale_init)
    model = GAUForMaskedLM(mcfg).to(device)
    opt, sched = make_optimizer(model, cfg)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["step"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    model.train()

    def save_checkpoint(step: int) -> None:
        if rank == 0:
            atomic_torch_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "format": "infoscale-train-1"}, out / "checkpoint.pt")

    def log(rec: dict) -> None:
        if rank == 0:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    if rank == 0 and start == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress or rank != 0, dynamic_ncols=True,
               mininterval=2.0, desc=f"train {cfg.attention}")
    t0, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        b = make_batch(train_docs, cfg, len(tok), step)
        shard = slice(rank, None, world)
        x, y = b.input_ids[shard].to(device), b.labels[shard].to(device)
        pos = b.positions[shard].to(device) if b.positions is not None else None
        n_global = int((b.labels != -100).sum())
        torch.manual_seed(step_generator(cfg.seed, step, 3).initial_seed() % 2**31 + rank)  # dropout of this step
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            res = net(x, position_ids=pos, labels=y)
        n_local = int((y != -100).sum())
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
            acc = float((res.logits.detach().argmax(-1) == y[y != -100]).float().mean())
            rate = tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.3f}", tok_s=f"{rate:,.0f}")
            log({"step": done, "loss": loss_value, "acc": acc, "lr": sched.get_last_lr()[0], "tok_s": rate})
        if done % cfg.eval_every == 0 or done == cfg.steps:
            rec = {"step": done, **heldout_accuracy(model, eval_docs, cfg, len(tok), device, bf16)}
            log(rec)
            bar.write(f"step {done}: held-out masked accuracy at L={cfg.train_len}: {rec['val_acc']:.4f} "
                      f"(loss {rec['val_loss']:.3f}, {rec['val_n']} predictions)")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(done)
        bar.update(1)
    bar.close()
    if rank == 0:
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
        print(f"saved {out} (GAUForMaskedLM.from_pretrained('{out}'))")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0
