"""The masked-language-model objective: BERT masking for training, masked-token accuracy for evaluation.

Evaluation masks positions of a window with [MASK] and predicts them; the protocols differ only in
which positions are masked together in one forward pass:

- ``exact``: every position masked alone (n passes per window; the paper's protocol);
- ``sampled``: K seeded random positions, each masked alone (unbiased for the same metric);
- ``strided``: every r-th position from a random offset, all in one pass (cheap; a different
  estimator whose agreement with ``exact`` the reproduction measures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokenizers import MASK, SPECIALS
from ..errors import ConfigError
from . import Task
from .metrics import MLM as MLM_METRICS

__all__ = ["MaskedLM", "Batch", "mask_tokens", "train_batch", "heldout_accuracy", "mask_groups", "score_windows"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, vocab_size: int, prob: float = 0.15):
    """BERT masking: each non-special token is chosen with ``prob``; of those 80% → [MASK], 10% → a
    random non-special token, 10% unchanged. Returns (inputs, labels) with labels −100 elsewhere."""
    ids = ids.clone()
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & (ids >= len(SPECIALS))
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=gen)
    ids = torch.where(chosen & (r < 0.8), torch.full_like(ids, MASK), ids)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
    return ids, labels


def train_batch(docs, gens, *, batch_size: int, train_len: int, vocab_size: int, mask_prob: float,
                positions=None) -> Batch:
    """One global training batch: windows, BERT masking and (PoSE) positions, each from its own
    generator in ``gens`` (windows, masking, positions) so a step's batch depends on the step alone.
    ``positions(gen, batch, length)`` gives training positions, or None for 0..L−1."""
    ids = docs.windows(gens[0], batch_size, train_len)
    inputs, labels = mask_tokens(ids, gens[1], vocab_size, mask_prob)
    pos = positions(gens[2], batch_size, train_len) if positions is not None else None
    return Batch(inputs, labels, pos)


@torch.no_grad()
def heldout_accuracy(model, docs, *, seed: int, windows: int, train_len: int, vocab_size: int, mask_prob: float,
                     device, bf16: bool) -> dict:
    """Masked accuracy and loss on fixed held-out windows at the training length (BERT masking)."""
    gen = torch.Generator().manual_seed(seed + 7)
    ids = docs.windows(gen, windows, train_len)
    inputs, labels = mask_tokens(ids, gen, vocab_size, mask_prob)
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, len(inputs), 128):
        x, y = inputs[i:i + 128].to(device), labels[i:i + 128].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).logits
        sel = y != -100
        logits, target = logits[sel].float(), y[sel]
        correct += int((logits.argmax(-1) == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        total += target.numel()
    model.train(was)
    return {"val_acc": correct / max(total, 1), "val_loss": loss_sum / max(total, 1), "val_n": total}


def mask_groups(n: int, protocol: str, rng: np.random.Generator, *, samples: int = 32, stride: int = 8
                ) -> list[np.ndarray]:
    """Sets of positions masked together in one forward pass."""
    if protocol == "exact":
        return [np.array([i]) for i in range(n)]
    if protocol == "sampled":
        k = min(samples, n)
        return [np.array([i]) for i in rng.choice(n, size=k, replace=False)]
    if protocol == "strided":
        return [np.arange(int(rng.integers(0, min(stride, n))), n, stride)]
    raise ConfigError(f"unknown protocol {protocol!r}; use exact, sampled or strided")


@torch.inference_mode()
def score_windows(forward, windows: list[np.ndarray], groups: list[list[np.ndarray]], tokens_per_batch: int, device,
                  bf16: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window, (correct, loss) of each prediction; every group of masked positions gets its own
    copy of its window, and copies of all windows are batched ``tokens_per_batch`` tokens at a time.
    ``forward``: ids (B, n) -> logits (B, n, V), the model running the method scored."""
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
            logits = forward(x)[rows, cols].float()
        ok = (logits.argmax(-1) == target).cpu().numpy()
        ce = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
        owner = np.repeat([w for w, _ in batch], [len(g) for _, g in batch])
        for w in np.unique(owner):
            correct[w].append(ok[owner == w])
            losses[w].append(ce[owner == w])
    return [np.concatenate(c) for c in correct], [np.concatenate(v) for v in losses]


class MaskedLM(Task):
    """The masked-LM task of ``infoscale train``: BERT masking (``--mask-prob``), the loss over the chosen
    positions, masked accuracy."""

    causal = False
    metrics = MLM_METRICS
    streams = 3  # windows, masking, positions
    noun = "masked"
    heldout_note = ("; with training's 80/10/10 masking, so not comparable to `infoscale eval`, which masks with "
                    "[MASK] only")

    def batch(self, docs, gens, positions) -> Batch:
        return train_batch(docs, gens, batch_size=self.cfg.batch_size, train_len=self.cfg.train_len,
                           vocab_size=len(self.tok), mask_prob=self.cfg.mask_prob, positions=positions)

    def forward(self, net, x, y, positions):
        return net(x, position_ids=positions, labels=y)

    def targets(self, labels) -> int:
        return int((labels != -100).sum())

    def step_metrics(self, logits, y, batch, shard) -> dict:
        sel = y != -100
        return {"acc": float((logits[sel].argmax(-1) == y[sel]).float().mean())}

    def heldout(self, model, docs, *, device, bf16: bool) -> dict:
        return heldout_accuracy(model, docs, seed=self.cfg.seed, windows=self.cfg.val_windows,
                                train_len=self.cfg.train_len, vocab_size=len(self.tok), mask_prob=self.cfg.mask_prob,
                                device=device, bf16=bf16)
