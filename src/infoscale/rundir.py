"""The run directory: written by ``infoscale train``, read by ``eval``, ``analyze`` and ``calibrate``.

    train_config.json   the training options          split.json     held-out document names
    vocab.txt (+ tokenizer_config.json)                 metrics.jsonl  training curve
    checkpoint.pt       resumable training state      config.json + model.safetensors: the model

The model family comes from ``config.json``'s ``model_type``; the run loads with transformers'
``from_pretrained`` (and the Auto classes once ``infoscale`` is imported).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import CORPORA, CharTokenizer, TokenDocs, load_corpus, load_tokenizer
from .errors import DataError
from .models import check_model_size, check_weights, family, is_out_of_memory, train_len_of, weight_shapes

__all__ = ["Run", "load_run", "load_model"]


@dataclass
class Run:
    path: Path
    model: torch.nn.Module
    tokenizer: CharTokenizer  # or BPETokenizer (causal runs)
    train_config: dict

    @property
    def name(self) -> str:
        return self.path.name

    def training_summary(self, extra: tuple = ()) -> dict:
        """The training options an evaluation record carries (``train``), plus ``extra`` ones."""
        keys = ("corpus", "preset", "attention", "train_len", "steps", "seed", "init_from") + tuple(extra)
        return {k: self.train_config.get(k) for k in keys}

    @property
    def family(self):
        return family(self.model.config.model_type)

    @property
    def task(self) -> str:
        return self.family.task

    def resolve_method(self, method: str):
        """The method a forward with ``method`` runs: merged with the training method (GAU-α: the model's own
        rule). A causal-only method on a bidirectional model is refused (MethodError), so evaluation skips it."""
        if self.family.per_call_methods:
            return self.model.resolve_method(method)
        from .attn import merge_with_training
        from .attn.errors import MethodError
        from .tasks import task

        train = (getattr(self.model.config, "infoscale", None) or {}).get("train_method", "softmax")
        pm = merge_with_training(train, method, self.train_len)
        only = [c.name for c in pm.components if c.method.causal_only]
        if only and not task(self.task).causal:
            raise MethodError(f"{only[0]} is defined for causal attention only; {self.model.config.model_type}'s "
                              "attention is bidirectional")
        from . import hf
        from .errors import ConfigError

        try:  # what hf.apply refuses for this model (train-time methods, rotaries it cannot reproduce) is skipped
            hf.apply(self.model, str(pm.resolved(self.train_len)), train_len=self.train_len)
        except ConfigError as e:
            raise MethodError(str(e)) from None
        if pm.calibrated() and not (getattr(self.model.config, "infoscale", None) or {}).get("dims"):
            raise MethodError(f"{method} needs this model's calibration (config.infoscale['dims'], from "
                              "infoscale.hf.calibrate); the run has none")
        return pm

    def logits_with(self, method: str, attn_options: dict | None = None):
        """A function ids -> logits of the model running ``method`` (a resolved method string): passed per call to a
        model whose forward takes it (GAU-α, with the core's ``attn_options``), else applied once with
        :func:`infoscale.hf.apply` (which replaces the method applied before)."""
        model = self.model
        if self.family.per_call_methods:
            return lambda ids: model(ids, method=method, attn_options=attn_options).logits
        from . import hf

        hf.apply(model, method, train_len=self.train_len)
        return lambda ids: model(ids).logits

    @property
    def train_len(self) -> int:
        """L: GAU's ``config.train_len``; for a transformers model (Llama) :func:`infoscale.models.train_len_of`."""
        L = getattr(self.model.config, "train_len", None)
        if L is None:
            return train_len_of(self.model.config)
        return int(L)

    def load_calibration(self) -> None:
        """Read the run's calibration.json now (a damaged one is refused before any work), if it has one."""
        f = getattr(self.model.base_model, "calibration_file", None)
        if f is not None and getattr(self.model.base_model, "infoscale_dims", None) is None:
            from .models.gau import attach

            attach(self.model, f)

    def calibration_dims(self) -> list[float] | None:
        """The per-layer InfoScale dims ``infoscale(calibrated=True)`` runs with: a GAU run's calibration.json (read
        now, checked), else a transformers model's ``config.infoscale["dims"]`` (:func:`infoscale.hf.calibrate`);
        None where the run has none."""
        self.load_calibration()
        dims = getattr(self.model.base_model, "infoscale_dims", None)
        if dims is None:
            dims = (getattr(self.model.config, "infoscale", None) or {}).get("dims")
        return dims

    def heldout_docs(self, corpus: str | None = None) -> TokenDocs:
        """The held-out documents named in ``split.json``, tokenized. A run without a split (a converted
        checkpoint, trained elsewhere) is evaluated on every document of ``corpus``."""
        split_file = self.path / "split.json"
        if not split_file.exists():
            if corpus:
                return TokenDocs(load_corpus(corpus), self.tokenizer)
            raise DataError(f"{self.path} has no split.json, so its held-out documents are unknown; evaluate a run "
                            "directory written by `infoscale train`, or give --corpus with held-out text (for a "
                            "converted checkpoint)")
        split = _read_json(split_file)
        corpus = self.train_config.get("corpus")
        if not corpus or not isinstance(corpus, str):
            raise DataError(f"{self.path / 'train_config.json'} names no corpus; evaluate a run written by "
                            "`infoscale train`")
        corpus = self.corpus_path(corpus)
        docs = {d.name: d for d in load_corpus(corpus)}
        missing = [n for n in split.get("eval", []) if n not in docs]
        if missing:
            raise DataError(f"the corpus {corpus!r} no longer has the held-out documents {missing[:3]} named in "
                            f"{split_file}")
        return TokenDocs([docs[n] for n in split["eval"]], self.tokenizer)


    def corpus_path(self, corpus: str) -> str:
        """The corpus as recorded; a relative path (runs of earlier versions) is looked up from the
        current folder, then beside the run directory."""
        if corpus in CORPORA or Path(corpus).is_absolute() or Path(corpus).exists():
            return corpus
        for base in (self.path.parent, self.path.resolve().parent):
            if (base / corpus).exists():
                return str(base / corpus)
        raise DataError(f"the corpus {corpus!r} of {self.path} (a relative path) is not found from here nor beside "
                        "the run; run from the folder it was trained in, or write its absolute path into "
                        f"{self.path / 'train_config.json'}")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; the run directory is damaged") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a JSON object; the run directory is damaged")
    return obj


def check_sizes(p: Path, device="cpu") -> None:
    """The config's sizes against free memory and the weights file's header, before anything is built (a
    damaged or crafted config.json would otherwise allocate whatever it says)."""
    import re

    fam = family(_read_json(p / "config.json").get("model_type"))
    cls = fam.load_class()

    try:
        config = cls.config_class.from_pretrained(p)
    except Exception as e:  # an InfoscaleError of the config's own checks, or transformers' parse errors
        raise DataError(f"{p / 'config.json'} cannot be used: {str(e).splitlines()[0][:200]}") from None
    check_model_size(config, device, str(p / "config.json"))
    shapes = weight_shapes(p / "model.safetensors")
    # runs saved by an earlier version of the family's module may name their weights otherwise (GAU-α's infoscale
    # 0.1 runs have flat names); the module maps them
    for old, new in getattr(fam.import_module(), "FIRST_FORMAT_KEYS", {}).items():
        shapes = {re.sub(old, new, k): v for k, v in shapes.items()}
    check_weights(cls, config, shapes, str(p / "model.safetensors"), str(p / "config.json"))


def load_run(path: str | Path, device="cpu") -> Run:
    """(model in eval mode, tokenizer, training options) of a run directory, one clear error per problem."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"model {str(path)!r} is not a directory; give a run directory written by `infoscale train`")
    cfg_file = p / "config.json"
    if not cfg_file.exists() or not (p / "model.safetensors").exists():
        hint = " (training is not finished: rerun it with --resume)" if (p / "checkpoint.pt").exists() else ""
        raise DataError(f"{p} has no config.json + model.safetensors{hint}")
    fam = family(_read_json(cfg_file).get("model_type"))
    cls = fam.load_class()
    check_sizes(p, device)
    try:
        model = cls.from_pretrained(p).to(device).eval()
    except Exception as e:  # truncated safetensors, wrong shapes
        if is_out_of_memory(e):
            raise DataError(f"not enough memory on {device} to load the model in {p} "
                            f"({str(e).splitlines()[0][:120]}); free memory or use a larger device") from None
        raise DataError(f"cannot load the model in {p}: {type(e).__name__}: {str(e)[:200]}") from None
    tok = load_tokenizer(p)
    rows = int(model.config.vocab_size)
    if len(tok) != rows:
        name = "vocab.txt" if isinstance(tok, CharTokenizer) else "tokenizer.json"
        raise DataError(f"{p / name} has {len(tok)} tokens but the model has {rows} embedding rows; the "
                        "vocabulary does not belong to this model (truncated or replaced): restore it from the run")
    if not (p / "train_config.json").exists():
        raise DataError(f"{p} has no train_config.json, so its corpus and training settings are unknown; evaluate a "
                        "run directory written by `infoscale train` (or restore that file)")
    tcfg = _read_json(p / "train_config.json")
    # `infoscale calibrate` (GAU runs): per-layer d for infoscale(calibrated=True), read (and checked) only when a
    # calibrated method runs, so a damaged file does not stop other methods; a transformers model keeps its
    # fitted dims in config.infoscale (infoscale.hf.calibrate), so a stray file beside one is not read
    if fam.calibration_file and (p / "calibration.json").exists():
        model.base_model.calibration_file = p / "calibration.json"
    return Run(p, model, tok, tcfg)


def load_model(path, device, train_len: int | None = None, progress: bool = True):
    """What ``--model``/``--models`` names: a run directory (:func:`load_run`) or a pretrained model, a
    transformers model directory or a ``.gguf`` file (:func:`infoscale.models.pretrained.load_pretrained`, with
    ``train_len`` overriding its config's L; a run's L is known, so ``train_len`` must agree with it)."""
    from .models.pretrained import is_pretrained, load_pretrained

    if is_pretrained(path):
        return load_pretrained(path, device, train_len=train_len, progress=progress)
    run = load_run(path, device)
    if train_len is not None and train_len != run.train_len:
        raise DataError(f"--train-len {train_len} is for pretrained models; the run {run.name} was trained at "
                        f"L = {run.train_len} (its length is known)")
    return run
