"""`moepack prune MODEL_DIR --calib-dir RUN_DIR [--keep R] [--top-k K|auto] -o OUT_DIR`: remove the least important
routed experts and adjust top-k; writes `prune_plan.json` and a pruned Hugging Face checkpoint.

Importance per routed expert (criterion "score", the paper's): I = alpha * f + (1 - alpha) * s, with f (share of
routed token slots) and s (mean routing weight when selected) each divided by its per-layer maximum. Every MoE layer
keeps the same number ceil(R * E) of experts (llama.cpp has one expert count per model); group-limited routers keep
the same number in every group unless `--groups collapse`. The pruned checkpoint renumbers the kept experts, slices
router rows and e_score_correction_bias, and updates config.json; it is written tensor by tensor.

`--merge` folds each dropped expert into the kept expert of its group whose outputs on the calibration tokens are
most similar (`--merge-similarity weight`: whose weights), as the usage-weighted average of their weights
(`--merge-weighting`; each member's neurons matched to the host's first unless `--no-merge-align`), and merges their
router rows (`--merge-router`); prune_plan.json records who went where.
"""
from __future__ import annotations

import argparse
import logging

from moepack.cli import options as o

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "prune", "remove the least important routed experts and adjust top-k", __doc__, run)
    o.add_model(p)
    o.add_calib_dir(p, "routing statistics")
    o.add_keep(p, auto=False)
    p.add_argument("--alpha", type=float, default=0.5, help="frequency weight in the score criterion (default 0.5)")
    o.add_criterion(p)
    o.add_top_k(p)
    p.add_argument("--kld-tol", type=float, default=0.01,
                   help="--top-k auto: smallest k' whose mean KLD is within this many nats of the best (default 0.01)")
    p.add_argument("--groups", choices=("preserve", "collapse"), default="preserve",
                   help="group-limited routers: keep the same count per group (default) or merge into one group")
    p.add_argument("--seed", type=int, default=0, help="seed for --criterion random (default 0)")
    o.add_merge(p)
    o.add_batch_size(p, "sequences per forward batch for --top-k auto")
    o.add_output(p, "OUT_DIR", "output directory of the pruned checkpoint")


def run(args: argparse.Namespace) -> int:
    from moepack.stages.merge import MergeOptions
    from moepack.stages.prune import PruneOptions, run_prune

    o.check_positive(args, "batch_size")
    merge = MergeOptions(args.merge_similarity, args.merge_weighting, args.merge_router,
                         args.merge_align) if args.merge else None
    opts = PruneOptions(keep=args.keep, alpha=args.alpha, criterion=args.criterion, top_k=args.top_k,
                        groups=args.groups, seed=args.seed, kld_tol=args.kld_tol, batch_size=args.batch_size,
                        merge=merge)
    plan = run_prune(args.model_dir, args.calib_dir, args.output, opts).to_dict()
    print(f"kept {plan['n_kept']} of {plan['n_experts']} experts in each of {len(plan['layers'])} MoE layers "
          f"({plan['criterion']}), top-k {plan['top_k']} -> {plan['top_k_new']} -> {args.output}")
    for row in plan["top_k_table"]:
        print(f"  k'={row['top_k']}: mean KLD {row['kld_mean']:.4f}, top-1 agreement {row['top1_agree']:.3f}, "
              f"{row['active_bytes']} active bytes/token")
    if plan.get("merge"):
        n = sum(len(g["members"]) - 1 for gs in plan["merge"]["layers"].values() for g in gs)
        print(f"  merged {n} dropped experts into kept ones ({plan['merge']['similarity']} similarity, "
              f"{plan['merge']['weighting']}-weighted, router {plan['merge']['router']})")
    for note in plan["notes"]:
        print(f"  note: {note}")
    return 0
