"""Fast path vs reference path: time and peak memory, as ratios measured in one run.

For each method and length, three variants run in fresh subprocesses (so each peak-RSS reading is
its own): the reference path in fp32, the fast path in fp32 and the fast path in bf16. Peak memory
is the rise of the process's maximum resident set over its level just before the call. Shapes are
GAU-like: batch 1, one head, d_k = 128, d_v = 256.

    python benchmarks/attention_speed.py                      # every method, n = 1024 4096 16384
    python benchmarks/attention_speed.py --methods softmax rerope --lengths 4096

Aims (issue 2): at 16384 the fast path's peak memory is <= 1/4 of the reference path's without being
slower; in bf16 the fast path is >= 2x faster than the fp32 reference at 4096.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import infoscale
method, n, variant, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
q, k = torch.randn(1, 1, n, 128), torch.randn(1, 1, n, 128)
v = torch.randn(1, 1, n, 256)
L = 64
def call():
    if variant == "reference":
        return infoscale.attention(q, k, v, method, train_len=L, impl="reference")
    return infoscale.attention(q, k, v, method, train_len=L, impl="fast", bf16=(variant == "fast-bf16"))
with torch.inference_mode():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"time": min(times), "peak_mb": (peak - before) / 1024}))
"""

VARIANTS = ("reference", "fast-fp32", "fast-bf16")


def measure(method: str, n: int, variant: str) -> dict:
    repeats = 3 if n <= 4096 else 1
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(n), variant, str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    import infoscale

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(infoscale.REGISTRY))
    ap.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    args = ap.parse_args(argv)
    print(f"bf16 native here: {infoscale.bf16_supported()}")
    print(f"{'method':<14}{'n':>7}{'ref s':>9}{'ref MB':>9}{'fast/ref t':>12}{'fast/ref mem':>14}"
          f"{'bf16/ref t':>12}{'bf16/ref mem':>14}")
    for n in args.lengths:
        for m in args.methods:
            r = {var: measure(m, n, var) for var in VARIANTS}
            ref, f32, b16 = r["reference"], r["fast-fp32"], r["fast-bf16"]
            mem = max(ref["peak_mb"], 1e-9)
            print(f"{m:<14}{n:>7}{ref['time']:>9.3f}{ref['peak_mb']:>9.0f}{f32['time'] / ref['time']:>12.2f}"
                  f"{f32['peak_mb'] / mem:>14.3f}{b16['time'] / ref['time']:>12.2f}{b16['peak_mb'] / mem:>14.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
