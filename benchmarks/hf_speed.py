"""Speed of infoscale.hf against stock SDPA on a small Llama (random weights, fp32, CPU).

For each context n and method: prefill time (one forward over n tokens with the cache ``generate`` would use:
a DynamicCache, or for the windowed methods the bounded :class:`infoscale.hf.SinkCache`), decode speed
(tokens/s over the next steps, one token at a time with that cache) and the KV cache's size after decoding
(the keys per layer it holds and its MiB). Every measurement is repeated in interleaved rounds (round r
measures every method once) and the median is reported as a ratio to stock SDPA measured in the same run.

``--long``: decode memory of the windowed methods against stock SDPA at contexts 4k, 16k and 64k on a tiny Llama
(hidden 64): each context is reached by a chunked prefill (4k tokens per forward), then decoded; the table gives
the KV cache's size (largest over the decode steps) and its ratio to stock's at the same context, which grows
with the context for stock and stays flat for the bounded caches, and the prefill time and decode speed as
ratios to stock's (one measurement each). ``--long --methods ...`` measures any method there (``--long --all``:
every method of the default table at 64k).

    python benchmarks/hf_speed.py            # contexts 1k, 4k, 16k
    python benchmarks/hf_speed.py --quick    # contexts 1k, 4k, fewer methods (< 2 min)
    python benchmarks/hf_speed.py --long     # decode memory at 4k, 16k, 64k (windowed methods against stock)
    python benchmarks/hf_speed.py --long --all   # every method at 64k on the tiny Llama (prefill, decode, memory)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infoscale import hf

METHODS = ["softmax", "infoscale", "logn", "window", "streamingllm", "pi", "yarn", "hf_yarn(factor=4.0)", "rerope",
           "leaky_rerope", "lm_infinite", "rerope+infoscale", "self_extend", "dca"]
QUICK_METHODS = ["softmax", "infoscale", "window", "yarn", "rerope"]
LONG_METHODS = ["window", "streamingllm", "streamingllm(true_positions=True)", "lm_infinite"]
LONG_CONTEXTS = [4096, 16384, 65536]


def build(train_len: int, hidden: int = 256, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=train_len)
    return LlamaForCausalLM(cfg).eval()


def new_cache(model):
    """The cache ``generate`` uses: the bounded one for a windowed method, one that keeps rotated keys for a method
    that moves positions, else a DynamicCache."""
    return hf.cache_for(model)


def cache_bytes(cache) -> int:
    """The cache's tensors: keys and values, and the rotated keys a RotatedKeysCache keeps beside them."""
    stored = [e.buf for layer in cache.layers for e in getattr(layer, "rotated", {}).values()]
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor)) + sum(t.numel() * t.element_size() for t in stored if t is not None)


def cache_keys(cache) -> int:
    """Keys held per layer (the largest layer)."""
    return max(layer.keys.shape[-2] for layer in cache.layers if isinstance(layer.keys, torch.Tensor))


@torch.no_grad()
def measure(model, ids: torch.Tensor, steps: int, chunk: int | None = None) -> tuple[float, float, int, int]:
    """(prefill s, decode tok/s, largest KV bytes over the decode steps, keys per layer after them)."""
    cache = new_cache(model)
    kw = {hf.cache_kwarg(model): cache}
    chunk = chunk or ids.shape[1]
    t0 = time.perf_counter()
    for c0 in range(0, ids.shape[1], chunk):
        out = model(ids[:, c0:c0 + chunk], **kw, use_cache=True)
    prefill = time.perf_counter() - t0
    tok = out.logits[:, -1:].argmax(-1)
    peak = cache_bytes(cache)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, **kw, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        peak = max(peak, cache_bytes(cache))
    decode = steps / (time.perf_counter() - t0)
    return prefill, decode, peak, cache_keys(cache)


def long_mode(args):
    """Decode memory at long contexts: the windowed methods' bounded caches against stock SDPA's DynamicCache."""
    contexts = args.contexts or ([65536] if args.all else LONG_CONTEXTS)
    methods = args.methods or (METHODS[1:] if args.all else LONG_METHODS)
    stock = build(args.train_len, hidden=64)
    stock.set_attn_implementation("sdpa")
    models = {"sdpa": stock} | {m: hf.apply(build(args.train_len, hidden=64), m) for m in methods}
    print(f"Llama 2 layers, hidden 64, 4 heads (2 kv), L = {args.train_len}, fp32; prefill in 4096-token chunks, "
          f"{args.steps} decode steps; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':<34} {'context':>8} {'keys/layer':>10} {'KV MiB':>9} {'× sdpa':>8} {'prefill s':>10} "
          f"{'× sdpa':>7} {'decode tok/s':>13} {'× sdpa':>7}")
    for n in contexts:
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        res = {name: measure(model, ids, args.steps, chunk=4096) for name, model in models.items()}
        base_pre, base_dec, base = res["sdpa"][:3]
        for name, (pre, dec, peak, keys) in res.items():
            print(f"{name:<34} {n:>8} {keys:>10} {peak / 2**20:>9.3f} {peak / base:>8.4f} {pre:>10.2f} "
                  f"{pre / base_pre:>7.2f} {dec:>13.1f} {dec / base_dec:>7.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="contexts 1k and 4k, fewer methods, 2 rounds")
    ap.add_argument("--long", action="store_true", help="decode memory at 4k, 16k, 64k: windowed methods vs stock")
    ap.add_argument("--all", action="store_true", help="with --long: every method, at 64k")
    ap.add_argument("--contexts", type=int, nargs="*", help="context lengths (default 1024 4096 16384)")
    ap.add_argument("--methods", nargs="*", help="methods to compare with stock SDPA")
    ap.add_argument("--rounds", type=int, help="interleaved repeats (default 3, quick 2)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    ap.add_argument("--train-len", type=int, default=512, help="L of the model (max_position_embeddings)")
    ap.add_argument("--layers", type=int, default=2, help="layers of the model (the masks and blocks of a query chunk "
                    "are built once per forward and shared by its layers: more layers weigh them less)")
    args = ap.parse_args(argv)
    if args.long:
        return long_mode(args)
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    methods = args.methods or (QUICK_METHODS if args.quick else METHODS)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    stock = build(args.train_len, layers=args.layers)
    stock.set_attn_implementation("sdpa")
    models = {"sdpa": stock}
    for m in methods:
        models[m] = hf.apply(build(args.train_len, layers=args.layers), m)

    print(f"Llama {args.layers} layers, hidden 256, 4 heads (2 kv), L = {args.train_len}; {rounds} interleaved rounds, "
          f"{args.steps} decode steps; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for n in contexts:
        ids = torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))
        res: dict[str, list[tuple[float, float, int, int]]] = {k: [] for k in models}
        measure(stock, ids[:, :64], 2)  # warm-up
        for _ in range(rounds):
            for name, model in models.items():
                res[name].append(measure(model, ids, args.steps))
        base_pre = statistics.median(r[0] for r in res["sdpa"])
        base_dec = statistics.median(r[1] for r in res["sdpa"])
        print(f"\ncontext {n}")
        print(f"{'method':<18} {'prefill s':>10} {'× sdpa':>7} {'decode tok/s':>13} {'× sdpa':>7} "
              f"{'keys/layer':>10} {'KV MiB':>8} {'× sdpa':>7}")
        base_kv = res["sdpa"][-1][2]
        for name in models:
            pre = statistics.median(r[0] for r in res[name])
            dec = statistics.median(r[1] for r in res[name])
            kv, keys = res[name][-1][2], res[name][-1][3]
            print(f"{name:<18} {pre:>10.3f} {pre / base_pre:>7.2f} {dec:>13.1f} {dec / base_dec:>7.2f} "
                  f"{keys:>10} {kv / 2**20:>8.2f} {kv / base_kv:>7.3f}")


if __name__ == "__main__":
    main()
