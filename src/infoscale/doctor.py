"""``infoscale doctor``: does this install of torch and transformers still run every kind of method correctly?

transformers changes how attention, masks and the KV cache reach a model from one minor release to the next
(5.4 removed ``cache_position``; 5.24 renamed the forward's ``past_key_values`` to ``cache``), and an
integration that misses such a change can decode wrong tokens without any error. This command checks, in
seconds, on tiny models built from configs (random weights, no downloads), the properties the test suite
checks, on the versions installed here:

* ``hf.apply(model, "softmax")`` gives the stock model's logits, and ``hf.remove`` restores the stock model;
* for one method of each kind (a length temperature, a dynamic position method, ReRoPE, a window with sinks),
  greedy ``generate`` with a KV cache and left padding gives, at every step, the logits of a full forward
  over the same tokens (for the dynamic method: with the factor fixed by the prompt, s = n / L).

It prints the versions and one line per check; it exits 0 when every check passes and 1 otherwise, with one
line per failure naming the check, the family and the largest difference.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass

import torch

from . import __version__
from .errors import ConfigError
from .options import add_flags, from_args, option

HELP = "check that this install (torch, transformers) still runs every kind of method correctly, in seconds"

L = 8  # the tiny models' training length (max_position_embeddings)
PROMPT, NEW = 18, 4  # a prompt of 2.25 L and 4 greedy steps: every length method extrapolates
PAD = 3  # left padding of the batch's second row
ATOL, RTOL = 5e-5, 1e-4  # fp32; the test suite's tolerance for the same comparison

# (method applied, method of the full forward a cached decode must equal, given the prompt's n real tokens)
DECODE_CHECKS: dict[str, str] = {
    "infoscale": "{method}",  # a length temperature: row factor from the keys attended
    "pi": "pi(factor={s})",  # a dynamic position method: s = n / L fixed by the prompt
    "rerope": "{method}",  # two position assignments merged by a band
    "streamingllm(sinks=2, window=5)": "{method}",  # a mask with sinks
}


FAMILIES = ("llama", "qwen2")


@dataclass
class DoctorConfig:
    families: list[str] = option(("llama", "qwen2"), "tiny model families to check (llama; qwen2 has a "
                                 "sliding-window layer)")


def _tiny(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=L, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, initializer_range=0.3)
    builders = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**small)),
                "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**small, use_sliding_window=True, sliding_window=16,
                                                              max_window_layers=1))}
    if family not in builders:
        raise ConfigError(f"doctor checks the families {', '.join(FAMILIES)}, not {family!r}")
    torch.manual_seed(0)
    model = builders[family]()
    model.config._attn_implementation = "sdpa"
    return model.eval()


def _fresh(family: str, cache: dict):
    import copy

    if family not in cache:
        cache[family] = _tiny(family)
    return copy.deepcopy(cache[family])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max())


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(torch.allclose(got, want, atol=ATOL, rtol=RTOL))


def check_stock(family: str, cache: dict) -> tuple[bool, str]:
    """apply(softmax) == stock, and remove() == stock."""
    from . import hf

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 3 * L), generator=g)
    stock = _logits(_fresh(family, cache), ids)
    m = hf.apply(_fresh(family, cache), "softmax")
    applied = _logits(m, ids)
    hf.remove(m)
    removed = _logits(m, ids)
    d = max(_max_diff(applied, stock), _max_diff(removed, stock))
    return _close(applied, stock) and _close(removed, stock), f"max |Δlogit| {d:.1e}"


def check_decode(family: str, method: str, cache: dict) -> tuple[bool, str]:
    """Greedy generate with a KV cache and left padding == a full forward at every step."""
    from . import hf

    m = hf.apply(_fresh(family, cache), method)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 64, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    worst = 0.0
    ok = True
    for row, n_real in ((0, PROMPT), (1, PROMPT - PAD)):
        spec = DECODE_CHECKS[method].format(method=method, s=max(1.0, n_real / L))
        full = hf.apply(_fresh(family, cache), spec)
        real = out.sequences[row : row + 1, PAD if row else 0 :]
        want = _logits(full, real)[0, n_real - 1 : n_real - 1 + NEW]
        got = torch.stack([step[row] for step in out.logits])
        worst = max(worst, _max_diff(got, want))
        ok = ok and _close(got, want)
    return ok, f"max |Δlogit| {worst:.1e}"


def versions() -> dict[str, str]:
    import transformers

    return {"infoscale": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def doctor(cfg: DoctorConfig, out=print) -> list[str]:
    """Run every check; print one line each; return the failure lines (empty: all passed)."""
    from . import hf
    from .runtime import quiet_libraries

    unknown = [f for f in cfg.families if f not in FAMILIES]
    if unknown or not cfg.families:
        raise ConfigError(f"doctor checks the families {', '.join(FAMILIES)}; got {', '.join(unknown) or 'none'}")
    quiet_libraries(False)  # transformers' advisory warnings (e.g. past the model's maximum length, on purpose)
    v = versions()
    out("  ".join(f"{k} {x}" for k, x in v.items()))
    tested = hf.TESTED_TRANSFORMERS
    if hf.newer_than_tested(v["transformers"]):
        out(f"note: transformers {v['transformers']} is newer than the newest infoscale's CI tested ({tested})")
    cache: dict = {}
    failures = []
    t0 = time.perf_counter()
    checks = [(f, "apply(softmax) == stock, remove() restores it", lambda f=f: check_stock(f, cache))
              for f in cfg.families]
    checks += [(f, f"cached generate == full forward: {meth}", lambda f=f, meth=meth: check_decode(f, meth, cache))
               for f in cfg.families for meth in DECODE_CHECKS]
    for family, what, fn in checks:
        try:
            ok, detail = fn()
        except Exception as e:  # a check that cannot run is a failure of this install, reported as one line
            ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        line = f"{'PASS' if ok else 'FAIL'}  {family:<7} {what}  ({detail})"
        out(line)
        if not ok:
            failures.append(line)
    out(f"{len(checks) - len(failures)} passed, {len(failures)} failed in {time.perf_counter() - t0:.1f} s")
    return failures


def add_arguments(parser) -> None:
    add_flags(parser, DoctorConfig)


def run(args) -> int:
    cfg = from_args(DoctorConfig, args)
    failures = doctor(cfg)
    for line in failures:
        print(f"infoscale doctor: {line}", file=sys.stderr)
    if failures:
        print("infoscale doctor: this install does not run infoscale's methods correctly; use a transformers "
              f"version in the tested range (pyproject.toml; newest tested {_tested()}) and report the versions "
              "above", file=sys.stderr)
    return 1 if failures else 0


def _tested() -> str:
    from . import hf

    return hf.TESTED_TRANSFORMERS


__all__ = ["DoctorConfig", "doctor", "check_stock", "check_decode", "versions", "DECODE_CHECKS"]
