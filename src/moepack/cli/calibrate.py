"""`moepack calibrate MODEL_DIR [--calib-text FILE] -o RUN_DIR`: run calibration text through the model layer by
layer; record routing statistics and the importance matrix.

Per MoE layer and routed expert: routed token slots (-> frequency), the sum of the routing weights that multiply
the expert's output (-> mean score), and the sum of weight x |expert output| (-> REAP saliency). Per weight matrix
(per expert for expert matrices): the sum of squared input activations per input column and the token count, i.e.
llama.cpp's importance matrix. Saved as RUN_DIR/calib/stats.safetensors + RUN_DIR/calib/manifest.json; RUN_DIR is
what `prune`, `sensitivity` and `quantize` take as --calib-dir.

A good calibration text is text of the domain the model is deployed for (a few hundred thousand characters); never
the text you evaluate on. The --sens-tokens tokens after the first --calib-tokens are held out (for `prune --top-k
auto`), as `moepack compress` does.
"""
from __future__ import annotations

import argparse
import logging

from moepack.cli import options as o
from moepack.errors import MoepackError

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "calibrate", "record routing statistics and the importance matrix on calibration text",
                      __doc__, run)
    o.add_model(p)
    o.add_calib_sources(p)
    o.add_calib_tokens(p)
    o.add_seq_len(p)
    o.add_selection_tokens(p, "tokens after the calibration tokens held out for KLD checks (prune --top-k auto); 0: none")
    o.add_batch_size(p)
    o.add_output(p, "RUN_DIR", "run directory (statistics go to RUN_DIR/calib/)")
    p.add_argument("--imatrix-out", metavar="FILE",
                   help="also write llama.cpp's GGUF imatrix file (for llama-quantize --imatrix)")
    o.add_threads(p, "torch threads per task", ray=True)
    o.add_backend(p, shards=True)


def run(args: argparse.Namespace) -> int:
    from moepack.schema import calib_dir
    from moepack.stages.calibrate import run_calibrate

    o.check_positive(args, "calib_tokens", "seq_len", "batch_size", "threads")
    if args.selection_tokens < 0:
        raise MoepackError(f"--sens-tokens must be at least 0 (got {args.selection_tokens})")
    text = o.calib_sources(args)
    if text is None:
        log.info("calibration text: moepack's bundled stories, encyclopedic prose, dialogue, code and web text; pass "
                 "--calib-text with text from your own domain for a better file")
    with o.make_backend(args) as backend:
        stats = run_calibrate(args.model_dir, text, args.output,
                              tokens=args.calib_tokens, seq_len=args.seq_len, selection_tokens=args.selection_tokens,
                              batch_size=args.batch_size, imatrix_out=args.imatrix_out, backend=backend,
                              shards=args.shards, threads=o.threads(args, backend))
    m = stats.manifest.to_dict()
    print(f"calibrated {m['tokens']} tokens ({m['n_sequences']} x {m['seq_len']}, {m.get('shards', 1)} shard(s)) "
          f"in {m['seconds']} s -> {calib_dir(args.output)}")
    for layer, ex in m["never_routed"].items():
        print(f"  layer {layer}: never routed experts {ex}")
    if args.imatrix_out:
        print(f"imatrix -> {args.imatrix_out}")
    return 0
