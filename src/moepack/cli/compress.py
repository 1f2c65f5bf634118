"""`moepack compress MODEL_DIR (--memory SIZE [--gpu-memory SIZE] -c N | --target-size SIZE | --target-bpw X) -o
OUT.gguf`: calibrate -> prune -> adjust k' -> sensitivity -> allocate -> write -> verify, in one resumable run.

The budget is a device (--memory and the context it must hold, -c/--ctx-size, as llama.cpp's -c; the KV cache and
compute buffers are subtracted), a GPU + CPU machine (--gpu-memory for all but the routed experts plus the KV cache,
--memory for the routed experts: two budgets, each allocated on its own, for llama.cpp's -ngl 99 -ot exps=CPU) or a
file size (--target-size, or --target-bpw bits per parameter of the original checkpoint). The summary ends with the
llama.cpp command that runs the file as placed. Every stage artifact lives in the run directory (default:
OUT.gguf's name + ".run" beside it); a rerun after an interruption redoes only unfinished stages and writes identical
bytes. The written file is loaded in llama.cpp with the device's context and generates a few tokens before the
command reports success.
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


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "compress", "prune, adjust top-k and quantize a MoE checkpoint to fit a device budget",
                      __doc__, run)
    p.add_argument("model_dir", type=Path, help="Hugging Face checkpoint directory")
    o.add_output(p, "OUT.gguf", "GGUF file to write")
    o.add_budget(p)
    o.add_keep(p, auto=True)
    o.add_top_k(p)
    o.add_calib_text(p)
    o.add_calib_tokens(p)
    o.add_seq_len(p)
    o.add_sens_tokens(p, "selection tokens held out after the calibration tokens (sensitivity and every choice); as "
                         "many again after them for the reported KLD, which no choice saw")
    p.add_argument("--probe-tokens", type=int, metavar="N",
                   help="run the sensitivity table's probes on the first N selection tokens only (rounded up to "
                        "whole sequences): the table's cost falls in proportion, every plan is still measured on "
                        "all --sens-tokens (default: all)")
    o.add_solver(p)
    o.add_base(p, "the ladder's smallest type (a fast table) and then, unless --sensitivity fast or a full "
                  "table is too costly for auto, the budget's own uniform type (a full table), keeping whichever "
                  "plan measures lower; groups move up and down from it")
    o.add_ladder(p)
    o.add_sensitivity(p)
    o.add_criterion(p, auto=True)
    p.add_argument("--refine", type=int, default=REFINE, metavar="N",
                   help="after allocation, up to N passes of measured moves (budget-neutral swaps, upgrades into "
                        "bytes left over) that the additive sensitivity model misses; 0: off (default %(default)s)")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="stage artifacts (default OUT.gguf.run beside the output)")
    o.add_threads(p, "torch and quantization threads of every stage and task", ray=True)
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="keep the sensitivity stage's quantized tensors on disk here (large models; with --ray on "
                        "storage every machine sees)")
    o.add_repack(p, "verify")
    o.add_backend(p, shards=True)


def run(args: argparse.Namespace) -> int:
    from moepack.pipeline.compress import compress, render_summary
    from moepack.pipeline.options import CompressOptions

    o.check_positive(args, "calib_tokens", "seq_len", "sens_tokens", "threads", "probe_tokens")
    if args.refine < 0:
        raise MoepackError(f"--refine must be 0 (off) or a number of passes (got {args.refine})")
    with o.make_backend(args) as backend:
        opts = CompressOptions(keep=args.keep, top_k=args.top_k, calib_text=args.calib_text,
                               calib_tokens=args.calib_tokens, seq_len=args.seq_len, sens_tokens=args.sens_tokens,
                               solver=args.solver, base=args.base, ladder=args.ladder, criterion=args.criterion,
                               threads=o.threads(args, backend), shards=args.shards, cache_dir=args.cache_dir,
                               extra_bufts=args.repack, sensitivity=args.sensitivity,
                               refine=args.refine, probe_tokens=args.probe_tokens)
        result = compress(args.model_dir, args.output, o.budget_request(args), opts, args.run_dir, backend)
    print(render_summary(result))
    return 0
