"""`moepack inspect MODEL_DIR [--json]`: the MoE structure, parameter counts and GGUF size estimates of a checkpoint,
from config.json and safetensors headers alone."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from moepack.cli import options as o

__all__ = ["add_cli", "run"]

log = logging.getLogger(__name__)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _render(d: dict[str, Any]) -> str:
    r = d["routing"]
    groups = f", groups {r['n_group']} (top {r['topk_group']} used)" if r["n_group"] else ""
    lines = [
        f"{d['path']}: {d['architecture']} ({d['hf_class']}; llama.cpp arch {d['gguf_arch']})",
        f"  layers        {d['layers']}: {len(d['moe_layers'])} MoE, {len(d['dense_layers'])} dense {d['dense_layers'] or ''}",
        f"  experts       {d['routed_experts']} routed per MoE layer (ffn {d['expert_ffn']}), top-k {d['top_k']}, "
        f"{d['shared_experts']} shared",
        f"  routing       {r['scoring']}{' + correction bias' if r['bias'] else ''}{groups}, "
        f"scale {r['routed_scaling_factor']:g}, normalised top-k: {'yes' if r['norm_topk_prob'] else 'no'}",
        f"  parameters    {d['params_total']:,} total, {d['params_active']:,} active per token; "
        f"bf16 {_fmt_bytes(d['bf16_bytes'])}",
    ]
    width = max(len(k) for k in d["params"])
    for k, v in d["params"].items():
        if v:
            lines.append(f"    {k:<{width}}  {v:>15,}  {100 * v / d['params_total']:5.1f}%")
    lines.append("  GGUF size estimates (quantizable weights at the type, norms/routers F32):")
    for t, b in d["gguf_estimates"].items():
        bpw = 8 * b / d["params_total"]
        lines.append(f"    {t:<8} {_fmt_bytes(b):>12}  {bpw:5.2f} bits/weight")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from moepack.gguf.estimate import describe
    from moepack.model.checkpoint import open_checkpoint

    for model_dir in args.model_dirs:
        d = describe(open_checkpoint(model_dir))
        print(json.dumps(d, indent=2) if args.json else _render(d))
    return 0


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "inspect", "show a checkpoint's MoE structure, parameter counts and GGUF size estimates",
                      __doc__, run)
    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of the text summary")
