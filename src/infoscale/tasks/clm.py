"""The causal-language-model objective: next-token training batches and the three long-context tests.

Training: windows of L tokens; the loss is the mean next-token cross-entropy
``−(1/(B(L−1))) Σ_b Σ_{t=1}^{L−1} log p(x_t | x_<t)`` (transformers shifts the labels). A share of the rows may be
replaced by short passkey samples (below), so the model knows the retrieval task at L before it is asked at 64L,
and another share by copy samples (:func:`copy_sample`: a training span of m ≤ L/2 tokens tiled to L), so it learns
to copy (induction) at L before it is asked to copy a span whose source lies beyond L.

Evaluation (Press et al. 2022 "Train short, test long", arXiv 2108.12409, for perplexity by position; the
tiled-document copy test of Su, kexue.fm/archives/9708; passkey retrieval of Mohtashami & Jaggi 2023,
"Landmark Attention", arXiv 2305.16300):

- :func:`token_nll`: per window, −log p(x_t | x_<t) and top-1 hit for every target position t = 1 … n−1, in one
  teacher-forced pass; :func:`bucket_edges` groups target positions into [0, L), [L, 2L), [2L, 4L), … .
- :func:`copy_windows`: a held-out span of m tokens, L < m ≤ 2L, tiled to n; positions t ≥ m (the 2nd and later
  copies) have their exact source m tokens back, beyond the training length.
- :func:`passkey_prompt`: the landmark-attention prompt shortened to fit L: filler, ``The pass key is
  d1d2d3d4d5. Remember it. d1…d5 is the pass key.`` at a chosen depth, more filler, then
  ``What is the pass key? The pass key is`` and the digits (one token per digit) are generated greedily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..stats import ratio_se
from . import Task
from .metrics import CLM as CLM_METRICS

__all__ = ["CausalLM", "Batch", "Passkey", "train_batch", "copy_sample", "copy_span_range", "TEXT", "PASSKEY", "COPY",
           "heldout_loss", "token_nll", "bucket_edges", "copy_windows", "passkey_prompt", "passkey_generate",
           "cluster_mean_ci"]

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_PRE, KEY_MID, KEY_POST = " The pass key is ", ". Remember it. ", " is the pass key."
QUESTION = " What is the pass key? The pass key is "
DIGITS = 5
COPY_MIN_SPAN = 8  # shortest training copy span (shorter when L/2 is shorter)
TEXT, PASSKEY, COPY = 0, 1, 2  # kinds of training rows


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    kind: torch.Tensor | None = None  # per row: TEXT, PASSKEY or COPY
    span: torch.Tensor | None = None  # per row: the copy span m (0 for other rows)


class Passkey:
    """The token pieces of the passkey prompt, encoded once with the run's tokenizer (digits one token each)."""

    def __init__(self, tok):
        self.filler = np.asarray(tok.encode(FILLER), dtype=np.int64)
        self.pre, self.mid, self.post = (np.asarray(tok.encode(s), dtype=np.int64) for s in (KEY_PRE, KEY_MID,
                                                                                             KEY_POST))
        self.question = np.asarray(tok.encode(QUESTION), dtype=np.int64)
        self.digits = []
        for d in "0123456789":
            ids = tok.encode(d)
            if len(ids) != 1:
                raise DataError(f"the tokenizer encodes the digit {d!r} as {len(ids)} tokens (or not at all: it was "
                                "trained without digits); the passkey test needs one token per digit")
            self.digits.append(ids[0])
        self.digits = np.asarray(self.digits, dtype=np.int64)
        self.fixed = len(self.pre) + len(self.mid) + len(self.post) + len(self.question) + 2 * DIGITS

    def min_length(self) -> int:
        """The shortest prompt (no filler)."""
        return self.fixed

    def prompt(self, n: int, key: np.ndarray, depth: float) -> np.ndarray:
        """A prompt of exactly n tokens: filler, the key sentence at ``depth`` ∈ [0, 1] of the filler, filler,
        the question (the answer digits follow)."""
        fill = n - self.fixed
        if fill < 0:
            raise DataError(f"a passkey prompt needs at least {self.fixed} tokens, got n={n}")
        before = int(round(depth * fill))
        tiled = np.resize(self.filler, fill)  # the filler stream, cut at n
        kd = self.digits[key]
        return np.concatenate([tiled[:before], self.pre, kd, self.mid, kd, self.post, tiled[before:], self.question])


def passkey_prompt(pk: Passkey, n: int, rng: np.random.Generator, depth: float) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids of length n, answer ids) with a random 5-digit key."""
    key = rng.integers(0, 10, DIGITS)
    return pk.prompt(n, key, depth), pk.digits[key]


def copy_span_range(train_len: int) -> tuple[int, int]:
    """(lo, hi), inclusive, of a training copy span m: hi = ⌊L/2⌋ (at least two copies fit in L),
    lo = min(8, hi)."""
    hi = max(train_len // 2, 1)
    return min(COPY_MIN_SPAN, hi), hi


def copy_sample(docs, gen: torch.Generator, train_len: int) -> tuple[np.ndarray, int]:
    """(L tokens, m): a span of m tokens, m uniform on :func:`copy_span_range`, drawn like a training window
    (uniform over every start inside a document of ``docs``), tiled to L tokens, so token t equals token
    t − m for t ≥ m."""
    lo, hi = copy_span_range(train_len)
    m = int(torch.randint(lo, hi + 1, (1,), generator=gen))
    span = docs.windows(gen, 1, m)[0].numpy()
    return np.resize(span, train_len).astype(np.int64), m


def train_batch(docs, gens, *, batch_size: int, train_len: int, positions=None, passkey: Passkey | None = None,
                passkey_share: float = 0.0, copy_share: float = 0.0) -> Batch:
    """One global batch: windows (``gens[0]``), PoSE positions (``gens[2]``), and per row one uniform u
    (``gens[4]``): u < ``passkey_share`` makes the row a passkey sample of exactly L tokens (prompt of L − 5
    tokens + the answer digits, depth uniform; ``gens[4]``), passkey_share ≤ u < passkey_share + ``copy_share``
    a copy sample (:func:`copy_sample` from ``docs``, the training split; ``gens[5]``). The two shares are
    disjoint and exact in expectation. Every generator depends on (seed, step) only; with ``copy_share`` = 0
    the batch is the one drawn before copy samples existed (``gens[5]`` is not read)."""
    ids = docs.windows(gens[0], batch_size, train_len)
    kind = torch.full((batch_size,), TEXT, dtype=torch.int8)
    span = torch.zeros(batch_size, dtype=torch.int64)
    p = passkey_share if passkey is not None else 0.0
    if p > 0 or copy_share > 0:
        g = gens[4]
        u = torch.rand(batch_size, generator=g)
        for r in torch.nonzero(u < p).flatten().tolist():
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            rng = np.random.default_rng(seed)
            prompt, answer = passkey_prompt(passkey, train_len - DIGITS, rng, float(rng.random()))
            ids[r] = torch.from_numpy(np.concatenate([prompt, answer]))
            kind[r] = PASSKEY
        if copy_share > 0:
            for r in torch.nonzero((u >= p) & (u < p + copy_share)).flatten().tolist():
                row, m = copy_sample(docs, gens[5], train_len)
                ids[r] = torch.from_numpy(row)
                kind[r], span[r] = COPY, m
    pos = positions(gens[2], batch_size, train_len) if positions is not None else None
    return Batch(ids, ids.clone(), pos, kind, span)


@torch.no_grad()
def heldout_loss(model, docs, *, seed: int, windows: int, train_len: int, device, bf16: bool) -> dict:
    """Next-token accuracy and loss on fixed held-out windows at the training length."""
    gen = torch.Generator().manual_seed(seed + 7)
    ids = docs.windows(gen, windows, train_len)
    was = model.training
    model.eval()
    nll, hits = token_nll(model, list(ids.numpy()), device=device, bf16=bf16)
    model.train(was)
    allv, allh = np.concatenate(nll), np.concatenate(hits)
    return {"val_acc": float(allh.mean()), "val_loss": float(allv.mean()), "val_n": int(allv.size)}


# Positions whose logits exist at once when the output head is applied by chunks (:func:`token_nll`): the logits of
# a long window over a large vocabulary are the largest tensor of a forward (32k positions × SmolLM2's 49k tokens in
# float32: 6 GiB, Gemma's 262k: 32 GiB), and only their log-softmax at the target is kept.
LOGIT_ROWS = 2048


_SPLIT_ATTR = "_infoscale_split_head"  # on the model: the verdict of split_head's probe


def split_head(model):
    """(backbone, output head) of a transformers causal LM whose logits are ``head(backbone(ids)[0])``, cut to the
    last positions by ``logits_to_keep``, or None. Found from the model's parts and checked once by a two-token
    forward (a model that changes its logits after the head, e.g. Gemma 2's final soft-capping, gets None);
    :func:`token_nll` checks again on every batch."""
    import inspect

    if _SPLIT_ATTR in vars(model):
        return vars(model)[_SPLIT_ATTR]
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    base = getattr(model, "base_model", None)
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    split = None
    if getattr(head, "weight", None) is not None and base is not None and base is not model and takes:
        # two ordinary tokens (not id 0, often the pad, whose embedding may be zero: zero logits hide any change)
        probe = (torch.arange(1, 3, device=head.weight.device) % head.weight.shape[0])[None]
        with torch.inference_mode():
            if _nll_by_chunks(model, (base, head), probe) is not None:
                split = base, head
    model.__dict__[_SPLIT_ATTR] = split
    return split


def _nll_by_chunks(model, split, x: torch.Tensor):
    """(−log p, hit) at targets 1 … n − 1 of the batch x (B, n) with the head applied ``LOGIT_ROWS`` positions at a
    time, or None where the head's logits at the last position differ from the model's own (the model changes its
    logits after the head)."""
    base, head = split
    got = {}
    hook = base.register_forward_hook(lambda module, args, out: got.__setitem__("h", out[0]))
    try:
        last = model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1]
    finally:
        hook.remove()
    h = got.get("h")
    if h is None or h.shape[:2] != x.shape:
        return None
    if not torch.allclose(head(h[:, -1:])[:, 0].float(), last.float(), rtol=1e-5, atol=1e-5):  # the same row
        return None
    n = x.shape[1]
    if n < 2:
        return None  # no target: the whole-logits path gives the empty result
    ce, ok = [], []
    for a in range(0, n - 1, LOGIT_ROWS):
        b = min(n - 1, a + LOGIT_ROWS)
        logits = head(h[:, a:b]).float()
        target = x[:, a + 1:b + 1]
        ce.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
        ok.append(logits.argmax(-1) == target)
    return torch.cat(ce, 1), torch.cat(ok, 1)


@torch.inference_mode()
def token_nll(model, windows: list[np.ndarray], *, device, bf16: bool, tokens_per_batch: int = 16384
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window of n tokens, arrays of length n − 1: −log p(x_t | x_<t) and [argmax = x_t] for t = 1 … n − 1
    (entry t − 1 is target position t). Windows of one length are batched ``tokens_per_batch`` tokens at a time.
    Where the model's head can be split off (:func:`split_head`), the logits are made ``LOGIT_ROWS`` positions at
    a time (the same numbers, in far less memory at long n); otherwise in one piece."""
    n = len(windows[0])
    per = max(1, tokens_per_batch // n)
    split = split_head(model)
    nll, hits = [], []
    for i in range(0, len(windows), per):
        x = torch.from_numpy(np.stack(windows[i:i + per])).long().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            res = _nll_by_chunks(model, split, x) if split is not None else None
            if res is None:
                logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
                target = x[:, 1:]
                res = F.cross_entropy(logits.transpose(1, 2), target, reduction="none"), logits.argmax(-1) == target
        ce, ok = res
        nll += list(ce.cpu().numpy())
        hits += list(ok.cpu().numpy())
    return nll, hits


def bucket_edges(n: int, train_len: int) -> list[tuple[int, int]]:
    """Target-position buckets [0, L), [L, 2L), [2L, 4L), … cut at n."""
    edges, lo, hi = [], 0, train_len
    while lo < n:
        edges.append((lo, min(hi, n)))
        lo, hi = hi, 2 * hi
    return edges


def copy_windows(docs, n: int, count: int, train_len: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """``count`` windows of n tokens, each a held-out span of m tokens tiled to n, with L < m ≤ min(2L, n − L/2)
    (so at least L/2 copied tokens exist). Returns (windows, spans m)."""
    hi = min(2 * train_len, n - train_len // 2)
    if hi <= train_len:
        raise DataError(f"the copy test needs n > 3L/2 (a span longer than L and part of a second copy); n={n}, "
                        f"L={train_len}")
    rng = np.random.default_rng([seed, n, 2])
    out, spans = [], []
    for _ in range(count):
        m = int(rng.integers(train_len + 1, hi + 1))
        cands = [a for a in docs.arrays if len(a) >= m]
        if not cands:
            raise DataError(f"no held-out document has {m} tokens for a copy span; use longer documents")
        a = cands[rng.integers(len(cands))]
        s = int(rng.integers(0, len(a) - m + 1))
        out.append(np.resize(a[s:s + m], n).astype(np.int64))
        spans.append(m)
    return out, spans


@torch.inference_mode()
def passkey_generate(model, prompts: list[np.ndarray], *, device, bf16: bool, new_tokens: int = DIGITS,
                     tokens_per_batch: int = 16384) -> np.ndarray:
    """Greedy continuations (``model.generate`` with its KV cache) of equal-length prompts: (count, new_tokens)."""
    n = len(prompts[0])
    per = max(1, tokens_per_batch // n)
    out = []
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for i in range(0, len(prompts), per):
        x = torch.from_numpy(np.stack(prompts[i:i + per])).long().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                               pad_token_id=pad, eos_token_id=None)
        out.append(y[:, n:].cpu().numpy())
    return np.concatenate(out)


def cluster_mean_ci(values_per_window: list[np.ndarray]) -> tuple[float, float, float]:
    """(mean, 95% low, 95% high) of the pooled mean of a per-token quantity, windows as clusters.

    Ratio estimator (Cochran 1977, §6.4): ȳ = Σ_w S_w / Σ_w N_w with S_w the window's sum and N_w its count;
    se² = w/(w−1) · Σ_w (S_w − ȳ N_w)² / (Σ_w N_w)². With one window (no clusters to compare) the tokens are
    treated as independent: se = sd/√N. The same estimator as :func:`infoscale.stats.cluster_ci` without its
    binomial floor, which applies to 0/1 outcomes only."""
    counts = np.array([len(v) for v in values_per_window], float)
    sums = np.array([float(np.sum(v)) for v in values_per_window])
    mean = sums.sum() / counts.sum()
    if len(counts) < 2:
        allv = np.concatenate(values_per_window)
        se = float(np.std(allv, ddof=1) / math.sqrt(allv.size)) if allv.size > 1 else 0.0
    else:
        se = ratio_se(sums, counts)
    return float(mean), float(mean - 1.96 * se), float(mean + 1.96 * se)


class CausalLM(Task):
    """The causal-LM task of ``infoscale train``: next-token loss over every position after the first, with shares
    of passkey (``--passkey-share``) and copy (``--copy-share``) samples; next-token accuracy, and on the copy rows
    the accuracy of their later and first copies."""

    causal = True
    metrics = CLM_METRICS
    streams = 6  # windows, (unused), positions, (dropout), row kinds and passkeys, copy samples
    noun = "next-token"
    options = {"passkey_share": 0.05, "copy_share": 0.0}

    def __init__(self, cfg, tok):
        super().__init__(cfg, tok)
        self.passkey = Passkey(tok) if cfg.passkey_share > 0 else None

    def check_run(self) -> None:
        if self.passkey is not None and self.passkey.min_length() + DIGITS > self.cfg.train_len:
            raise ConfigError(f"a passkey sample needs at least {self.passkey.min_length() + DIGITS} tokens with this "
                              f"tokenizer but --train-len is {self.cfg.train_len}; use a longer --train-len or "
                              "--passkey-share 0")

    def batch(self, docs, gens, positions) -> Batch:
        return train_batch(docs, gens, batch_size=self.cfg.batch_size, train_len=self.cfg.train_len,
                           positions=positions, passkey=self.passkey, passkey_share=self.cfg.passkey_share,
                           copy_share=self.cfg.copy_share)

    def forward(self, net, x, y, positions):
        # an all-ones mask: without one, transformers may read PoSE's position jumps as packed sequences
        # (masking_utils.find_packed_sequence_indices) and cut attention at the skip
        return net(input_ids=x, attention_mask=torch.ones_like(x), position_ids=positions, labels=y, use_cache=False)

    def targets(self, labels) -> int:
        return int((labels[:, 1:] != -100).sum())  # transformers shifts the labels: target t is predicted at t − 1

    def step_metrics(self, logits, y, batch, shard) -> dict:
        rec = {"acc": float((logits[:, :-1].argmax(-1) == y[:, 1:]).float().mean())}
        if self.cfg.copy_share > 0:
            rec |= copy_accuracy(logits, y, batch.kind[shard], batch.span[shard])
        return rec

    def heldout(self, model, docs, *, device, bf16: bool) -> dict:
        return heldout_loss(model, docs, seed=self.cfg.seed, windows=self.cfg.val_windows,
                            train_len=self.cfg.train_len, device=device, bf16=bf16)


def copy_accuracy(logits: torch.Tensor, labels: torch.Tensor, kind: torch.Tensor, span: torch.Tensor) -> dict:
    """A step's top-1 accuracy on the copy rows' later copies (targets t ≥ m, whose source is m tokens back) and on
    their first copy (targets 1 ≤ t < m), as ``copy_acc`` / ``copy_first_acc`` (this process's rows); {} when the
    step drew no copy row. The gap is the copying the model has learnt."""
    rows = kind.to(logits.device) == COPY
    if not rows.any():
        return {}
    hit = logits[rows, :-1].argmax(-1) == labels[rows, 1:]  # entry t − 1 is target t
    t = torch.arange(1, labels.shape[1], device=logits.device)
    later = t[None, :] >= span.to(logits.device)[rows][:, None]
    return {"copy_acc": float(hit[later].float().mean()), "copy_first_acc": float(hit[~later].float().mean())}
