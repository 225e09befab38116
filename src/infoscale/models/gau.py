"""GAU-α, a masked-language-model encoder of gated attention units (Su et al. 2022).

Layer by layer (bert4keras 0.11.3 semantics; github.com/ZhuiyiTechnology/GAU-alpha):

    x₀ = RMSNorm(Dropout(E_tok[ids] + E_seg[segments]))          no position embeddings
    h  = swish(x W_i) → [u | v | z]  (e, e, s wide)              one dense for gate, value, q/k stem
    q  = z ⊙ γ_q,  k = z ⊙ γ_k                                    per-dimension scales, no offset
    A  = attention(q, k, method) (RoPE inside, single head)
    x  = RMSNorm(x + Dropout((u ⊙ A v) W_o))                      post-norm, parameter-free RMS
    logits = Dropout(x) E_tokᵀ                                    MLM head tied to the embeddings

Module names follow the GAU-alpha-pytorch port (github.com/JunnYu/GAU-alpha-pytorch):
``gau_alpha.embeddings.word_embeddings``, ``gau_alpha.encoder.layer.N.gau.i_dense`` …, so its
checkpoints convert by name. Every attention computation goes through :func:`infoscale.attention`.
The training method (``softmax``, ``softmax_plus``, ``cosscale(s)``, ``alibi``, ``pose(target)``) is
``config.attention``. The method used in eval mode is ``config.eval_attention`` merged with the
training method (whatever changes the function the model computes is inherited: CosScale, ALiBi, a
length temperature); a single forward can use another one with ``forward(..., method=...)``.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from ..attn import attention, build_plan, merge_with_training, parse_method
from ..attn.errors import MethodError
from ..attn.methods import ParsedMethod
from ..attn.plan import with_dims
from ..errors import ConfigError, DataError

PRESETS = {
    # seconds on a laptop: for tests
    "tiny": dict(hidden_size=64, intermediate_size=128, attention_key_size=32, num_hidden_layers=2),
    # minutes on two CPU cores
    "small": dict(hidden_size=256, intermediate_size=512, attention_key_size=64, num_hidden_layers=4),
    # the official code's fine-tuning shape (6 of GAU-α's 24 layers); for a GPU
    "paper": dict(hidden_size=768, intermediate_size=1536, attention_key_size=128, num_hidden_layers=6),
}


class GAUConfig(PreTrainedConfig):
    """GAU-α hyper-parameters plus the attention method it was trained with.

    ``cosscale_init`` chooses how γ_q, γ_k start when training with CosScale: ``"apart"`` (default)
    draws them as independent random signs so that q_i and k_i start nearly orthogonal instead of
    equal; ``"ones"`` is GAU-α's init (q = k at step 0). See :func:`GAUForMaskedLM._init_weights`.
    """

    model_type = "gau_alpha"

    def __init__(self, vocab_size: int = 100, hidden_size: int = 256, intermediate_size: int = 512,
                 attention_key_size: int = 64, num_hidden_layers: int = 4, type_vocab_size: int = 2,
                 hidden_dropout_prob: float = 0.1, attention_probs_dropout_prob: float = 0.1,
                 layer_norm_eps: float = 1e-12, train_len: int = 64, attention: str = "softmax",
                 eval_attention: str | None = None, cosscale_init: str = "apart", pad_token_id: int = 0,
                 **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.attention_key_size = attention_key_size
        self.num_hidden_layers = num_hidden_layers
        self.type_vocab_size = type_vocab_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        if not isinstance(train_len, int) or train_len < 2:
            raise ConfigError(f"GAUConfig: train_len must be an integer >= 2, got {train_len!r}")
        for name, v in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("intermediate_size",
                        intermediate_size), ("attention_key_size", attention_key_size),
                        ("num_hidden_layers", num_hidden_layers)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"GAUConfig: {name} must be a positive integer, got {v!r}")
        if attention_key_size % 2:
            raise ConfigError(f"GAUConfig: attention_key_size must be even for RoPE, got {attention_key_size}")
        if cosscale_init not in ("apart", "ones"):
            raise ConfigError(f"GAUConfig: cosscale_init must be 'apart' or 'ones', got {cosscale_init!r}")
        self.train_len = train_len
        self.attention = str(parse_method(attention, train_len))
        if eval_attention is not None:  # refused now, not at the first forward
            merge_with_training(self.attention, eval_attention, train_len)
        self.eval_attention = eval_attention
        self.cosscale_init = cosscale_init
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """y / sqrt(mean(y²) + eps): no centring, no learned scale (bert4keras zero_mean=False, scale=False)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


class GatedAttentionUnit(nn.Module):
    def __init__(self, config: GAUConfig):
        super().__init__()
        e, s = config.intermediate_size, config.attention_key_size
        self.e, self.s = e, s
        self.i_dense = nn.Linear(config.hidden_size, 2 * e + s, bias=False)
        self.o_dense = nn.Linear(e, config.hidden_size, bias=False)
        self.q_scaleoffset = nn.Parameter(torch.ones(s))  # γ_q (names as in GAU-α's checkpoint)
        self.k_scaleoffset = nn.Parameter(torch.ones(s))  # γ_k
        self.config = config

    def qkv(self, x):
        """(u, v, q, k) of hidden states x (B, n, hidden): the gate, the value and q, k before RoPE."""
        u, v, z = torch.split(F.silu(self.i_dense(x)), [self.e, self.e, self.s], dim=-1)
        return u, v, z * self.q_scaleoffset, z * self.k_scaleoffset

    def forward(self, x, plan, attn_options=None):
        u, v, q, k = self.qkv(x)
        a = attention(q[:, None], k[:, None], v[:, None], plan.method, train_len=self.config.train_len, plan=plan,
                      dropout_p=self.config.attention_probs_dropout_prob, training=self.training,
                      **(attn_options or {}))
        return self.o_dense(u * a[:, 0].to(u.dtype))


class GAULayer(nn.Module):
    def __init__(self, config: GAUConfig):
        super().__init__()
        self.gau = GatedAttentionUnit(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.eps = config.layer_norm_eps

    def forward(self, x, plan, attn_options=None):
        return rms_norm(x + self.dropout(self.gau(x, plan, attn_options)), self.eps)


class GAUPreTrainedModel(PreTrainedModel):
    config_class = GAUConfig
    base_model_prefix = "gau_alpha"
    _no_split_modules = ["GAULayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        """GAU-α's init: truncated normal (±2σ) with std 1/sqrt(fan_in) · N^(−1/3), N = layers (the cube
        root because a GAU layer is roughly cubic in its weights; bert4keras's GAU-α code). γ_q, γ_k = 1,
        except for CosScale with ``cosscale_init="apart"``: independent random signs.

        Why: in GAU q and k are per-dimension scalings of one vector z, so with γ_q = γ_k they are equal
        at step 0 and cos(q_i, k_i) = 1 > cos(q_i, k_j). Plain dot-product attention shrugs this off,
        but CosScale multiplies the cosines by s: at s = 128 the self logit leads every other by ~100,
        each token attends only to itself, the attention gradients vanish and the model never learns
        to use context (measured: 15% accuracy vs 66% for softmax). With random signs, cos(q_i, k_i) is
        Σ_m z_m² ε_m / |z|² ≈ 0 ± 1/sqrt(s), like any other pair, and the norms and the rest of the
        init are untouched.
        """
        cfg = self.config
        depth = max(cfg.num_hidden_layers, 1) ** (-1 / 3)
        if isinstance(module, nn.Linear):
            std = depth / math.sqrt(module.in_features) / 0.87962566  # undo the ±2σ truncation's shrink
            hf_init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, nn.Embedding):
            std = depth / math.sqrt(cfg.hidden_size) / 0.87962566
            hf_init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, GatedAttentionUnit):
            cos = parse_method(cfg.attention).slot("normalize") is not None  # cosine attention (CosScale)
            if cos and cfg.cosscale_init == "apart":
                for p in (module.q_scaleoffset, module.k_scaleoffset):
                    hf_init.copy_(p, torch.randint(0, 2, p.shape).float() * 2 - 1)
            else:
                hf_init.ones_(module.q_scaleoffset)
                hf_init.ones_(module.k_scaleoffset)


class GAUEmbeddings(nn.Module):
    def __init__(self, config: GAUConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.eps = config.layer_norm_eps

    def forward(self, input_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return rms_norm(self.dropout(x), self.eps)


class GAUEncoder(nn.Module):
    def __init__(self, config: GAUConfig):
        super().__init__()
        self.layer = nn.ModuleList(GAULayer(config) for _ in range(config.num_hidden_layers))


class GAUModel(GAUPreTrainedModel):
    """The GAU-α encoder: embeddings and GAU layers, no head."""

    def __init__(self, config: GAUConfig):
        super().__init__(config)
        self.embeddings = GAUEmbeddings(config)
        self.encoder = GAUEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def resolve_method(self, method: str | ParsedMethod | None = None) -> ParsedMethod:
        """The method attention runs with: while training, the training method; in eval mode, ``method``
        (or ``config.eval_attention``) merged with the training method."""
        cfg = self.config
        if self.training:
            return parse_method(cfg.attention, cfg.train_len)
        pm = merge_with_training(cfg.attention, method or cfg.eval_attention or "softmax", cfg.train_len)
        only = [c.name for c in pm.components if c.method.causal_only]
        if only:  # refused here, so evaluation skips it as a method that does not apply to this model
            raise MethodError(f"{only[0]} is defined for causal attention only; GAU's attention is bidirectional")
        return pm

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: bool | None = None, method: str | ParsedMethod | None = None,
                attn_options: dict | None = None, return_dict: bool = True, **kwargs) -> BaseModelOutput:
        """``attention_mask``: (B, n), 1 for real tokens. ``position_ids``: RoPE positions (PoSE training).
        ``method``: evaluate this forward with another method (merged with the training one)."""
        pm = self.resolve_method(method)
        cfg = self.config
        b, n = input_ids.shape
        plan = build_plan(pm, n=n, batch=b, heads=1, head_dim=cfg.attention_key_size, train_len=cfg.train_len,
                          key_padding_mask=attention_mask, positions=position_ids, device=input_ids.device)
        plans = [plan] * len(self.encoder.layer)  # one plan for all layers: same method, shapes and masks
        if pm.calibrated():  # per-layer d (infoscale calibrate): only the temperature differs
            dims = getattr(self, "infoscale_dims", None)
            if dims is None and getattr(self, "calibration_file", None) is not None:  # read when first needed
                attach(self, self.calibration_file)
                dims = self.infoscale_dims
            if dims is None:
                raise MethodError("infoscale(calibrated=True) needs this model's calibration: run `infoscale calibrate "
                                  "--model RUN` (then load the run again) or infoscale.models.gau.attach(model, ...)")
            plans = [with_dims(plan, d) for d in dims]
        x = self.embeddings(input_ids, token_type_ids)
        hidden = (x,) if output_hidden_states else None
        for layer, lplan in zip(self.encoder.layer, plans, strict=True):
            x = layer(x, lplan, attn_options)
            if output_hidden_states:
                hidden = hidden + (x,)
        return BaseModelOutput(last_hidden_state=x, hidden_states=hidden)


# Parameter names of infoscale 0.1 (a flat module: word_embeddings, layers.N.gau...) -> today's
FIRST_FORMAT_KEYS = {r"^word_embeddings": "gau_alpha.embeddings.word_embeddings",
                     r"^token_type_embeddings": "gau_alpha.embeddings.token_type_embeddings",
                     r"^layers\.": "gau_alpha.encoder.layer."}


class GAUForMaskedLM(GAUPreTrainedModel):
    """GAU-α encoder with its tied, bias-free MLM head."""

    _tied_weights_keys = {}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' ``from_pretrained``; runs saved by infoscale 0.1 (flat parameter names) load too."""
        kwargs.setdefault("key_mapping", FIRST_FORMAT_KEYS)
        return super().from_pretrained(*args, **kwargs)

    def __init__(self, config: GAUConfig):
        super().__init__(config)
        self.gau_alpha = GAUModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.post_init()

    def get_input_embeddings(self):
        return self.gau_alpha.embeddings.word_embeddings

    def resolve_method(self, method: str | ParsedMethod | None = None) -> ParsedMethod:
        return self.gau_alpha.resolve_method(method)

    @classmethod
    def from_official(cls, path, **kwargs) -> GAUForMaskedLM:
        """A checkpoint in the GAU-alpha-pytorch / official InfoScale layout (see :mod:`infoscale.convert`)."""
        from ..convert import from_official

        return from_official(path, **kwargs)

    def set_input_embeddings(self, value):
        self.gau_alpha.embeddings.word_embeddings = value

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, labels=None,
                output_hidden_states: bool | None = None, method: str | ParsedMethod | None = None,
                attn_options: dict | None = None, return_dict: bool = True, **kwargs) -> MaskedLMOutput:
        """Logits (B, n, vocab); with ``labels`` (−100 where no prediction is wanted) also the mean
        cross-entropy over the labelled positions."""
        out = self.gau_alpha(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                             method, attn_options)
        logits = F.linear(self.dropout(out.last_hidden_state), self.gau_alpha.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


def build_config(preset: str = "small", **overrides) -> GAUConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return GAUConfig(**{**PRESETS[preset], **overrides})


# The training methods GAU-α trains with: every trainable method of the registry.
TRAIN_METHODS = None
# What a model initialised from another run (--init-from) takes from that run's config: its shape.
SHAPE = ("hidden_size", "intermediate_size", "attention_key_size", "num_hidden_layers", "type_vocab_size")


def build_for_training(cfg, tok, source=None) -> GAUForMaskedLM:
    """A freshly initialised GAU-α masked LM for an ``infoscale train`` config (seeded by the caller): the preset's
    size (or ``source``'s shape), the run's vocabulary, L, training method, dropout and CosScale init."""
    shape = {k: getattr(source.config, k) for k in SHAPE} if source is not None else {}
    mcfg = build_config(cfg.preset, vocab_size=len(tok), train_len=cfg.train_len, attention=cfg.attention,
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                        cosscale_init=cfg.cosscale_init, **shape)
    return GAUForMaskedLM(mcfg)


AutoConfig.register(GAUConfig.model_type, GAUConfig, exist_ok=True)
AutoModel.register(GAUConfig, GAUModel, exist_ok=True)
AutoModelForMaskedLM.register(GAUConfig, GAUForMaskedLM, exist_ok=True)


@torch.no_grad()
def attention_inputs(model: GAUForMaskedLM, input_ids, method: str | ParsedMethod | None = None):
    """Per layer, the (q, k) of shape (B, 1, n, d) that reach attention (before RoPE), from one forward
    pass of ``model`` with ``method``."""
    captured = []
    hooks = [layer.gau.register_forward_hook(lambda mod, args, out: captured.append(mod.qkv(args[0])[2:]))
             for layer in model.gau_alpha.encoder.layer]
    try:
        model(input_ids, method=method)
    finally:
        for h in hooks:
            h.remove()
    return [(q[:, None], k[:, None]) for q, k in captured]


def read_calibration(path: str | Path) -> dict:
    """A calibration.json (written by ``infoscale calibrate``), checked: a JSON object whose ``dims`` is a list of
    positive finite numbers. A damaged file is a :class:`DataError` naming it and how to redo it."""
    path = Path(path)
    redo = f"run `infoscale calibrate --model {path.parent}` again to redo it"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 2**20:
            raise DataError(f"{path} is not a calibration (a regular file of at most 1 MiB); {redo}")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}: {str(e)[:80]}); {redo}") from None
    dims = obj.get("dims") if isinstance(obj, dict) else None
    if not isinstance(dims, list) or not dims:
        raise DataError(f"{path} is damaged: it has no list of per-layer dims ('dims'); {redo}")
    for i, d in enumerate(dims):
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            raise DataError(f"{path} is damaged: dims[{i}] = {d!r} is not a positive finite number; {redo}")
    return obj


def attach(model, calibration: dict | str | Path | None) -> None:
    """Give a GAU model its calibrated dimensions (from a dict or a calibration.json); None removes them."""
    where = "the calibration"
    if isinstance(calibration, (str, Path)):
        where, calibration = str(calibration), read_calibration(calibration)
    base = getattr(model, "base_model", model)
    dims = None if calibration is None else [float(d) for d in calibration["dims"]]
    if dims is not None and len(dims) != len(base.encoder.layer):
        raise ConfigError(f"{where} has {len(dims)} layers but the model has {len(base.encoder.layer)}; "
                          "rerun `infoscale calibrate` for this model")
    base.infoscale_dims = dims
