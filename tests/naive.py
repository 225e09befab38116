"""An independent, plain implementation of every method, for the tests.

Nothing here imports the package. Every logit is written from its per-position formula: the RoPE
score of a query and key at relative position Δ' is

    Σ_m cos(Δ' θ_m)(q_2m k_2m + q_2m+1 k_2m+1) + sin(Δ' θ_m)(q_2m+1 k_2m − q_2m k_2m+1),

(the value of ⟨R(p_i) q, R(p_j) k⟩ when Δ' = p_j − p_i), with frequencies θ and the effective
relative position Δ' of each method spelled out below. Computed in float64 numpy.
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
    − (W − ⌊W/G⌋), for a key on the right)."""
    if abs(pj - pi) < W:
        return pj - pi
    shift = W - math.floor(W / G)
    query = math.floor(pi / G) + (shift if pj < pi else -shift)
    return math.floor(pj / G) - query


def dca_delta(pi, pj, s, w):
    """Dual Chunk Attention (An et al. 2024, arXiv 2402.17463, Eq. 2, 5, 7, 8), pretraining length c = s + w:
    P_k = p_j mod s; the query is P_q^Intra = p_i mod s in the key's chunk, P_q^Succ = s + (p_i mod s) for its
    first w positions and c − 1 after them when the key's chunk is the one before, P_q^Inter = c − 1 otherwise."""
    c = s + w
    gap = math.floor(pi / s) - math.floor(pj / s)
    if gap <= 0:
        query = pi % s
    elif gap == 1:
        query = s + pi % s if pi % s < w else c - 1
    else:
        query = c - 1
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
    for b in range(B):
        n_real = n if pad is None else int(pad[b].sum())
        real = np.ones(n, bool) if pad is None else pad[b].astype(bool)
        s = max(1.0, n_real / L) if method.get("factor") is None else method["factor"]
        pos = method.get("pos")
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
        for h in range(H):
            for i in range(n):
                allowed = real.copy()
                logits = np.zeros(n)
                for j in range(n):
                    if causal and j > i:
                        allowed[j] = False
                    if method.get("mask") == "window" and abs(i - j) > method["w"]:
                        allowed[j] = False
                    if method.get("mask") == "sinks":
                        S = method["sinks"]
                        if abs(i - j) > method["w"] and i >= S and j >= S:
                            allowed[j] = False
                l = int(allowed.sum())
                qi = q[b, h, i]
                if method.get("cos_s"):
                    qi = qi / np.linalg.norm(qi)
                for j in range(n):
                    kj = k[b, h, j]
                    if method.get("cos_s"):
                        kj = kj / np.linalg.norm(kj)
                    pi = p[i]
                    if method.get("kept") and p[j] < method["sinks"] and abs(p[i] - p[j]) > method["w"]:
                        # positions within the kept set (StreamingLLM's cache): the sinks, then the window up to
                        # the query, indexed 0, 1, ...: the query sits at min(p_i, sinks + w)
                        pi = min(p[i], method["sinks"] + method["w"])
                    delta = p[j] - pi
                    if pos == "alibi":
                        score = float(qi @ kj)
                    else:
                        if pos == "rerope":
                            delta = math.copysign(min(abs(delta), method["w"]), delta)
                        elif pos == "lminf":
                            delta = math.copysign(min(abs(delta), method["cap"]), delta)
                        elif pos == "self_extend":
                            G = method.get("group") or self_extend_group(n_real, L, method["w"])
                            delta = self_extend_delta(p[i], p[j], method["w"], G)
                        elif pos == "dca":
                            delta = dca_delta(p[i], p[j], method["chunk"], method["local"])
                        elif pos == "leaky" and abs(delta) > method["w"]:
                            kk = method["k"] if method.get("k") else max(1.0, (n_real - 1 - method["w"])
                                                                         / max(L - 1 - method["w"], 1))
                            delta = math.copysign(method["w"] + (abs(delta) - method["w"]) / kk, delta)
                        score = 0.0
                        for m in range(d // 2):
                            a0, a1, b0, b1 = qi[2 * m], qi[2 * m + 1], kj[2 * m], kj[2 * m + 1]
                            ang = delta * th[m]
                            score += math.cos(ang) * (a0 * b0 + a1 * b1) + math.sin(ang) * (a1 * b0 - a0 * b1)
                    z = score * (method["cos_s"] if method.get("cos_s") else 1 / math.sqrt(d)) * mscale2
                    if pos == "alibi":
                        slope = method["slopes"][h]
                        if p[j] > p[i] and method.get("right_slopes"):  # key right of the query
                            slope = method["right_slopes"][h]
                        z -= slope * abs(pi - p[j])
                    logits[j] = z
                t = 1.0
                temp = method.get("temp")
                Lt = method.get("temp_len", L)  # infoscale(train_len=...), logn(train_len=...)
                if temp == "infoscale":
                    de = method.get("dim", d)  # infoscale(dim=...): d in the formula only
                    t = math.sqrt(1 - max(l, Lt) ** (-2 / de)) / math.sqrt(1 - Lt ** (-2 / de))
                elif temp == "infoscale_noclamp":
                    t = math.sqrt(1 - l ** (-2 / d)) / math.sqrt(1 - Lt ** (-2 / d))
                elif temp == "logn":
                    t = max(1.0, math.log(l) / math.log(Lt))
                elif temp == "softmax_plus":
                    t = math.log(l) / math.log(512)
                elif temp == "llama4":  # 1 + β ln(1 + floor(l / F)), defaults β = 0.1, F = L
                    beta, floor = method.get("beta", 0.1), method.get("floor", L)
                    t = 1 + beta * math.log(1 + math.floor(l / floor))
                logits = logits * t
                if l == 0:
                    continue
                e = np.where(allowed, np.exp(logits - logits[allowed].max()), 0.0)
                w = e / e.sum()
                weights[b, h, i] = w
                out[b, h, i] = w @ v[b, h]
    return out, weights
