"""`moepack allocate --sensitivity sensitivity.json (--target-size SIZE | --budget-bytes N) -o quant_plan.json`: one
GGML type per tensor group, the lowest predicted KLD whose bytes fit the budget.

The predicted change of a plan is the sum of its groups' measured changes (sensitivity.json). Solvers: `greedy`, the
paper's dynamic budgeting with back-off (take the upgrade with the most KLD saved per extra byte; when it would
overshoot, take the next best that fits); `exact`, a multiple-choice knapsack by dynamic programming over byte
buckets, never worse than greedy. Both plans fit the budget. The plan goes to `moepack quantize --plan`.
"""
from __future__ import annotations

import argparse
import logging

from moepack.cli import options as o

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "allocate", "choose a GGML type per tensor group from sensitivity.json under a budget",
                      __doc__, run)
    p.add_argument("--sensitivity", required=True, metavar="FILE", help="sensitivity.json from `moepack sensitivity`")
    g = p.add_mutually_exclusive_group(required=True)
    o.add_target_size(g, "; the table's overhead_bytes (non-tensor GGUF bytes) are subtracted")
    g.add_argument("--budget-bytes", metavar="N", help="bytes of tensor data the plan may use")
    o.add_solver(p)
    o.add_output(p, "FILE", "quant_plan.json to write")


def run(args: argparse.Namespace) -> int:
    from moepack.schema import SensitivityTable
    from moepack.stages.allocate import allocate, budget_bytes_for

    table = SensitivityTable.read(args.sensitivity)
    budget = budget_bytes_for(table, target_size=args.target_size, budget_bytes=args.budget_bytes)
    plan = allocate(table, budget, args.solver)
    out = plan.write(args.output)
    types = ", ".join(f"{t} ×{n}" for t, n in plan.type_counts().items())
    share = 100 * plan.predicted_bytes / max(1, plan.budget_bytes)
    print(f"{out}: {plan.solver} plan, {plan.predicted_bytes:,} of {plan.budget_bytes:,} bytes "
          f"({share:.2f} %), predicted ΔKLD {plan.predicted_dkld:+.5g}"
          f"\n  tensors: {types}")
    return 0
