"""`moepack` command line: one module per subcommand in this package, sharing the flags of `options`.

Each module in COMMANDS defines `add_cli(subparsers)`, which adds its subparser and sets `func` to its
`run(args) -> int`. The command modules import the library (torch, transformers, llama_cpp) only inside `run`, so
building the parser (`moepack --help`) loads none of it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from moepack import __version__
from moepack.errors import MoepackError

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = tuple(f"moepack.cli.{name}" for name in (
    "inspect", "calibrate", "prune", "eval", "allocate", "quantize", "sensitivity", "compress", "report", "usage"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moepack", description="Pack Mixture-of-Experts LLMs into one edge machine.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"moepack {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).add_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
