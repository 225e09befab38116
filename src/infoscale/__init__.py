"""infoscale: length extrapolation of attention (InfoScale, CosScale and their baselines)."""

from .attention import (
    attention,
    attention_fast,
    attention_logits,
    attention_reference,
    bf16_supported,
    build_plan,
)
from .methods import (
    REGISTRY,
    MethodError,
    alibi_slopes,
    infoscale_factor,
    logn_factor,
    merge_with_training,
    parse_method,
    softmax_plus_factor,
    yarn_attention_factor,
)

__version__ = "0.1.0"


def __getattr__(name):  # the model pulls in transformers: import it only when asked for
    if name in ("GAUForMaskedLM", "GAUConfig"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'infoscale' has no attribute {name!r}")


__all__ = [
    "GAUConfig",
    "GAUForMaskedLM",
    "REGISTRY",
    "MethodError",
    "alibi_slopes",
    "attention",
    "attention_fast",
    "attention_logits",
    "attention_reference",
    "bf16_supported",
    "build_plan",
    "infoscale_factor",
    "logn_factor",
    "merge_with_training",
    "parse_method",
    "softmax_plus_factor",
    "yarn_attention_factor",
]
