"""Prototypes of faster GAU attention on CPU, timed against ``infoscale.attention`` in one run.

Single head, GAU shapes: d_k = 128, d_v = 1536 (paper preset) and d_k = 64, d_v = 512 (small preset).
Every variant computes the same function as the reference path for a method whose row factor is a
constant per row (``softmax``, ``infoscale`` without masks): RoPE is applied once, the row factor
c · t(l_i) is folded into q, and then:

  ref              ``attention(impl="reference")``: the whole n×n matrix in fp32 (the exactness baseline)
  fast-fp32/-bf16  ``attention(impl="fast")`` as shipped (chunk 256 fp32 / 512 bf16)
  sdpa-math-*      ``F.scaled_dot_product_attention`` with the math backend (any d_v)
  sdpa-flash-split the CPU flash kernel needs d_v == d_k: v is cut into d_v/d_k slices, one call each
  sdpa-flash-pad   ... or q, k are zero-padded to d_v (scores unchanged, q·k costs d_v/d_k times more)
  lean-C-*         the fast path's loop, lean: kᵀ made contiguous once, q pre-scaled and cast once,
                   chunks of C query rows; ``-sm16`` keeps scores in bf16 through the softmax (no
                   fp32 round trip); ``-unfolded`` multiplies the scores by the row factor instead
                   of folding it into q
  compiled-*       ``torch.compile`` (inductor) of one lean chunk body; compile time reported apart

Time is the median of interleaved rounds (v1 v2 ... v1 v2 ...); the error is max |out − ref| over the
output, with max |ref| printed for scale. Thread count via ``--threads`` (``torch.set_num_threads``).

    python benchmarks/attention_variants.py                  # both shapes, n = 1024 4096, 1 thread
    python benchmarks/attention_variants.py --threads 2 --lengths 4096 --shapes paper
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from infoscale import attention
from infoscale.attn.kernel import _rotated, build_plan

SHAPES = {"paper": (128, 1536), "small": (64, 512)}
BF = torch.bfloat16


def prepared(q, k, method: str, train_len: int):
    """(q rotated and multiplied by its row factor, k rotated), fp32, as the reference path scores them."""
    b, h, n, d = q.shape
    plan = build_plan(method, n=n, batch=b, heads=h, head_dim=d, train_len=train_len)
    (qr, kr), = _rotated(plan, q.float(), k.float())
    factor = plan.logit_scale.view(-1, 1, 1, 1)
    if plan.temperature is not None:
        factor = factor * plan.temperature_factor(torch.full((1, 1, n, 1), float(n), dtype=torch.float64))
    factor = factor.float().expand(1, 1, n, 1)
    return (qr * factor).contiguous(), kr.contiguous(), qr.contiguous(), factor.contiguous()


def sdpa(qs, k, v, backend, dtype):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(qs.to(dtype), k.to(dtype), v.to(dtype), scale=1.0).float()


def flash_split(qs, k, v, dtype):
    d = qs.shape[-1]
    q_, k_, v_ = qs.to(dtype), k.to(dtype), v.to(dtype)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        parts = [F.scaled_dot_product_attention(q_, k_, v_[..., i:i + d], scale=1.0) for i in range(0, v.shape[-1], d)]
    return torch.cat(parts, dim=-1).float()


def flash_pad(qs, k, v, dtype):
    pad = v.shape[-1] - qs.shape[-1]
    q_, k_ = F.pad(qs, (0, pad)).to(dtype), F.pad(k, (0, pad)).to(dtype)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q_, k_, v.to(dtype), scale=1.0).float()


def _body(qc, kt, v, dtype, row_factor=None):
    s = torch.matmul(qc, kt)
    if row_factor is not None:  # the factor on the scores instead of folded into q
        s = s * row_factor
    w = torch.softmax(s, dim=-1) if dtype is None else torch.softmax(s.float(), dim=-1).to(dtype)
    return torch.matmul(w, v)


def lean(qs, k, v, chunk: int, dtype, softmax_reduced: bool = False, body=_body, row_factor=None):
    """The fast path's chunk loop without per-chunk casts, index tensors or transposed copies."""
    q_, kt, v_ = qs.to(dtype), k.transpose(-1, -2).contiguous().to(dtype), v.to(dtype)
    inner = None if (softmax_reduced or dtype == torch.float32) else dtype
    out = torch.empty(v.shape, dtype=torch.float32)
    for r0 in range(0, qs.shape[2], chunk):
        rf = None if row_factor is None else row_factor[:, :, r0:r0 + chunk].to(dtype)
        out[:, :, r0:r0 + chunk] = body(q_[:, :, r0:r0 + chunk], kt, v_, inner, rf)
    return out


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def case(shape: str, n: int, args, compiled) -> None:
    """Time every variant at one shape and length; print the table."""
    dk, dv = SHAPES[shape]
    L = 64
    g = torch.Generator().manual_seed(n)
    q, k = torch.randn(1, 1, n, dk, generator=g), torch.randn(1, 1, n, dk, generator=g)
    v = torch.randn(1, 1, n, dv, generator=g)
    qs, kr, qr, factor = prepared(q, k, args.method, L)
    fns = {
        "ref": lambda: attention(q, k, v, args.method, train_len=L, impl="reference"),
        "fast-fp32": lambda: attention(q, k, v, args.method, train_len=L, impl="fast"),
        "fast-bf16": lambda: attention(q, k, v, args.method, train_len=L, impl="fast", bf16=True),
        "sdpa-math-fp32": lambda: sdpa(qs, kr, v, SDPBackend.MATH, torch.float32),
        "sdpa-math-bf16": lambda: sdpa(qs, kr, v, SDPBackend.MATH, BF),
        "sdpa-flash-split-fp32": lambda: flash_split(qs, kr, v, torch.float32),
        "sdpa-flash-split-bf16": lambda: flash_split(qs, kr, v, BF),
        "sdpa-flash-pad-fp32": lambda: flash_pad(qs, kr, v, torch.float32),
        "sdpa-flash-pad-bf16": lambda: flash_pad(qs, kr, v, BF),
    }
    for c in (256, 512, 1024):
        fns[f"lean-{c}-fp32"] = lambda c=c: lean(qs, kr, v, c, torch.float32)
        fns[f"lean-{c}-bf16"] = lambda c=c: lean(qs, kr, v, c, BF)
        fns[f"lean-{c}-bf16-sm16"] = lambda c=c: lean(qs, kr, v, c, BF, softmax_reduced=True)
    for dt, tag in ((torch.float32, "fp32"), (BF, "bf16")):
        fns[f"lean-512-{tag}-unfolded"] = lambda dt=dt: lean(qr, kr, v, 512, dt, row_factor=factor)
    compile_s = {}
    if compiled is not None:
        for name, dt in (("compiled-512-fp32", torch.float32), ("compiled-512-bf16", BF)):
            t0 = time.perf_counter()
            lean(qs, kr, v, 512, dt, body=compiled)  # the first call compiles
            compile_s[name] = time.perf_counter() - t0
            fns[name] = lambda dt=dt: lean(qs, kr, v, 512, dt, body=compiled)
    with torch.inference_mode():
        ref = fns["ref"]().float()
        err = {name: (f().float() - ref).abs().max().item() for name, f in fns.items()}  # also warms up
        t = interleaved(fns, args.repeats)
    print(f"\n{shape} (d_k {dk}, d_v {dv}), n = {n}: ref {t['ref'] * 1e3:.1f} ms, "
          f"max|ref| {ref.abs().max().item():.3f}")
    print(f"{'variant':<24}{'ms':>10}{'vs ref':>9}{'vs fast-fp32':>14}{'vs fast-bf16':>14}{'max abs err':>13}")
    for name in fns:
        extra = f"  (compile {compile_s[name]:.1f} s)" if name in compile_s else ""
        print(f"{name:<24}{t[name] * 1e3:>10.1f}{t['ref'] / t[name]:>8.2f}x"
              f"{t['fast-fp32'] / t[name]:>13.2f}x{t['fast-bf16'] / t[name]:>13.2f}x"
              f"{err[name]:>13.1e}{extra}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    ap.add_argument("--method", default="infoscale")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, method {args.method}, median of {args.repeats} interleaved rounds")
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(_body, dynamic=False)
    for shape in args.shapes:
        for n in args.lengths:
            case(shape, n, args, compiled)


if __name__ == "__main__":
    main()
