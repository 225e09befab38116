"""infoscale: length extrapolation of attention (InfoScale, CosScale and their baselines)."""

from .attn import (
    REGISTRY,
    InfoscaleError,
    MethodError,
    alibi_slopes,
    attention,
    attention_fast,
    attention_logits,
    attention_reference,
    build_plan,
    infoscale_factor,
    logn_factor,
    merge_with_training,
    parse_method,
    softmax_plus_factor,
    yarn_attention_factor,
)
from .attn.rope import Rope
from .errors import ConfigError, DataError

__version__ = "0.2.0"


def __getattr__(name):  # the models pull in transformers: import them only when asked for
    if name in ("GAUForMaskedLM", "GAUConfig", "GAUModel"):
        from .models import gau

        return getattr(gau, name)
    raise AttributeError(f"module 'infoscale' has no attribute {name!r}")


__all__ = [
    "GAUConfig",
    "GAUForMaskedLM",
    "GAUModel",
    "REGISTRY",
    "Rope",
    "InfoscaleError",
    "MethodError",
    "DataError",
    "ConfigError",
    "alibi_slopes",
    "attention",
    "attention_fast",
    "attention_logits",
    "attention_reference",
    "build_plan",
    "infoscale_factor",
    "logn_factor",
    "merge_with_training",
    "parse_method",
    "softmax_plus_factor",
    "yarn_attention_factor",
]
