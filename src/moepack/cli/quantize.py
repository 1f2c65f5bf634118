"""`moepack quantize MODEL_DIR (--type T | --plan PLAN | --ftype F) [--calib-dir RUN_DIR | --imatrix FILE] -o OUT.gguf`:
a checkpoint (original or pruned) -> one GGUF.

Two quantizers, two kinds of names:

--type T      moepack's writer, ONE GGML type for every weight matrix: T is a GGML tensor type (Q4_K, IQ2_XXS,
              Q8_0, ...). Norms, routers and biases stay F32; where a row width does not suit T, llama.cpp's
              fallback type is used for that tensor.
--plan PLAN   moepack's writer, per-tensor types from a quant plan (`moepack allocate`'s, or one written by hand):
              {"tensors": {"<GGUF tensor name>": "<GGML type>" or {"type": "<GGML type>", ...}, ...}, ...}; its
              other fields go into the GGUF's moepack.quant_plan as they are.
--ftype F     llama.cpp's own quantizer (llama_model_quantize), from a lossless BF16 (or F32) GGUF written first:
              F is one of llama.cpp's file-type names (Q4_K_M, Q3_K_S, Q2_K, IQ2_XXS, Q8_0, ...), a MIXTURE that
              gives some tensors other types (Q4_K_M keeps some attention and ffn_down tensors at Q6_K); the
              uniform baselines llama-quantize would make.

So `--type Q4_K` and `--ftype Q4_K_M` give different files, and a bare GGML type that is not one of llama.cpp's
file-type names (Q4_K, Q3_K, Q5_K: only llama-quantize's aliases of the _M mixtures) is refused by --ftype.

The importance matrix (needed by the IQ1/IQ2 types) comes from a calibration run directory (--calib-dir) or from
llama.cpp's imatrix GGUF (--imatrix FILE, as llama-quantize takes it). For a pruned checkpoint, the original model's
importance matrix is sliced to the kept experts.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from moepack.cli import options as o
from moepack.errors import MoepackError

__all__ = ["add_cli", "run", "check_ftype"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "quantize", "write a GGUF at one GGML type, a quant plan, or a llama.cpp ftype mixture",
                      __doc__, run)
    o.add_model(p, " (original or pruned)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--type", dest="qtype", metavar="T",
                     help="moepack's writer: this GGML type (Q4_K, IQ2_XXS, ...) for every weight matrix")
    how.add_argument("--plan", type=Path, metavar="PLAN",
                     help="moepack's writer: quant_plan.json with per-tensor types")
    how.add_argument("--ftype", metavar="F",
                     help="llama.cpp's quantizer: one of its file-type mixtures (Q4_K_M, Q3_K_S, IQ2_XXS, ...)")
    im = p.add_mutually_exclusive_group()
    o.add_calib_dir(im, "importance matrix", required=False)
    im.add_argument("--imatrix", type=Path, metavar="FILE",
                    help="importance matrix: llama.cpp's imatrix GGUF (from llama-imatrix or calibrate --imatrix-out)")
    o.add_output(p, "OUT.gguf", "GGUF file to write")
    o.add_threads(p, "quantization threads")


def check_ftype(name: str) -> None:
    """Refuse a GGML type name that llama.cpp knows only as an alias of a mixture (Q4_K for Q4_K_M): with --ftype it
    would not mean what --type means."""
    import gguf

    from moepack.gguf.kernels import ftypes

    key = name.strip().upper()
    table = ftypes()
    mixtures = sorted(k for k, v in table.items() if k != key and k.startswith(key + "_") and v == table.get(key))
    if key in gguf.GGMLQuantizationType.__members__ and mixtures:
        raise MoepackError(f"--ftype {name}: {key} is a GGML type, and for llama.cpp only an alias of the mixture "
                           f"{mixtures[0]}; use --type {key} for {key} in every weight matrix (moepack's writer) or "
                           f"--ftype {mixtures[0]} for llama.cpp's mixture")


def run(args: argparse.Namespace) -> int:
    from moepack.gguf.quantize import quantize_model

    o.check_positive(args, "threads")
    if args.ftype is not None:
        check_ftype(args.ftype)
    if args.calib_dir is not None and not args.calib_dir.is_dir():
        raise MoepackError(f"--calib-dir {args.calib_dir}: no such directory (llama.cpp's imatrix GGUF file goes to "
                           "--imatrix)")
    if args.imatrix is not None and args.imatrix.is_dir():
        raise MoepackError(f"--imatrix {args.imatrix} is a directory; a `moepack calibrate` run directory goes to "
                           "--calib-dir, --imatrix takes llama.cpp's imatrix GGUF file")
    report = quantize_model(args.model_dir, args.output, qtype=args.qtype, plan=args.plan, ftype=args.ftype,
                            imatrix=args.calib_dir or args.imatrix, threads=o.threads(args))
    n_fb = len(report.fallbacks)
    print(f"wrote {report.path} ({report.n_bytes / 2**20:.1f} MiB, {len(report.tensor_types)} tensors"
          + (f", {n_fb} row-width fallback(s)" if n_fb else "") + ")")
    return 0
