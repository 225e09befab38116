"""Model families. Each family's module registers its config and model with transformers' Auto classes
when imported; :func:`family` imports it by ``model_type`` (only then is transformers loaded)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError, DataError


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


def train_len_of(config) -> int:
    """The training length L: ``rope_parameters["original_max_position_embeddings"]`` when present (the length
    before a RoPE extension such as YaRN or Llama 3's), else ``max_position_embeddings``."""
    rp = getattr(config, "rope_parameters", None) or {}
    params = [rp] if "rope_type" in rp or "rope_theta" in rp else [v for v in rp.values() if isinstance(v, dict)]
    for p in params:
        if p.get("original_max_position_embeddings"):
            return int(p["original_max_position_embeddings"])
    L = getattr(config, "max_position_embeddings", None)
    if not isinstance(L, int) or L < 2:
        raise ConfigError("cannot tell the training length: the config has no max_position_embeddings; "
                          "pass train_len=")
    return L
