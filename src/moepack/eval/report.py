"""The one-page report of a compress run, built from its run directory's artifacts alone (no model is loaded);
what the page holds is described where the command is (`moepack.cli.report`, `moepack report --help`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moepack.atomic import atomic_copy, atomic_write_text
from moepack.errors import MoepackError
from moepack.eval.plots import pyplot, save_figure
from moepack.gguf.types import bits_per_weight
from moepack.schema import PrunePlan, QuantPlan, SensitivityTable

__all__ = ["ReportError", "find_artifacts", "build_report", "experts_chart", "types_chart", "pareto_points",
           "pareto_chart"]

log = logging.getLogger(__name__)

SENS_ROWS = 15  # sensitivity rows shown


class ReportError(MoepackError, ValueError):
    pass


def _load(path: Path | None) -> Any:
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _read(reader: Any, path: Path) -> Any:
    """A stage artifact through its contract's reader; None where the run has none."""
    return reader(path) if path.is_file() else None


def _retention(path: Path) -> str:
    """'0.75' from 'quant_plan-r0.75.json' / 'sensitivity-r0.75.json' / 'prune_plan-r0.75.json'."""
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return stem.rsplit("-r", 1)[-1]


def table_path(run_dir: Path, keep: str, plan: QuantPlan | None) -> Path:
    """The sensitivity table the plan of retention `keep` was allocated from: compress measures a second reference
    type into sensitivity-rKEEP-TYPE.json (moepack.pipeline.candidates.reference_types)."""
    base = (plan.base or {}).get("default_type") if plan is not None else None
    tagged = run_dir / f"sensitivity-r{keep}-{base}.json"
    return tagged if base and tagged.is_file() else run_dir / f"sensitivity-r{keep}.json"


def _prune_plan(run_dir: Path, keep: str) -> PrunePlan | None:
    """The chosen retention's prune plan: prune_plan-rKEEP.json (compress prunes lazily), or inside the pruned
    checkpoint that runs before that wrote (pruned-rKEEP/)."""
    for path in (run_dir / f"prune_plan-r{keep}.json", run_dir / f"pruned-r{keep}" / "prune_plan.json"):
        if path.is_file():
            return PrunePlan.read(path)
    return None


def find_artifacts(run_dir: Path) -> dict[str, Any]:
    """The artifacts of the run's chosen retention (summary.json's keep; else the last quant plan written)."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; pass a `moepack compress` run directory")
    summary = _load(run_dir / "summary.json")
    plans = sorted(run_dir.glob("quant_plan-r*.json"), key=lambda p: p.stat().st_mtime)
    if summary is not None:
        keep = f"{float(summary['keep']):g}"
    elif plans:
        keep = _retention(plans[-1])
    else:
        raise ReportError(f"{run_dir}: no summary.json or quant_plan-r*.json; is this a compress run directory?")
    evals = [p for p in sorted(run_dir.glob("*.json")) if (_load(p) or {}).get("models") is not None]
    plan = _read(QuantPlan.read, run_dir / f"quant_plan-r{keep}.json")
    return {"keep": keep, "summary": summary,
            "prune_plan": _prune_plan(run_dir, keep),
            "quant_plan": plan, "sensitivity": _read(SensitivityTable.read, table_path(run_dir, keep, plan)),
            "eval": _load(evals[0]) if evals else None}


def experts_chart(prune_plan: PrunePlan, path: Path) -> None:
    """Heat map layer × expert of the pruning importance; kept experts outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    plt = pyplot()
    layers = sorted(prune_plan.layers, key=int)
    n = prune_plan.n_experts
    grid = np.full((len(layers), n), np.nan)  # (layers, experts)
    for i, L in enumerate(layers):
        scores = prune_plan.layers[L].scores
        grid[i, : len(scores)] = scores
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * n + 2), max(2.0, 0.45 * len(layers) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for i, L in enumerate(layers):
        for e in prune_plan.layers[L].kept:
            ax.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", lw=1.2))
        for e in prune_plan.layers[L].removed:
            ax.text(e, i, "x", ha="center", va="center", color="red", fontsize=9)
    ax.set_yticks(range(len(layers)), [f"layer {L}" for L in layers])
    ax.set_xlabel("expert (x: removed)")
    ax.set_title(f"importance ({prune_plan.criterion}), kept {prune_plan.n_kept} of {n}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)


def types_chart(quant_plan: QuantPlan, path: Path) -> None:
    """One bar per quantized tensor: bits per weight of its chosen type, coloured by type (F32 ones left out)."""
    plt = pyplot()
    names = [n for n, t in quant_plan.tensors.items() if t not in ("F32", "F16", "BF16")]  # chosen types only
    types = [quant_plan.tensors[n] for n in names]
    kinds = sorted(set(types), key=bits_per_weight)
    colour = {t: f"C{i % 10}" for i, t in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.16 * len(names) + 1)))
    ax.barh(range(len(names)), [bits_per_weight(t) for t in types], color=[colour[t] for t in types])
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("bits per weight")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colour[t]) for t in kinds], labels=kinds, fontsize=7,
              loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def pareto_points(summary: dict[str, Any] | None, eval_report: dict[str, Any] | None
                  ) -> tuple[str, list[tuple[str, int, float]]]:
    """(what the sizes are, [(label, bytes, mean KLD)]) to plot: the eval report's models when it has two or more
    (file bytes, KLD on the eval text), else the retentions compress measured (tensor bytes, KLD on held-out
    calibration tokens); fewer than two points: nothing to trade off, an empty list."""
    models = [m for m in (eval_report or {}).get("models") or [] if m.get("kld_mean") is not None]
    if len(models) >= 2:
        return "file", [(Path(m["file"]).name, int(m["size_bytes"]), float(m["kld_mean"])) for m in models]
    cands = [c for c in (summary or {}).get("candidates") or [] if c.get("kld") is not None]
    if len(cands) >= 2:
        return "tensor", [(f"keep {c['keep']:g}, k {c['top_k']}", int(c["tensor_bytes"]), float(c["kld"]))
                          for c in cands]
    return "", []


def pareto_chart(points: list[tuple[str, int, float]], sizes: str, path: Path) -> None:
    """Size (MiB) against mean KLD, one labelled point each; the points no other beats on both joined."""
    plt = pyplot()
    pts = sorted(points, key=lambda p: (p[1], p[2]))
    front, best = [], float("inf")
    for p in pts:
        if p[2] < best:
            front.append(p)
            best = p[2]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[1] / 2**20 for p in pts], [p[2] for p in pts], color="C0")
    ax.plot([p[1] / 2**20 for p in front], [p[2] for p in front], color="C1", lw=1)
    for label, size, kld in pts:
        ax.annotate(label, (size / 2**20, kld), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{sizes} MiB")
    ax.set_ylabel("mean KLD vs the original")
    ax.set_title("size vs KLD (line: the Pareto front)")
    fig.tight_layout()
    save_figure(fig, path)


def sensitivity_rows(table: SensitivityTable, n: int = SENS_ROWS) -> list[str]:
    """Markdown rows: groups sorted by the KLD gained by their first upgrade, per byte spent."""
    rows = []
    for g in table.groups:
        opts = g.options
        if len(opts) < 2:
            continue
        base, nxt = opts[0], opts[1]
        gain = base.dkld - nxt.dkld
        extra = max(1, nxt.bytes - base.bytes)
        best = min(opts, key=lambda o: o.dkld)
        rows.append((gain / extra, g.name, base, nxt, best))
    rows.sort(key=lambda r: -r[0])
    head = ["group", "base", "ΔKLD at base", "next type", "ΔKLD next", "KLD gained per KiB", "best ΔKLD (type)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for per, name, base, nxt, best in rows[:n]:
        out.append(f"| {name} | {base.type} | {base.dkld:.5f} | {nxt.type} | {nxt.dkld:.5f} | "
                   f"{per * 1024:.2e} | {best.dkld:.5f} ({best.type}) |")
    return out


def _summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [f"- output `{s.get('out')}`: {s['file_bytes']:,} bytes, {s['bpw']:.3f} bits per original weight",
             f"- experts kept {s['n_experts'][0]} of {s['n_experts'][1]} per MoE layer (keep {s['keep']}), "
             f"top-k {s['top_k']}"]
    if s.get("measured_kld") is not None:
        lines.append(f"- measured KLD on held-out calibration tokens: {s['measured_kld']:.5f}")
    if s.get("timings"):
        lines.append("- stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timings"].items()))
    return lines


def build_report(run_dir: str | Path, out: str | Path, pareto: str | Path | None = None,
                 eval_json: str | Path | None = None) -> Path:
    """Write the page `out` and its charts beside it; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    a = find_artifacts(run_dir)
    if eval_json is not None:
        a["eval"] = _load(Path(eval_json))
        if a["eval"] is None:
            raise ReportError(f"{eval_json}: no such eval JSON")
    lines = [f"# moepack compress report: `{run_dir}`", ""]
    if a["summary"]:
        lines += _summary_lines(a["summary"]) + [""]
    stem = out.stem
    if a["prune_plan"]:
        experts_chart(a["prune_plan"], out.with_name(f"{stem}-experts.png"))
        lines += ["## Experts kept per layer", "", f"![experts]({stem}-experts.png)", ""]
    else:
        lines += ["## Experts kept per layer", "", f"No pruning (keep {a['keep']}).", ""]
    if a["quant_plan"]:
        types_chart(a["quant_plan"], out.with_name(f"{stem}-types.png"))
        qp = a["quant_plan"]
        lines += ["## Type per tensor", "", f"Predicted tensor bytes {qp.predicted_bytes:,} of budget "
                  f"{qp.budget_bytes:,}; predicted KLD {qp.predicted_kld}.", "",
                  f"![types]({stem}-types.png)", ""]
    if a["sensitivity"]:
        lines += [f"## Sensitivity (top {SENS_ROWS} groups by KLD gained per byte of their first upgrade)", ""]
        lines += sensitivity_rows(a["sensitivity"]) + [""]
    if a["eval"]:
        from moepack.eval.evaluate import to_markdown

        lines += ["## Evaluation", "", to_markdown(a["eval"]), ""]
    if pareto is not None:
        src = Path(pareto)
        if not src.is_file():
            raise ReportError(f"{src}: no such Pareto plot")
        dst = out.with_name(f"{stem}-pareto.png")
        if src.resolve() != dst.resolve():
            atomic_copy(src, dst)
        lines += ["## Size vs KLD", "", f"![pareto]({dst.name})", ""]
    atomic_write_text(out, "\n".join(lines))
    return out
