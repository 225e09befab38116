"""The method registry: every attention variant as a named, parametrised, validated recipe.

A *method string* is one or more registered names joined with ``+``, each with optional keyword
parameters: ``"rerope(window=32)+infoscale"``, ``"cosscale(s=128)"``, ``"yarn+infoscale(clamp=False)"``.

Each method contributes to one or more *slots* of the attention computation, through the functions
it registers; two methods that fill the same slot do not compose and are refused:

=============  ==========================================================================
slot           what its function gives (see :class:`Method`)
=============  ==========================================================================
normalize      ``normalize(p)``: q, k are L2-normalised and the logit scale becomes s (CosScale)
temperature    ``temperature(p, l, ctx)``: a per-row factor on the logits from l, the keys a query attends
positions      ``positions(p, ctx)``: RoPE frequencies (PI, NTK, YaRN), regions of (i, j) pairs with their
               own q and k positions (ReRoPE, Leaky ReRoPE, LM-Infinite's distance cap, SelfExtend's
               groups, DCA's chunks) or ALiBi slopes (no RoPE)
mask           ``mask(p)``: a band |Δ| <= window plus sink tokens (window, StreamingLLM, LM-Infinite)
training       ``training(p, L)``: training-time positions (PoSE); nothing at evaluation
=============  ==========================================================================

``defaults(p, L)`` fills parameters whose default depends on the training length; ``dynamic(p)`` says
whether the method depends on n (a KV cache keeps the prompt's n); ``causal_only`` refuses bidirectional
attention (DCA). The plan that
:func:`infoscale.attention` runs (:mod:`infoscale.attn.plan`) folds these functions and never names
a method, so a new method is one registry entry (plus its naive formula in the tests).

Notation: L = training length, n = sequence length, s = n / L, l = number of keys a query may attend
after all masks, d = head dim.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import rope, scales
from .errors import MethodError

__all__ = ["MethodError", "Component", "Method", "ParsedMethod", "REGISTRY", "parse_method", "merge_with_training",
           "PositionEffect", "Region", "Context"]


# --------------------------------------------------------------------------------------------
# Parameters: one frozen dataclass per method; defaults documented with their source
# --------------------------------------------------------------------------------------------


def param(default, doc: str, quiet: bool = False):
    """A parameter; ``quiet`` ones are left out of the method string at their default, so adding one keeps
    existing resolved strings (and the record keys built from them) unchanged."""
    return field(default=default, metadata={"doc": doc, "quiet": quiet})


@dataclass(frozen=True)
class NoParams:
    pass


# A model pretrained long and fine-tuned short (GAU-α: 512, then 64) has two candidate Ls for a length temperature
LENGTH_DOC = ("L in the formula; None = the model's training length (for a model pretrained at a longer length and "
              "fine-tuned short, its pretraining length is the other choice)")


@dataclass(frozen=True)
class InfoScaleParams:
    clamp: bool = param(True, "factor is 1 for l <= L (identity inside the training length); "
                              "False gives the official code's form, < 1 for l < L")
    dim: float | None = param(None, "d in the formula, the effective dimension of q and k; None = the head dim "
                                    "(the paper's isotropic assumption)", quiet=True)
    calibrated: bool = param(False, "use a per-layer d fitted on the model's own attention (`infoscale calibrate`): "
                                    "the calibration the model or layer carries; an error if it has none", quiet=True)
    train_len: int | None = param(None, LENGTH_DOC, quiet=True)


@dataclass(frozen=True)
class LognParams:
    clamp: bool = param(True, "max(1, log l / log L): identity inside the training length")
    train_len: int | None = param(None, LENGTH_DOC, quiet=True)


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
class HFRopeParams:
    factor: float = param(2.0, "s, the rope_parameters factor (transformers requires one; 2 = twice the context)")


@dataclass(frozen=True)
class SelfExtendParams:
    group: int | None = param(None, "G, the group size of far positions (floor(p / G)); None = per length n, the "
                                    "smallest G whose grouped positions stay within the training length, "
                                    "floor((n − 1)/G) + W − floor(W/G) <= L − 1 (LongLM README: try the smallest G "
                                    "with (L − W)·G + W >= n first; the two agree when G divides W); 1 for n <= L")
    window: int | None = param(None, "W, the neighbour window: pairs with |i − j| < W keep their plain positions; "
                                     "None = L // 4 (LongLM's self_extend_forward default 1024 and example.py's "
                                     "window_size for Llama-2's 4096; README: 512 to 1536 at 4096)")


@dataclass(frozen=True)
class DCAParams:
    chunk: int | None = param(None, "s, the chunk length: positions restart at every multiple of s; None = "
                                    "3L//4 − L//8, the chunk ChunkLlama's code runs (replace_with_chunkllama(L): "
                                    "chunk_size 3L//4 minus local_window L//8; 2560 for Llama-2's 4096)")
    local: int | None = param(None, "w, the local window: the first w queries of a chunk see the previous chunk at "
                                    "their true distances, and s + w − 1 is the largest position a query gets "
                                    "(the paper's c − 1, with w = c − s); None = L//8 + 1, ChunkLlama's code "
                                    "(query offsets 0 .. local_window keep their distances, capped at chunk_size "
                                    "= 3L//4)")


@dataclass(frozen=True)
class AlibiParams:
    max_bias: float = param(8.0, "slopes 2^(-max_bias*h/H) (Press et al. 2022); a single head "
                                 "(GAU) gets 2^-max_bias")
    right_bias: float | None = param(None, "keys right of the query (j > i) get their own slopes "
                                           "2^(-right_bias*h/H); None = max_bias: the official symmetric form",
                                     quiet=True)


@dataclass(frozen=True)
class Llama4Params:
    beta: float = param(0.1, "β: temperature step per doubling is about β·ln 2 (Llama 4's attn_scale 0.1)")
    floor: int | None = param(None, "F: the factor is 1 for l < F; None = L (Ministral 3 uses the original "
                                    "context; Llama 4 uses 8192)")


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
    true_positions: bool = param(False, "keep every token at its position in the sequence; False = StreamingLLM's "
                                        "own positions within the cache (a sink beyond the window sits "
                                        "sinks + window − j before its query)")
    # true_positions is written out in every method string (not quiet): records made when streamingllm meant true
    # positions carry the string without it, so a resumed evaluation does not take them for the new default


@dataclass(frozen=True)
class LMInfiniteParams:
    sinks: int = param(10, "global tokens n_global (LM-Infinite's convert_llama_model(.., 10))")
    window: int | None = param(None, "|i - j| <= window; None = L - 1 (n_local = L keys one-sided)")
    cap: int | None = param(None, "distance ceiling d_max; None = L (LM-Infinite: the pretraining "
                                  "length)")


# --------------------------------------------------------------------------------------------
# What a method's functions receive and return
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What a call knows: L, the q·k dim d, the heads, the model's RoPE and each row's length n
    (number of real keys, or what the caller fixed, e.g. the prompt length when decoding)."""

    train_len: int
    head_dim: int
    heads: int
    rope: rope.Rope | None
    seq_len: torch.Tensor  # (B or 1,) float64
    dims: float | None = None  # the layer's calibrated effective dimension (infoscale(calibrated=True))


def _same(pos: torch.Tensor) -> torch.Tensor:
    return pos


@dataclass
class Region:
    """A set of (i, j) pairs and the RoPE positions their logits use: q rotated at ``q_at(p_i)``, k at ``k_at(p_j)``.

    ``q_at``, ``k_at``: positions (B|1, n) float64 -> (B|1, n). ``select(p_i, p_j)``: positions broadcast as
    (B|1, r, 1) and (B|1, 1, c) -> bool (B|1, r, c), the pairs this region scores. A positions method gives a
    list of regions: the first one scores every pair, each later one overwrites the pairs it selects, so a
    method whose logits merge several position assignments per (i, j) (ReRoPE's band and far sides,
    SelfExtend's neighbour and grouped attention, DCA's three chunk relations) is a list of regions.
    ``select`` compares the keys' positions with a function of the queries' (``kp > qp + w``, not ``kp - qp > w``):
    the same pairs on integer positions, and no r × c float64 difference is formed (the fused path evaluates it
    over every chunk of a 16k prefill)."""

    select: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    q_at: Callable[[torch.Tensor], torch.Tensor] = _same
    k_at: Callable[[torch.Tensor], torch.Tensor] = _same
    later_keys: bool = False  # selects only keys after their query (p_j > p_i): causal attention skips it


@dataclass
class PositionEffect:
    """A positions method's contribution: new frequencies (B or 1, d/2), a factor on the logits (B or 1,),
    piecewise regions, or ALiBi slopes (H,) in place of RoPE."""

    inv_freq: torch.Tensor | None = None
    logit_factor: torch.Tensor | None = None
    regions: list[Region] | None = None
    slopes: torch.Tensor | None = None
    slopes_right: torch.Tensor | None = None  # ALiBi slopes for keys right of the query; None = ``slopes``


# --------------------------------------------------------------------------------------------
# The functions methods register
# --------------------------------------------------------------------------------------------


def _scale(p, ctx: Context) -> torch.Tensor:
    """s per row: the fixed factor, or n / L (at least 1) when dynamic."""
    if p.factor is not None:
        return torch.full_like(ctx.seq_len, float(p.factor))
    return (ctx.seq_len / ctx.train_len).clamp(min=1.0)


def _plain_theta(name: str, ctx: Context) -> torch.Tensor:
    if ctx.rope is None:
        raise MethodError(f"{name} changes RoPE, but this attention has no RoPE; it does not apply")
    return ctx.rope.frequencies()


def _pi(p, ctx):
    theta = _plain_theta("pi", ctx)
    return PositionEffect(inv_freq=torch.stack([rope.pi_inv_freq(theta, float(s)) for s in _scale(p, ctx)]))


def _ntk(p, ctx):
    theta = _plain_theta("ntk", ctx)
    return PositionEffect(inv_freq=torch.stack([rope.ntk_inv_freq(theta, float(s)) for s in _scale(p, ctx)]))


def _yarn(p, ctx):
    _plain_theta("yarn", ctx)
    if not ctx.rope.geometric:
        raise MethodError("yarn is defined on plain RoPE frequencies base^(-2i/d); this model's RoPE has its own")
    s = _scale(p, ctx)
    freqs = torch.stack([rope.yarn_inv_freq(ctx.rope.dim, float(v), ctx.train_len, p.beta_fast, p.beta_slow,
                                            ctx.rope.base) for v in s])
    m = torch.tensor([scales.yarn_attention_factor(float(v)) for v in s], dtype=torch.float64)
    return PositionEffect(inv_freq=freqs, logit_factor=m**2)  # m on q and on k: m² on the logits


def _piecewise(w: float, k: torch.Tensor) -> list[Region]:
    """Relative position Δ for |Δ| <= w, else sign(Δ)·(w + (|Δ| − w)/k); k = ∞ caps at w (ReRoPE)."""
    a = (1.0 / k)[:, None]  # (B or 1, 1)
    shift = w * (1.0 - a)

    def scaled(pos):
        return a.to(pos.device) * pos

    return [Region(None),  # |Δ| <= w: plain positions
            Region(lambda qp, kp: kp > qp + w,  # Δ > w; Δ' = w + (Δ − w)/k: q at p_i/k − w(1 − 1/k)
                   lambda pos: scaled(pos) - shift.to(pos.device), scaled, later_keys=True),
            Region(lambda qp, kp: kp < qp - w,  # Δ < −w; Δ' = −w + (Δ + w)/k
                   lambda pos: scaled(pos) + shift.to(pos.device), scaled)]


def _no_factor(p) -> bool:
    return p.factor is None


def _hf_linear(p, ctx):
    return _pi(FactorParams(p.factor), ctx)


def _hf_dynamic(p, ctx):
    """transformers' "dynamic" RoPE (dynamic NTK, emozilla 2023): base' = base·(s·n'/L − (s − 1))^(d/(d−2)) with
    n' = max(n, L), per row; the identity for n <= L."""
    _plain_theta("hf_dynamic", ctx)
    if not ctx.rope.geometric:
        raise MethodError("hf_dynamic rescales the base of plain RoPE frequencies; this model's RoPE has its own")
    d = ctx.rope.dim
    n = ctx.seq_len.clamp(min=float(ctx.train_len))
    grow = (p.factor * n / ctx.train_len - (p.factor - 1.0)) ** (d / (d - 2))  # (B,)
    expo = torch.arange(0, d, 2, dtype=torch.float64) / d
    return PositionEffect(inv_freq=(ctx.rope.base * grow[:, None]) ** (-expo[None, :]))


def _hf_yarn(p, ctx):
    return _yarn(YarnParams(factor=p.factor), ctx)


def _hf_rope(rope_type: str):
    """``rope_parameters`` for transformers' own rotary of this type (the hf backend sets them on the config)."""
    def parameters(p, train_len: int) -> dict:
        out = {"rope_type": rope_type, "factor": float(p.factor)}
        if rope_type == "yarn":
            out["original_max_position_embeddings"] = int(train_len)
        return out
    return parameters


def _rerope(p, ctx):
    _plain_theta("rerope", ctx)
    return PositionEffect(regions=_piecewise(float(p.window), torch.full_like(ctx.seq_len, math.inf)))


def _leaky(p, ctx):
    _plain_theta("leaky_rerope", ctx)
    w = float(p.window)
    if p.k is not None:
        k = torch.full_like(ctx.seq_len, float(p.k))
    else:  # the smallest slope that keeps the longest distance within L − 1
        k = ((ctx.seq_len - 1 - w) / max(ctx.train_len - 1 - w, 1.0)).clamp(min=1.0)
    return PositionEffect(regions=_piecewise(w, k))


def _lm_infinite_positions(p, ctx):
    _plain_theta("lm_infinite", ctx)
    return PositionEffect(regions=_piecewise(float(p.cap), torch.full_like(ctx.seq_len, math.inf)))


@functools.lru_cache(maxsize=4096)
def _smallest_group(n: int, train_len: int, window: int) -> int:
    """The smallest G >= 1 whose largest grouped relative position, floor((n − 1)/G) + W − floor(W/G) (query
    n − 1, key 0), is at most L − 1. Starts at LongLM's rule ceil((n − W)/(L − W)), a lower bound; for large
    G the position tends to W, so a G exists when W < L."""
    g = max(1, -(-(n - window) // (train_len - window)))
    while (n - 1) // g + window - window // g > train_len - 1:
        g += 1
    return g


def _self_extend(p, ctx):
    """SelfExtend (Jin et al. 2024, arXiv 2401.01325; datamllab/LongLM self_extend_patch/Llama.py): neighbour
    attention at plain positions for |Δ| < W; beyond it grouped attention, keys at floor(p_j/G) and queries at
    floor(p_i/G) + W − floor(W/G), so the two join at the window's edge (Δ' ≈ −W at Δ = −W). LongLM's code
    (causal) takes the grouped logits where i − j >= W; keys right of the query (bidirectional) mirror it, q at
    floor(p_i/G) − (W − floor(W/G)), so Δ'(i, j) = −Δ'(j, i)."""
    _plain_theta("self_extend", ctx)
    w = float(p.window)
    if p.group is not None:
        g = torch.full_like(ctx.seq_len, float(p.group))
    else:
        g = torch.tensor([float(_smallest_group(int(n), ctx.train_len, p.window)) for n in ctx.seq_len],
                         dtype=torch.float64)
    g = g[:, None]  # (B or 1, 1)
    shift = w - torch.floor(w / g)

    def grouped(pos):
        return torch.floor(pos / g.to(pos.device))

    return PositionEffect(regions=[
        Region(None),  # neighbours, |Δ| < W
        Region(lambda qp, kp: kp <= qp - w, lambda pos: grouped(pos) + shift.to(pos.device), grouped),  # −Δ >= W
        Region(lambda qp, kp: kp >= qp + w, lambda pos: grouped(pos) - shift.to(pos.device), grouped,  # Δ >= W
               later_keys=True)])


def _dca(p, ctx):
    """Dual Chunk Attention (An et al. 2024, arXiv 2402.17463, Eq. 2-8; HKUNLP/ChunkLlama): keys at p_j mod s;
    a query at p_i mod s for keys of its own chunk (intra), at min(s + p_i mod s, s + w − 1) for keys of the
    chunk before (successive) and at s + w − 1 for older chunks (inter). Chunks are floor(p / s). ChunkLlama's
    code (since March 2024) also scales cos and sin by 0.05·ln(n/L) + 1 beyond the model's
    max_position_embeddings, a length temperature outside DCA's definition, left out here (compose one with
    ``+``); its perplexity script runs local_window = L/4 (dca(chunk=L/2, local=L/4 + 1)), its passkey script
    the default L/8."""
    _plain_theta("dca", ctx)
    s, top = float(p.chunk), float(p.chunk + p.local - 1)

    def within(pos):
        return torch.remainder(pos, s)

    def chunk(pos):
        return torch.floor(pos / s)

    return PositionEffect(regions=[
        Region(None, within, within),  # the same chunk (and the pairs causality masks)
        Region(lambda qp, kp: chunk(kp) == chunk(qp) - 1,  # the chunk before
               lambda pos: (within(pos) + s).clamp(max=top), within),
        Region(lambda qp, kp: chunk(kp) <= chunk(qp) - 2,  # older chunks
               lambda pos: torch.full_like(pos, top), within)])


def _alibi(p, ctx):
    """Bias −m_h·(i − j) for keys left of the query, −m'_h·(j − i) for keys right of it. Symmetric (m' = m,
    the official bidirectional form −m_h·|i − j|) unless ``right_bias`` is set. Separate slopes per side make
    a bidirectional model see order (with one head, a symmetric bias weighs i − 1 and i + 1 alike):
    direction-aware relative biases as in T5 (Raffel et al. 2020, arXiv 1910.10683, separate buckets per
    direction); the ALiBi authors discuss ALiBi for encoders in
    github.com/ofirpress/attention_with_linear_biases/issues/5."""
    slopes = torch.tensor(scales.alibi_slopes(ctx.heads, p.max_bias), dtype=torch.float32)
    right = None
    if p.right_bias is not None and p.right_bias != p.max_bias:
        right = torch.tensor(scales.alibi_slopes(ctx.heads, p.right_bias), dtype=torch.float32)
    return PositionEffect(slopes=slopes, slopes_right=right)


def _pose_training(p, train_len: int):
    return lambda gen, batch, length: rope.pose_positions(gen, batch, length, p.target, p.chunks)


def _fill(**defaults: Callable[[int], object]):
    """defaults(p, L): replace each None field named here by its value at training length L."""
    def fill(p, train_len):
        new = {k: f(train_len) for k, f in defaults.items() if getattr(p, k) is None}
        return dataclasses.replace(p, **new) if new else p
    return fill


def _half(L):
    return max(1, L // 2)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _v_positive(**names):
    def check(p, train_len):
        for k in names:
            v = getattr(p, k)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise MethodError(f"{k} must be a positive finite number, got {v!r}")
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
    _v_positive(window=1, cap=1)(p, train_len) if hasattr(p, "cap") else _v_positive(window=1)(p, train_len)


def _v_softmax_plus(p, train_len):
    if p.base < 2:
        raise MethodError(f"softmax_plus: base must be an integer >= 2 (log 1 = 0), got {p.base}")


def _v_pose(p, train_len):
    _v_positive(target=1, chunks=1)(p, train_len)
    if train_len is None:
        return
    if p.chunks > train_len:
        raise MethodError(f"pose: chunks ({p.chunks}) cannot exceed the training length ({train_len})")
    if p.target is not None and p.target < train_len:
        raise MethodError(f"pose: target ({p.target}) must be at least the training length ({train_len})")


def _v_self_extend(p, train_len):
    _v_positive(group=1, window=1)(p, train_len)
    if p.group is None and train_len is not None and p.window is not None and p.window >= train_len:
        raise MethodError(f"self_extend: window ({p.window}) must be below the training length ({train_len}) for "
                          "the default group: grouped positions reach W whatever G; give group= to run it anyway")


def _v_alibi(p, train_len):
    _v_positive(max_bias=1)(p, train_len)
    if p.right_bias is not None and not math.isfinite(p.right_bias):  # 0: slope 1; negative: steeper than 1
        raise MethodError(f"right_bias must be a finite number, got {p.right_bias!r}")


def _v_infoscale(p, train_len):
    if p.dim is not None and not (p.dim > 0 and math.isfinite(p.dim)):
        raise MethodError(f"dim must be a positive finite number, got {p.dim!r}")
    if p.dim is not None and p.calibrated:
        raise MethodError("give dim or calibrated=True, not both (calibrated fits a dim per layer)")
    if p.train_len is not None and p.train_len < 2:
        raise MethodError(f"train_len must be an integer >= 2, got {p.train_len}")
    if p.train_len is None and train_len is not None and train_len < 2:
        raise MethodError(f"needs a training length >= 2 (its factor divides by 1 - L^(-2/d), which is 0 at L = 1), "
                          f"got train_len={train_len}; pass the length the model was trained at")
    if p.train_len is not None and p.calibrated:
        raise MethodError("give train_len or calibrated=True, not both (the calibration fits d at the model's own "
                          "training length)")


def _v_logn(p, train_len):
    if p.train_len is not None and p.train_len < 2:
        raise MethodError(f"train_len must be an integer >= 2 (log 1 = 0), got {p.train_len}")
    if p.train_len is None and train_len is not None and train_len < 2:
        raise MethodError(f"needs a training length >= 2 (log 1 = 0), got train_len={train_len}")


def _infoscale_temperature(p, l, ctx):
    """sqrt(1 − l^(−2/d)) / sqrt(1 − L^(−2/d)) with d = ``dim``, the layer's calibrated dim, or the head dim, and
    L = ``train_len`` or the model's training length."""
    d, L = p.dim, p.train_len or ctx.train_len
    if p.calibrated:
        if ctx.dims is None:
            raise MethodError("infoscale(calibrated=True) needs a calibration: run `infoscale calibrate --model RUN` "
                              "(GAU runs) or infoscale.hf.calibrate(model, input_ids) first")
        d = ctx.dims
    if d is None:
        return scales.infoscale_factor(l, L, ctx.head_dim, clamp=p.clamp)
    d, L = float(d), float(L)  # a fitted d is a real number, not the head's integer dim
    l = l.double().clamp(min=1.0)
    if p.clamp:
        l = l.clamp(min=L)
    return scales.infoscale_ratio(l, L, d)


def _infoscale_with_dim(p, d):
    return dataclasses.replace(p, calibrated=False, dim=float(d))


def _window_with_true_positions(p) -> str:
    """LM-Infinite's Λ-mask, or StreamingLLM's, on a layer without RoPE: StreamingLLM's mask with the same sinks and
    window (positions within the cache mean nothing without RoPE)."""
    return f"streamingllm(sinks={p.sinks}, window={p.window}, true_positions=True)"


def _v_llama4(p, train_len):
    _v_positive(floor=1)(p, train_len)
    if not (p.beta >= 0 and math.isfinite(p.beta)):
        raise MethodError(f"llama4: beta must be a finite number >= 0, got {p.beta}")


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A registered method: its slots, parameter class, formula, source and the functions that fill
    its slots (see the module docstring)."""

    name: str
    slots: tuple[str, ...]
    params: type
    formula: str
    source: str
    train_time: bool = False  # the model must have been trained with it (it changes what the weights mean)
    trainable: bool = False  # `infoscale train --attention` accepts it
    validate: Callable | None = None  # (params, L) -> None, raises MethodError
    defaults: Callable | None = None  # (params, L) -> params
    normalize: Callable | None = None  # params -> s
    temperature: Callable | None = None  # (params, l, ctx) -> factor tensor
    positions: Callable | None = None  # (params, ctx) -> PositionEffect
    mask: Callable | None = None  # params -> (window, sinks)
    # params -> whether RoPE positions are those within the kept set (the sinks and the window), as a bounded KV
    # cache holds them (StreamingLLM): a sink j beyond the window of query i is rotated at distance
    # min(p_i, sinks + window) − p_j, every other pair at its true distance
    cache_positions: Callable | None = None
    training: Callable | None = None  # (params, L) -> f(gen, batch, length) -> positions
    # (params, L) -> transformers rope_parameters: the hf backend runs the model's own rotary with them (the
    # ecosystem's implementation, set through the config as a user would); the core computes the same positions
    rope_parameters: Callable | None = None
    causal_only: bool = False  # defined for causal attention only: bidirectional attention is refused
    # its positions are regions of pairs, each with its own positions (PositionEffect.regions); positions within a
    # bounded cache (cache_positions) do not compose with them
    piecewise: bool = False
    dynamic: Callable | None = None  # params -> whether the method depends on n (a cache keeps the prompt's n)
    # params -> the method string this one becomes on a layer without RoPE (a NoPE layer); None = itself if it sets
    # no positions, nothing if it does (there are no positions to move)
    without_rope: Callable | None = None
    # params -> whether the method runs on a per-layer fitted effective dimension (`infoscale calibrate`), given as
    # the Context's dims; None = it takes no calibration
    calibrated: Callable | None = None
    # (params, d) -> the same method with d, one layer's fitted dimension, written into its parameters
    with_dim: Callable | None = None


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in [
        Method("softmax", (), NoParams,
               "logits q·k/sqrt(d) with RoPE (the identity method)", "Vaswani et al. 2017; Su et al. 2021",
               trainable=True),
        Method("infoscale", ("temperature",), InfoScaleParams,
               "logits × sqrt(1 − l^(−2/d)) / sqrt(1 − L^(−2/d)); training-free",
               "Li et al. 2025, arXiv 2501.08570; dim/calibrated: d as an effective dimension fitted so each "
               "layer's attention entropy stays at its training-length value", trainable=True,
               validate=_v_infoscale, temperature=_infoscale_temperature, calibrated=lambda p: p.calibrated,
               with_dim=_infoscale_with_dim),
        Method("logn", ("temperature",), LognParams,
               "logits × max(1, log l / log L)", "Su 2021, kexue.fm/archives/8823, 9444", trainable=True,
               validate=_v_logn,
               temperature=lambda p, l, c: scales.logn_factor(l, p.train_len or c.train_len, clamp=p.clamp)),
        Method("softmax_plus", ("temperature",), SoftmaxPlusParams,
               "logits × log l / log base (GAU-α's pretraining scale)",
               "Su 2021, kexue.fm/archives/8823; bert4keras", trainable=True, validate=_v_softmax_plus,
               temperature=lambda p, l, c: scales.softmax_plus_factor(l, p.base)),
        Method("llama4", ("temperature",), Llama4Params,
               "logits × (1 + β·ln(1 + floor(l / F))); 1 for l < F",
               "Meta Llama 4 attn_temperature_tuning; Mistral Ministral 3 llama_4_scaling_beta",
               validate=_v_llama4, defaults=_fill(floor=lambda L: L),
               temperature=lambda p, l, c: scales.llama4_factor(l, p.beta, p.floor)),
        Method("cosscale", ("normalize",), CosScaleParams,
               "q, k L2-normalised; logits = s · cos(q, k); must be trained with",
               "Li et al. 2025, arXiv 2501.08570", train_time=True, trainable=True, validate=_v_positive(s=1),
               normalize=lambda p: float(p.s)),
        Method("pi", ("positions",), FactorParams,
               "RoPE positions × 1/s for s > 1", "Chen et al. 2023, arXiv 2306.15595",
               validate=_v_positive(factor=1), positions=_pi, dynamic=_no_factor),
        Method("ntk", ("positions",), FactorParams,
               "RoPE base × s^(d/(d−2)) for s > 1", "bloc97 2023 (NTK-aware scaled RoPE)",
               validate=_v_positive(factor=1), positions=_ntk, dynamic=_no_factor),
        Method("yarn", ("positions",), YarnParams,
               "NTK-by-parts ramp on the original L (β_fast, β_slow); q and k × (0.1 ln s + 1)",
               "Peng et al. 2023, arXiv 2309.00071", validate=_v_yarn, positions=_yarn, dynamic=_no_factor),
        Method("hf_linear", ("positions",), HFRopeParams,
               "transformers' rope_type 'linear': RoPE positions × 1/s (the formula of pi(factor=s)); in a "
               "transformers model, the model's own rotary with rope_parameters {rope_type: linear, factor: s}",
               "transformers modeling_rope_utils; Chen et al. 2023, arXiv 2306.15595",
               validate=_v_positive(factor=1), positions=_hf_linear, rope_parameters=_hf_rope("linear")),
        Method("hf_dynamic", ("positions",), HFRopeParams,
               "transformers' rope_type 'dynamic': RoPE base × (s·n/L − (s − 1))^(d/(d−2)) for n > L; in a "
               "transformers model, the model's own rotary with rope_parameters {rope_type: dynamic, factor: s}",
               "transformers modeling_rope_utils; emozilla 2023 (dynamically scaled RoPE)",
               validate=_v_positive(factor=1), positions=_hf_dynamic, rope_parameters=_hf_rope("dynamic"),
               dynamic=lambda p: True),
        Method("hf_yarn", ("positions",), HFRopeParams,
               "transformers' rope_type 'yarn' (the formula of yarn(factor=s), β_fast 32, β_slow 1, on L); in a "
               "transformers model, the model's own rotary with rope_parameters {rope_type: yarn, factor: s, "
               "original_max_position_embeddings: L}",
               "transformers modeling_rope_utils; Peng et al. 2023, arXiv 2309.00071. On a partial rotary "
               "(Phi-3) transformers scales only the rotated dims by the attention factor (it multiplies cos and "
               "sin), so there its logits differ from the formula, which scales the whole logit",
               validate=_v_positive(factor=1), positions=_hf_yarn, rope_parameters=_hf_rope("yarn")),
        Method("rerope", ("positions",), ReRoPEParams,
               "relative position sign(Δ)·min(|Δ|, w)", "Su 2023, kexue.fm/archives/9708",
               validate=_v_positive(window=1), defaults=_fill(window=_half), positions=_rerope, piecewise=True),
        Method("leaky_rerope", ("positions",), LeakyReRoPEParams,
               "relative position Δ for |Δ| <= w, else sign(Δ)·(w + (|Δ| − w)/k)",
               "Su 2023, kexue.fm/archives/9708", validate=_v_leaky, defaults=_fill(window=_half),
               positions=_leaky, dynamic=lambda p: p.k is None, piecewise=True),
        Method("self_extend", ("positions",), SelfExtendParams,
               "neighbour positions for |i − j| < W; beyond, keys at floor(p_j/G) and queries at "
               "floor(p_i/G) ± (W − floor(W/G)) (+ for keys to the left): Δ' = floor(p_j/G) − floor(p_i/G) "
               "∓ (W − floor(W/G))",
               "Jin et al. 2024 (LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning), arXiv "
               "2401.01325; github.com/datamllab/LongLM self_extend_patch/Llama.py (grouped logits where "
               "i − j >= W; query shift W − W/G there, W − W//G in Llama_4_40.py since May 2024: equal when "
               "G divides W)",
               validate=_v_self_extend, defaults=_fill(window=lambda L: max(1, L // 4)), positions=_self_extend,
               dynamic=lambda p: p.group is None, piecewise=True),
        Method("dca", ("positions",), DCAParams,
               "keys at p_j mod s; queries at p_i mod s (same chunk), min(s + p_i mod s, s + w − 1) (previous "
               "chunk), s + w − 1 (older chunks); chunk = floor(p / s); causal only",
               "An et al. 2024 (Training-Free Long-Context Scaling of Large Language Models), arXiv 2402.17463, "
               "Eq. 2-8 with c = s + w; github.com/HKUNLP/ChunkLlama chunkllama_attn_replace.py: its "
               "(chunk_size, local_window) is dca(chunk=chunk_size − local_window, local=local_window + 1)",
               validate=_v_positive(chunk=1, local=1), positions=_dca, causal_only=True, piecewise=True,
               defaults=_fill(chunk=lambda L: max(1, 3 * L // 4 - L // 8), local=lambda L: L // 8 + 1)),
        Method("alibi", ("positions",), AlibiParams,
               "no RoPE; bias −m·|i − j| with geometric slopes m; with right_bias, keys right of the query "
               "get slopes m' (−m'·(j − i))",
               "Press et al. 2022, arXiv 2108.12409; direction-aware biases: Raffel et al. 2020 (T5)",
               train_time=True, trainable=True, validate=_v_alibi, positions=_alibi),
        Method("pose", ("training",), PoseParams,
               "positional skip-wise training toward target; plain RoPE at evaluation",
               "Zhu et al. 2023, arXiv 2309.10400", train_time=True, trainable=True, validate=_v_pose,
               defaults=_fill(target=lambda L: 64 * L), training=_pose_training),
        Method("window", ("mask",), WindowParams,
               "mask |i − j| <= width", "Su 2023, kexue.fm/archives/9431 (local attention baseline)",
               validate=_v_positive(width=1), defaults=_fill(width=_half), mask=lambda p: (p.width, 0)),
        Method("streamingllm", ("mask",), StreamingParams,
               "mask |i − j| <= window, or i < sinks, or j < sinks; RoPE positions within the kept set (the sinks "
               "and the window): a sink j beyond the window is at distance min(i, sinks + window) − j, every other "
               "key at i − j (true_positions=True: every key at i − j)",
               "Xiao et al. 2023, arXiv 2309.17453, §3.2 (positions within the cache, not the text); "
               "github.com/mit-han-lab/streaming-llm: pos_shift (keys cached un-rotated, rotated at their cache "
               "index at every step; the query at its own) and StartRecentKVCache (start_size + recent_size keys)",
               validate=_v_sinks, defaults=_fill(window=_half), mask=lambda p: (p.window, p.sinks),
               cache_positions=lambda p: not p.true_positions, without_rope=_window_with_true_positions),
        Method("lm_infinite", ("mask", "positions"), LMInfiniteParams,
               "Λ-mask (|i − j| <= window or sink row/column) and relative position "
               "sign(Δ)·min(|Δ|, cap)", "Han et al. 2023, arXiv 2308.16137", validate=_v_sinks,
               defaults=_fill(window=lambda L: max(1, L - 1), cap=lambda L: L),
               mask=lambda p: (p.window, p.sinks), positions=_lm_infinite_positions, piecewise=True,
               without_rope=_window_with_true_positions),
    ]
}


@dataclass(frozen=True)
class Component:
    """One parsed ``name(params)`` term of a method string."""

    name: str
    params: object

    @property
    def method(self) -> Method:
        return REGISTRY[self.name]

    def resolved(self, train_len: int) -> Component:
        d = self.method.defaults
        return Component(self.name, d(self.params, train_len)) if d else self

    def __str__(self) -> str:
        quiet = {f.name: f.default for f in dataclasses.fields(self.params) if f.metadata.get("quiet")}
        kv = {k: v for k, v in dataclasses.asdict(self.params).items() if not (k in quiet and v == quiet[k])}
        if not kv:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in kv.items()) + ")"

    def short(self) -> str:
        """Only the parameters that differ from their defaults."""
        defaults = self.method.params()
        kv = {k: v for k, v in dataclasses.asdict(self.params).items() if getattr(defaults, k) != v}
        return self.name + ("(" + ", ".join(f"{k}={v!r}" for k, v in kv.items()) + ")" if kv else "")


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


_MAX_VALUE = 1e9  # parameters are lengths, scales and slopes: anything beyond is a typo or an attack


def _coerce(method: str, name: str, value, typ) -> object:
    """Check a literal against a dataclass field's annotation (int, float, bool, or X | None)."""
    allowed = [t.strip() for t in str(typ).split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise MethodError(f"{method}: parameter {name} may not be None")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (
            abs(value) > _MAX_VALUE or not math.isfinite(value) or 0 < abs(value) < 1 / _MAX_VALUE):
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:30] + "…"
        raise MethodError(f"{method}: parameter {name} = {shown} is out of range (|value| between "
                          f"{1 / _MAX_VALUE:g} and {_MAX_VALUE:g}, or 0)")
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
        except (RecursionError, MemoryError, ValueError, OverflowError):  # absurdly nested or huge literals
            raise MethodError(f"{name}: cannot parse parameters {args[:40]!r}...: too deeply nested or too large"
                              ) from None
        if not isinstance(call, ast.Call):
            raise MethodError(f"{name}: cannot parse parameters {args!r}; expected key=value, ...")
        if call.args:
            raise MethodError(f"{name}: parameters must be given as key=value, got {args!r}")
        fields = {f.name: f for f in dataclasses.fields(meth.params)}
        for kw in call.keywords:
            if kw.arg not in fields:
                ok = ", ".join(fields) or "none"
                raise MethodError(f"{name}: unknown parameter {kw.arg!r}; its parameters: {ok}")
            if kw.arg in kwargs:
                raise MethodError(f"{name}: parameter {kw.arg} is given twice")
            try:
                value = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError):
                raise MethodError(f"{name}: parameter {kw.arg} must be a literal number, bool or None") from None
            kwargs[kw.arg] = _coerce(name, kw.arg, value, fields[kw.arg].type)
    return Component(name, meth.params(**kwargs))


@dataclass(frozen=True)
class ParsedMethod:
    """A validated combination of components, at most one per slot. Frozen and hashable: parse once
    at the edge and pass this around."""

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

    def calibrated(self) -> bool:
        """Whether a component runs on the per-layer dimension ``infoscale calibrate`` fits (its registry entry
        says which parameters ask for it)."""
        return any(c.method.calibrated is not None and c.method.calibrated(c.params) for c in self.components)

    @property
    def train_time(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.method.train_time)

    def resolved(self, train_len: int) -> ParsedMethod:
        """The same method with every length-dependent default filled in for this training length."""
        return ParsedMethod(tuple(c.resolved(train_len) for c in self.components))

    def training_positions(self, train_len: int):
        """``f(gen, batch, length) -> positions`` for training (PoSE), or None for 0..L−1."""
        for c in self.resolved(train_len).components:
            if c.method.training is not None:
                return c.method.training(c.params, train_len)
        return None

    def short(self) -> str:
        """A label: names with only their non-default parameters (``cosscale(s=32.0)+rerope``)."""
        return "+".join(c.short() for c in self.components) or "softmax"

    def __str__(self) -> str:
        # kept after the first call: the transformers backend keys its per-forward memos by it at every layer
        text = self.__dict__.get("_text")
        if text is None:
            text = "+".join(str(c) for c in self.components) or "softmax"
            object.__setattr__(self, "_text", text)
        return text


_MAX_SPEC = 2000  # characters: a method string is short; longer input is refused before parsing


def parse_method(spec: str | ParsedMethod, train_len: int | None = None) -> ParsedMethod:
    """Parse ``"name(k=v)+name2"`` into a validated :class:`ParsedMethod`.

    ``softmax`` is the identity and is dropped when combined. Raises :class:`MethodError` for unknown
    names or parameters, ill-typed or out-of-range values and two methods that fill the same slot;
    with ``train_len``, also for values that do not fit that training length.
    """
    if isinstance(spec, ParsedMethod):
        pm = spec
    else:
        if not isinstance(spec, str) or not spec.strip():
            raise MethodError(f"a method must be a non-empty string such as 'infoscale', got {spec!r}")
        if len(spec) > _MAX_SPEC:
            raise MethodError(f"a method string of {len(spec)} characters is too long (at most {_MAX_SPEC})")
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
    moved = [c.name for c in pm.components
             if c.method.cache_positions is not None and c.method.cache_positions(c.params)]
    piecewise = [c.name for c in pm.components if c.method.piecewise]
    if moved and piecewise:
        raise MethodError(f"{moved[0]}'s positions within the cache do not compose with {piecewise[0]}'s piecewise "
                          f"positions; give {moved[0]}(true_positions=True) to combine them")
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
    CosScale, ALiBi, a length temperature (``softmax_plus``); a training-only recipe (PoSE) is
    dropped. The evaluation method adds to it; a slot filled by both must hold the same component
    (a model trained with ``softmax_plus`` keeps it: adding ``infoscale`` would scale twice). Asking
    for a train-time method the model was not trained with is refused.
    """
    tm, em = parse_method(train_method, train_len), parse_method(eval_method, train_len)
    for c in em.train_time:
        if c.method.training is not None:
            continue
        mine = tm.get(c.name)
        if mine is None:
            raise MethodError(
                f"{c.name} is a train-time method and this model was trained with '{tm}'; "
                f"evaluate it with a training-free method or train a model with {c.name}")
        if mine != c.params:
            raise MethodError(f"this model was trained with {Component(c.name, mine)}, not {c}")
    inherited = [c for c in tm.components if c.method.training is None]
    for c in inherited:
        for slot in c.method.slots:
            other = em.slot(slot)
            if other is not None and other != c:
                if c.method.train_time and slot == "positions":
                    raise MethodError(f"{other.name} changes the positions, but this model was trained with {c} "
                                      f"(no RoPE); it does not apply")
                raise MethodError(f"this model was trained with {c}, which sets the attention {slot}; "
                                  f"{other} would replace it, so it does not apply to this model")
    comps = [c for c in inherited if em.get(c.name) is None]
    comps += [c for c in em.components if c.method.training is None]
    return parse_method(ParsedMethod(tuple(comps)), train_len)
