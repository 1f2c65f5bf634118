"""`moepack usage MODEL_DIR --calib-text NAME=FILE --calib-text NAME=FILE ... -o OUT_DIR`: which experts each domain's text
routes to, per MoE layer — the specialisation that domain-targeted pruning (`compress --calib-text`) relies on.

Each text is calibrated on (OUT_DIR/<NAME>/calib/, reused when run again with the same inputs); OUT_DIR gets
usage.png (one heat map per MoE layer: domains × experts, experts grouped by the domain that uses them most),
usage.md (per domain and layer: the share of experts it barely uses, under a quarter of the uniform share, and the
share of specialist experts, over half of whose usage is that domain's) and usage.json (every share).
"""
from __future__ import annotations

import argparse

from moepack.cli import options as o

__all__ = ["add_cli", "run"]


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "usage", "expert usage per domain: heat map and the experts each domain barely uses",
                      __doc__, run)
    o.add_model(p)
    p.add_argument("--calib-text", action="append", required=True, metavar="[NAME=]FILE",
                   help="a domain's text (at least two; e.g. code=data/calib/code.txt); a bare FILE is named by its stem")
    o.add_calib_tokens(p)
    o.add_seq_len(p)
    o.add_batch_size(p)
    o.add_output(p, "OUT_DIR", "directory for usage.png, usage.md, usage.json and one calibration run per domain")
    o.add_threads(p, "torch threads")


def run(args: argparse.Namespace) -> int:
    from moepack.eval.usage import domain_usage, parse_texts, usage_markdown, write_usage

    o.check_positive(args, "calib_tokens", "seq_len", "batch_size")
    texts = parse_texts(args.calib_text)
    u = domain_usage(args.model_dir, texts, args.output, tokens=args.calib_tokens, seq_len=args.seq_len,
                     batch_size=args.batch_size, threads=o.threads(args))
    paths = write_usage(u, args.output)
    print(usage_markdown(u), end="")
    print(f"-> {paths['png']}, {paths['md']}, {paths['json']}")
    return 0
