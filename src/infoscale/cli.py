"""The ``infoscale`` command. Each subcommand's flags come from a typed option dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

from . import analysis, calibrate, convert, doctor, evaluate, report, reproduce, train
from .attn import REGISTRY
from .errors import InfoscaleError


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


# subcommand -> module with HELP, add_arguments(parser) and run(args)
COMMANDS = {"train": train, "eval": evaluate, "report": report, "analyze": analysis, "reproduce": reproduce,
            "convert": convert, "calibrate": calibrate, "doctor": doctor}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infoscale", description="Length extrapolation of attention.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list every method, its parameters, defaults and sources")
    for name, module in COMMANDS.items():
        sp = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sp)
    return p


def interrupt_advice(args) -> str:
    """What to do after Ctrl-C, for the command that was interrupted (and how far it got)."""
    if args.command == "train":
        from pathlib import Path

        if not args.out or not (Path(args.out) / "train_config.json").exists():
            return "nothing was written; rerun the same command to start"
        if args.resume:
            return "rerun the same command to continue from the last checkpoint"
        extra = " (instead of --overwrite)" if args.overwrite else ""
        return f"rerun the same command with --resume{extra} to continue from the last checkpoint"
    if args.command == "eval":
        return f"finished cells are in {args.out}; rerun the same command to do the rest (they are skipped)"
    if args.command == "reproduce":
        return "rerun the same command to continue (finished runs and records are kept)"
    if args.command == "analyze":
        return "nothing was written (records are written at the end); rerun the same command"
    return "rerun the same command"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "methods":
            print_methods()
            return 0
        return int(COMMANDS[args.command].run(args) or 0)
    except InfoscaleError as e:
        print(f"infoscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # running out of memory is one line too; anything else is a bug: its traceback
        from .models import is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print(f"infoscale {args.command}: error: out of memory ({str(e).splitlines()[0][:160]}); use shorter "
              "lengths, a smaller batch or model, or a machine with more memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"infoscale {args.command}: interrupted; {interrupt_advice(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
