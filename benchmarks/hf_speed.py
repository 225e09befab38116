"""Speed of infoscale.hf against stock SDPA on a small Llama (random weights, fp32, CPU).

For each context n and method: prefill time (one forward over n tokens with a DynamicCache), decode speed
(tokens/s over the next steps, one token at a time with that cache) and the KV cache's size after decoding
(the memory that grows with the context). Every measurement is repeated in interleaved rounds (round r
measures every method once) and the median is reported as a ratio to stock SDPA measured in the same run.

    python benchmarks/hf_speed.py            # contexts 1k, 4k, 16k
    python benchmarks/hf_speed.py --quick    # contexts 1k, 4k, fewer methods (< 2 min)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from infoscale import hf

METHODS = ["softmax", "infoscale", "logn", "window", "streamingllm", "pi", "yarn", "rerope", "leaky_rerope",
           "lm_infinite", "rerope+infoscale"]
QUICK_METHODS = ["softmax", "infoscale", "window", "yarn", "rerope"]


def build(train_len: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=train_len)
    return LlamaForCausalLM(cfg).eval()


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@torch.no_grad()
def measure(model, ids: torch.Tensor, steps: int) -> tuple[float, float, int]:
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    kw = {hf.cache_kwarg(model): cache}
    out = model(ids, **kw, use_cache=True)
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, **kw, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    decode = steps / (time.perf_counter() - t0)
    return prefill, decode, cache_bytes(cache)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts 1k and 4k, fewer methods, 2 rounds")
    ap.add_argument("--contexts", type=int, nargs="*", help="context lengths (default 1024 4096 16384)")
    ap.add_argument("--methods", nargs="*", help="methods to compare with stock SDPA")
    ap.add_argument("--rounds", type=int, help="interleaved repeats (default 3, quick 2)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--train-len", type=int, default=512, help="L of the model (max_position_embeddings)")
    args = ap.parse_args(argv)
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    methods = args.methods or (QUICK_METHODS if args.quick else METHODS)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    stock = build(args.train_len)
    stock.set_attn_implementation("sdpa")
    models = {"sdpa": stock}
    for m in methods:
        models[m] = hf.apply(build(args.train_len), m)

    print(f"Llama 2 layers, hidden 256, 4 heads (2 kv), L = {args.train_len}; {rounds} interleaved rounds, "
          f"{args.steps} decode steps; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in contexts:
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        res: dict[str, list[tuple[float, float, int]]] = {k: [] for k in models}
        measure(stock, ids[:, :64], 2)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                res[name].append(measure(model, ids, args.steps))
        base_pre = statistics.median(r[0] for r in res["sdpa"])
        base_dec = statistics.median(r[1] for r in res["sdpa"])
        print(f"\ncontext {n}")
        print(f"{'method':<18} {'prefill s':>10} {'× sdpa':>7} {'decode tok/s':>13} {'× sdpa':>7} {'KV MiB':>7}")
        for name in models:
            pre = statistics.median(r[0] for r in res[name])
            dec = statistics.median(r[1] for r in res[name])
            mib = res[name][-1][2] / 2**20
            print(f"{name:<18} {pre:>10.3f} {pre / base_pre:>7.2f} {dec:>13.1f} {dec / base_dec:>7.2f} {mib:>7.1f}")


if __name__ == "__main__":
    main()
