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
Records are appended to a JSONL file one per (model, method, length, setting, protocol); a rerun
skips records already there and the file is rewritten atomically after each new record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .data import MASK, CharTokenizer, DataError, TokenDocs, load_corpus
from .methods import MethodError, merge_with_training, parse_method
from .train import atomic_write_bytes, doc, use_bf16

HELP = "evaluate models × methods × lengths (contiguous and repeated text) into JSONL records"


@dataclass
class EvalConfig:
    models: list[str] = doc(dataclasses.MISSING, "run directories written by `infoscale train`")
    methods: list[str] = doc(("softmax", "infoscale"), "methods to evaluate with (train-time parts are inherited)")
    lengths: list[int] = doc((64, 128, 256, 512, 1024, 2048, 4096), "sequence lengths n")
    settings: list[str] = doc(("contiguous", "repeated"), "contiguous and/or repeated")
    protocol: str = doc("strided", "exact | sampled | strided")
    windows: int = doc(4, "least windows per (length, setting), from held-out documents")
    predictions: int = doc(2048, "least predictions per record: short lengths use more windows to reach it")
    samples: int = doc(32, "sampled: positions per window")
    stride: int = doc(8, "strided: mask every r-th position")
    out: str = doc("results/results.jsonl", "JSONL file the records are appended to")
    seed: int = doc(0, "seed of the windows and masked positions")
    bf16: str = doc("auto", "bf16 autocast and bf16 attention: auto, on, off")
    chunk_size: int = doc(256, "query rows per attention chunk")
    tokens_per_batch: int = doc(16384, "tokens per forward batch (copies of a window × n)")
    progress: bool = doc(True, "show a progress bar")


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def load_model(path: str | Path, device="cpu"):
    """(model, tokenizer, train config) of a run directory, with one clear error for each problem."""
    from .model import GAUForMaskedLM

    p = Path(path)
    if not p.is_dir():
        raise DataError(f"model {str(path)!r} is not a directory; give a run directory written by `infoscale train`")
    cfg_file = p / "config.json"
    if not cfg_file.exists() or not (p / "model.safetensors").exists():
        hint = " (training is not finished: rerun it with --resume)" if (p / "checkpoint.pt").exists() else ""
        raise DataError(f"{p} has no config.json + model.safetensors{hint}")
    try:
        mtype = json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError:
        raise DataError(f"{cfg_file} is not valid JSON") from None
    if mtype != "gau_alpha":
        raise DataError(f"{p} holds a {mtype!r} model, not an infoscale GAU-α model")
    try:
        model = GAUForMaskedLM.from_pretrained(p).to(device).eval()
    except Exception as e:  # truncated safetensors, wrong shapes
        raise DataError(f"cannot load the model in {p}: {type(e).__name__}: {str(e)[:200]}") from None
    tok = CharTokenizer.load(p)
    tcfg = json.loads((p / "train_config.json").read_text()) if (p / "train_config.json").exists() else {}
    return model, tok, tcfg


def heldout_docs(run_dir: Path, tok: CharTokenizer, tcfg: dict) -> TokenDocs:
    split = json.loads((run_dir / "split.json").read_text())
    docs = {d.name: d for d in load_corpus(tcfg["corpus"])}
    return TokenDocs([docs[n] for n in split["eval"]], tok)


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------------------------------------
# windows and masks
# ---------------------------------------------------------------------------------------------


def make_windows(docs: TokenDocs, n: int, setting: str, count: int, train_len: int, stride: int | None,
                 seed: int) -> list[np.ndarray]:
    """``count`` windows of n tokens (see the module docstring)."""
    rng = np.random.default_rng([seed, n, 0 if setting == "contiguous" else 1])
    if setting == "contiguous":
        long = [a for a in docs.arrays if len(a) >= n]
        if not long:
            raise DataError(f"no held-out document has {n} tokens, so the contiguous setting cannot run at n={n} "
                            f"(longest: {max(len(a) for a in docs.arrays)}); use shorter lengths or longer documents")
        out = []
        for _ in range(count):
            a = long[rng.integers(len(long))]
            s = int(rng.integers(0, len(a) - n + 1))
            out.append(a[s:s + n].astype(np.int64))
        return out
    if setting != "repeated":
        raise DataError(f"unknown setting {setting!r}; use contiguous or repeated")
    out = []
    for _ in range(count):
        while True:
            m = int(rng.integers(train_len, 2 * train_len + 1))
            if not stride or m % stride:
                break
        cands = [a for a in docs.arrays if len(a) >= m]
        if not cands:
            raise DataError(f"no held-out document has {m} tokens for a repeated span; use longer documents")
        a = cands[rng.integers(len(cands))]
        s = int(rng.integers(0, len(a) - m + 1))
        span = a[s:s + m]
        out.append(np.resize(span, n).astype(np.int64))  # tiles the span
    return out


def mask_groups(n: int, protocol: str, cfg: EvalConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Sets of positions masked together in one forward pass."""
    if protocol == "exact":
        return [np.array([i]) for i in range(n)]
    if protocol == "sampled":
        k = min(cfg.samples, n)
        return [np.array([i]) for i in rng.choice(n, size=k, replace=False)]
    if protocol == "strided":
        return [np.arange(int(rng.integers(0, min(cfg.stride, n))), n, cfg.stride)]
    raise DataError(f"unknown protocol {protocol!r}; use exact, sampled or strided")


@torch.inference_mode()
def score_windows(model, windows: list[np.ndarray], groups: list[list[np.ndarray]], tokens_per_batch: int, device,
                  bf16: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window, (correct, loss) of each prediction; every group of masked positions gets its own
    copy of its window, and copies of all windows are batched ``tokens_per_batch`` tokens at a time."""
    n = len(windows[0])
    tasks = [(w, g) for w, gs in enumerate(groups) for g in gs]
    per = max(1, tokens_per_batch // n)
    base = torch.from_numpy(np.stack(windows)).to(device)
    correct = [[] for _ in windows]
    losses = [[] for _ in windows]
    for t0 in range(0, len(tasks), per):
        batch = tasks[t0:t0 + per]
        x = base[[w for w, _ in batch]].clone()
        rows = torch.cat([torch.full((len(g),), r, dtype=torch.long) for r, (_, g) in enumerate(batch)]).to(device)
        cols = torch.from_numpy(np.concatenate([g for _, g in batch])).long().to(device)
        target = x[rows, cols].clone()
        x[rows, cols] = MASK
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            h = model.encode(x)
        logits = F.linear(h[rows, cols].float(), model.word_embeddings.weight.float())
        ok = (logits.argmax(-1) == target).cpu().numpy()
        ce = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
        owner = np.repeat([w for w, _ in batch], [len(g) for _, g in batch])
        for w in np.unique(owner):
            correct[w].append(ok[owner == w])
            losses[w].append(ce[owner == w])
    return [np.concatenate(c) for c in correct], [np.concatenate(v) for v in losses]


def cluster_ci(correct_per_window: list[np.ndarray]) -> tuple[float, float]:
    """95% CI of the pooled accuracy: windows as clusters (ratio estimator), floored at the binomial
    standard error; Wilson's interval for a single window."""
    counts = np.array([len(c) for c in correct_per_window], float)
    hits = np.array([c.sum() for c in correct_per_window], float)
    n, acc = counts.sum(), hits.sum() / counts.sum()
    w = len(counts)
    if w < 2:
        z = 1.96
        centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)
    se = math.sqrt(w / (w - 1) * float(((hits - acc * counts) ** 2).sum())) / n
    # never narrower than independent predictions would give: with few windows the cluster estimate
    # can come out near zero by chance
    se = max(se, math.sqrt(acc * (1 - acc) / n))
    return max(0.0, acc - 1.96 * se), min(1.0, acc + 1.96 * se)


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------


def record_key(rec: dict) -> str:
    parts = [rec["model"], rec["method_resolved"], str(rec["length"]), rec["setting"], rec["protocol"],
             json.dumps(rec["protocol_params"], sort_keys=True), str(rec["seed"]), str(rec["windows"]),
             str(rec["predictions"])]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def read_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{p}:{i} is not a JSON record; fix or remove that line") from None
    return out


def write_records(path: str | Path, records: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


def check_length_fits(model, n: int, tokens_per_batch: int) -> None:
    """Refuse lengths whose activations would not fit in memory (with a factor 8 of head-room)."""
    cfg = model.config
    copies = max(1, tokens_per_batch // n)
    need = 8 * copies * n * (2 * cfg.intermediate_size + cfg.attention_key_size + cfg.hidden_size) * 4
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > avail:
        raise DataError(f"length {n} needs about {need / 2**30:.1f} GiB for activations but {avail / 2**30:.1f} GiB "
                        "is free; use shorter lengths or a smaller --tokens-per-batch")


def evaluate(cfg: EvalConfig, log=print) -> list[dict]:
    """Run the sweep; returns the new records (all records are in ``cfg.out``)."""
    from tqdm import tqdm

    for s in cfg.settings:
        if s not in ("contiguous", "repeated"):
            raise DataError(f"unknown setting {s!r}; use contiguous or repeated")
    if cfg.protocol not in ("exact", "sampled", "strided"):
        raise DataError(f"unknown protocol {cfg.protocol!r}; use exact, sampled or strided")
    for n in cfg.lengths:
        if n < 2:
            raise DataError(f"length {n} is too short; lengths must be at least 2")
    for m in cfg.methods:
        parse_method(m)  # syntax errors are errors, inapplicable methods are skipped below
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(cfg.bf16, device)
    records = read_records(cfg.out)
    done = {r["key"] for r in records}
    new: list[dict] = []
    commit = git_commit()
    for mpath in cfg.models:
        model, tok, tcfg = load_model(mpath, device)
        L = model.config.train_len
        docs = heldout_docs(Path(mpath), tok, tcfg)
        for n in cfg.lengths:
            check_length_fits(model, n, cfg.tokens_per_batch)
        todo = []
        for m in cfg.methods:
            try:
                merged = merge_with_training(model.config.attention, m)
                resolved = str(parse_method(merged, L).resolved(L))
            except MethodError as e:
                log(f"skip {m} on {mpath}: {e}")
                continue
            for setting in cfg.settings:
                for n in cfg.lengths:
                    todo.append((m, resolved, setting, n))
        params = {"samples": cfg.samples} if cfg.protocol == "sampled" else (
            {"stride": cfg.stride} if cfg.protocol == "strided" else {})
        bar = tqdm(todo, disable=not cfg.progress, dynamic_ncols=True, mininterval=2.0, desc=Path(mpath).name)
        for m, resolved, setting, n in bar:
            rec = {"model": str(Path(mpath).resolve()), "model_name": Path(mpath).name,
                   "train": {k: tcfg.get(k) for k in ("corpus", "preset", "attention", "train_len", "steps", "seed")},
                   "method": m, "method_resolved": resolved, "length": n, "setting": setting,
                   "protocol": cfg.protocol, "protocol_params": params, "windows": cfg.windows,
                   "predictions": cfg.predictions, "seed": cfg.seed}
            rec["key"] = record_key(rec)
            if rec["key"] in done:
                continue
            bar.set_postfix_str(f"{m} {setting} n={n}")
            t0 = time.perf_counter()
            model.set_attention(m)
            model.attn_options = {"chunk_size": cfg.chunk_size, "bf16": bf16}
            per_window = {"exact": n, "sampled": min(cfg.samples, n), "strided": math.ceil(n / cfg.stride)}
            count = max(cfg.windows, math.ceil(cfg.predictions / per_window[cfg.protocol]))
            wins = make_windows(docs, n, setting, count, L, cfg.stride if cfg.protocol == "strided" else None,
                                cfg.seed)
            rng = np.random.default_rng([cfg.seed, n, 7])
            groups = [mask_groups(n, cfg.protocol, cfg, rng) for _ in wins]
            hits, losses = score_windows(model, wins, groups, cfg.tokens_per_batch, device, bf16)
            allc, alll = np.concatenate(hits), np.concatenate(losses)
            lo_ci, hi_ci = cluster_ci(hits)
            rec.update({"windows_used": len(wins), "n_predictions": int(allc.size), "accuracy": float(allc.mean()),
                        "loss": float(alll.mean()),
                        "ci_low": lo_ci, "ci_high": hi_ci, "tiled": setting == "repeated",
                        "precision": "bf16" if bf16 else "fp32", "version": __version__, "git_commit": commit,
                        "wall_time": time.perf_counter() - t0, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            records.append(rec)
            new.append(rec)
            done.add(rec["key"])
            write_records(cfg.out, records)
        model.set_attention(None)
    return new


def add_arguments(parser) -> None:
    from .cli import add_dataclass_flags

    add_dataclass_flags(parser, EvalConfig)


def run(args) -> int:
    from .cli import dataclass_from_args

    cfg = dataclass_from_args(EvalConfig, args)
    new = evaluate(cfg, log=lambda s: print(s, file=sys.stderr))
    print(f"{len(new)} new records in {cfg.out}")
    return 0
