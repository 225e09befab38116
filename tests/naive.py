"""An independent, plain implementation of every method, for the tests.

Nothing here imports the package. Every logit is written from its per-position formula: the RoPE
score of a query and key at relative position Δ' is

    Σ_m cos(Δ' θ_m)(q_2m k_2m + q_2m+1 k_2m+1) + sin(Δ' θ_m)(q_2m+1 k_2m − q_2m k_2m+1),

(the value of ⟨R(p_i) q, R(p_j) k⟩ when Δ' = p_j − p_i), with frequencies θ and the effective
relative position Δ' of each method spelled out below. Computed in float64 numpy, the same formula for
every (i, j) pair at once: arrays indexed [i, j] (query, key), [i, j, m] with the frequency pair m.
"""

from __future__ import annotations

import math

import numpy as np

BASE = 10000.0


def theta(d):
    return np.array([BASE ** (-2 * m / d) for m in range(d // 2)])


def yarn_theta(d, s, L, beta_fast=32.0, beta_slow=1.0):
    # pair index at which a frequency makes `rot` full turns over L: θ_m L = 2π rot
    def index(rot):
        return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(BASE))

    lo = max(math.floor(index(beta_fast)), 0)
    hi = min(math.ceil(index(beta_slow)), d - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for m, t in enumerate(theta(d)):
        ramp = min(max((m - lo) / (hi - lo), 0.0), 1.0)  # 0: keep θ (extrapolate), 1: θ/s
        out.append((1 - ramp) * t + ramp * t / s)
    return np.array(out)


def self_extend_group(n, L, W):
    """The smallest group size whose grouped relative positions all stay below L (the largest is the last query's
    distance to key 0)."""
    G = 1
    while math.floor((n - 1) / G) + W - math.floor(W / G) > L - 1:
        G += 1
    return G


def self_extend_delta(pi, pj, W, G):
    """SelfExtend (Jin et al. 2024, arXiv 2401.01325): the plain distance inside the neighbour window |Δ| < W;
    outside it, the key sits at ⌊p_j/G⌋ and the query at ⌊p_i/G⌋ + (W − ⌊W/G⌋) (key on the left; mirrored,
    − (W − ⌊W/G⌋), for a key on the right). ``pi``, ``pj``: arrays of the same shape (or numbers)."""
    shift = W - math.floor(W / G)
    query = np.floor(pi / G) + np.where(pj < pi, shift, -shift)
    return np.where(np.abs(pj - pi) < W, pj - pi, np.floor(pj / G) - query)


def dca_delta(pi, pj, s, w):
    """Dual Chunk Attention (An et al. 2024, arXiv 2402.17463, Eq. 2, 5, 7, 8), pretraining length c = s + w:
    P_k = p_j mod s; the query is P_q^Intra = p_i mod s in the key's chunk, P_q^Succ = s + (p_i mod s) for its
    first w positions and c − 1 after them when the key's chunk is the one before, P_q^Inter = c − 1 otherwise.
    ``pi``, ``pj``: arrays of the same shape (or numbers)."""
    c = s + w
    gap = np.floor(pi / s) - np.floor(pj / s)
    succ = np.where(pi % s < w, s + pi % s, c - 1)
    query = np.where(gap <= 0, pi % s, np.where(gap == 1, succ, c - 1))
    return pj % s - query


def naive_attention(q, k, v, method: dict, L: int, causal=False, pad=None, positions=None):
    """q, k: (B, H, n, d), v: (B, H, n, e) numpy; ``method`` is a dict of plain settings:

    temp: None|'infoscale'|'infoscale_noclamp'|'logn'|'softmax_plus'|'llama4' (beta, floor); cos_s: CosScale s or None;
    pos: None|'pi'|'ntk'|'yarn'|'hf_dynamic'|'rerope'|'leaky'|'lminf'|'alibi'|'self_extend'|'dca' with w, k, cap,
    factor (alibi: slopes, and right_slopes for keys right of the query; self_extend: w and group, None = per
    length; dca: chunk, local); infoscale's dim replaces d in its formula and temp_len replaces L in infoscale's
    and logn's;
    mask: None|'window'|'sinks' with w, sinks; kept: positions within the kept set (the sinks and the window, each at
    its index there: StreamingLLM's cache positions).
    Returns (out, weights).
    """
    B, H, n, d = q.shape
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    out = np.zeros(v.shape)
    weights = np.zeros((B, H, n, n))
    p = np.arange(n, dtype=np.float64) if positions is None else np.asarray(positions, dtype=np.float64)
    i_idx, j_idx = np.arange(n)[:, None], np.arange(n)[None, :]  # [i, j]: query i, key j (indices)
    Pi, Pj = np.meshgrid(p, p, indexing="ij")  # [i, j]: their positions
    pos = method.get("pos")
    for b in range(B):
        n_real = n if pad is None else int(pad[b].sum())
        real = np.ones(n, bool) if pad is None else pad[b].astype(bool)
        s = max(1.0, n_real / L) if method.get("factor") is None else method["factor"]
        if pos == "pi":
            th = theta(d) / s
        elif pos == "ntk":
            th = np.array([(BASE * s ** (d / (d - 2))) ** (-2 * m / d) for m in range(d // 2)])
        elif pos == "yarn":
            th = yarn_theta(d, s, L)
        elif pos == "hf_dynamic":  # base·(s·max(n, L)/L − (s − 1))^(d/(d−2)), s fixed
            grown = BASE * (s * max(n_real, L) / L - (s - 1)) ** (d / (d - 2))
            th = np.array([grown ** (-2 * m / d) for m in range(d // 2)])
        else:
            th = theta(d)
        mscale2 = (0.1 * math.log(s) + 1) ** 2 if pos == "yarn" and s > 1 else 1.0

        # which keys each query may attend: real keys, minus causality and the method's mask
        allowed = real[None, :] & np.ones((n, n), bool)
        if causal:
            allowed &= j_idx <= i_idx
        if method.get("mask") == "window":
            allowed &= np.abs(i_idx - j_idx) <= method["w"]
        if method.get("mask") == "sinks":
            S = method["sinks"]
            allowed &= ~((np.abs(i_idx - j_idx) > method["w"]) & (i_idx >= S) & (j_idx >= S))
        l = allowed.sum(1)  # keys per query

        # the query's position for each pair
        q_at = Pi
        if method.get("kept"):
            # positions within the kept set (StreamingLLM's cache): the sinks, then the window up to the query,
            # indexed 0, 1, ...: for a sink beyond the window the query sits at min(p_i, sinks + w)
            far_sink = (Pj < method["sinks"]) & (np.abs(Pi - Pj) > method["w"])
            q_at = np.where(far_sink, np.minimum(Pi, method["sinks"] + method["w"]), Pi)
        delta = Pj - q_at
        if pos == "rerope":
            delta = np.sign(delta) * np.minimum(np.abs(delta), method["w"])
        elif pos == "lminf":
            delta = np.sign(delta) * np.minimum(np.abs(delta), method["cap"])
        elif pos == "self_extend":
            G = method.get("group") or self_extend_group(n_real, L, method["w"])
            delta = self_extend_delta(Pi, Pj, method["w"], G)
        elif pos == "dca":
            delta = dca_delta(Pi, Pj, method["chunk"], method["local"])
        elif pos == "leaky":
            w = method["w"]
            kk = method["k"] if method.get("k") else max(1.0, (n_real - 1 - w) / max(L - 1 - w, 1))
            delta = np.where(np.abs(delta) > w, np.sign(delta) * (w + (np.abs(delta) - w) / kk), delta)

        for h in range(H):
            qh, kh = q[b, h], k[b, h]
            if method.get("cos_s"):
                qh = qh / np.linalg.norm(qh, axis=-1, keepdims=True)
                kh = kh / np.linalg.norm(kh, axis=-1, keepdims=True)
            if pos == "alibi":
                score = qh @ kh.T
            else:
                a0, a1 = qh[:, None, 0::2], qh[:, None, 1::2]  # [i, 1, m]
                b0, b1 = kh[None, :, 0::2], kh[None, :, 1::2]  # [1, j, m]
                ang = delta[:, :, None] * th[None, None, :]  # [i, j, m]
                score = (np.cos(ang) * (a0 * b0 + a1 * b1) + np.sin(ang) * (a1 * b0 - a0 * b1)).sum(-1)
            z = score * (method["cos_s"] if method.get("cos_s") else 1 / math.sqrt(d)) * mscale2
            if pos == "alibi":
                slope = np.full((n, n), method["slopes"][h])
                if method.get("right_slopes"):  # keys right of the query
                    slope = np.where(Pj > Pi, method["right_slopes"][h], slope)
                z = z - slope * np.abs(q_at - Pj)

            # the length temperature of each row, from l
            lf = np.maximum(l, 1).astype(np.float64)  # rows with l = 0 get no output below
            t = np.ones(n)
            temp = method.get("temp")
            Lt = method.get("temp_len", L)  # infoscale(train_len=...), logn(train_len=...)
            if temp == "infoscale":
                de = method.get("dim", d)  # infoscale(dim=...): d in the formula only
                t = np.sqrt(1 - np.maximum(lf, Lt) ** (-2 / de)) / math.sqrt(1 - Lt ** (-2 / de))
            elif temp == "infoscale_noclamp":
                t = np.sqrt(1 - lf ** (-2 / d)) / math.sqrt(1 - Lt ** (-2 / d))
            elif temp == "logn":
                t = np.maximum(1.0, np.log(lf) / math.log(Lt))
            elif temp == "softmax_plus":
                t = np.log(lf) / math.log(512)
            elif temp == "llama4":  # 1 + β ln(1 + floor(l / F)), defaults β = 0.1, F = L
                beta, floor = method.get("beta", 0.1), method.get("floor", L)
                t = 1 + beta * np.log(1 + np.floor(lf / floor))
            logits = z * t[:, None]

            masked = np.where(allowed, logits, -np.inf)
            top = masked.max(1, keepdims=True)
            e = np.exp(masked - np.where(l[:, None] > 0, top, 0.0))  # exp(−∞) = 0 for keys not attended
            w = e / np.where(l[:, None] > 0, e.sum(1, keepdims=True), 1.0)  # a row with no key: all zero
            weights[b, h] = w
            out[b, h] = w @ v[b, h]
    return out, weights
