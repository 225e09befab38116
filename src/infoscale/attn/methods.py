"""The method registry: every attention variant as a named, parametrised, validated recipe.

A *method string* is one or more registered names joined with ``+``, each with optional keyword
parameters: ``"rerope(window=32)+infoscale"``, ``"cosscale(s=128)"``, ``"yarn+infoscale(clamp=False)"``.

Each method contributes to one or more *slots* of the attention computation; two methods that fill
the same slot do not compose and are refused:

=============  ==========================================================================
slot           what it changes
=============  ==========================================================================
normalize      q, k are L2-normalised and the dot-product scale 1/sqrt(d) becomes s (CosScale)
temperature    a per-row factor on the logits that depends on l, the keys a query attends
positions      RoPE frequencies/positions (PI, NTK, YaRN), piecewise relative positions
               (ReRoPE, Leaky ReRoPE, LM-Infinite's distance cap) or ALiBi (replaces RoPE)
mask           which keys a query may attend (window, StreamingLLM, LM-Infinite)
training       a training-time recipe with no effect at evaluation (PoSE)
=============  ==========================================================================

Notation (as in DESIGN.md): L = training length, n = sequence length, s = n / L, l = number of keys
a query may attend after all masks, d = head dim. Every function here is pure; the tensors are
assembled in :mod:`infoscale.attention`.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "MethodError",
    "Component",
    "Method",
    "REGISTRY",
    "parse_method",
    "infoscale_factor",
    "logn_factor",
    "softmax_plus_factor",
    "yarn_attention_factor",
    "alibi_slopes",
    "merge_with_training",
]


from .errors import MethodError  # noqa: E402

# --------------------------------------------------------------------------------------------
# Pure formulas
# --------------------------------------------------------------------------------------------


def infoscale_factor(n, train_len: int, head_dim: int, clamp: bool = True):
    """InfoScale logit multiplier sqrt(1 - l^(-2/d)) / sqrt(1 - L^(-2/d)) (arXiv 2501.08570).

    ``n`` is l, the number of keys attended (a number or a tensor). With ``clamp`` the factor is 1
    for l <= L so that nothing changes inside the training length; ``clamp=False`` is the official
    code's form (below 1 for l < L). Golden values: (4096, 64, 128) -> 1.392, (512, 64, 128) -> 1.215.
    """
    _check_positive(train_len=train_len, head_dim=head_dim)
    denom = math.sqrt(1.0 - train_len ** (-2.0 / head_dim))
    if _is_tensor(n):
        l = n.double().clamp(min=1.0)
        if clamp:
            l = l.clamp(min=float(train_len))
        return (1.0 - l ** (-2.0 / head_dim)).sqrt() / denom
    if n < 1:
        raise MethodError(f"infoscale_factor needs n >= 1 keys, got {n}")
    l = max(n, train_len) if clamp else n
    return math.sqrt(1.0 - l ** (-2.0 / head_dim)) / denom


def logn_factor(n, train_len: int, clamp: bool = True):
    """Log-n scale log(l) / log(L) (Su 2021, kexue.fm/archives/8823; normalised to the training length
    as in kexue.fm/archives/9444). With ``clamp`` it is max(1, .), the training-free form of
    bojone/rerope's patches."""
    _check_positive(train_len=train_len)
    if train_len < 2:
        raise MethodError("logn needs train_len >= 2 (log 1 = 0)")
    if _is_tensor(n):
        f = n.double().clamp(min=1.0).log() / math.log(train_len)
        return f.clamp(min=1.0) if clamp else f
    f = math.log(max(n, 1)) / math.log(train_len)
    return max(1.0, f) if clamp else f


def softmax_plus_factor(n, base: int = 512):
    """GAU-α's ``softmax_plus``: log(l) / log(base), base 512 (its pretraining length; Su 2021,
    kexue.fm/archives/8823, and the official InfoScale code). Not normalised to the training length,
    so it is 2/3 at l = 64."""
    if _is_tensor(n):
        return n.double().clamp(min=1.0).log() / math.log(base)
    return math.log(max(n, 1)) / math.log(base)


def yarn_attention_factor(scale: float) -> float:
    """YaRN's mscale 0.1 ln s + 1 (Peng et al. 2023). It multiplies both q and k (cos and sin), so the
    logits grow by its square; 1 for s <= 1."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> list[float]:
    """ALiBi head slopes m_h = 2^(-max_bias * h / H), h = 1..H (Press et al. 2022). For H not a power
    of two: the slopes of the nearest lower power of two H', then every other slope of 2H'."""

    def powers(h: int) -> list[float]:
        return [2.0 ** (-max_bias * (i + 1) / h) for i in range(h)]

    if num_heads < 1:
        raise MethodError(f"alibi needs at least one head, got {num_heads}")
    p = 2 ** int(math.floor(math.log2(num_heads)))
    if p == num_heads:
        return powers(num_heads)
    return powers(p) + powers(2 * p)[0::2][: num_heads - p]


def _is_tensor(x) -> bool:
    return hasattr(x, "dtype") and hasattr(x, "shape")


def _check_positive(**kw):
    for k, v in kw.items():
        if not isinstance(v, int) or v < 1:
            raise MethodError(f"{k} must be a positive integer, got {v!r}")


# --------------------------------------------------------------------------------------------
# Parameters: one frozen dataclass per method; defaults documented with their source
# --------------------------------------------------------------------------------------------


def param(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class NoParams:
    pass


@dataclass(frozen=True)
class InfoScaleParams:
    clamp: bool = param(True, "factor is 1 for l <= L (identity inside the training length); "
                              "False gives the official code's form, < 1 for l < L")


@dataclass(frozen=True)
class LognParams:
    clamp: bool = param(True, "max(1, log l / log L): identity inside the training length")


@dataclass(frozen=True)
class SoftmaxPlusParams:
    base: int = param(512, "log base: GAU-α's pretraining length 512 (bert4keras softmax_plus)")


@dataclass(frozen=True)
class CosScaleParams:
    s: float = param(128.0, "logit scale on cos(q, k); 128 is the official GAU-α CosScale run")


@dataclass(frozen=True)
class FactorParams:
    factor: float | None = param(None, "scale s; None = n / L recomputed per length (dynamic), "
                                       "so the method is the identity for n <= L")


@dataclass(frozen=True)
class YarnParams:
    factor: float | None = param(None, "scale s; None = n / L per length (dynamic YaRN)")
    beta_fast: float = param(32.0, "rotations over L above which a pair extrapolates (YaRN paper)")
    beta_slow: float = param(1.0, "rotations over L below which a pair interpolates (YaRN paper)")


@dataclass(frozen=True)
class ReRoPEParams:
    window: int | None = param(None, "w; None = L // 2 (Su, kexue.fm/archives/9708: best w is "
                                     "1/4 to 1/2 of the training length)")


@dataclass(frozen=True)
class LeakyReRoPEParams:
    window: int | None = param(None, "w; None = L // 2 (as ReRoPE)")
    k: float | None = param(None, "slope 1/k beyond w; None = the smallest k that keeps every "
                                  "distance <= L - 1: (n - 1 - w) / (L - 1 - w), at least 1")


@dataclass(frozen=True)
class AlibiParams:
    max_bias: float = param(8.0, "slopes 2^(-max_bias*h/H) (Press et al. 2022); a single head "
                                 "(GAU) gets 2^-max_bias")


@dataclass(frozen=True)
class PoseParams:
    target: int | None = param(None, "simulated length L_t; None = 64 * L (the paper's 64x)")
    chunks: int = param(2, "position chunks per training window (PoSE code default)")


@dataclass(frozen=True)
class WindowParams:
    width: int | None = param(None, "|i - j| <= width; None = L // 2, so a query sees L + 1 keys "
                                    "at distances all seen in training")


@dataclass(frozen=True)
class StreamingParams:
    sinks: int = param(4, "sink tokens, attended by all and attending all (StreamingLLM start_size)")
    window: int | None = param(None, "|i - j| <= window; None = L // 2 (as window)")


@dataclass(frozen=True)
class LMInfiniteParams:
    sinks: int = param(10, "global tokens n_global (LM-Infinite's convert_llama_model(.., 10))")
    window: int | None = param(None, "|i - j| <= window; None = L - 1 (n_local = L keys one-sided)")
    cap: int | None = param(None, "distance ceiling d_max; None = L (LM-Infinite: the pretraining "
                                  "length)")


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A registered method: its slots, parameter class, formula and source."""

    name: str
    slots: tuple[str, ...]
    params: type
    formula: str
    source: str
    train_time: bool = False
    validate: Callable | None = None
    trainable: bool = False


@dataclass(frozen=True)
class Component:
    """One parsed ``name(params)`` term of a method string."""

    name: str
    params: object

    @property
    def method(self) -> Method:
        return REGISTRY[self.name]

    def __str__(self) -> str:
        kv = dataclasses.asdict(self.params)
        if not kv:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in kv.items()) + ")"


def _v_positive(**names):
    def check(p, train_len):
        for k in names:
            v = getattr(p, k)
            if v is not None and v <= 0:
                raise MethodError(f"{k} must be positive, got {v!r}")
    return check


def _v_leaky(p, train_len):
    _v_positive(window=1, k=1)(p, train_len)
    if p.k is not None and p.k < 1:
        raise MethodError(f"leaky_rerope: k must be >= 1 (k = 1 is plain RoPE), got {p.k}")


def _v_yarn(p, train_len):
    _v_positive(factor=1, beta_fast=1, beta_slow=1)(p, train_len)
    if p.beta_fast <= p.beta_slow:
        raise MethodError(f"yarn: beta_fast ({p.beta_fast}) must exceed beta_slow ({p.beta_slow})")


def _v_sinks(p, train_len):
    if p.sinks < 0:
        raise MethodError(f"sinks must be >= 0, got {p.sinks}")
    _v_positive(window=1)(p, train_len)
    if getattr(p, "cap", None) is not None and p.cap <= 0:
        raise MethodError(f"cap must be positive, got {p.cap}")


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in [
        Method("softmax", (), NoParams,
               "logits q·k/sqrt(d) with RoPE (the identity method)", "Vaswani et al. 2017; Su et al. 2021",
               trainable=True),
        Method("infoscale", ("temperature",), InfoScaleParams,
               "logits × sqrt(1 − l^(−2/d)) / sqrt(1 − L^(−2/d)); training-free",
               "Li et al. 2025, arXiv 2501.08570"),
        Method("logn", ("temperature",), LognParams,
               "logits × max(1, log l / log L)", "Su 2021, kexue.fm/archives/8823, 9444"),
        Method("softmax_plus", ("temperature",), SoftmaxPlusParams,
               "logits × log l / log base (GAU-α's pretraining scale)",
               "Su 2021, kexue.fm/archives/8823; bert4keras", trainable=True),
        Method("cosscale", ("normalize",), CosScaleParams,
               "q, k L2-normalised; logits = s · cos(q, k); must be trained with",
               "Li et al. 2025, arXiv 2501.08570", train_time=True, validate=_v_positive(s=1), trainable=True),
        Method("pi", ("positions",), FactorParams,
               "RoPE positions × 1/s for s > 1", "Chen et al. 2023, arXiv 2306.15595",
               validate=_v_positive(factor=1)),
        Method("ntk", ("positions",), FactorParams,
               "RoPE base × s^(d/(d−2)) for s > 1", "bloc97 2023 (NTK-aware scaled RoPE)",
               validate=_v_positive(factor=1)),
        Method("yarn", ("positions",), YarnParams,
               "NTK-by-parts ramp on the original L (β_fast, β_slow); q and k × (0.1 ln s + 1)",
               "Peng et al. 2023, arXiv 2309.00071", validate=_v_yarn),
        Method("rerope", ("positions",), ReRoPEParams,
               "relative position sign(Δ)·min(|Δ|, w)", "Su 2023, kexue.fm/archives/9708",
               validate=_v_positive(window=1)),
        Method("leaky_rerope", ("positions",), LeakyReRoPEParams,
               "relative position Δ for |Δ| <= w, else sign(Δ)·(w + (|Δ| − w)/k)",
               "Su 2023, kexue.fm/archives/9708", validate=_v_leaky),
        Method("alibi", ("positions",), AlibiParams,
               "no RoPE; bias −m·|i − j| with geometric slopes m", "Press et al. 2022, arXiv 2108.12409",
               train_time=True, validate=_v_positive(max_bias=1), trainable=True),
        Method("pose", ("training",), PoseParams,
               "positional skip-wise training toward target; plain RoPE at evaluation",
               "Zhu et al. 2023, arXiv 2309.10400", train_time=True, validate=_v_positive(target=1, chunks=1),
               trainable=True),
        Method("window", ("mask",), WindowParams,
               "mask |i − j| <= width", "Su 2023, kexue.fm/archives/9431 (local attention baseline)",
               validate=_v_positive(width=1)),
        Method("streamingllm", ("mask",), StreamingParams,
               "mask |i − j| <= window, or i < sinks, or j < sinks",
               "Xiao et al. 2023, arXiv 2309.17453", validate=_v_sinks),
        Method("lm_infinite", ("mask", "positions"), LMInfiniteParams,
               "Λ-mask (|i − j| <= window or sink row/column) and relative position "
               "sign(Δ)·min(|Δ|, cap)", "Han et al. 2023, arXiv 2308.16137", validate=_v_sinks),
    ]
}


# --------------------------------------------------------------------------------------------
# Parsing and composition
# --------------------------------------------------------------------------------------------

_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def _split_plus(text: str) -> list[str]:
    """Split on '+' outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "+" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _coerce(method: str, name: str, value, typ) -> object:
    """Check a literal against a dataclass field's annotation (int, float, bool, or X | None)."""
    allowed = [t.strip() for t in str(typ).split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise MethodError(f"{method}: parameter {name} may not be None")
    if "bool" in allowed:
        if isinstance(value, bool):
            return value
    elif "int" in allowed:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif "float" in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    want = " or ".join(a for a in allowed)
    raise MethodError(f"{method}: parameter {name} must be {want}, got {value!r}")


def _parse_term(text: str) -> Component:
    m = _TERM.match(text)
    if not m or not text.strip():
        raise MethodError(f"cannot parse method term {text.strip()!r}; expected name or name(key=value, ...)")
    name, args = m.group(1), m.group(2)
    if name not in REGISTRY:
        known = ", ".join(REGISTRY)
        raise MethodError(f"unknown method {name!r}; known methods: {known} (see `infoscale methods`)")
    meth = REGISTRY[name]
    kwargs = {}
    if args and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
        except SyntaxError as e:
            raise MethodError(f"{name}: cannot parse parameters {args!r}: {e.msg}") from None
        if call.args:
            raise MethodError(f"{name}: parameters must be given as key=value, got {args!r}")
        fields = {f.name: f for f in dataclasses.fields(meth.params)}
        for kw in call.keywords:
            if kw.arg not in fields:
                ok = ", ".join(fields) or "none"
                raise MethodError(f"{name}: unknown parameter {kw.arg!r}; its parameters: {ok}")
            try:
                value = ast.literal_eval(kw.value)
            except ValueError:
                raise MethodError(f"{name}: parameter {kw.arg} must be a literal number, bool or None") from None
            kwargs[kw.arg] = _coerce(name, kw.arg, value, fields[kw.arg].type)
    return Component(name, meth.params(**kwargs))


@dataclass(frozen=True)
class ParsedMethod:
    """A validated combination of components, at most one per slot."""

    components: tuple[Component, ...]

    def get(self, name: str):
        """The params of component ``name``, or None if absent."""
        for c in self.components:
            if c.name == name:
                return c.params
        return None

    def slot(self, slot: str) -> Component | None:
        for c in self.components:
            if slot in c.method.slots:
                return c
        return None

    @property
    def train_time(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.method.train_time)

    def resolved(self, train_len: int) -> ParsedMethod:
        """The same method with every None default replaced by its value at this training length."""
        return ParsedMethod(tuple(Component(c.name, resolve_params(c, train_len)) for c in self.components))

    def training_positions(self, train_len: int):
        """``f(gen, batch, length) -> positions`` for training (PoSE), or None for 0..L−1."""
        from .rope import pose_positions

        p = self.resolved(train_len).get("pose")
        if p is None:
            return None
        return lambda gen, batch, length: pose_positions(gen, batch, length, p.target, p.chunks)

    def __str__(self) -> str:
        return "+".join(str(c) for c in self.components) or "softmax"


def resolve_params(c: Component, train_len: int):
    """Fill length-dependent defaults (window = L // 2, ...). ``factor``/``k`` stay None: they depend
    on n and are resolved per call."""
    p, L = c.params, train_len
    fill = {}
    if c.name in ("rerope", "leaky_rerope") and p.window is None:
        fill["window"] = max(1, L // 2)
    if c.name == "window" and p.width is None:
        fill["width"] = max(1, L // 2)
    if c.name == "streamingllm" and p.window is None:
        fill["window"] = max(1, L // 2)
    if c.name == "lm_infinite":
        if p.window is None:
            fill["window"] = max(1, L - 1)
        if p.cap is None:
            fill["cap"] = L
    if c.name == "pose" and p.target is None:
        fill["target"] = 64 * L
    return dataclasses.replace(p, **fill) if fill else p


def parse_method(spec: str | ParsedMethod, train_len: int | None = None) -> ParsedMethod:
    """Parse ``"name(k=v)+name2"`` into a validated :class:`ParsedMethod`.

    ``softmax`` is the identity and is dropped when combined. Raises :class:`MethodError` for unknown
    names or parameters, ill-typed values and two methods that fill the same slot.
    """
    if isinstance(spec, ParsedMethod):
        pm = spec
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise MethodError(f"a method must be a non-empty string such as 'infoscale', got {spec!r}")
        comps = [_parse_term(t) for t in _split_plus(spec)]
        comps = [c for c in comps if c.name != "softmax"]
        seen: dict[str, str] = {}
        for c in comps:
            for slot in c.method.slots:
                if slot in seen:
                    raise MethodError(
                        f"{seen[slot]} and {c.name} both set the attention {slot} and do not compose; "
                        f"choose one (e.g. '{seen[slot]}+infoscale' or '{c.name}+infoscale')"
                        if slot != "temperature" else
                        f"{seen[slot]} and {c.name} are both length temperatures and would scale the "
                        f"logits twice; choose one")
                seen[slot] = c.name
        pm = ParsedMethod(tuple(comps))
    if train_len is not None:
        for c in pm.components:
            if c.method.validate:
                try:
                    c.method.validate(c.params, train_len)
                except MethodError as e:
                    msg = str(e)
                    raise MethodError(msg if msg.startswith(c.name) else f"{c.name}: {msg}") from None
    return pm


def merge_with_training(train_method: str | ParsedMethod, eval_method: str | ParsedMethod,
                        train_len: int | None = None) -> ParsedMethod:
    """The method to evaluate a model trained with ``train_method``.

    Everything of the training method that changes the function the model computes is inherited:
    CosScale, ALiBi, a length temperature (``softmax_plus``); PoSE only changes training positions
    and is dropped. The evaluation method adds to it; a slot filled by both must hold the same
    component (a model trained with ``softmax_plus`` keeps it: adding ``infoscale`` would scale twice).
    Asking for a train-time method the model was not trained with is refused.
    """
    tm, em = parse_method(train_method, train_len), parse_method(eval_method, train_len)
    for c in em.train_time:
        if c.name == "pose":
            continue
        mine = tm.get(c.name)
        if mine is None:
            raise MethodError(
                f"{c.name} is a train-time method and this model was trained with '{tm}'; "
                f"evaluate it with a training-free method or train a model with {c.name}")
        if mine != c.params:
            raise MethodError(f"this model was trained with {Component(c.name, mine)}, not {c}")
    if tm.get("alibi") is not None and em.slot("positions") is not None and em.get("alibi") is None:
        pos = em.slot("positions")
        raise MethodError(f"{pos.name} changes RoPE, but this model uses ALiBi (no RoPE); it does not apply")
    inherited = [c for c in tm.components if "training" not in c.method.slots]
    for c in inherited:
        for slot in c.method.slots:
            other = em.slot(slot)
            if other is not None and other != c:
                raise MethodError(f"this model was trained with {c}, which sets the attention {slot}; "
                                  f"{other} would replace it, so it does not apply to this model")
    comps = [c for c in inherited if em.get(c.name) is None]
    comps += [c for c in em.components if c.name != "pose"]
    return parse_method("+".join(str(c) for c in comps) or "softmax", train_len)
