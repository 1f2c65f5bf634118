"""`moepack report RUN_DIR [-o PAGE.md | -o DIR/README.md | --card] [--pareto PNG] [--eval EVAL.json]`.

Two pages, each from the run directory's files alone (no model is loaded):

The run report (default, `-o PAGE.md`): how the run decided, for the person who ran it —
- the experts kept per MoE layer, as a heat map of the pruning importance (`prune_plan-r*.json`), kept
  experts outlined;
- the GGML type chosen for every tensor (`quant_plan-r*.json`), as a chart of bits per weight;
- the top rows of the sensitivity table (`sensitivity-r*.json`): the groups whose first upgrade gains most KLD;
- the eval table, when an eval JSON (`moepack eval --json-out`) is in the run directory (for the card, also
  beside the GGUF) or given;
- the Pareto plot, when given (copied beside the page).

The model card (`--card`, or an output named README.md): the page to share beside the GGUF on a model hub — YAML
front matter (base_model, tags, quantized_by, license, library_name, pipeline_tag), the base model, the recipe
(keep, k', types per tensor class, budget; from the GGUF's moepack.recipe), file size and bits per weight, the
eval table, the llama.cpp command, and the experts, types and size-vs-KLD charts. It needs a finished compress run
(summary.json); `--card` without -o writes README.md beside the GGUF.

Charts are PNG files written next to the page (`<page stem>-*.png`), linked relatively.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from moepack.cli import options as o

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "report", "a Markdown run report, or the model card to share, for a compress run", __doc__,
                      run)
    p.add_argument("run_dir", type=Path, help="a `moepack compress` run directory")
    o.add_output(p, "PAGE.md", "page to write (default RUN_DIR/report.md; a file named README.md gets the model "
                 "card)", required=False)
    p.add_argument("--card", action="store_true",
                   help="write the model card (default: README.md beside the GGUF) instead of the run report")
    p.add_argument("--pareto", type=Path, metavar="PNG",
                   help="a size-vs-KLD PNG to include (e.g. docs/results-pareto-tiny-qwen3-moe.png); the card draws one itself "
                        "when the run measured two or more sizes")
    p.add_argument("--eval", type=Path, metavar="EVAL.json",
                   help="an eval JSON (`moepack eval --json-out`); default: one that scored this GGUF in the run "
                        "directory or beside the GGUF")


def run(args: argparse.Namespace) -> int:
    if args.card or (args.output is not None and args.output.name.lower() == "readme.md"):
        from moepack.eval.card import build_card, card_path

        out = build_card(args.run_dir, args.output or card_path(args.run_dir), args.pareto, args.eval)
    else:
        from moepack.eval.report import build_report

        out = build_report(args.run_dir, args.output or args.run_dir / "report.md", args.pareto, args.eval)
    print(f"wrote {out}")
    return 0
