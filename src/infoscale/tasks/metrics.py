"""The metrics each task's evaluation writes, with what a reader of its records needs: which way is better, how
to show it and what it measures (as lm-evaluation-harness's metric registry pairs each metric with its
aggregation and direction). Pure data: the report reads it without loading torch.

A task lists its metrics here and its :class:`infoscale.tasks.Task` points at the list; the report ranks and
formats every record by its metric's entry, so a task's new metric is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Metric", "MLM", "CLM", "METRICS", "metric_spec"]


@dataclass(frozen=True)
class Metric:
    name: str
    higher: bool  # higher is better
    percent: bool  # shown ×100
    what: str


MLM = (
    Metric("accuracy", True, True, "masked-token top-1 accuracy (each record: the mean over its predictions)"),
    Metric("loss", False, False, "masked-token cross-entropy, nats"),
)
CLM = (
    # also per target-position bucket, as nll[lo,hi) (a record with a "bucket" field)
    Metric("nll", False, False, "next-token negative log-likelihood, nats per token"),
    Metric("ppl", False, False, "perplexity, exp(nll)"),
    Metric("copy_nll", False, False, "NLL on the later copies of a tiled span (their source is beyond L)"),
    Metric("copy_accuracy", True, True, "top-1 accuracy on the later copies of a tiled span"),
    Metric("passkey_accuracy", True, True, "passkey digits right, greedily generated"),
    Metric("passkey_exact", True, True, "passkeys with all digits right"),
)
METRICS = {m.name: m for m in (*MLM, *CLM)}


def metric_spec(name: str) -> Metric | None:
    """The entry of a record's metric; a bucket ``nll[lo,hi)`` is ``nll``'s. None for an unknown name."""
    return METRICS.get(name.split("[", 1)[0])
