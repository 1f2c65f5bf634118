"""`moepack` command line: one module per subcommand in this package, sharing the flags of `options`.

Each module in COMMANDS defines `add_cli(subparsers)`, which adds its subparser and sets `func` to its
`run(args) -> int`. The command modules import the library (torch, transformers, llama_cpp) only inside `run`, so
building the parser (`moepack --help`) loads none of it.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import sys

from moepack import __version__
from moepack.errors import MoepackError

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = tuple(f"moepack.cli.{name}" for name in (
    "inspect", "calibrate", "prune", "eval", "allocate", "quantize", "sensitivity", "compress", "report", "usage", "speed"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moepack", description="Pack Mixture-of-Experts LLMs into one edge machine.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"moepack {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).add_cli(sub)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown argument is reported by its subcommand's parser (its usage, its name) with
    the closest flag that command has."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, args.command)
        flags = [f for a in sub._actions for f in a.option_strings if f.startswith("--")]
        hints = [f"{x}: did you mean {close[0]}?" for x in extra if x.startswith("-")
                 and (close := difflib.get_close_matches(x.split("=")[0], flags, n=1, cutoff=0.6))]
        sub.error(f"unrecognized arguments: {' '.join(extra)}" + ("; " + "; ".join(hints) if hints else ""))
    return args


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MoepackError as e:
        if args.debug:
            raise
        print(f"moepack {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (`moepack inspect --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush fails silently too
        return 0
    except KeyboardInterrupt:
        print(f"moepack {args.command}: interrupted; finished stages are kept and a rerun resumes", file=sys.stderr)
        return 130
