"""`moepack inspect MODEL_DIR [--json]`: the MoE structure, parameter counts and GGUF size estimates of a checkpoint,
from config.json and safetensors headers alone."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import gguf

from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView, open_checkpoint

__all__ = ["add_cli", "describe", "estimate_size", "tensor_bytes", "ESTIMATE_TYPES"]

log = logging.getLogger(__name__)

ESTIMATE_TYPES = ("Q8_0", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S")
_F32 = gguf.GGMLQuantizationType.F32


def tensor_bytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor at `qtype`, or at llama.cpp's fallback type when its rows do not fit the block size."""
    from moepack.gguf.kernels import fallback_type

    qtype = fallback_type(qtype, shape[-1])
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


def estimate_size(view: CheckpointView, type_name: str) -> int:
    """GGUF tensor data bytes with every quantizable tensor at `type_name` and the rest at F32."""
    qtype = gguf.GGMLQuantizationType[type_name]
    return sum(tensor_bytes(t.shape, qtype if t.quantizable else _F32) for t in view.tensors.values())


def describe(view: CheckpointView) -> dict[str, Any]:
    f = view.facts
    counts = view.param_counts()
    total = sum(counts.values())
    routed_per_expert = counts[Role.ROUTED_EXPERTS.value] / max(1, len(f.moe_layers) * f.n_experts)
    active = total - counts[Role.ROUTED_EXPERTS.value] + routed_per_expert * f.top_k * len(f.moe_layers)
    return {
        "path": str(view.root),
        "architecture": f.arch,
        "hf_class": view.spec.hf_class,
        "gguf_arch": f.gguf_arch,
        "layers": f.n_layers,
        "moe_layers": list(f.moe_layers),
        "dense_layers": list(f.dense_layers),
        "routed_experts": f.n_experts,
        "top_k": f.top_k,
        "shared_experts": f.n_shared_experts,
        "expert_ffn": f.expert_ffn,
        "hidden": f.hidden,
        "vocab": f.vocab,
        "routing": {
            "scoring": f.scoring,
            "bias": f.router_bias,
            "n_group": f.n_group,
            "topk_group": f.topk_group,
            "routed_scaling_factor": f.routed_scaling_factor,
            "norm_topk_prob": f.norm_topk_prob,
        },
        "params": counts,
        "params_total": total,
        "params_active": int(active),
        "bf16_bytes": 2 * total,
        "gguf_estimates": {t: estimate_size(view, t) for t in ESTIMATE_TYPES},
        "fingerprint": view.fingerprint(),
    }


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
    for model_dir in args.model_dirs:
        d = describe(open_checkpoint(model_dir))
        print(json.dumps(d, indent=2) if args.json else _render(d))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's MoE structure, parameter counts and GGUF size estimates")
    p.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
