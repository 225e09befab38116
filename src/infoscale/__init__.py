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

__all__ = [
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
