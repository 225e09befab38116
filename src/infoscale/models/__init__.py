"""Model families. Each family's module registers its config and model with transformers' Auto classes
when imported; :func:`family` imports it by ``model_type`` (only then is transformers loaded)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import DataError


@dataclass(frozen=True)
class Family:
    model_type: str
    module: str  # infoscale.models.<module>
    model_class: str
    task: str  # infoscale.tasks.<task>

    def load_class(self):
        return getattr(importlib.import_module(f"infoscale.models.{self.module}"), self.model_class)


FAMILIES = {f.model_type: f for f in [
    Family("gau_alpha", "gau", "GAUForMaskedLM", "mlm"),
    Family("llama", "llama", "LlamaForCausalLM", "clm"),
]}


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise DataError(f"model_type {model_type!r} is not an infoscale model family (known: {known})")
    return FAMILIES[model_type]
