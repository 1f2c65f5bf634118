"""`moepack inspect MODEL [--memory SIZE -c N | --target-size SIZE | --target-bpw X] [--json]`: the MoE structure,
parameter counts and GGUF size estimates of a checkpoint, from config.json and safetensors headers alone.

MODEL is a checkpoint directory, a directory holding only config.json (every tensor's shape is then derived from
the architecture tables: plan before you download), or a Hugging Face repo id already in the local cache. With a
budget it also prints what the budget leaves for weights, the bits per weight that gives at expert retention 1.0
and 0.75, and which single types and which of llama.cpp's standard mixtures (Q2_K, Q4_K_M, IQ2_XXS, ...; sizes from
moepack.stages.mixtures) fit."""
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
    lines.append("  llama.cpp mixtures (llama-quantize's per-tensor rules; tensor data, with an imatrix):")
    row = []
    for t, m in sorted(d["mixtures"].items(), key=lambda kv: kv[1]["bytes"]):
        row.append(f"{t} {_fmt_bytes(m['bytes'])} ({m['bpw']:.2f})")
        if len(row) == 4:
            lines.append("    " + ", ".join(row))
            row = []
    if row:
        lines.append("    " + ", ".join(row))
    return "\n".join(lines)


def _mixtures(view: Any, keep: float, params: int, budget: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Each standard mixture's bytes and bits per weight at retention `keep`; with a budget, whether it fits
    (with a GPU budget: the GPU-resident tensors within the GPU's share, the rest within the RAM's)."""
    from moepack.stages.mixtures import mixture_sizes

    gpu_budget = budget.get("gpu_weights") if budget else None
    on_gpu = None
    if gpu_budget is not None:
        from moepack.stages.placement import on_gpu
    out = {}
    for t, size in mixture_sizes(view, keep, on_gpu=on_gpu).items():
        m: dict[str, Any] = {"bytes": size.total, "routed_bytes": size.routed, "bpw": 8 * size.total / params}
        if budget is not None:
            m["fits"] = size.total <= budget["weights"]
            if size.gpu is not None:
                m["gpu_bytes"] = size.gpu
                m["fits"] = size.gpu <= gpu_budget and size.total - size.gpu <= budget["weights"] - gpu_budget
        out[t] = m
    return out


def _render_fit(f: dict[str, Any]) -> str:
    b = f["budget"]
    how = (f"device memory {_fmt_bytes(b['memory'])}, context {b['ctx']}: KV cache {_fmt_bytes(b['kv_cache'])}, "
           f"compute buffers {_fmt_bytes(b['compute'])}, reserve {_fmt_bytes(b['reserve'])}"
           if b["source"] == "memory" else f"file target {_fmt_bytes(b['target'])}")
    lines = [f"  budget        {how}; GGUF overhead {_fmt_bytes(b['overhead'])}",
             f"                leaves {_fmt_bytes(b['weights'])} for tensor data (file at most "
             f"{_fmt_bytes(f['file_limit'])})"]
    if b.get("gpu_weights") is not None:  # GPU + RAM: -ngl 99 -ot exps=CPU
        lines[0] = (f"  budget        GPU {_fmt_bytes(b['gpu_memory'])} (KV cache {_fmt_bytes(b['kv_cache'])}, compute "
                    f"buffers {_fmt_bytes(b['compute'])}, reserve {_fmt_bytes(b['gpu_reserve'])}) + RAM "
                    f"{_fmt_bytes(b['memory'])} (compute buffers, reserve {_fmt_bytes(b['reserve'])}), context "
                    f"{b['ctx']}; GGUF overhead {_fmt_bytes(b['overhead'])}")
        lines[1] += (f": {_fmt_bytes(b['gpu_weights'])} on the GPU, {_fmt_bytes(b['weights'] - b['gpu_weights'])} "
                     "in RAM (routed experts, token_embd)")
    for r in f["retentions"]:
        fit = [t for t, v in r["types"].items() if v["fits"]]
        mix = sorted((m["bytes"], t) for t, m in r["mixtures"].items() if m["fits"])
        lines.append(f"  keep {r['keep']:<5g}    {r['bpw']:5.2f} bits per kept weight ({r['params']:,} parameters); "
                     f"uniform types that fit: {', '.join(fit) or 'none'}")
        small_b, small_t = min((m["bytes"], t) for t, m in r["mixtures"].items())
        lines.append("                llama.cpp mixtures that fit: " + (", ".join(
            f"{t} ({_fmt_bytes(b)})" for b, t in mix) or f"none (the smallest, {small_t}, takes "
            f"{_fmt_bytes(small_b)})"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from moepack.gguf.estimate import describe
    from moepack.model.shapes import open_for_planning
    from moepack.model.source import resolve_model

    request = o.budget_request(args)
    planned = any(v is not None for v in (request.memory, request.target_size, request.target_bpw))
    for model in args.models:
        view = open_for_planning(resolve_model(model))
        d = describe(view)
        d["mixtures"] = _mixtures(view, 1.0, d["params_total"])
        if planned:
            from moepack.stages.fit import fit_report

            d["fit"] = fit = fit_report(view, request)
            for r in fit["retentions"]:
                r["mixtures"] = _mixtures(view, r["keep"], r["params"], fit["budget"])
        print(json.dumps(d, indent=2) if args.json else
              _render(d) + ("\n" + _render_fit(d["fit"]) if planned else ""))
    return 0


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "inspect", "show a checkpoint's MoE structure, parameter counts and GGUF size estimates",
                      __doc__, run)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint directory, a directory with only config.json, or a repo id in the local "
                        "Hugging Face cache")
    o.add_budget(p)
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of the text summary")
