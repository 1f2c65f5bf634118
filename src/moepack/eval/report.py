"""The one-page report of a compress run, built from its run directory's artifacts alone (no model is loaded);
what the page holds is described where the command is (`moepack.cli.report`, `moepack report --help`)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from moepack.atomic import atomic_copy, atomic_write_text
from moepack.errors import MoepackError
from moepack.eval.plots import pyplot, save_figure
from moepack.gguf.types import bits_per_weight
from moepack.schema import PrunePlan, QuantPlan, RunSummary, SensitivityTable
from moepack.schema.run import RunLayout, retention_name

__all__ = ["domain_rows", "speed_text", "ReportError", "RunArtifacts", "find_artifacts", "build_report", "experts_chart", "types_chart",
           "pareto_points", "pareto_chart", "sensitivity_rows"]

log = logging.getLogger(__name__)

SENS_ROWS = 15  # sensitivity rows shown
A = TypeVar("A")


class ReportError(MoepackError, ValueError):
    pass


def load_eval(path: Path | None) -> dict[str, Any] | None:
    """An eval report (`moepack eval --json-out`), or None where there is none (or it is another JSON file)."""
    try:
        d = json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("models"), list) else None


def _read(reader: Callable[[Path], A], path: Path) -> A | None:
    """A stage artifact through its contract's reader; None where the run has none."""
    return reader(path) if path.is_file() else None


@dataclass
class RunArtifacts:
    """What a page shows of a run: its chosen retention's artifacts, each read through its contract."""

    run_dir: Path
    keep: str  # the chosen retention as the file names spell it ('0.75')
    summary: RunSummary | None  # None: the run has not finished
    prune_plan: PrunePlan | None
    quant_plan: QuantPlan | None
    sensitivity: SensitivityTable | None
    eval: dict[str, Any] | None  # an eval report (`moepack eval --json-out`)


def _prune_plan(layout: RunLayout, keep: str) -> PrunePlan | None:
    """The chosen retention's prune plan: prune_plan-rKEEP.json (compress prunes lazily), or inside the pruned
    checkpoint that runs before that wrote (pruned-rKEEP/)."""
    for path in (layout.prune_plan(keep), layout.root / f"pruned-r{keep}" / "prune_plan.json"):
        if path.is_file():
            return PrunePlan.read(path)
    return None


def find_artifacts(run_dir: Path) -> RunArtifacts:
    """The artifacts of the run's chosen retention (summary.json's keep; else the last quant plan written)."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; pass a `moepack compress` run directory")
    layout = RunLayout(run_dir)
    summary = _read(RunSummary.read, layout.summary)
    plans = layout.quant_plans()
    if summary is not None:
        keep = retention_name(summary.keep)
    elif plans:
        keep = layout.retention_of(plans[-1])
    else:
        raise ReportError(f"{run_dir}: no summary.json or quant_plan-r*.json; is this a compress run directory?")
    evals = [d for p in sorted(run_dir.glob("*.json")) if (d := load_eval(p)) is not None]
    plan = _read(QuantPlan.read, layout.quant_plan(keep))
    reference = (plan.base or {}).get("default_type") if plan is not None else None
    return RunArtifacts(run_dir, keep, summary, _prune_plan(layout, keep), plan,
                        _read(SensitivityTable.read, layout.table_of(keep, reference)), evals[0] if evals else None)


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


def pareto_points(candidates: list[dict[str, Any]], eval_report: dict[str, Any] | None
                  ) -> tuple[str, list[tuple[str, int, float]]]:
    """(what the sizes are, [(label, bytes, mean KLD)]) to plot: the eval report's models when it has two or more
    (file bytes, KLD on the eval text), else the retentions compress measured (RunSummary.candidates: tensor bytes,
    KLD on the selection tokens); fewer than two points: nothing to trade off, an empty list."""
    models = [m for m in (eval_report or {}).get("models") or [] if m.get("kld_mean") is not None]
    if len(models) >= 2:
        return "file", [(Path(m["file"]).name, int(m["size_bytes"]), float(m["kld_mean"])) for m in models]
    cands = [c for c in candidates if c.get("kld") is not None]
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


def result_tokens(s: RunSummary) -> str:
    """Which tokens `s.result_kld` was measured on, for a sentence."""
    if s.report_kld is not None:
        n = f"{s.report_tokens:,} " if s.report_tokens else ""
        return f"the {n}held-out report tokens no choice saw"
    return "the held-out selection tokens every choice was measured on (the text left no report tokens)"


def domain_rows(s: RunSummary) -> list[str]:
    """Markdown table: per calibration domain the chosen plan's mean KLD and the best llama.cpp mixture's (of the
    unpruned model, the file a user would otherwise make), ± the 95 % CI half-width, on the report tokens no
    choice saw and on the selection tokens; [] for a one-domain run."""
    d = s.domains
    if not d:
        return []
    cols: list[tuple[str, dict[str, list[float]]]] = []
    for part in ("report", "selection"):
        if part in d:
            cols.append((f"plan ({part})", d[part]["chosen"]))
            if "best_mixture" in d[part]:
                cols.append((f"{d[part]['best_mixture']['name']} ({part})", d[part]["best_mixture"]["kld"]))
    lines = ["| domain | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in d["names"]:
        cells = [f"{v[name][0]:.5f} ± {v[name][1]:.5f}" if name in v else "—" for _, v in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def speed_text(s: RunSummary) -> str | None:
    """One sentence: the predicted tokens per second of the plan and of the same-size llama.cpp mixture."""
    sp = s.speed
    if not sp:
        return None
    m = sp.get("mixture")
    vs = (f" (llama.cpp's {m['name']} of the unpruned model, the file a user would otherwise make at this size: "
          f"decode {m['decode_tps']:,.0f}, prompt {m['prompt_tps']:,.0f})" if m else "")
    return (f"predicted tokens per second on {sp['kernels']}: decode {sp['decode_tps']:,.0f}, prompt "
            f"{sp['prompt_tps']:,.0f}{vs}{floor_text(sp.get('floor'))}; from the weights' products, attention and "
            "each layer's element-wise ops, timed in llama.cpp's kernels (on models small enough to run from the "
            "CPU's cache, a lower bound: the kernels are timed with the weights out of cache)")


def floor_text(f: dict[str, Any] | None) -> str:
    """'; speed floor 0.95 × IQ1_S's decode (1,200 tok/s): met after moving types to faster ones (selection KLD
    0.0301 → 0.0312)', or '' without a floor."""
    if not f:
        return ""
    head = f"; speed floor {f['factor']:g} × {f['mixture']}'s decode ({f['decode_tps']:,.0f} tok/s): "
    if (m := f.get("moved")) is not None:
        return head + (f"met after moving types to faster ones (selection KLD {m['kld_before']:.5f} → "
                       f"{m['kld_after']:.5f})")
    return head + ("met" if f["met"] else "not reachable within the budget (the plan is kept)")


def _summary_lines(s: RunSummary) -> list[str]:
    lines = [f"- output `{s.out}`: {s.file_bytes:,} bytes, {s.bpw:.3f} bits per original weight",
             f"- experts kept {s.n_experts[0]} of {s.n_experts[1]} per MoE layer (keep {s.keep}), top-k {s.top_k}",
             f"- KLD vs the original on {result_tokens(s)}: {s.result_kld:.5f}"]
    if sp := speed_text(s):
        lines.append(f"- {sp}")
    if s.timings:
        lines.append("- stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in s.timings.items()))
    if s.domains:
        lines += ["", "KLD per calibration domain (each plan had to be no worse than the best llama.cpp mixture on "
                  "every domain of the selection tokens):", "", *domain_rows(s)]
    return lines


def eval_report(path: str | Path) -> dict[str, Any]:
    """The eval report at `path`, given on the command line: a ReportError when it is none."""
    found = load_eval(Path(path))
    if found is None:
        why = "no such eval JSON" if not Path(path).is_file() else "not an eval report (`moepack eval --json-out`)"
        raise ReportError(f"{path}: {why}")
    return found


def _plan_lines(qp: QuantPlan, stem: str) -> list[str]:
    said = (f"Predicted tensor bytes {qp.predicted_bytes:,} of budget {qp.budget_bytes:,}; predicted KLD "
            f"{qp.predicted_kld}." if qp.allocated else "A quant plan written by hand: nothing was predicted.")
    return ["## Type per tensor", "", said, "", f"![types]({stem}-types.png)", ""]


def build_report(run_dir: str | Path, out: str | Path, pareto: str | Path | None = None,
                 eval_json: str | Path | None = None) -> Path:
    """Write the page `out` and its charts beside it; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    a = find_artifacts(run_dir)
    if eval_json is not None:
        a.eval = eval_report(eval_json)
    if pareto is not None and not Path(pareto).is_file():
        raise ReportError(f"{pareto}: no such Pareto plot")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# moepack compress report: `{run_dir}`", ""]
    if a.summary is not None:
        lines += _summary_lines(a.summary) + [""]
    stem = out.stem
    lines += ["## Experts kept per layer", ""]
    if a.prune_plan is not None:
        experts_chart(a.prune_plan, out.with_name(f"{stem}-experts.png"))
        lines += [f"![experts]({stem}-experts.png)", ""]
    else:
        lines += [f"No pruning (keep {a.keep}).", ""]
    if a.quant_plan is not None:
        types_chart(a.quant_plan, out.with_name(f"{stem}-types.png"))
        lines += _plan_lines(a.quant_plan, stem)
    if a.sensitivity is not None:
        lines += [f"## Sensitivity (top {SENS_ROWS} groups by KLD gained per byte of their first upgrade)", ""]
        lines += sensitivity_rows(a.sensitivity) + [""]
    if a.eval:
        from moepack.eval.evaluate import to_markdown

        lines += ["## Evaluation", "", to_markdown(a.eval), ""]
    if pareto is not None:
        src, dst = Path(pareto), out.with_name(f"{stem}-pareto.png")
        if src.resolve() != dst.resolve():
            atomic_copy(src, dst)
        lines += ["## Size vs KLD", "", f"![pareto]({dst.name})", ""]
    atomic_write_text(out, "\n".join(lines))
    return out
