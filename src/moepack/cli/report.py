"""`moepack report RUN_DIR [-o report.md] [--pareto PNG] [--eval EVAL.json]`: one Markdown page per compress run.

The page shows, from the run directory's artifacts (no model is loaded):
- the experts kept per MoE layer, as a heat map of the pruning importance (`pruned-r*/prune_plan.json`), kept
  experts outlined;
- the GGML type chosen for every tensor (`quant_plan-r*.json`), as a chart of bits per weight;
- the top rows of the sensitivity table (`sensitivity-r*.json`): the groups whose first upgrade gains most KLD;
- the eval table, when an eval JSON (`moepack eval --json-out`) is in the run directory or given;
- the Pareto plot, when given (copied beside the page).
Charts are PNG files written next to the page (`<page stem>-*.png`).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from moepack.cli import options as o

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "report", "one Markdown page with charts for a compress run directory", __doc__, run)
    p.add_argument("run_dir", type=Path, help="a `moepack compress` run directory")
    o.add_output(p, "PAGE.md", "page to write (default RUN_DIR/report.md)", required=False)
    p.add_argument("--pareto", type=Path, metavar="PNG",
                   help="a size-vs-KLD PNG to include (e.g. docs/results-pareto.png)")
    p.add_argument("--eval", type=Path, metavar="EVAL.json",
                   help="an eval JSON (`moepack eval --json-out`), if not in the run directory")


def run(args: argparse.Namespace) -> int:
    from moepack.eval.report import build_report

    out = build_report(args.run_dir, args.output or args.run_dir / "report.md", args.pareto, args.eval)
    print(f"wrote {out}")
    return 0
