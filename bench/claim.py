"""The central claim, measured: for the bytes of each llama.cpp file, is `moepack compress`'s file better?

Per fixture, and per llama.cpp mixture from IQ1_S through Q4_K_M that llama.cpp writes and loads (a size point):
- uniform: the mixture (`moepack quantize --ftype F`, llama_model_quantize) with the importance matrix of
  compress's own calibration;
- moepack: `compress --target-size <that file's bytes>` with compress's defaults (keep, criterion and sensitivity
  auto) on the calibration text below;
- at the same size, the largest plan of each hand rule that fits: a dynamic mixture in Unsloth's style (attention,
  shared experts, dense FFN and output HAND_STEPS ladder steps above the routed experts, ffn_down_exps and
  token_embd one step above ffn_gate/up_exps), the paper authors' fixed rules (authors_plan) and prune-only (one
  uniform type), the last two on the paper's pruned checkpoint (keep 0.75, score criterion, alpha 0.5).
Every file is scored by moepack.eval against the bf16 checkpoint on data/tinystories-valid.txt, which neither the
calibration nor the selection and report tokens (all from the calibration text) contain. Verdict per size point:
moepack's mean KLD at least 25 % lower than the uniform file's, its file no larger, the 95 % CIs apart.

One compress run directory per fixture serves every size point: its calibration (and the paper's pruning) is made
once; a sensitivity table is reused whenever its key (the base type compress picks for the budget among them) is
unchanged, so size points run in ascending order. Each finished cell is saved in --out at once: a rerun resumes,
and --render-only redoes the page and plots from the JSON alone.

Calibration text: by default data/calib/stories.txt (CALIB_TEXT: the fixtures' training and evaluation domain,
none of it in the evaluation text), or --calib-text bundled (compress's own default, the bundled multi-domain text)
or another file; either way the uniform files' importance matrix comes from the same calibration. Each has its own
JSON, page and plots (bench/results/claim.json and docs/results.md; claim-bundled.json and results-bundled.md), so
they never mix.

Full run (both fixtures x 18 size points, compress's default token counts), from the repository root; each size
point takes several minutes on an idle 2-core machine (each page's wall-time lines say how long), most of it
compress's sensitivity tables, so pick a subset with --ftypes, e.g. IQ1_S IQ2_XXS Q2_K Q3_K_M Q4_K_M, and add
points in later runs (cells already in --out are kept):
    .venv/bin/python bench/claim.py [--calib-text bundled]
Smoke test (small, not the committed results):
    .venv/bin/python bench/claim.py --models models/tiny-qwen3-moe --ftypes IQ2_XXS --calib-tokens 4096
      --sens-tokens 512 --eval-tokens 2048 --work out/claim-smoke --out out/claim-smoke/claim.json
      --md out/claim-smoke/results.md --png out/claim-smoke/pareto.png
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import (CALIB_TEXT, DEFAULT_MODELS, PAPER_PRUNE, ROOT, Evaluator, authors_plan, cells,
                    code_commit, commits_line, default_paths, ladder, plan_bytes, portable, reproduce, settings,
                    size_points, unsloth_plan, verdict, verdict_cell, write_json)

ROWS = ("uniform", "moepack", "unsloth", "authors", "prune_only")
LABELS = {"uniform": "llama.cpp uniform", "moepack": "moepack compress", "unsloth": "Unsloth-style rule",
          "authors": "authors' rules (pruned)", "prune_only": "prune-only (uniform)"}

log = logging.getLogger("claim")


# ---- the hand rules' files (their plans: common.py) -------------------------------------------------------------
def write_rule(src: Path, out: Path, run_dir: Path, limit: int, overhead: int,
               plan_for: Callable[[str], dict[str, str]]) -> dict[str, Any]:
    """The largest base whose rule's file is no larger than `limit`, written; the next base down whenever the
    written file (its metadata larger than predicted) is over."""
    from moepack.gguf.quantize import quantize_model
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(src)
    fitting = [t for t in reversed(ladder()) if plan_bytes(view, plan_for(t)) + overhead <= limit]  # largest first
    for base in fitting:
        plan = out.with_suffix(".quant_plan.json")
        plan.write_text(json.dumps({"tensors": plan_for(base)}, indent=1))
        quantize_model(src, out, plan=plan, imatrix=run_dir, threads=2, progress=False)
        if out.stat().st_size <= limit:
            return {"file": out, "base": base}
        out.unlink()
    return {"file": None, "error": "no base type fits"}


# ---- one fixture ------------------------------------------------------------------------------------------------
class Fixture:
    """The shared work of one fixture's size points: calibration, the paper's pruned checkpoint, the evaluator."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from moepack.pipeline.options import CompressOptions

        self.model, self.args = model, args
        self.work = Path(args.work) / model.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.work / "run"
        self.opts = dataclasses.replace(CompressOptions(), calib_text=args.calib_text, calib_tokens=args.calib_tokens,
                                        seq_len=args.seq_len, selection_tokens=args.selection_tokens, progress=False)
        self.evaluate = Evaluator(model, self.work, args.ctx, args.eval_tokens)
        self.pruned = self.work / "pruned-paper"

    def prepare(self) -> float:
        """Compress's own calibration stage (so compress reuses it) and the paper's pruning; seconds spent."""
        from moepack.backends import LocalBackend
        from moepack.model.checkpoint import open_checkpoint
        from moepack.pipeline.compress import calibrate_run  # compress's calibration, exactly as compress calls it
        from moepack.rundir import RunDir
        from moepack.stages.prune import PruneOptions, run_prune

        t0 = time.perf_counter()
        calibrate_run(open_checkpoint(self.model), RunDir(self.run_dir), self.opts, LocalBackend())
        run_prune(self.model, self.run_dir, self.pruned, PruneOptions(**PAPER_PRUNE), progress=False)
        return time.perf_counter() - t0

    def uniform(self, ftype: str) -> dict[str, Any]:
        from moepack.gguf.quantize import quantize_model

        out = self.work / f"llama-{ftype}.gguf"
        if not out.is_file():
            quantize_model(self.model, out, ftype=ftype, imatrix=self.run_dir, threads=2, progress=False)
        return {"file": out}

    def moepack(self, target: int) -> dict[str, Any]:
        from moepack.pipeline.compress import compress
        from moepack.stages.budget import BudgetRequest

        out = self.work / f"moepack-{target}.gguf"
        r = compress(self.model, out, BudgetRequest(target_size=target), self.opts, self.run_dir)
        mix = r.mixtures or {}
        return {"file": out, "keep": r.keep, "top_k": r.top_k, "n_experts": list(r.n_experts),
                "criterion": r.criterion, "alpha": r.alpha, "selection_kld": r.selection_kld,
                "report_kld": r.report_kld, "started_from": mix.get("chosen"), "best_mixture": mix.get("best_mixture"),
                "types": r.types, "stage_seconds": {k: round(v, 1) for k, v in r.timings.items()}}

    def rules(self, target: int, overhead: int) -> dict[str, Callable[[], dict[str, Any]]]:
        """Each hand rule's writer at `target` bytes."""
        from moepack.gguf.names import gguf_outputs
        from moepack.model.checkpoint import open_checkpoint

        full, pruned = open_checkpoint(self.model), open_checkpoint(self.pruned)
        flat = [o.name for o in gguf_outputs(pruned) if o.quantizable]
        rules = {"unsloth": (self.model, lambda t: unsloth_plan(full, t)),
                 "authors": (self.pruned, lambda t: authors_plan(pruned, t)),
                 "prune_only": (self.pruned, lambda t: dict.fromkeys(flat, t))}
        return {name: (lambda src=src, plan_for=plan_for, name=name: write_rule(
            src, self.work / f"{name}-{target}.gguf", self.run_dir, target, overhead, plan_for))
            for name, (src, plan_for) in rules.items()}


def _attempt(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn's row with its seconds, or the reason it failed (llama.cpp refusing a mixture, an infeasible budget)."""
    from moepack.errors import MoepackError

    t0 = time.perf_counter()
    try:
        row = fn()
    except MoepackError as e:
        row = {"file": None, "error": str(e)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _evaluated(fx: Fixture, row: dict[str, Any]) -> dict[str, Any]:
    if row.get("file") is not None and "eval" not in row:
        row["eval"] = _attempt(lambda: fx.evaluate(row["file"]))
        if row["eval"].get("error"):
            row["error"], row["eval"] = row["eval"]["error"], None
    return row


def run_cell(fx: Fixture, ftype: str, done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One size point: the uniform file, then every other row at its size (shared with an earlier point of the same
    size, as in `done`), each evaluated."""
    from moepack.eval.reference import gguf_counts

    t0 = time.perf_counter()
    cell: dict[str, Any] = {"ftype": ftype, "commit": code_commit(),
                            "uniform": _evaluated(fx, _attempt(lambda: fx.uniform(ftype)))}
    uni = cell["uniform"]
    if uni.get("file") is None or not uni.get("eval"):
        cell["seconds"] = round(time.perf_counter() - t0, 1)
        return cell
    target = Path(uni["file"]).stat().st_size
    cell["target_bytes"] = target
    if target in done:
        cell.update({k: done[target][k] for k in ROWS[1:]}, same_size_as=done[target]["ftype"])
    else:
        cell["moepack"] = _evaluated(fx, _attempt(lambda: fx.moepack(target)))
        overhead = target - gguf_counts(Path(uni["file"]))[1]  # non-tensor bytes: metadata, vocabulary
        t = time.perf_counter()
        for name, make in fx.rules(target, overhead).items():
            cell[name] = _evaluated(fx, _attempt(make))
        cell["rules_seconds"] = round(time.perf_counter() - t, 1)
    cell["verdict"] = verdict((cell.get("moepack") or {}).get("eval"), uni["eval"])
    cell["seconds"] = round(time.perf_counter() - t0, 1)
    return cell


# ---- results JSON -----------------------------------------------------------------------------------------------
def load(path: Path, want: dict[str, Any]) -> dict[str, Any]:
    """The results so far when they were made with the same settings; a fresh record when there are none."""
    if not path.is_file():
        return {"settings": want, "fixtures": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != want:
        diff = sorted(k for k in set(want) | set(results.get("settings", {}))
                      if want.get(k) != results.get("settings", {}).get(k))
        sys.exit(f"{path} holds cells made with other settings ({', '.join(diff)}); rerun with the same flags, or "
                 "give another --out and --work")
    return results


def bench_fixture(model: Path, ftypes: list[str] | None, results: dict[str, Any], args: argparse.Namespace) -> None:
    from moepack.model.checkpoint import open_checkpoint

    fx = Fixture(model, args)
    rec = results["fixtures"].setdefault(model.name, {"model": model, "cells": {}})
    points = size_points(model)
    todo = [f for f in points if f in (ftypes or points) and f not in rec["cells"]]
    unknown = sorted(set(ftypes or ()) - set(points))
    if unknown:
        log.warning("%s: %s not between IQ1_S and Q4_K_M here (size points: %s)", model.name, unknown, points)
    if not todo:
        return
    rec.setdefault("prepare_seconds", round(fx.prepare(), 1))
    ref = fx.evaluate.reference()
    rec.update(params=ref.params, size_bytes=ref.size_bytes, ppl=ref.ppl, scored_tokens=len(ref.nll),
               windows=len(ref.windows), n_experts=open_checkpoint(model).facts.n_experts)
    for f in todo:
        done = {c["target_bytes"]: c for c in rec["cells"].values() if c.get("target_bytes") and "moepack" in c}
        cell = run_cell(fx, f, done)
        rec["cells"][f] = cell
        write_json(args.out, portable(results, Path(args.work).resolve()))
        print(f"{model.name} {f}: cell {cell['seconds']:.0f} s ({_cell_times(cell)})", flush=True)


def _cell_times(cell: dict[str, Any]) -> str:
    parts = [f"{k} {cell[k]['seconds']:.0f} s" for k in ("uniform", "moepack") if isinstance(cell.get(k), dict)]
    if "rules_seconds" in cell:
        parts.append(f"rules {cell['rules_seconds']:.0f} s")
    if cell.get("same_size_as"):
        parts.append(f"same size as {cell['same_size_as']}")
    return ", ".join(parts)


# ---- the page ---------------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.3f}"


def _pm(e: dict[str, Any] | None, key: str, spec: str, scale: float = 1.0) -> str:
    """e[key] ± the half-width of its 95 % CI (the value alone without one; — when not measured)."""
    if not e or e.get(key) is None:
        return "—"
    lo, hi = e.get(f"{key}_ci95_low"), e.get(f"{key}_ci95_high")
    if key == "kld_mean":
        lo, hi = e.get("kld_ci95_low"), e.get("kld_ci95_high")
    v = format(e[key] * scale, spec)
    return v if lo is None or hi is None else f"{v} ± {format((hi - lo) / 2 * scale, spec)}"


def _row_cell(row: dict[str, Any] | None) -> str:
    """A baseline's KLD ± CI, its size and base type, or why it has none."""
    if not row:
        return "—"
    if not row.get("eval"):
        return f"— ({_short(row.get('error', 'not made'))})"
    return f"{_pm(row['eval'], 'kld_mean', '.5f')} ({row.get('base')}, {_mib(row['eval']['size_bytes'])} MiB)"


def _short(msg: str, n: int = 80) -> str:
    msg = " ".join(str(msg).split()).replace("|", "/")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def fixture_table(rec: dict[str, Any]) -> list[str]:
    head = ["size point", "uniform MiB", "uniform KLD", "moepack MiB", "moepack KLD", "KLD lower by", "verdict",
            "moepack: keep, k', criterion, started from", "Unsloth-style rule", "authors' rules (pruned)",
            "prune-only (pruned)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, c in cells(rec):
        u, m = c["uniform"], c.get("moepack") or {}
        ue, me = u.get("eval"), m.get("eval")
        if not ue:
            lines.append(f"| {f} | — | — ({_short(u.get('error', 'not evaluated'))}) |" + " |" * (len(head) - 3))
            continue
        v = c.get("verdict")
        crit = m.get("criterion") if me and m["keep"] < 1 else "— (none pruned)"
        how = (f"{m['keep']:g} ({m['n_experts'][0]}/{m['n_experts'][1]}), {m['top_k']}, {crit}, "
               f"{m.get('started_from')}" if me else _short(m.get("error", "—")))
        red = "—" if v is None else f"{100 * v['kld_reduction']:.1f} %"
        same = f" (= {c['same_size_as']})" if c.get("same_size_as") else ""
        lines.append(f"| {f}{same} | {_mib(ue['size_bytes'])} | {_pm(ue, 'kld_mean', '.5f')} | "
                     f"{_mib(me and me['size_bytes'])} | {_pm(me, 'kld_mean', '.5f')} | {red} | {verdict_cell(v)} | "
                     f"{how} | {_row_cell(c.get('unsloth'))} | {_row_cell(c.get('authors'))} | "
                     f"{_row_cell(c.get('prune_only'))} |")
    return lines


def pair_table(rec: dict[str, Any]) -> list[str]:
    """llama-perplexity's other statistics for the uniform and moepack files, where eval reported them."""
    keys = [("ppl_ratio", ".4f", 1.0, "PPL ratio"), ("dp_rms", ".2f", 100.0, "RMS Δp %"),
            ("top1", ".2f", 100.0, "same top %")]
    evals = [e for _, c in cells(rec) for e in ((c["uniform"] or {}).get("eval"), (c.get("moepack") or {}).get("eval"))
             if e]
    keys = [k for k in keys if any(k[0] in e for e in evals)]
    if not keys:
        return []
    head = ["size point"] + [f"{side} {k[3]}" for k in keys for side in ("uniform", "moepack")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, c in cells(rec):
        ue, me = (c["uniform"] or {}).get("eval"), (c.get("moepack") or {}).get("eval")
        lines.append(f"| {f} | " + " | ".join(_pm(e, k, spec, sc) for k, spec, sc, _ in keys for e in (ue, me)) + " |")
    return lines


def holds_count(rec: dict[str, Any]) -> tuple[int, int]:
    vs = [c.get("verdict") for _, c in cells(rec) if (c["uniform"] or {}).get("eval")]
    return sum(bool(v and v["holds"]) for v in vs), len(vs)


def timing_line(rec: dict[str, Any]) -> str:
    per_point = ", ".join(f"{f} {c['seconds']:.0f}" for f, c in cells(rec))
    total = rec.get("prepare_seconds", 0) + sum(c["seconds"] for _, c in cells(rec))
    return (f"Wall time (s): calibration and the paper's pruning {rec.get('prepare_seconds', 0):.0f}; per size point "
            f"(uniform file, compress, hand rules, their evaluation) {per_point}; total {total / 60:.1f} min.")


def plot_fixture(rec: dict[str, Any], name: str, path: Path) -> None:
    """Size vs mean KLD with 95 % CI bars, one series per method."""
    from moepack.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    style = {"uniform": ("x", "k"), "moepack": ("o", "C0"), "unsloth": ("s", "C1"), "authors": ("v", "C3"),
             "prune_only": ("^", "C2")}
    for method in ROWS:
        pts = sorted({(e["size_bytes"], e["kld_mean"], e["kld_ci95_low"], e["kld_ci95_high"])
                      for _, c in cells(rec) for e in [((c.get(method) or {}).get("eval"))] if e})
        if not pts:
            continue
        x = [p[0] / 2**20 for p in pts]
        y = [p[1] for p in pts]
        err = [[max(p[1] - p[2], 0) for p in pts], [max(p[3] - p[1], 0) for p in pts]]
        m, col = style[method]
        ax.errorbar(x, y, yerr=err, fmt=m + ("-" if method in ("uniform", "moepack") else ""), color=col,
                    capsize=2, lw=0.8, ms=5, label=LABELS[method])
    ax.set_yscale("log")
    ax.set_xlabel("GGUF file size (MiB)")
    ax.set_ylabel("mean KLD vs bf16 (nats, log scale), 95 % CI")
    ax.set_title(name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_path(png: Path, name: str) -> Path:
    return png.with_name(f"{png.stem}-{name}{png.suffix}")


def markdown(results: dict[str, Any], pngs: dict[str, str], source: str) -> str:
    s = results["settings"]
    fixtures = results["fixtures"]
    counts = {n: holds_count(r) for n, r in fixtures.items()}
    held, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    out = ["# moepack vs llama.cpp's mixtures at the same file size", "",
           f"Generated by `bench/claim.py` from `{source}` (`--render-only` redraws it from there); rerun to reproduce:", "",
           f"    {results['command']}", "",
           f"**The goal (moepack's mean KLD at least {100 * s['goal']:.0f} % below the llama.cpp file's, its file no "
           f"larger, the 95 % CIs apart) holds at {held} of {total} size points** ("
           + "; ".join(f"{n}: {h} of {t}" for n, (h, t) in counts.items()) + ").", "",
           "Method. Per fixture and per llama.cpp mixture from IQ1_S through Q4_K_M (a size point): the uniform file "
           "is `moepack quantize --ftype F` (llama_model_quantize) with the importance matrix of compress's "
           "calibration; moepack is `moepack compress --target-size <that file's bytes>` with its defaults "
           f"(keep {s['keep']}, criterion {s['criterion']}, sensitivity {s['sensitivity']}; calibration text: "
           f"{s['calib_text']}, {s['calib_tokens']:,} tokens in sequences of {s['seq_len']}, "
           f"{s['sens_tokens']:,} selection and as many report tokens held out after them). Baselines at the same "
           f"size, each the largest base type whose file fits: an Unsloth-style rule (ffn_gate/up_exps at the "
           f"base; ffn_down_exps and token_embd one ladder step up; attention, shared experts, dense FFN and output "
           f"{s['hand_steps']} steps up), the paper authors' fixed rules and one uniform type (prune-only), these "
           f"two on the paper's pruned checkpoint (keep {s['paper_prune']['keep']:g}, criterion "
           f"{s['paper_prune']['criterion']}, alpha {s['paper_prune']['alpha']:g}).", "",
           f"Evaluation: `moepack.eval` (llama.cpp through llama-cpp-python) against the bf16 checkpoint on "
           f"`{s['eval_text']}`, text that neither the calibration nor the selection and report tokens (all from "
           f"the calibration text) contain; windows of {s['ctx']} tokens, the second half of each scored. KLD = "
           "KL(reference || model) in nats, ± the half-width of the 95 % CI from the spread of the window means. "
           "Rows marked (= X) have the same file size as size point X and share its files.", ""]
    for name, rec in fixtures.items():
        h, t = counts[name]
        out += [f"## {name}", "",
                f"{rec['params']:,} parameters, {rec['n_experts']} routed experts per MoE layer; {rec['scored_tokens']:,} "
                f"tokens scored in {rec['windows']} windows; the reference's PPL {rec['ppl']:.3f}. The goal holds at "
                f"{h} of {t} size points. {commits_line(rec)}", "", *fixture_table(rec), ""]
        pair = pair_table(rec)
        if pair:
            out += ["Other statistics (± 95 % CI):", "", *pair, ""]
        if name in pngs:
            out += [f"![{name}: size vs mean KLD]({pngs[name]})", ""]
        out += [timing_line(rec), ""]
    return "\n".join(out) + "\n"


def render(results: dict[str, Any], args: argparse.Namespace) -> int:
    from moepack.atomic import atomic_write_text

    pngs = {}
    for name, rec in results["fixtures"].items():
        path = plot_path(args.png, name)
        plot_fixture(rec, name, path)
        here, page = path.resolve(), args.md.parent.resolve()
        pngs[name] = str(here.relative_to(page) if here.is_relative_to(page) else here.name)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.md, markdown(results, pngs, portable(args.out, ROOT)))
    print(args.md.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    from moepack.pipeline.options import CompressOptions

    d = CompressOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path, default=[ROOT / m for m in DEFAULT_MODELS])
    p.add_argument("--ftypes", nargs="+", help="size points to run (default: every mixture IQ1_S..Q4_K_M)")
    p.add_argument("--calib-text", type=Path, default=CALIB_TEXT,
                   help="compress --calib-text, the importance matrix's text too (default: data/calib/stories.txt, "
                        "the evaluation's domain); 'bundled': compress's default, the bundled multi-domain text")
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens, help="compress --calib-tokens")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="compress --seq-len")
    p.add_argument("--sens-tokens", dest="selection_tokens", type=int, default=d.selection_tokens, help="compress --sens-tokens")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window")
    p.add_argument("--eval-tokens", type=int, default=0, help="evaluation text tokens (0: 16k scored, eval's default)")
    p.add_argument("--work", type=Path, help="run directories (default out/bench-claim[-CALIB])")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/claim[-CALIB].json)")
    p.add_argument("--md", type=Path, help="the page (default docs/results[-CALIB].md)")
    p.add_argument("--png", type=Path, help="plot path (default docs/results[-CALIB]-pareto.png); one per fixture, "
                   "named PNG-STEM-FIXTURE.png")
    p.add_argument("--render-only", action="store_true", help="redo the page and plots from --out's JSON")
    args = p.parse_args(argv)
    default_paths(args)
    if args.render_only:
        return render(json.loads(args.out.read_text()), args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = load(args.out, settings(args))
    for m in args.models:
        bench_fixture(Path(m), args.ftypes, results, args)
    results["command"] = reproduce(results, sys.argv[1:] if argv is None else argv)
    write_json(args.out, portable(results, Path(args.work).resolve()))
    return render(json.loads(args.out.read_text()), args)


if __name__ == "__main__":
    sys.exit(main())
