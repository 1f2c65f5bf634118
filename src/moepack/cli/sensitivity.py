"""`moepack sensitivity MODEL_DIR --calib-dir RUN_DIR --calib-text FILE -o sensitivity.json`: the change of the
model's output KL divergence for every tensor group raised from its base type to each ladder type.

Groups are one GGUF tensor class in one layer ("blk.3.ffn_down_exps", "blk.0.attn_kv_b"), plus token_embd and
output; each option's bytes are the GGUF bytes of the group's tensors at that type after llama.cpp's row-width
fallbacks. Every weight is fake-quantized exactly as the GGUF writer writes it, with the importance matrix of
--calib-dir. KLD mode measures KL(reference || model) per token on the first --sens-tokens tokens of --calib-text
(held-out text of the deployment domain, like the calibration text; never the evaluation text), the reference being
the original (unpruned) model. Proxy mode: the imatrix-weighted squared quantization error, no forward; both are
reported when KLD is measured, with their rank agreement. --sensitivity fast probes one type per group and predicts
the others from their quantization error (forward passes independent of the ladder length); auto (default) is fast
when the full table's estimate, timed on those probes, exceeds 30 minutes.

Output: sensitivity.json, the input of `moepack allocate`; every field except "timing" is a deterministic function
of the inputs.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from moepack.cli import options as o

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "sensitivity", "measure ΔKLD per tensor group and GGML type (sensitivity.json)",
                      __doc__, run)
    o.add_model(p, " (original or pruned)")
    o.add_calib_dir(p, "importance matrix")
    o.add_calib_text(p, required=True, help="text to measure on (UTF-8): held-out text of the deployment domain, "
                                            "like the calibration text; never the text you evaluate on")
    o.add_selection_tokens(p, "tokens to measure on")
    o.add_seq_len(p)
    o.add_reference(p, "reference model (the unpruned original; default: MODEL_DIR unquantized)",
                    metavar="ORIG_MODEL_DIR")
    o.add_reference_types(p, o.REFERENCE)
    o.add_ladder(p)
    p.add_argument("--mode", choices=o.SENS_MODES, default="kld", help="kld (measured; the proxy comes free) or proxy (default kld)")
    o.add_sensitivity(p)
    o.add_threads(p, "torch and quantization threads per task", ray=True)
    o.add_batch_size(p)
    o.add_quant_cache(p)
    o.add_output(p, "sensitivity.json", "sensitivity table to write")
    o.add_backend(p)


def run(args: argparse.Namespace) -> int:
    from moepack.model.checkpoint import open_checkpoint
    from moepack.model.textdata import chunk_tokens, tokenize_file
    from moepack.schema import CalibStats
    from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity

    o.check_positive(args, "selection_tokens", "seq_len", "batch_size", "threads")
    view = open_checkpoint(args.model_dir)
    ref_view = open_checkpoint(args.reference) if args.reference else None
    stats = CalibStats.read(args.calib_dir)
    ids = chunk_tokens(tokenize_file(args.model_dir, args.calib_text, args.selection_tokens), args.seq_len)  # (N, L)
    with o.make_backend(args) as backend:
        cfg = SensitivityConfig(reference=args.reference_types, ladder=tuple(args.ladder), mode=args.mode,
                                threads=o.threads(args, backend), batch_size=args.batch_size, cache_dir=args.quant_cache,
                                sensitivity=args.sensitivity)
        table = measure_sensitivity(view, ids, cfg, reference_view=ref_view, imatrix=stats, backend=backend)
    table.write(args.output)
    _summary(table.to_dict(), args.output)
    return 0


def _summary(table: dict[str, Any], path: Path) -> None:
    t, b = table["timing"], table["base"]
    n_opt = sum(len(g["options"]) - 1 for g in table["groups"])
    print(f"{path}: {len(table['groups'])} groups, {n_opt} upgrades, {b['tokens']} tokens, "
          f"measure {b['measure']}"
          f"{' (' + b['sensitivity'] + ')' if 'sensitivity' in b else ''}, {t['total_s']:.1f} s")
    if "kld" in b:
        rho = table["proxy"]["spearman"]
        print(f"  KLD of the all-base model: {b['kld']:.5f}; proxy rank agreement (Spearman): "
              f"{'n/a' if rho is None else f'{rho:.3f}'}")
    best = sorted(((opt["dkld"], g["name"], opt["type"]) for g in table["groups"] for opt in g["options"][1:]))[:5]
    for d, name, typ in best:
        print(f"  {name:28s} {typ:8s} ΔKLD {d:+.5f}")
