"""Which method is best, from the per-window fields of result records (``window_counts`` with
``window_means`` or ``window_hits``, written by ``infoscale eval`` for both tracks).

Two records of one cell measured on the same windows pair window by window: :func:`paired` gives their Δ with
a cluster-bootstrap 95% CI (:func:`infoscale.stats.paired_delta`), and :func:`best_by_ci` names the best method
at a length and whether its Δ against the runner-up excludes 0, the rule every report table uses before it
marks a best in bold. Pure readers of the records, used by :mod:`infoscale.report`'s tables and plots.
"""

from __future__ import annotations

from collections import defaultdict

from .stats import paired_delta

__all__ = ["RESAMPLES", "label", "window_sums", "grows_by_windows", "cell_groups", "shared_windows", "paired",
           "single_window_delta", "best_by_ci", "bold_rule", "is_temperature", "has_temperature"]


def label(rec: dict) -> str:
    """The method as it ran (inherited train-time parts included), short form."""
    return rec.get("method_label") or rec["method"]


def is_temperature(term: str) -> bool:
    """Whether one term of a method label (``infoscale``, ``logn(clamp=False)``) is a length temperature: a
    registered method that fills the temperature slot."""
    from .attn.methods import REGISTRY

    method = REGISTRY.get(term.split("(")[0].strip())
    return method is not None and "temperature" in method.slots


def has_temperature(label: str) -> bool:
    """Whether a method label has a length temperature among its ``+`` terms."""
    return any(is_temperature(t) for t in label.split("+"))


RESAMPLES = 2000  # cluster-bootstrap resamples of the paired Δ


def window_sums(rec: dict):
    """(per-window sums of the metric, per-window counts) of a record, or None for records written without
    per-window fields."""
    counts = rec.get("window_counts")
    if not counts:
        return None
    if rec.get("window_hits") is not None:
        return [float(h) for h in rec["window_hits"]], counts
    means = rec.get("window_means")
    if means is None or len(means) != len(counts):
        return None
    return [m * c for m, c in zip(means, counts, strict=True)], counts


def grows_by_windows(rec: dict) -> bool:
    """Whether a record's windows are the first of any larger cell's (causal teacher-forced cells: their windows
    are drawn one after another by the cell's seed, whatever the count; :func:`infoscale.sweep.sweep`)."""
    from .tasks import TASKS, task

    name = rec.get("task")
    return (isinstance(name, str) and name in TASKS and task(name).causal
            and rec.get("setting") in ("contiguous", "repeated"))


def cell_groups(recs: list[dict]) -> dict:
    """length -> {label: record} for records measured on the same windows (same model, setting, protocol,
    seed, windows and predictions; only records with per-window fields). Causal teacher-forced cells of different
    window counts share their first windows, so they group together (paired on those: :func:`paired`); a method
    with several such cells is represented by its largest."""
    out = defaultdict(dict)
    for r in recs:
        if window_sums(r) is None:
            continue
        windows = None if grows_by_windows(r) else r.get("windows")
        ident = (r["length"], r.get("seed"), str(r.get("protocol_params")), windows, r.get("predictions"))
        g, m = out[ident], label(r)
        if m not in g or len(window_sums(r)[1]) > len(window_sums(g[m])[1]):
            g[m] = r
    by_n = defaultdict(dict)
    for (n, *_), g in out.items():  # several seeds: the first group of each length
        if len(g) > len(by_n[n]):
            by_n[n] = g
    return by_n


def shared_windows(a: dict, b: dict):
    """(sums of a, sums of b, counts) over the windows both records measured: all of them, or for two causal
    teacher-forced cells of different window counts their shared first windows; None when they do not pair."""
    sa, sb = window_sums(a), window_sums(b)
    if sa is None or sb is None:
        return None
    if len(sa[1]) == len(sb[1]):
        w = len(sa[1])
    else:
        w = min(len(sa[1]), len(sb[1])) if grows_by_windows(a) and grows_by_windows(b) else 0
    if w == 0 or list(sa[1][:w]) != list(sb[1][:w]):
        return None
    return sa[0][:w], sb[0][:w], sa[1][:w]


def paired(a: dict, b: dict):
    """(Δ, low, high) of record a minus record b on the windows both measured (:func:`shared_windows`), or None if
    they share none or only one (a bootstrap over one cluster has nothing to resample: its CI would be
    zero-width)."""
    shared = shared_windows(a, b)
    if shared is None or len(shared[2]) < 2:
        return None
    return paired_delta(*shared, resamples=RESAMPLES, seed=int(a.get("seed") or 0))


def single_window_delta(a: dict, b: dict) -> float | None:
    """Record a minus record b where they share a single window (a Δ with no CI), else None."""
    shared = shared_windows(a, b)
    if shared is None or len(shared[2]) != 1 or not shared[2][0]:
        return None
    return (shared[0][0] - shared[1][0]) / shared[2][0]


def best_by_ci(recs: list[dict], n: int, higher: bool):
    """(best, runner-up, Δ, low, high, significant) at length n from the records' per-window fields; None when
    fewer than two methods there have them."""
    g = cell_groups([r for r in recs if r["length"] == n]).get(n, {})
    if len(g) < 2:
        return None
    order = sorted(g, key=lambda m: g[m]["value"], reverse=higher)
    first, second = order[0], order[1]
    d = paired(g[first], g[second])
    if d is None:
        return None
    sig = d[1] > 0 or d[2] < 0
    return first, second, *d, sig


def bold_rule(ranked: dict) -> str:
    """The caption's words for the bold rule, when any column was ranked by :func:`best_by_ci`."""
    if all(r is None for r in ranked.values()):
        return ""
    return " only where its paired 95% CI against the runner-up excludes 0 (see the Δ table)"


def provenance(train: dict, with_schedule: bool = True) -> str:
    """The sentence a report table opens with: how the model came to be. A pretrained model (records of
    ``infoscale eval --models <dir or .gguf>``) says so, with its L and where L came from; a run says its
    training method, L, corpus and steps."""
    if train.get("source") == "pretrained":
        params = train.get("parameters")
        size = f", {params / 1e6:.1f}M parameters" if isinstance(params, (int, float)) else ""
        return (f"Pretrained `{train.get('model_type')}` ({train.get('format')}{size}), not trained here; L = "
                f"{train.get('train_len')} ({train.get('train_len_from')}).")
    text = f"Trained with `{train.get('attention')}` at L = {train.get('train_len')}"
    if not with_schedule:
        return text + "."
    text += f" on {train.get('corpus')} ({train.get('steps')} steps"
    if train.get("init_from"):
        from pathlib import Path

        text += f", fine-tuned from `{Path(train['init_from']).name}`"
    return text + ")."


def origin(train: dict) -> str:
    """A plot title's short form of :func:`provenance`: ``trained: <method>`` or ``pretrained``."""
    return "pretrained" if train.get("source") == "pretrained" else f"trained: {train.get('attention')}"
