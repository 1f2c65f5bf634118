"""`moepack compress MODEL_DIR (--memory SIZE [--gpu-memory SIZE] -c N | --target-size SIZE | --target-bpw X) -o
OUT.gguf`: calibrate -> prune -> adjust k' -> sensitivity -> allocate -> write -> verify, in one resumable run.

The budget is a device (--memory and the context it must hold, -c/--ctx-size, as llama.cpp's -c; the KV cache and
compute buffers are subtracted), a GPU + CPU machine (--gpu-memory for all but the routed experts plus the KV cache,
--memory for the routed experts: two budgets, each allocated on its own, for llama.cpp's -ngl 99 -ot exps=CPU) or a
file size (--target-size, or --target-bpw bits per parameter of the original checkpoint). The summary ends with the
llama.cpp command that runs the file as placed. Every stage artifact lives in the run directory (default:
OUT.gguf's name + ".run" beside it); a rerun after an interruption redoes only unfinished stages and writes identical
bytes; candidates are pruned lazily (no checkpoint per retention; --save-pruned DIR writes the chosen one) and the
GGUF is written once, at -o. The written file is loaded in llama.cpp with the device's context and generates a few
tokens before the command reports success.

Every run first prints its plan: the stages, the wall time predicted on this machine (docs/performance.md's cost
model, calibrated by a short timing probe), peak RAM and scratch disk; --dry-run prints only that (from a
config.json alone, too). Sizes need a unit: 128GB = 128*10^9 bytes, 128GiB = 128G = 128*2^30. Words: docs/usage.md's
glossary.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from moepack.cli import options as o
from moepack.errors import MoepackError

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)

REFINE = 4  # pipeline.options.REFINE_PASSES, mirrored to keep torch out of argument parsing (tests/test_refine.py)
SPEED_FLOOR = 0.95  # pipeline.options.SPEED_FLOOR, mirrored likewise (tests/test_speed.py)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "compress", "prune, adjust top-k and quantize a MoE checkpoint to fit a device budget",
                      __doc__, run)
    o.add_model(p)
    o.add_output(p, "OUT.gguf", "GGUF file to write")
    o.add_budget(p)
    o.add_keep(p, auto=True)
    o.add_top_k(p, tol_flag=False)
    o.add_calib_sources(p)
    o.add_calib_tokens(p)
    o.add_seq_len(p)
    o.add_selection_tokens(p, "selection tokens held out after the calibration tokens (sensitivity and every choice); as "
                         "many again after them for the reported KLD, which no choice saw")
    p.add_argument("--probe-tokens", type=int, metavar="N",
                   help="run the sensitivity table's probes on the first N selection tokens only (rounded up to "
                        "whole sequences): the table's cost falls in proportion, every plan is still measured on "
                        "all --sens-tokens (default: all)")
    o.add_solver(p)
    o.add_reference_types(p, "the ladder's smallest type (a fast table) and then, unless --sensitivity fast or a full "
                  "table is too costly for auto, the budget's own uniform type (a full table), keeping whichever "
                  "plan measures lower; groups move up and down from it")
    o.add_ladder(p)
    o.add_sensitivity(p)
    o.add_criterion(p, auto=True)
    o.add_merge(p, auto=True)
    p.add_argument("--min-decode-tps", type=float, default=None, metavar="X",
                   help="every plan must predict at least X decode tokens/s (from the kernel times; types are moved "
                        "to faster ones where needed, within the budget); fails before writing when none can")
    p.add_argument("--speed-floor", type=float, default=SPEED_FLOOR, metavar="F",
                   help="every plan should predict at least F times the decode tokens/s of the same-size llama.cpp "
                        "mixture (types are moved to faster ones where needed, within the budget; a plan that cannot "
                        "is kept as it is); 0 turns it off (default: %(default)s)")
    p.add_argument("--no-speed-tiebreak", dest="speed_tiebreak", action="store_false",
                   help="among retentions not measurably worse than the lowest-KLD one (paired 95%% CI on the "
                        "selection tokens), keep the lowest KLD (default: the fastest predicted decode)")
    p.add_argument("--speed-table", type=Path, default=None, metavar="FILE",
                   help="kernel times of the target device (`moepack speed MODEL -o FILE` run there) to predict "
                        "tokens per second with; default: measured on this machine and cached")
    p.add_argument("--refine", type=int, default=REFINE, metavar="N",
                   help="after allocation, up to N passes of measured moves (budget-neutral swaps, upgrades into "
                        "bytes left over) that the additive sensitivity model misses; 0: off (default %(default)s)")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="stage artifacts: calibration statistics, sensitivity tables, prune and quant plans, summary "
                        "(default OUT.gguf.run beside the output; candidates are pruned lazily, no checkpoint is "
                        "written per retention, and the GGUF is written once, at -o)")
    p.add_argument("--save-pruned", type=Path, metavar="DIR",
                   help="also write the chosen retention's pruned model as a Hugging Face checkpoint to DIR "
                        "(default: none; it takes about the source's size on disk)")
    o.add_threads(p, "torch and quantization threads of every stage and task", ray=True)
    o.add_quant_cache(p)
    p.add_argument("--dry-run", action="store_true",
                   help="check the budget and print the stages, the predicted wall time on this machine, peak RAM and "
                        "scratch disk, then stop (every compress prints the same first); works on a directory "
                        "holding only config.json")
    o.add_repack(p, "verify")
    o.add_backend(p, shards=True)


def _options(args: argparse.Namespace, threads: int, shards: int | None = None):  # -> CompressOptions
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.merge import MergeOptions

    merge = MergeOptions(args.merge_similarity, args.merge_weighting, args.merge_router,
                         args.merge_align) if args.merge else None
    return CompressOptions(keep=args.keep, top_k=args.top_k, calib_text=o.calib_sources(args),
                           calib_tokens=args.calib_tokens, seq_len=args.seq_len, selection_tokens=args.selection_tokens,
                           solver=args.solver, reference=args.reference_types, ladder=args.ladder, criterion=args.criterion,
                           threads=threads, shards=shards, cache_dir=args.quant_cache, repack=args.repack,
                           sensitivity=args.sensitivity, refine=args.refine, probe_tokens=args.probe_tokens,
                           save_pruned=args.save_pruned, merge=merge, speed_table=args.speed_table,
                           min_decode_tps=args.min_decode_tps, speed_tiebreak=args.speed_tiebreak,
                           speed_floor=args.speed_floor)


def run(args: argparse.Namespace) -> int:
    from moepack.pipeline.compress import compress, dry_run
    from moepack.pipeline.summary_text import render_summary

    o.check_positive(args, "calib_tokens", "seq_len", "selection_tokens", "threads", "probe_tokens")
    if args.speed_table is not None:  # read now: a bad file fails before hours of work
        from moepack.schema.speed import KernelTimes

        KernelTimes.read(args.speed_table)
    if args.refine < 0:
        raise MoepackError(f"--refine must be 0 (off) or a number of passes (got {args.refine})")
    if args.dry_run:
        print(dry_run(args.model_dir, o.budget_request(args), _options(args, o.threads(args))))
        return 0
    with o.make_backend(args) as backend:
        opts = _options(args, o.threads(args, backend), args.shards)
        summary = compress(args.model_dir, args.output, o.budget_request(args), opts, args.run_dir, backend)
    print(render_summary(summary))
    return 0
