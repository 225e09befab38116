"""GAU-α end to end: a plain fp32 eager forward vs our reference path vs our default, as ratios from one run.

Three variants of the same model (same random weights) are compared:

  (a) eager     a plain fp32 forward written here, the way the original GAU-α code runs: the full n×n
                score matrix, one einsum per product, no chunking (see ``eager_forward``);
  (b) reference our model with ``attn_options={"impl": "reference"}`` (fp32, full score matrix);
  (c) default   our model as ``infoscale eval`` runs it: the fast path (the kernel's chunk size) with the
                precision ``--bf16 auto`` picks (``infoscale.runtime.choose_precision``), under autocast.

Shapes: the ``paper`` preset (6 layers, hidden 768, intermediate 1536, key 128) and the ``small`` preset
(4 layers, hidden 256, intermediate 512, key 64); n in 1024 4096 16384; batch 1 and the eval batch
(``tokens_per_batch`` 16384 → batch 16384 // n); a character-sized vocabulary (100).

Time: in one process, repeats interleaved across the variants (a b c a b c ...), median per variant;
the ratios compare medians of the same rounds. Memory: for each (configuration, variant), a fresh
subprocess builds the model and inputs, returns freed memory to the OS (``malloc_trim``), resets the
kernel's resident-set high-water mark (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and reports
VmHWM − VmRSS around one forward. RSS is used because torch's CPU allocator takes its memory from
malloc/mmap directly: ``tracemalloc`` sees only Python's allocator and would miss every tensor, and
``torch.cuda.max_memory_allocated`` has no CPU counterpart. A fresh process per reading keeps one
variant's allocator cache from hiding another's peak.

Training: tokens/s of full steps (forward, masked-LM loss, backward, gradient clipping, AdamW) at
L = 64, batch 64: the eager forward in fp32 vs our model as ``infoscale train`` runs it.

    python benchmarks/gau_speed.py              # everything (~15 min on two cores)
    python benchmarks/gau_speed.py --quick      # small preset, n = 1024 4096, < 3 min
    python benchmarks/gau_speed.py --threads 1  # one thread (steadier on a shared machine)

Aims tracked: (c)/(a) ≥ 3× tokens/s at n = 4096; (c)'s peak memory at 16384 tokens ≤ 1/4 of (a)'s;
training ≥ 2× the fp32 eager step.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = ("paper", "small")
VARIANTS = ("eager", "reference", "default")
VOCAB = 100
TOKENS_PER_BATCH = 16384
EVAL_CHUNK = None  # ``infoscale eval --chunk-size 0``: the kernel's default (256 rows in fp32, 512 in bf16)


# --------------------------------------------------------------------------------------------
# The model and the plain eager forward
# --------------------------------------------------------------------------------------------


def build_model(preset: str, seed: int = 0):
    from infoscale.models.gau import GAUForMaskedLM, build_config

    torch.manual_seed(seed)
    cfg = build_config(preset, vocab_size=VOCAB, train_len=64)
    return GAUForMaskedLM(cfg).eval()


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate adjacent pairs (x_2i, x_2i+1) by p·base^(−2i/d) (RoFormer's layout)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def eager_forward(model, ids: torch.Tensor, training: bool = False) -> torch.Tensor:
    """GAU-α's forward written plainly, reading the weights of our ``GAUForMaskedLM``.

    embeddings → RMS norm → per layer: silu(x W_i) = [u | v | z]; q = z·γ_q, k = z·γ_k; RoPE;
    A = softmax(q kᵀ / sqrt(s)); o = (u ⊙ A v) W_o; x = RMSNorm(x + o) → tied head. Dropout (when
    ``training``) where the model has it.
    """
    cfg = model.config
    g = model.gau_alpha
    p_h, p_a = cfg.hidden_dropout_prob if training else 0.0, cfg.attention_probs_dropout_prob if training else 0.0
    emb = g.embeddings.word_embeddings.weight
    x = emb[ids] + g.embeddings.token_type_embeddings.weight[0]
    x = _rms(F.dropout(x, p_h, training), cfg.layer_norm_eps)
    pos = torch.arange(ids.shape[1])
    e, s = cfg.intermediate_size, cfg.attention_key_size
    for layer in g.encoder.layer:
        gau = layer.gau
        h = F.silu(torch.einsum("bnh,fh->bnf", x, gau.i_dense.weight))
        u, v, z = torch.split(h, [e, e, s], dim=-1)
        q, k = _rope(z * gau.q_scaleoffset, pos), _rope(z * gau.k_scaleoffset, pos)
        a = torch.softmax(torch.einsum("bid,bjd->bij", q, k) / math.sqrt(s), dim=-1)
        a = F.dropout(a, p_a, training)
        o = torch.einsum("bne,he->bnh", u * torch.einsum("bij,bje->bie", a, v), gau.o_dense.weight)
        x = _rms(x + F.dropout(o, p_h, training), cfg.layer_norm_eps)
    return torch.einsum("bnh,vh->bnv", F.dropout(x, p_h, training), emb)


def forward(model, ids, variant: str, bf16: bool) -> torch.Tensor:
    if variant == "eager":
        return eager_forward(model, ids)
    if variant == "reference":
        return model(ids, attn_options={"impl": "reference"}).logits
    if variant == "default-fp32":
        return model(ids, attn_options={"chunk_size": EVAL_CHUNK, "bf16": False}).logits
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as mlm.score_windows does
        return model(ids, attn_options={"chunk_size": EVAL_CHUNK, "bf16": bf16}).logits.float()


def inputs(n: int, batch: int) -> torch.Tensor:
    return torch.randint(5, VOCAB, (batch, n), generator=torch.Generator().manual_seed(n + batch))


# --------------------------------------------------------------------------------------------
# Memory: one forward in a fresh process
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(preset: str, n: int, batch: int, variant: str, bf16: bool) -> dict:
    import gc

    model, ids = build_model(preset), inputs(n, batch)
    with torch.inference_mode():
        forward(model, inputs(16, 1), variant, bf16)  # load kernels and lazy imports outside the reading
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        forward(model, ids, variant, bf16)
        peak = _status_kb("VmHWM")
    return {"peak_mb": (peak - before) / 1024}


def measure_memory(preset: str, n: int, batch: int, variant: str, bf16: bool, threads: int) -> float:
    cmd = [sys.executable, __file__, "--child-memory", preset, str(n), str(batch), variant, str(int(bf16)),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"memory child failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def interleaved(fns: dict, repeats: int, warmup: bool) -> dict[str, float]:
    """Median seconds of each function, called in rounds (a b c a b c ...)."""
    times = {k: [] for k in fns}
    if warmup:
        for f in fns.values():
            f()
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def check_logits(model, bf16: bool) -> str:
    """(a) vs (c) on one input: fp32 fast path must match to 1e-4 relative; the default (bf16 if picked)
    must agree on ≥ 99% of argmaxes with a relative error ≤ 5e-2."""
    ids = inputs(1024, 2)
    with torch.inference_mode():
        ref = eager_forward(model, ids)
        f32 = forward(model, ids, "default-fp32", False)
        dflt = forward(model, ids, "default", bf16)
    scale = ref.abs().max().item()
    e32 = (f32 - ref).abs().max().item() / scale
    ed = (dflt - ref).abs().max().item() / scale
    agree = (dflt.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ok = e32 <= 1e-4 and ed <= 5e-2 and agree >= 0.99
    return (f"{'OK' if ok else 'MISMATCH'}: max|fast fp32 − eager|/max|eager| = {e32:.1e}; default "
            f"({'bf16' if bf16 else 'fp32'}) {ed:.1e}, argmax agreement {agree:.4f}"), ok


def train_speed(preset: str, steps: int, bf16: bool, L: int = 64, batch: int = 64) -> dict[str, float]:
    """Tokens/s of full training steps: the eager forward in fp32 vs our model as ``infoscale train`` runs it."""
    models = {"eager": build_model(preset).train(), "default": build_model(preset).train()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (batch, L), generator=gen)
    labels = torch.where(torch.rand(batch, L, generator=gen) < 0.15, ids, torch.full_like(ids, -100))

    def step(kind):
        m, opt = models[kind], opts[kind]
        if kind == "eager":
            logits = eager_forward(m, ids, training=True)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = m(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    med = interleaved({k: (lambda k=k: step(k)) for k in models}, steps, warmup=True)
    return {k: batch * L / t for k, t in med.items()}


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small preset, n = 1024 4096, memory at 16384 tokens only (< 3 min)")
    ap.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (1 at n >= 16384)")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--child-memory", nargs=5, metavar=("PRESET", "N", "BATCH", "VARIANT", "BF16"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_memory:
        p, n, b, v, bf = args.child_memory
        print(json.dumps(child_memory(p, int(n), int(b), v, bool(int(bf)))))
        return 0
    if args.quick:
        args.presets, args.lengths, args.repeats, args.train_steps = ["small"], [1024, 4096], 1, 3

    from infoscale.runtime import choose_precision

    prec = choose_precision("auto", "cpu")
    bf16 = prec.bf16
    print(f"threads {torch.get_num_threads()}; precision auto picked {prec.name} "
          + " ".join(f"({k} {v['total'] * 1e3:.2f} ms)" for k, v in prec.timings.items()), flush=True)
    failed = False
    for preset in args.presets:
        model = build_model(preset)
        msg, ok = check_logits(model, bf16)
        failed |= not ok
        print(f"\n== {preset}: logits {msg}", flush=True)
        print(f"{'n':>6}{'batch':>6}{'eager tok/s':>13}{'ref tok/s':>11}{'dflt tok/s':>12}{'dflt/eager':>12}"
              f"{'ref/eager':>11}{'eager MB':>10}{'ref MB':>9}{'dflt MB':>9}{'dflt/eager mem':>16}", flush=True)
        for n in args.lengths:
            for batch in sorted({1, max(1, TOKENS_PER_BATCH // n)}):
                ids = inputs(n, batch)
                reps = 1 if n >= 16384 else args.repeats
                with torch.inference_mode():
                    t = interleaved({v: (lambda v=v, m=model, x=ids: forward(m, x, v, bf16)) for v in VARIANTS}, reps,
                                    warmup=n * batch <= 8192)
                tps = {v: n * batch / t[v] for v in VARIANTS}
                mem = {v: float("nan") for v in VARIANTS}
                if not args.no_memory and (not args.quick or n * batch == TOKENS_PER_BATCH):
                    mem = {v: measure_memory(preset, n, batch, v, bf16, torch.get_num_threads()) for v in VARIANTS}
                print(f"{n:>6}{batch:>6}{tps['eager']:>13.0f}{tps['reference']:>11.0f}{tps['default']:>12.0f}"
                      f"{tps['default'] / tps['eager']:>11.2f}x{tps['reference'] / tps['eager']:>10.2f}x"
                      f"{mem['eager']:>10.0f}{mem['reference']:>9.0f}{mem['default']:>9.0f}"
                      f"{mem['default'] / mem['eager']:>16.3f}", flush=True)
        if not args.no_train:
            tr = train_speed(preset, args.train_steps, bf16)
            print(f"train L=64 batch 64: eager fp32 {tr['eager']:.0f} tok/s, default ({prec.name}) "
                  f"{tr['default']:.0f} tok/s: {tr['default'] / tr['eager']:.2f}x", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
