"""Model families. Each family's module registers its config and model with transformers' Auto classes
when imported; :func:`family` imports it by ``model_type`` (only then is transformers loaded)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError


@dataclass(frozen=True)
class Family:
    """A model family: its transformers ``model_type``, the module that registers its config and model, the model
    class, the task it trains (a name in :data:`infoscale.tasks.TASKS`) and, for a family ``infoscale train``
    builds, its ``--arch`` name, its tokenizers (the first is the default) and how a user loads a saved run.

    A trainable family's module defines ``PRESETS`` (size name → config fields), ``TRAIN_METHODS`` (the method
    names it trains with, or None for every trainable method) and ``build_for_training(cfg, tok, source)`` (a
    freshly initialised model for a ``TrainConfig``; ``source``, the ``--init-from`` model whose shape it takes).
    Adding a family: its module and one line in ``FAMILIES``.
    """

    model_type: str
    module: str  # infoscale.models.<module>
    model_class: str
    task: str  # infoscale.tasks.<task>
    arch: str = ""  # `infoscale train --arch` name ("": not trained by infoscale)
    tokenizers: tuple[str, ...] = ("char",)
    load_hint: str = ""  # a format string of {out}: how the saved run is loaded
    calibration_file: bool = False  # reads per-layer dims from a run's calibration.json (`infoscale calibrate`)
    per_call_methods: bool = False  # the model's forward takes method= (GAU-α); else infoscale.hf.apply

    def import_module(self):
        return importlib.import_module(f"infoscale.models.{self.module}")

    def load_class(self):
        return getattr(self.import_module(), self.model_class)


FAMILIES = {f.model_type: f for f in [
    Family("gau_alpha", "gau", "GAUForMaskedLM", "mlm", arch="gau", tokenizers=("char",),
           load_hint="AutoModelForMaskedLM.from_pretrained('{out}') after `import infoscale.models.gau`",
           calibration_file=True, per_call_methods=True),
    Family("llama", "llama", "LlamaForCausalLM", "clm", arch="llama", tokenizers=("bpe", "char"),
           load_hint="AutoModelForCausalLM.from_pretrained('{out}'), AutoTokenizer.from_pretrained('{out}')"),
    Family("modernbert", "modernbert", "ModernBertForMaskedLM", "mlm", arch="modernbert", tokenizers=("char",),
           load_hint="AutoModelForMaskedLM.from_pretrained('{out}')"),
]}
ARCHS = {f.arch: f for f in FAMILIES.values() if f.arch}  # the families `infoscale train` builds, by --arch


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


# --------------------------------------------------------------------------------------------
# sizes: a config and a weights file are checked before any model is built
# --------------------------------------------------------------------------------------------


def _size(config, name: str, default: int = 0) -> int:
    v = getattr(config, name, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise DataError(f"{name} must be a non-negative integer, got {v!r}")
    return v


def parameter_count(config) -> int:
    """The number of parameters ``config`` describes, from its sizes alone (nothing is built)."""
    h, i = _size(config, "hidden_size"), _size(config, "intermediate_size")
    layers, vocab = _size(config, "num_hidden_layers"), _size(config, "vocab_size")
    if getattr(config, "model_type", None) == "gau_alpha":
        s = _size(config, "attention_key_size")
        return (vocab + _size(config, "type_vocab_size", 2)) * h + layers * (h * (2 * i + s) + i * h + 2 * s)
    heads = _size(config, "num_attention_heads", 1) or 1
    kv = _size(config, "num_key_value_heads", heads) or heads
    hd = _size(config, "head_dim", h // heads) or h // heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return vocab * h * (1 if tied else 2) + h + layers * (h * hd * (2 * heads + 2 * kv) + 3 * h * i + 2 * h)


def _gib(b: float) -> str:
    return f"{b / 2**30:.3g}"


def check_model_size(config, device, where: str) -> None:
    """Refuse a config whose parameters (fp32) would not fit in the memory free on ``device`` now."""
    import torch

    from ..runtime import available_memory

    try:
        need = 4 * parameter_count(config)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    free = available_memory(torch.device(device))
    if free is not None and need > free:
        sizes = ", ".join(f"{k} = {getattr(config, k)}" for k in ("num_hidden_layers", "hidden_size",
                                                                   "intermediate_size", "attention_key_size",
                                                                   "vocab_size") if hasattr(config, k))
        raise DataError(f"{where} describes a model of about {_gib(need)} GiB of parameters ({sizes}), more than the "
                        f"{_gib(free)} GiB free on {device}; the config is damaged, or the model needs a larger "
                        "machine")


def weight_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # SafetensorError, OSError: a damaged or foreign file
        raise DataError(f"cannot load the model in {Path(path).parent}: {Path(path).name} cannot be read "
                        f"({type(e).__name__}: {str(e)[:200]}); the file is damaged or not safetensors") from None


def check_weights(cls, config, shapes: dict[str, tuple[int, ...]], where: str, config_file: str) -> None:
    """Refuse weights (names → shapes) that do not belong to ``config``, before the model is built: the sizes
    first (a config describing far more parameters than the file holds), then every tensor's shape against
    the model built on the meta device (no memory)."""
    import math

    import torch

    have = sum(math.prod(s) for s in shapes.values())
    want = parameter_count(config)
    if want > 2 * have + 10**6:
        raise DataError(f"{config_file} describes about {want:,} parameters but {where} holds {have:,}; they do not "
                        f"belong together (restore the config.json the weights were saved with)")
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:
        raise DataError(f"{config_file}: cannot build the model it describes: {type(e).__name__}: "
                        f"{str(e)[:200]}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings",
                                                                              True) else set()
    bad = [f"{k}: file {shapes[k]}, config {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    missing = [k for k in expected if k not in shapes and k not in tied]
    extra = [k for k in shapes if k not in expected]
    problems = []
    if bad:
        problems.append("shape mismatch " + "; ".join(bad[:3]))
    if missing:
        problems.append(f"missing {missing[:3]}{' …' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:3]}{' …' if len(extra) > 3 else ''}")
    if problems:
        raise DataError(f"{where} does not match {config_file}: " + ", ".join(problems) + " (restore the run's "
                        "files, or convert the checkpoint again)")


def is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError, torch's OutOfMemoryError, or a RuntimeError that says it could not
    allocate."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "allocate" in str(e))
