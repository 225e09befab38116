"""The attention core: methods, their formulas, RoPE and ``attention()``. Imports only torch."""

from .errors import InfoscaleError, MethodError
from .kernel import attention, attention_fast, attention_logits, attention_reference, build_plan
from .methods import REGISTRY, ParsedMethod, merge_with_training, parse_method
from .rope import Rope
from .scales import (
           alibi_slopes,
           infoscale_factor,
           llama4_factor,
           logn_factor,
           softmax_plus_factor,
           yarn_attention_factor,
)

__all__ = ["InfoscaleError", "MethodError", "attention", "attention_fast", "attention_logits", "attention_reference",
           "build_plan", "REGISTRY", "ParsedMethod", "Rope", "alibi_slopes", "infoscale_factor", "llama4_factor",
           "logn_factor", "merge_with_training", "parse_method", "softmax_plus_factor", "yarn_attention_factor"]
