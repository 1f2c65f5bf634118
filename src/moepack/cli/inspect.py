"""`moepack inspect MODEL [--memory SIZE -c N | --target-size SIZE | --target-bpw X] [--json]`: the MoE structure,
parameter counts and GGUF size estimates of a checkpoint, from config.json and safetensors headers alone.

MODEL is a checkpoint directory, a directory holding only config.json (every tensor's shape is then derived from
the architecture tables: plan before you download), or a Hugging Face repo id already in the local cache. With a
budget it also prints what the budget leaves for weights and a verdict: for each retention `compress --keep auto`
tries (1.0, 0.875, 0.75, 0.625), whether it fits, the bits per kept weight, the largest uniform type and llama.cpp
standard mixture (Q2_K, Q4_K_M, IQ2_XXS, ...; sizes from moepack.stages.mixtures) that fit, which side (file, GPU,
RAM) is short and by how much; and what would make it fit (more memory, a smaller context, a quantized KV cache,
flash attention), with the numbers."""
from __future__ import annotations

import argparse
import json
import logging
from typing import TYPE_CHECKING, Any

from moepack.cli import options as o

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView

__all__ = ["add_cli", "run", "render_fit"]

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
        f"  parameters    {d['params_total']:,} total, {d['params_active']:,} active per token "
        f"({d['params_active_without_embedding']:,} without the input embedding); bf16 {_fmt_bytes(d['bf16_bytes'])}",
        f"  stored        {_fmt_bytes(d['stored']['bytes'])}, {d['stored']['bpw']:.2f} bits/weight ("
        + ", ".join(f"{k} {100 * v / max(1, d['params_total']):.1f}%" for k, v in d["stored"]["params"].items())
        + " of the parameters)",
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


def _mixtures(view: CheckpointView, params: int) -> dict[str, dict[str, Any]]:
    """Each standard mixture's bytes and bits per weight of the whole model."""
    from moepack.stages.mixtures import mixture_sizes

    return {t: {"bytes": size.total, "routed_bytes": size.routed, "bpw": 8 * size.total / params}
            for t, size in mixture_sizes(view, 1.0).items()}


def _budget_lines(f: dict[str, Any]) -> list[str]:
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
                    f"{_fmt_bytes(b['memory'])} (compute buffers {_fmt_bytes(b['compute'])}, reserve "
                    f"{_fmt_bytes(b['reserve'])}), context {b['ctx']}; GGUF overhead {_fmt_bytes(b['overhead'])}")
        lines[1] += (f": {_fmt_bytes(b['gpu_weights'])} on the GPU, {_fmt_bytes(b['weights'] - b['gpu_weights'])} "
                     "in RAM (routed experts, token_embd)")
    return lines


def _short_text(short: list[dict[str, Any]], t: str) -> str:
    where = {"file": "the file", "gpu": "the GPU side", "ram": "the RAM side"}
    return "; ".join(f"{where[x['side']]} is short by {_fmt_bytes(x['short'])} at {t} (needs {_fmt_bytes(x['need'])}, "
                     f"the budget leaves {_fmt_bytes(x['left'])})" for x in short)


def _verdict_line(f: dict[str, Any]) -> str:
    v, rows, t = f["verdict"], f["retentions"], f["ladder_smallest"]
    if not v["fits"]:
        return (f"  verdict       does not fit at any retention compress tries (down to keep {rows[-1]['keep']:g} "
                f"with every tensor at {t}): {_short_text(v['short'], t)}")
    r = next(r for r in rows if r["keep"] == v["keep"])
    mix = f"; llama.cpp mixture {r['best_mixture']}" if r["best_mixture"] else "; no llama.cpp mixture fits"
    if v["keep"] == rows[0]["keep"]:
        return f"  verdict       fits unpruned at {r['best_type']} (the largest uniform type that fits{mix})"
    return (f"  verdict       fits pruned: keep {v['keep']:g} ({r['experts']} experts per layer) at {r['best_type']}"
            f"{mix}; unpruned, {_short_text(v['short'], t)}")


def _remedy_lines(f: dict[str, Any]) -> list[str]:
    v = f["verdict"]
    if not v.get("remedies"):
        return []
    where = {"file": "", "gpu": " on the GPU", "ram": " in RAM"}
    lines = [f"  to fit keep {v['remedy_keep']:g} (every tensor at {f['ladder_smallest']}), any one of:"]
    for r in v["remedies"]:
        if r["what"] in ("more memory", "a larger target"):
            text = r["flags"]
        elif r["what"] == "a smaller context":
            text = f"{r['flags']} (the largest that fits)" if r["fits"] else "none fits, even -c 256"
        else:
            freed = ", ".join(f"{_fmt_bytes(n)}{where[s]}" for s, n in r["freed"].items() if n)
            text = f"{r['flags']} frees {freed or 'nothing'}: {'fits' if r['fits'] else 'not enough alone'}"
        lines.append(f"                {r['what']}: {text}")
    return lines


def render_fit(f: dict[str, Any]) -> str:
    lines = _budget_lines(f) + [_verdict_line(f)]
    t = f["ladder_smallest"]
    for r in f["retentions"]:
        state = "fits" if r["fits"] else "does not fit"
        lines.append(f"  keep {r['keep']:<5g}    {state}: {r['bpw']:5.2f} bits per kept weight ({r['params']:,} "
                     f"parameters, {r['experts']} experts per layer)"
                     + (f"; best uniform type {r['best_type']}" if r["fits"] else f"; {_short_text(r['short'], t)}"))
        mix = sorted((m["bytes"], x) for x, m in r["mixtures"].items() if m["fits"])
        small_b, small_t = min((m["bytes"], x) for x, m in r["mixtures"].items())
        fitting = [f"{x} ({_fmt_bytes(b)})" for b, x in mix]
        rows = [", ".join(fitting[i:i + 6]) for i in range(0, len(fitting), 6)]  # six a line
        lines.append("                llama.cpp mixtures that fit: " + (rows[0] if rows else f"none (the smallest, "
                     f"{small_t}, takes {_fmt_bytes(small_b)})"))
        lines += [" " * 18 + row for row in rows[1:]]
    return "\n".join(lines + _remedy_lines(f))


def run(args: argparse.Namespace) -> int:
    from moepack.gguf.estimate import ESTIMATE_TYPES, describe
    from moepack.model.shapes import open_for_planning
    from moepack.model.source import resolve_model
    from moepack.stages.fit import uniform_bytes

    request = o.budget_request(args)
    planned = any(v is not None for v in (request.memory, request.target_size, request.target_bpw))
    for model in args.models:
        view = open_for_planning(resolve_model(model))
        d = describe(view, {t: uniform_bytes(view, t) for t in ESTIMATE_TYPES})
        d["mixtures"] = _mixtures(view, d["params_total"])
        if planned:
            from moepack.stages.fit import fit_report

            d["fit"] = fit_report(view, request)
        print(json.dumps(d, indent=2) if args.json else
              _render(d) + ("\n" + render_fit(d["fit"]) if planned else ""))
    return 0


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "inspect", "show a checkpoint's MoE structure, parameter counts and GGUF size estimates",
                      __doc__, run)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint directory, a directory with only config.json, or a repo id in the local "
                        "Hugging Face cache")
    o.add_budget(p)
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of the text summary")
