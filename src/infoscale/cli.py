"""The ``infoscale`` command. Each subcommand's flags come from a typed config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

from .data import DataError
from .methods import REGISTRY, MethodError


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def print_methods() -> None:
    """Every registered method with its slots, parameters (type, default, why) and source."""
    for m in REGISTRY.values():
        tags = ", ".join(m.slots) or "identity"
        if m.train_time:
            tags += "; train-time"
        print(f"{m.name}  [{tags}]")
        print(textwrap.indent(textwrap.fill(m.formula, 96), "    "))
        print(f"    source: {m.source}")
        for f in dataclasses.fields(m.params):
            typ = str(f.type).replace(" | None", "|None")
            print(f"    - {f.name}: {typ} = {f.default!r}")
            print(textwrap.indent(textwrap.fill(f.metadata.get("doc", ""), 90), "        "))
        print()
    print("Combine with '+', e.g. 'rerope(window=32)+infoscale', 'yarn+infoscale', 'cosscale(s=128)+infoscale'.")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` flag per dataclass field, typed, with the field's doc as help."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        doc = f.metadata.get("doc", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        typ = str(f.type)
        if typ == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif typ.startswith("list[") or typ.startswith("tuple["):
            inner = int if "int" in typ else str
            parser.add_argument(flag, nargs="+", type=inner, default=None if required else list(default),
                                required=required, help=doc)
        else:
            conv = {"int": int, "float": float, "str": str, "int | None": _opt(int), "str | None": _opt(str),
                    "float | None": _opt(float)}.get(typ, str)
            parser.add_argument(flag, type=conv, default=default, help=f"{doc} (default: {default})")


def _opt(conv):
    def parse(text: str):
        return None if text.lower() in ("none", "") else conv(text)

    parse.__name__ = conv.__name__
    return parse


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(extra)
    return cls(**kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infoscale", description="Length extrapolation of attention.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list every method, its parameters, defaults and sources")
    for name, mod in _COMMANDS.items():
        module = __import__(f"infoscale.{mod}", fromlist=["add_arguments"])
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
    return p


# subcommand -> module with HELP, add_arguments(parser) and run(args)
_COMMANDS: dict[str, str] = {"train": "train", "eval": "evaluate", "report": "report", "analyze": "analysis",
                             "reproduce": "reproduce"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            print_methods()
            return 0
        module = __import__(f"infoscale.{_COMMANDS[args.command]}", fromlist=["run"])
        return int(module.run(args) or 0)
    except (UserError, MethodError, DataError) as e:
        print(f"infoscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"infoscale {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
