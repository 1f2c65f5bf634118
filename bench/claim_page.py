"""The claim's results (bench/claim.py): the JSON's layout, the verdict per (fixture, size point, evaluation
domain), the counts, the page and its plots. Everything here reads the results JSON alone, so `claim.py
--render-only` redraws the page from it and the page states no number the JSON does not hold.

A library, as common.py: scripts import it, it imports no script (tests/test_claim_bench.py checks).

Layout: results = {"settings", "domains": [evaluation domains held], "done_when", "command", "fixtures": {name: rec}};
rec = {"model", "points": {size point: tensor bytes, smallest first}, "left_out": {file type: why},
"references": {domain: {"text", "ppl", "scored_tokens", "windows"}}, "cells": {size point: cell}}; a cell holds one
row per method ({"file", "seconds", "evals": {domain: eval}} or {"file": None, "error"}) and "verdicts": {domain:
common.verdict}. Results written before the domains (one "eval" per row, on the stories text) are read as such.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common import DOMAINS, cells, commits_line, rel, verdict

__all__ = ["BASELINES", "LABELS", "ROWS", "SHARE", "cell_verdicts", "evals", "headline", "kind", "markdown",
           "migrate", "page_link", "plot_fixture", "plot_path", "points"]

log = logging.getLogger(__name__)

ROWS = ("uniform", "moepack", "unsloth", "authors", "prune_only")
BASELINES = ROWS[2:]
LABELS = {"uniform": "llama.cpp uniform", "moepack": "moepack compress", "unsloth": "Unsloth-style rule",
          "authors": "authors' rules (pruned)", "prune_only": "prune-only (uniform)"}
SHARE = 0.8  # issue 32: the goal's reduction at this share of the (fixture, size point, domain) points at least
MARK = {"holds": "✓", "short": "○", "worse": "✗"}


# ---- the JSON -----------------------------------------------------------------------------------------------------
def migrate(results: dict[str, Any]) -> dict[str, Any]:
    """`results` in the domains' layout (in place): rows' single "eval" (on the stories text) become evals of the
    stories domain, the fixture's reference statistics that domain's; every cell's verdicts from its evals."""
    for rec in results.get("fixtures", {}).values():
        if "references" not in rec and "ppl" in rec:
            rec["references"] = {"stories": {"text": results["settings"].get("eval_text"), "ppl": rec.pop("ppl"),
                                             "scored_tokens": rec.pop("scored_tokens"), "windows": rec.pop("windows")}}
        for c in rec.get("cells", {}).values():
            for row in (c.get(k) for k in ROWS):
                if isinstance(row, dict) and "eval" in row:
                    e = row.pop("eval")
                    row["evals"] = {"stories": e} if e else {}
            c.pop("verdict", None)
            c["verdicts"] = cell_verdicts(c)
    held = {d for rec in results.get("fixtures", {}).values() for _, c in cells(rec) for d in c["verdicts"]}
    results["domains"] = list(results.get("domains") or [d for d in DOMAINS if d in held])
    return results


def evals(row: dict[str, Any] | None) -> dict[str, Any]:
    return (row or {}).get("evals") or {}


def cell_verdicts(c: dict[str, Any]) -> dict[str, Any]:
    """Per domain both files were evaluated on: moepack's eval against the uniform file's (common.verdict)."""
    u, m = evals(c.get("uniform")), evals(c.get("moepack"))
    return {d: verdict(m[d], u[d]) for d in u if d in m}


def kind(v: dict[str, Any] | None) -> str | None:
    """holds (the goal: ≥ GOAL lower, no larger, CIs apart); worse (larger file, or its KLD's CI above the uniform
    file's); short (neither: never worse, but below the goal or the CIs overlap); None: not measured."""
    if v is None:
        return None
    return "worse" if v["worse"] else "holds" if v["holds"] else "short"


def points(results: dict[str, Any]) -> tuple[list[tuple[str, str, str, str]], dict[str, list[str]]]:
    """The measured (fixture, size point, domain, kind), and per fixture what is not measured yet (and why)."""
    done, todo = [], {}
    for name, rec in results["fixtures"].items():
        missing = []
        for f in list(rec.get("points") or {}) + [f for f in rec["cells"] if f not in (rec.get("points") or {})]:
            c = rec["cells"].get(f) or {}
            why = (c.get("uniform") or {}).get("error") or (c.get("moepack") or {}).get("error")
            lack = [d for d in results["domains"] if d not in c.get("verdicts", {})]
            done += [(name, f, d, kind(c["verdicts"][d])) for d in results["domains"] if d not in lack]
            if lack:
                where = "" if len(lack) == len(results["domains"]) else f" ({', '.join(lack)})"
                missing.append(f"{f}{where}" + (f": {_short(why)}" if why else ""))
        if missing:
            todo[name] = missing
    return done, todo


# ---- the page -----------------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.3f}"


def _pm(e: dict[str, Any] | None, key: str, spec: str, scale: float = 1.0) -> str:
    """e[key] ± the half-width of its 95 % CI (the value alone without one; — when not measured)."""
    if not e or e.get(key) is None:
        return "—"
    stem = "kld" if key == "kld_mean" else key
    lo, hi = e.get(f"{stem}_ci95_low"), e.get(f"{stem}_ci95_high")
    v = format(e[key] * scale, spec)
    return v if lo is None or hi is None else f"{v} ± {format((hi - lo) / 2 * scale, spec)}"


def _short(msg: str, n: int = 80) -> str:
    msg = " ".join(str(msg).split()).replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def _mark(v: dict[str, Any] | None) -> str:
    """"−43 % ✓": moepack's KLD relative to the uniform file's and the verdict's mark."""
    if v is None:
        return "—"
    change = -100 * v["kld_reduction"]
    return f"{'−' if change < 0 else '+'}{abs(change):.0f} % {MARK[kind(v)]}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _size(c: dict[str, Any]) -> str:
    same = f" (= {c['same_size_as']})" if c.get("same_size_as") else ""
    return f"{c.get('ftype', '?')}{same}"


def verdict_table(rec: dict[str, Any], domains: list[str]) -> list[str]:
    rows = [[_size(c), _mib(c.get("target_bytes"))] + [_mark(c.get("verdicts", {}).get(d)) for d in domains]
            for _, c in cells(rec)]
    return _table(["size point", "llama.cpp MiB", *domains], rows)


def detail_table(rec: dict[str, Any], domains: list[str]) -> list[str]:
    """Per (size point, domain): both KLDs ± CI, the reduction, the verdict, and llama-perplexity's other numbers."""
    rows = []
    for _, c in cells(rec):
        u, m = evals(c.get("uniform")), evals(c.get("moepack"))
        for d in (d for d in domains if d in u or d in m):
            v = c.get("verdicts", {}).get(d)
            red = "—" if v is None else f"{100 * v['kld_reduction']:.1f} %"
            rows.append([_size(c), d, _pm(u.get(d), "kld_mean", ".5f"), _pm(m.get(d), "kld_mean", ".5f"), red,
                         "—" if v is None else f"{MARK[kind(v)]} {kind(v)}",
                         *(_pm(e, k, ".2f", 100.0) for k in ("top1", "dp_rms") for e in (u.get(d), m.get(d)))])
    return _table(["size point", "domain", "uniform KLD", "moepack KLD", "KLD lower by", "verdict",
                   "uniform same top %", "moepack same top %", "uniform RMS Δp %", "moepack RMS Δp %"], rows)


def _own_domains(m: dict[str, Any]) -> str:
    """compress's own per-domain KLDs on its report (else selection) tokens, from summary.json's optional record."""
    rec = m.get("domains")
    if not isinstance(rec, dict):
        return "—"
    part = rec.get("report") or rec.get("selection") or {}
    chosen, best = part.get("chosen") or {}, part.get("best_mixture") or {}
    try:
        return "; ".join(f"{d} {chosen[d][0]:.4f}" + (f" (vs {best['name']} {best['kld'][d][0]:.4f})"
                                                      if d in (best.get("kld") or {}) else "") for d in chosen)
    except (KeyError, TypeError, IndexError):
        return "(not read)"


def choice_table(rec: dict[str, Any]) -> list[str]:
    rows = []
    for _, c in cells(rec):
        m = c.get("moepack") or {}
        me = next(iter(evals(m).values()), None)
        if me:
            crit = m.get("criterion") if m["keep"] < 1 else "— (none pruned)"
            how = f"{m['keep']:g} ({m['n_experts'][0]}/{m['n_experts'][1]}), {m['top_k']}, {crit}, {m.get('started_from')}"
        else:
            how = _short(m.get("error") or (c.get("uniform") or {}).get("error") or "not made")
        u = next(iter(evals(c.get("uniform")).values()), None)
        rows.append([_size(c), _mib(u and u["size_bytes"]), _mib(me and me["size_bytes"]), how, _own_domains(m)])
    return _table(["size point", "uniform MiB", "moepack MiB", "moepack: keep (kept/all), k', criterion, started from",
                   "compress's own per-domain KLD (summary.json)"], rows)


def _baseline(row: dict[str, Any] | None, d: str) -> str:
    if not row:
        return "—"
    e = evals(row).get(d)
    if not e:
        return f"— ({_short(row.get('error', 'not made'))})"
    return f"{_pm(e, 'kld_mean', '.5f')} ({row.get('base')}, {_mib(e['size_bytes'])} MiB)"


def baseline_table(rec: dict[str, Any], domains: list[str]) -> list[str]:
    held = [(c, d) for _, c in cells(rec) if any(c.get(k) for k in BASELINES) for d in domains]
    rows = [[_size(c), d, _pm(evals(c.get("moepack")).get(d), "kld_mean", ".5f"),
             *(_baseline(c.get(k), d) for k in BASELINES)] for c, d in held]
    return _table(["size point", "domain", "moepack KLD", *(LABELS[k] for k in BASELINES)], rows) if rows else []


def timing_line(rec: dict[str, Any]) -> str:
    per_point = ", ".join(f"{f} {c['seconds']:.0f}" for f, c in cells(rec) if "seconds" in c)
    total = rec.get("prepare_seconds", 0) + sum(c.get("seconds", 0) for _, c in cells(rec))
    return (f"Wall time (s): calibration (and the paper's pruning) {rec.get('prepare_seconds', 0):.0f}; per size point "
            f"(uniform file, compress, baselines where made, every evaluation) {per_point}; total {total / 60:.1f} min.")


def _counts(done: list[tuple[str, str, str, str]]) -> tuple[int, int, int]:
    return len(done), sum(k != "worse" for *_, k in done), sum(k == "holds" for *_, k in done)


def headline(results: dict[str, Any]) -> list[str]:
    """The counts over the measured points, the issue's bar, and what is not measured yet."""
    done, todo = points(results)
    n, never, held = _counts(done)
    goal = 100 * results["settings"]["goal"]
    per = "; ".join(f"{name}: {c[1]} and {c[2]} of {c[0]}" for name in results["fixtures"]
                    for c in [_counts([p for p in done if p[0] == name])])
    share = results.get("done_when", {}).get("share", SHARE)
    bar = (f"The bar (never worse at any point, at least {goal:.0f} % lower at {100 * share:.0f} % of the points) is "
           + ("met" if n and never == n and held >= share * n else "not met") + " over the measured points.")
    out = [(f"**Of {n} (fixture, size point, domain) points measured, moepack's file is never worse at {never} and "
           f"at least {goal:.0f} % lower at {held}** ({per}). {bar}"), ""]
    if todo:
        out += ["Not measured yet: " + "; ".join(f"{name}: {', '.join(m)}" for name, m in todo.items()) + ".", ""]
    return out


def _method(results: dict[str, Any]) -> list[str]:
    s, ds = results["settings"], results["domains"]
    texts = {d: t for rec in results["fixtures"].values() for d, r in rec.get("references", {}).items()
             if (t := r.get("text"))}
    return [(f"Legend: \"−43 % ✓\" moepack's mean KLD 43 % below the llama.cpp file's, the 95 % CIs apart and its "
            f"file no larger (the goal); \"○\" never worse but short of the goal ({100 * s['goal']:.0f} % lower with "
            "the CIs apart); \"✗\" worse (its KLD's CI above the llama.cpp file's, or its file larger)."), "",
            ("Method. Per fixture and per llama.cpp file type from IQ1_S through Q4_K_M that llama_model_quantize "
            "writes (a size point): the uniform file is `moepack quantize --ftype F` (llama_model_quantize) with the "
            "importance matrix of compress's calibration; moepack is `moepack compress --target-size <that file's "
            f"bytes>` with its defaults (keep {s['keep']}, criterion {s['criterion']}, sensitivity {s['sensitivity']}; "
            f"calibration text: {s['calib_text']}, {s['calib_tokens']:,} tokens in sequences of {s['seq_len']}, "
            f"{s['sens_tokens']:,} selection and as many report tokens held out after them)."), "",
            "Evaluation: `moepack.eval` (llama.cpp through llama-cpp-python) against the bf16 checkpoint on each "
            "domain's evaluation text, never calibrated on: " + ", ".join(f"{d} `{texts.get(d, '?')}`" for d in ds)
            + f"; windows of {s['ctx']} tokens, the second half of each scored. KLD = KL(reference || model) in nats, "
            "± the half-width of the 95 % CI from the spread of the window means. Rows marked (= X) have the same "
            "file size as size point X and share its files.", ""]


def _baseline_note(s: dict[str, Any]) -> str:
    p = s["paper_prune"]
    return (f"Baselines at the same size, each the largest base type whose file fits: an Unsloth-style rule "
            f"(ffn_gate/up_exps at the base; ffn_down_exps and token_embd one ladder step up; attention, shared "
            f"experts, dense FFN and output {s['hand_steps']} steps up), the paper authors' fixed rules and one "
            f"uniform type (prune-only), these two on the paper's pruned checkpoint (keep {p['keep']:g}, criterion "
            f"{p['criterion']}, alpha {p['alpha']:g}).")


def fixture_section(name: str, rec: dict[str, Any], results: dict[str, Any], png: str | None) -> list[str]:
    ds = results["domains"]
    done = [p for p in points(results)[0] if p[0] == name]
    n, never, held = _counts(done)
    refs = "; ".join(f"{d}: {r['scored_tokens']:,} tokens in {r['windows']} windows, the reference's PPL {r['ppl']:.3f}"
                     for d, r in rec.get("references", {}).items() if d in ds)
    why: dict[str, list[str]] = {}
    errors = []  # an error with its file type; other reasons grouped
    for f, w in (rec.get("left_out") or {}).items():
        if ":" in w:
            errors.append(f"{f} ({_short(w, 90)})")
        else:
            why.setdefault(w, []).append(f)
    left = "; ".join([f"{w}: {', '.join(fs)}" for w, fs in why.items()] + errors)
    out = [f"## {name}", "", f"{rec.get('params', 0):,} parameters, {rec.get('n_experts')} routed experts per MoE "
           f"layer. Scored: {refs}. Never worse at {never} and the goal at {held} of {n} measured points. "
           f"{commits_line(rec)}" + (f" llama.cpp's other file types, not size points here: {left}." if left else ""), "",
           *verdict_table(rec, ds), "", "Per domain (mean KLD ± 95 % CI):", "", *detail_table(rec, ds), "",
           "moepack's files:", "", *choice_table(rec), ""]
    if base := baseline_table(rec, ds):
        out += [_baseline_note(results["settings"]), "", *base, ""]
    if png:
        out += [f"![{name}: size vs mean KLD per domain]({png})", ""]
    return out + [timing_line(rec), ""]


def markdown(results: dict[str, Any], pngs: dict[str, str], source: str) -> str:
    many = len(results["domains"]) > 1
    title = "# moepack vs llama.cpp's mixtures at the same file size" + (
        f", on {len(results['domains'])} held-out evaluation domains" if many else "")
    out = [title, "", (f"Generated by `bench/claim.py` from `{source}` (`--render-only` redraws it from there); rerun "
           "to reproduce:"), "", f"    {results.get('command', 'python bench/claim.py')}", "", *headline(results),
           *_method(results)]
    for name, rec in results["fixtures"].items():
        out += fixture_section(name, rec, results, pngs.get(name))
    return "\n".join(out) + "\n"


# ---- plots ----------------------------------------------------------------------------------------------------------
STYLE = {"uniform": ("x", "k"), "moepack": ("o", "C0"), "unsloth": ("s", "C1"), "authors": ("v", "C3"),
         "prune_only": ("^", "C2")}


def _series(rec: dict[str, Any], method: str, d: str) -> list[tuple[float, float, float, float]]:
    return sorted({(e["size_bytes"], e["kld_mean"], e["kld_ci95_low"], e["kld_ci95_high"])
                   for _, c in cells(rec) for e in [evals(c.get(method)).get(d)] if e})


def plot_fixture(rec: dict[str, Any], name: str, domains: list[str], path: Path) -> None:
    """Size vs mean KLD with 95 % CI bars, one panel per evaluation domain, one series per method."""
    from moepack.eval.plots import pyplot, save_figure

    plt = pyplot()
    cols = min(3, len(domains))
    rows = -(-len(domains) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols + 1.5, 4.4 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(domains):]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, domains):
        for method in ROWS:
            if not (pts := _series(rec, method, d)):
                continue
            err = [[max(p[1] - p[2], 0) for p in pts], [max(p[3] - p[1], 0) for p in pts]]
            m, col = STYLE[method]
            ax.errorbar([p[0] / 2**20 for p in pts], [p[1] for p in pts], yerr=err, capsize=2, lw=0.8, ms=5,
                        fmt=m + ("-" if method in ROWS[:2] else ""), color=col, label=LABELS[method])
        ax.set_yscale("log")
        ax.set_xlabel("GGUF file size (MiB)")
        ax.set_title(f"{name}: {d}" if len(domains) > 1 else name)
    axes[0][0].set_ylabel("mean KLD vs bf16 (nats, log scale), 95 % CI")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def plot_path(png: Path, name: str) -> Path:
    return png.with_name(f"{png.stem}-{name}{png.suffix}")


def page_link(path: Path, md: Path) -> str:
    """`path` as the page at `md` links it."""
    here, page = path.resolve(), md.parent.resolve()
    return str(here.relative_to(page) if here.is_relative_to(page) else rel(here))
