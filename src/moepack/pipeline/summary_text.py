"""The summary `moepack compress` prints: what it wrote, the KLD it measured, what each choice measured, and the
llama.cpp command that runs the file (from the run's RunSummary, as summary.json holds it)."""
from __future__ import annotations

import logging
from typing import Any

from moepack.schema import RunSummary
from moepack.stages.budget import format_size

__all__ = ["render_summary"]

log = logging.getLogger(__name__)


def render_summary(r: RunSummary) -> str:
    lines = [
        f"wrote {r.out}: {format_size(r.file_bytes)} ({r.bpw:.2f} bits per original weight), "
        f"budget {format_size(r.budget['weights'] + r.budget['overhead'])}",
        f"  experts kept  {r.n_experts[0]} of {r.n_experts[1]} per MoE layer (keep {r.keep:g}), top-k {r.top_k}",
        f"  bytes         predicted tensors+metadata {r.predicted_bytes:,}; actual file {r.file_bytes:,}",
    ]
    if r.report_kld is not None:
        lines.append(f"  KLD vs original (fake-quantized forward, {r.report_tokens:,} held-out tokens no choice saw): "
                     f"{r.report_kld:.5f}; on the selection tokens {r.selection_kld:.5f}")
    else:
        lines.append(f"  KLD vs original on the selection tokens (the text left none for a report): "
                     f"{r.selection_kld:.5f}")
    if r.domains:
        lines.append(_domains_line(r.domains))
    chosen = r.chosen_candidate()
    if chosen and len(chosen.get("references") or []) > 1:
        refs = chosen["references"]
        won = min(refs, key=lambda x: x["kld"])["base"]
        lines.append("  reference types (selection KLD of each one's refined plan): "
                     + ", ".join(f"{x['base']} {x['kld']:.5f}" for x in refs) + f"; chose {won}")
    if r.refinement:
        lines.append(_refinement_line(r.refinement))
    if r.mixtures:
        lines.append(_mixtures_line(r.mixtures, r.selection_kld))
    for c in r.candidates:
        if c.get("criteria"):
            tried = ", ".join(f"{_criterion_name(t)} {t['prune_kld']:.5f}" for t in c["criteria"])
            lines.append(f"  criterion at keep {c['keep']:g} (pruning-only KLD on the selection tokens): {tried}; "
                         f"chose {_criterion_name(c)}")
    if m := r.merge:
        lines.append(f"  merging       each dropped expert folded into its most {m['similarity']}-similar kept one "
                     f"({m['weighting']}-weighted, router rows {m['router']}; the GGUF's moepack.prune_plan "
                     "lists the merges)")
    if len(r.candidates) > 1:
        lines.append("  retention search: " + ", ".join(_candidate_line(c) for c in r.candidates))
    if r.speed:
        lines.append(_speed_line(r.speed))
    lines.append("  types per tensor class:")
    for cls, counts in sorted(r.types.items()):
        lines.append(f"    {cls:<16} " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())))
    lines.append("  stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    lines.append(f"  sample: {r.sample!r}" if r.verify_error is None else f"  not verified: {r.verify_error}")
    if p := r.placement:
        sides = [f"{side} tensors {format_size(p[k]['bytes'])} of {format_size(p[k]['budget_bytes'])}"
                 for side, k in (("GPU", "gpu"), ("RAM", "ram"))]
        lines.append(f"  placement     {'; '.join(sides)} (-ot {p['override']})")
    lines.append(f"  run it:        {r.llama_command}")
    return "\n".join(lines)


def _mixtures_line(m: dict[str, Any], kld: float) -> str:
    """The llama.cpp mixtures measured on the selection tokens, which plan won and by how much."""
    measured = ", ".join(f"{x['name']} {x['kld']:.5f}" for x in m["mixtures"]) or "none fits"
    line = f"  llama.cpp mixtures (same imatrix, selection KLD): {measured}; plan: {m['chosen']}"
    if m["best_mixture"] is not None:
        top = min(x["kld"] for x in m["mixtures"])
        gain = f"{100 * (top - kld) / top:.1f}% below" if top > 0 else "equal to"
        line += f" ({gain} {m['best_mixture']}; allocated plan {m['allocated_kld']:.5f})"
    return line


def _domains_line(d: dict[str, Any]) -> str:
    """Per calibration domain: the plan's KLD and the best llama.cpp mixture's, on the report tokens if any."""
    part = d["report"] if "report" in d else d["selection"]
    mix = part.get("best_mixture")
    what = "report" if "report" in d else "selection"
    vs = f" vs {mix['name']}" if mix else ""
    cells = [f"{n} {part['chosen'][n][0]:.5f}" + (f"/{mix['kld'][n][0]:.5f}" if mix else "") for n in d["names"]]
    return f"  per domain ({what} KLD, plan{vs}): " + ", ".join(cells)


def _speed_line(sp: dict[str, Any]) -> str:
    m = sp.get("mixture")
    vs = (f"; llama.cpp's {m['name']} of the unpruned model: decode {m['decode_tps']:,.0f}, prompt "
          f"{m['prompt_tps']:,.0f}" if m else "")
    tie = sp.get("tie_break") or {}
    won = (f"; keep {tie['chosen']:g} chosen over keep {tie['lowest_kld']:g} (not measurably worse on the selection "
           "tokens, paired 95 % CI; faster)" if tie and tie["chosen"] != tie["lowest_kld"] else "")
    from moepack.eval.report import floor_text

    return (f"  speed         predicted tokens/s from llama.cpp's kernel times ({sp['threads']} threads): decode "
            f"{sp['decode_tps']:,.0f}, prompt {sp['prompt_tps']:,.0f}{vs}{won}{floor_text(sp.get('floor'))}")


def _refinement_line(f: dict[str, Any]) -> str:
    """The allocated plan's additive prediction vs its measured selection KLD, and what refinement changed."""
    pred = "n/a" if f["allocated_predicted_kld"] is None else f"{f['allocated_predicted_kld']:.5f}"
    line = (f"  refinement (selection KLD): allocated plan predicted {pred}, measured {f['allocated_kld']:.5f}; "
            f"{len(f['accepted'])} move(s) kept of {f['measured']} measured in {f['passes']} pass(es)")
    return line + (f", {f['kld']:.5f} ({100 * f['gain'] / f['allocated_kld']:.1f}% lower)"
                   if f["accepted"] and f["allocated_kld"] > 0 else "")


def _criterion_name(c: dict[str, Any]) -> str:
    name = f"score alpha {c['alpha']:g}" if c["criterion"] == "score" else c["criterion"]
    return name + (" merged" if c.get("merge") else "")


def _candidate_line(c: dict[str, Any]) -> str:
    if c.get("infeasible"):
        return f"keep {c['keep']:g} -> does not fit the budget at the smallest type (screened)"
    if c.get("same_as") is not None:
        return f"keep {c['keep']:g} -> same model as keep {c['same_as']:g} (screened)"
    if c.get("screened"):
        return f"keep {c['keep']:g} -> pruning alone KLD {c['prune_kld']:.5f}, not quantized (screened)"
    return f"keep {c['keep']:g} -> KLD {c['kld']:.5f}"
