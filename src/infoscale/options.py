"""Typed option dataclasses, exposed as command-line flags.

A field is declared with :func:`option` (default + one line of help); :func:`add_flags` turns every
field of a dataclass into ``--field-name``, typed from the real annotations
(``typing.get_type_hints``, so ``list[float]`` parses floats), and :func:`from_args` builds the
dataclass back, which validates itself in ``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import field

__all__ = ["option", "add_flags", "from_args", "SEED_RANGE"]


def option(default, doc: str, **metadata):
    """A dataclass field with help text; ``dataclasses.MISSING`` makes the flag required."""
    if isinstance(default, (list, tuple)):
        value = tuple(default)
        return field(default_factory=lambda: list(value), metadata={"doc": doc, **metadata})
    return field(default=default, metadata={"doc": doc, **metadata})


def _unwrap_optional(tp):
    """(inner type, optional?) of ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


SEED_RANGE = (0, 2**32)  # numpy's and torch's seeds: 0 <= seed < 2**32


def _converter(tp, flag: str, bounds: tuple | None = None):
    inner, optional = _unwrap_optional(tp)
    if inner not in (int, float, str):
        raise TypeError(f"{flag}: unsupported option type {tp!r}")

    def parse(text: str):
        if optional and text.lower() in ("none", ""):
            return None
        try:
            value = inner(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {inner.__name__}, got {text!r}") from None
        if bounds is not None and not bounds[0] <= value < bounds[1]:
            raise argparse.ArgumentTypeError(f"must be an integer with {bounds[0]} <= value < {bounds[1]}, got {text}")
        return value

    parse.__name__ = inner.__name__
    return parse


def _help(doc: str, default) -> str:
    if default is not None and default != "" and default != []:
        shown = " ".join(str(x) for x in default) if isinstance(default, list) else default
        doc = f"{doc} (default: {shown})"
    return doc.replace("%", "%%")  # argparse %-formats help strings


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per field of dataclass ``cls``, typed, with its doc and default as help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        required = (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING) or bool(
            f.metadata.get("required"))
        default = (None if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING else
                   f.default if f.default is not dataclasses.MISSING else f.default_factory())
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_help(doc, default))
        elif typing.get_origin(tp) in (list, tuple):
            (inner,) = set(typing.get_args(tp)) - {Ellipsis}
            parser.add_argument(flag, nargs="+", type=_converter(inner, flag, f.metadata.get("bounds")),
                                default=default, required=required, help=_help(doc, default))
        else:
            parser.add_argument(flag, type=_converter(tp, flag, f.metadata.get("bounds")), default=default,
                                required=required, help=_help(doc, default))


def from_args(cls, args: argparse.Namespace, **extra):
    """The dataclass ``cls`` from parsed flags (fields not on the command line keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(extra)
    return cls(**kw)
