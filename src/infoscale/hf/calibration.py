"""A forward pass with a view into every layer's attention: :func:`calibrate` (InfoScale's per-layer dims) and
:func:`capture_attention` (the method's logits, for analysis). Both run the model inside a
:func:`infoscale.hf.capture.capturing` block."""

from __future__ import annotations

import torch

from ..attn import parse_method
from ..errors import ConfigError, MethodError
from ..models import train_len_of
from .capture import capturing
from .patch import _STATE_ATTR, _attention_modules, apply


def calibrate(model, input_ids, *, lengths: list[int] | None = None, train_len: int | None = None, rows: int = 32,
              seed: int = 0, log=None) -> dict:
    """Fit InfoScale's effective dimension per layer on ``model``'s own attention (see :mod:`infoscale.calibrate`)
    and apply ``infoscale(calibrated=True)``.

    ``input_ids`` (windows, N): a few windows of the user's text (unlabelled), each at least the longest length.
    The target of layer ℓ is its mean H / ln l at the training length L (the first L tokens of each window); the
    fit runs at ``lengths`` (default 4L, 16L, … up to N), on the first n tokens of each window, over ``rows``
    seeded query positions from the last half (the same for every layer and window; for a causal model those
    attend n/2 … n keys), every head. Layers are fitted in order (layer ℓ sees inputs from the calibrated layers
    before it; its forwards stop after it), by ``module.layer_idx``. The dims are stored in
    ``config.infoscale["dims"]`` (saved by ``save_pretrained``; ``apply(model)`` after reloading uses them; another
    ``apply`` or ``remove`` keeps them).
    Returns the calibration (as ``calibration.json`` holds it)."""
    from ..calfit import calibrate_layers

    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    L = int(train_len) if train_len is not None else train_len_of(model.config)
    N = ids.shape[1]
    lengths = list(lengths) if lengths else [n for n in (4 * L, 16 * L, 64 * L) if n <= N]
    if not lengths or any(n <= L or n > N for n in lengths):
        raise ConfigError(f"calibrate needs lengths above L = {L} and at most the text's {N} tokens; got "
                          f"{lengths or 'none (the text is shorter than 4L: give longer windows or lengths=)'}")
    saved = getattr(model.config, "infoscale", None)
    if isinstance(saved, dict) and saved.get("method"):
        merged = parse_method(saved["method"], L)
        if any(c.method.calibrated is None and "temperature" in c.method.slots for c in merged.components):
            raise MethodError(f"the model runs {saved['method']}, another length temperature; calibrate fits InfoScale")
    apply(model, "infoscale(calibrated=True)", train_len=L)
    layers = max(m.layer_idx for _, m in _attention_modules(model)) + 1
    head_dim = None
    gen = torch.Generator().manual_seed(seed)

    picked = {}

    def pick(n_q):  # drawn once per length: every layer and window reads the same rows, however many forwards run
        if n_q not in picked:
            lo = n_q // 2
            picked[n_q] = (torch.arange(lo, n_q) if n_q - lo <= rows
                           else (lo + torch.randperm(n_q - lo, generator=gen)[:rows]).sort().values)
        return picked[n_q]

    def capture(dims, n, w, upto=None):
        hd = head_dim or 64
        model.config.infoscale["dims"] = [hd if d is None else float(d) for d in dims]
        need = layers if upto is None else upto + 1
        with capturing(rows=pick, upto=upto) as got, torch.no_grad():  # the layers after upto cannot matter
            model(ids[w:w + 1, :n].to(model.device))
        if any(i not in got for i in range(need)):
            if upto is not None:  # the layers do not run in layer_idx order: the whole forward
                return capture(dims, n, w)
            raise ConfigError(f"calibrate saw {len(got)} of {layers} attention layers; this model does not route "
                              "every layer through transformers' attention interface")
        return [got[i] for i in range(need)]

    was_training = model.training
    model.eval()
    try:
        first = _attention_modules(model)[0][1]
        head_dim = int(getattr(first, "head_dim", 0) or model.config.hidden_size // model.config.num_attention_heads)
        cal = calibrate_layers(capture, layers, lengths, ids.shape[0], L, head_dim, rows=rows, seed=seed,
                               log=log or (lambda s: None))
    finally:
        model.train(was_training)
    model.config.infoscale["dims"] = cal["dims"]
    # the fit belongs to the model, not to this apply: remove() (and so another apply) keeps it, as loading a
    # calibrated pretrained model does
    state = getattr(model, _STATE_ATTR)
    before = state["infoscale"] if isinstance(state["infoscale"], dict) else {}
    state["infoscale"] = {**before, "dims": cal["dims"]}
    return cal


def capture_attention(model, input_ids, reduce, *, chunk: int = 256) -> list[list]:
    """Run ``model`` (a method applied with :func:`infoscale.hf.apply`) once on ``input_ids`` and hand every
    layer's attention logits under its method to ``reduce``, ``chunk`` query rows at a time; returns, per layer in
    ``layer_idx`` order, the list of ``reduce``'s results (one per chunk, in row order).

    ``reduce(logits, q_pos, k_pos)``: ``logits`` (H, r, n_k) float32 of batch row 0, every head (GQA heads
    repeated), with masked keys (causal, the method's window or sinks, padding) at the dtype's minimum;
    ``q_pos`` (r,), ``k_pos`` (n_k,) float64, the positions of the queries and keys as the core sees them. The
    logits are the reference path's (:func:`infoscale.attn.attention_logits`) with the call's own arguments,
    after the length temperature, moved positions and masks of the method; a row's weights are their softmax.
    The forward's output is unchanged (the usual path still computes it). Used by ``infoscale analyze`` for
    attention entropy on causal runs; keep ``reduce`` small (per-row sums), not the logits."""
    if getattr(model, _STATE_ATTR, None) is None:
        raise ConfigError("capture_attention needs a model whose attention runs a method: call "
                          "infoscale.hf.apply(model, method) first")
    if chunk < 1:
        raise ConfigError(f"chunk must be a positive number of query rows, got {chunk}")
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    want = sorted({m.layer_idx for _, m in _attention_modules(model)})
    was_training = model.training
    model.eval()
    try:
        with capturing(reduce=reduce, chunk=chunk) as got, torch.no_grad():
            model(ids.to(model.device))
    finally:
        model.train(was_training)
    if sorted(got) != want:
        raise ConfigError(f"capture_attention saw {len(got)} of {len(want)} attention layers; this model does not "
                          "route every layer through transformers' attention interface")
    return [got[i] for i in want]
