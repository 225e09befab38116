"""Objectives. A task is one class with one interface (:class:`Task`): it draws a training step's batch, runs the
forward with its arguments, counts the step's predictions, reports the step's metrics and the held-out ones at the
training length, and owns the training options only it reads. ``infoscale train`` knows a task only through this
interface; a model family names its task (``infoscale.models.Family.task``) and :func:`task` finds it here.

Adding a task: a module here with a :class:`Task` subclass and one line in ``TASKS``.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

__all__ = ["Task", "TASKS", "task"]


class Task:
    """One training objective for one run (built with the run's config and tokenizer).

    Class attributes: ``causal``, whether the model predicts the next token (a decoder); ``streams``, the number of
    per-step random generators a batch reads (generator ``i`` of step ``s`` is ``runtime.step_generator(seed, s,
    i)``, so a batch depends on (seed, step) alone); ``noun``, what the held-out accuracy counts (``"masked"``,
    ``"next-token"``); ``metrics``, the entries of :mod:`infoscale.tasks.metrics` its evaluation writes;
    ``options``, the training options only this task reads, with the value each takes when given
    as -1 ("auto"; every other task requires 0); ``heldout_note``, what to know when reading its held-out accuracy.
    """

    causal: ClassVar[bool]  # next-token prediction (decoder) or not (encoder)
    streams: ClassVar[int]
    noun: ClassVar[str]
    options: ClassVar[dict[str, float]] = {}  # option → its default when given as -1 ("auto")
    heldout_note: ClassVar[str] = ""
    metrics: ClassVar[tuple] = ()  # what its evaluation writes (infoscale.tasks.metrics): direction, display

    def __init__(self, cfg, tok):
        self.cfg, self.tok = cfg, tok

    def check_run(self) -> None:
        """Refuse settings that cannot work with this run's tokenizer (raised before anything is written)."""

    def batch(self, docs, gens, positions):
        """The global batch of one step (``input_ids``, ``labels``, ``positions`` and task-specific fields)."""
        raise NotImplementedError

    def forward(self, net, x, y, positions):
        """The training forward on this process's rows; returns the model's output (``.loss``, ``.logits``)."""
        raise NotImplementedError

    def targets(self, labels) -> int:
        """How many predictions ``labels`` asks for (the loss's denominator)."""
        raise NotImplementedError

    def step_metrics(self, logits, y, batch, shard) -> dict:
        """The logged metrics of a step beyond the loss: at least ``acc``."""
        raise NotImplementedError

    def heldout(self, model, docs, *, device, bf16: bool) -> dict:
        """``val_acc``, ``val_loss``, ``val_n`` on fixed held-out windows at the training length."""
        raise NotImplementedError


TASKS = {  # name → "module:class" under infoscale.tasks
    "mlm": "mlm:MaskedLM",
    "clm": "clm:CausalLM",
}


def task(name: str) -> type[Task]:
    """The task class registered as ``name``."""
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(f"infoscale.tasks.{module}"), cls)
