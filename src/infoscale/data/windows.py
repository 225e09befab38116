"""Token streams and windows: uniform training windows inside documents, evaluation windows of length n."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .corpora import Document
from .tokenizers import CharTokenizer


class TokenDocs:
    """Documents as int32 token arrays with uniform sampling of windows that stay inside a document."""

    def __init__(self, docs: list[Document], tok: CharTokenizer):
        self.names = [d.name for d in docs]
        self.arrays = [np.asarray(tok.encode(d.text), dtype=np.int32) for d in docs]

    def windows(self, gen: torch.Generator, count: int, length: int) -> torch.Tensor:
        """``count`` windows of ``length`` tokens, each start uniform over all valid starts."""
        starts = np.array([max(len(a) - length + 1, 0) for a in self.arrays], dtype=np.int64)
        if starts.sum() == 0:
            raise DataError(f"no document is {length} tokens long; use a shorter --train-len or longer documents")
        cum = np.cumsum(starts)
        picks = torch.randint(0, int(cum[-1]), (count,), generator=gen).numpy()
        out = np.empty((count, length), dtype=np.int64)
        for r, g in enumerate(picks):
            d = int(np.searchsorted(cum, g, side="right"))
            off = int(g - (cum[d - 1] if d else 0))
            out[r] = self.arrays[d][off:off + length]
        return torch.from_numpy(out)


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
