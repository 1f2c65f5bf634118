"""The central claim, measured: for the bytes of each llama.cpp file, is `moepack compress`'s file better, on every
evaluation domain?

Per fixture, and per llama.cpp file type from IQ1_S through Q4_K_M that llama_model_quantize writes (a size point:
every mixture of moepack's tables, sized as predicted, and llama-quantize's other types, Q2_K_S, Q4_0, ..., sized
from the file written; kept when between IQ1_S and Q4_K_M; the ternary TQ1_0/TQ2_0 only when --ftypes names them):
- uniform: the file type (`moepack quantize --ftype F`, llama_model_quantize) with the importance matrix of
  compress's own calibration;
- moepack: `compress --target-size <that file's bytes>` with compress's defaults (keep, criterion and sensitivity
  auto) on the calibration text below;
- with --baselines, at the same size, the largest plan of each hand rule that fits: a dynamic mixture in Unsloth's
  style (attention, shared experts, dense FFN and output HAND_STEPS ladder steps above the routed experts,
  ffn_down_exps and token_embd one step above ffn_gate/up_exps), the paper authors' fixed rules (authors_plan) and
  prune-only (one uniform type), the last two on the paper's pruned checkpoint (keep 0.75, score criterion, alpha
  0.5).
Every file is scored by moepack.eval against the bf16 checkpoint on each evaluation domain's text (--domains;
common.eval_text: data/tinystories-valid.txt and data/eval/*.txt, none of it calibrated on). Verdict per (fixture,
size point, domain): holds (moepack's mean KLD at least 25 % lower, its file no larger, the 95 % CIs apart), worse
(its KLD's CI above the uniform file's, or its file larger), else never worse but short of the goal.

One compress run directory per fixture serves every size point: its calibration (and the paper's pruning) is made
once; a sensitivity table is reused whenever its key is unchanged, so size points run in ascending order. Each
(fixture, size point) cell is saved in --out as soon as it is made, with its commit: a rerun fills in what is
missing (a cell, an evaluation domain, the baselines), so one run can be split over sessions with --models and
--ftypes; --render-only redoes the page and plots from the JSON alone (bench/claim_page.py).

Calibration text: by default data/calib/stories.txt (CALIB_TEXT: the fixtures' training domain, none of it in the
evaluation text), evaluated on stories alone, with the baselines, on the two small fixtures: the in-domain page.
--calib-text bundled: compress's own default, the bundled per-domain calibration, evaluated on all five domains
without the baselines, on those fixtures and tiny-deepseek-v3-multi (trained on all five domains). Each has its own
JSON, page and plots (bench/results/claim.json and docs/results.md; claim-bundled.json and results-bundled.md).

Full runs (every size point; a cell takes several minutes on an idle 2-core machine, most of it compress's
sensitivity tables; each page's wall-time lines say how long), from the repository root:
    .venv/bin/python bench/claim.py                          # in-domain: docs/results.md
    .venv/bin/python bench/claim.py --calib-text bundled     # five domains: docs/results-bundled.md
Smoke test (small, not the committed results):
    .venv/bin/python bench/claim.py --calib-text bundled --models models/tiny-qwen3-moe --ftypes IQ2_XXS
      --calib-tokens 4096 --sens-tokens 1024 --eval-tokens 2048 --work out/claim-smoke
      --out out/claim-smoke/claim.json --md out/claim-smoke/page.md --png out/claim-smoke/page.png
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

from claim_page import BASELINES, ROWS, SHARE, cell_verdicts, evals, markdown, migrate, page_link, plot_fixture, plot_path
from common import (CALIB_TEXT, DEFAULT_MODELS, DOMAINS, PAPER_PRUNE, ROOT, Evaluator, authors_plan, code_commit,
                    default_paths, eval_text, ladder, plan_bytes, portable, rel, reproduce, settings, unsloth_plan,
                    write_json)

MULTI_MODEL = "models/tiny-deepseek-v3-multi"  # trained on all five domains: the bundled calibration's run adds it
# Not size points unless --ftypes names them: ternary packings, made for weights trained ternary (BitNet b1.58);
# float and alias names (Q4_K is Q4_K_M) are no file types of their own.
TERNARY = ("TQ1_0", "TQ2_0")
NOT_FILE_TYPES = ("F32", "F16", "BF16", "Q3_K", "Q4_K", "Q5_K")

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
    """The shared work of one fixture's size points: calibration, the paper's pruned checkpoint, the evaluators."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from moepack.pipeline.options import CompressOptions

        self.model, self.args = model, args
        self.work = Path(args.work) / model.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.work / "run"
        self.opts = dataclasses.replace(CompressOptions(), calib_text=args.calib_text, calib_tokens=args.calib_tokens,
                                        seq_len=args.seq_len, selection_tokens=args.selection_tokens, progress=False)
        self.evaluate = {d: Evaluator(model, self.work, args.ctx, args.eval_tokens, eval_text(d)) for d in args.domains}
        self.pruned = self.work / "pruned-paper"
        self.done: set[str] = set()  # what prepare made in this process

    def path(self, file: str | Path) -> Path:
        """A row's file: the results JSON holds it relative to --work."""
        return Path(file) if Path(file).is_absolute() else Path(self.args.work) / file

    def prepare(self, prune: bool) -> float:
        """Compress's own calibration stage (so compress reuses it) and, for the baselines, the paper's pruning;
        seconds spent."""
        from moepack.backends import LocalBackend
        from moepack.model.checkpoint import open_checkpoint
        from moepack.pipeline.compress import calibrate_run  # compress's calibration, exactly as compress calls it
        from moepack.rundir import RunDir
        from moepack.stages.prune import PruneOptions, run_prune

        t0 = time.perf_counter()
        if "calibrate" not in self.done:
            calibrate_run(open_checkpoint(self.model), RunDir(self.run_dir), self.opts, LocalBackend())
            self.done.add("calibrate")
        if prune and "prune" not in self.done:
            run_prune(self.model, self.run_dir, self.pruned, PruneOptions(**PAPER_PRUNE), progress=False)
            self.done.add("prune")
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
                "domains": getattr(r, "domains", None),  # summary.json's per-domain KLDs, where compress has them
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


# ---- size points ------------------------------------------------------------------------------------------------
def record_points(fx: Fixture, rec: dict[str, Any], named: list[str]) -> None:
    """rec["sizes"]: each candidate file type's tensor bytes (moepack's mixture tables predict them; the other types
    llama_model_quantize writes are sized from their file) or why it has none; rec["points"]: those between IQ1_S and
    Q4_K_M, smallest first; rec["left_out"]: the others and why."""
    from moepack.errors import MoepackError
    from moepack.eval.reference import gguf_counts
    from moepack.gguf.kernels import ftypes
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.mixtures import mixture_sizes

    sizes = rec.setdefault("sizes", {})
    for f, s in mixture_sizes(open_checkpoint(fx.model)).items():
        sizes.setdefault(f, s.total)
    for f in sorted(set(ftypes()) - set(sizes) - set(NOT_FILE_TYPES) - (set(TERNARY) - set(named))):
        rec["prepare_seconds"] = round(rec.get("prepare_seconds", 0) + fx.prepare(False), 1)  # Q2_K_S: an imatrix
        try:
            sizes[f] = gguf_counts(fx.uniform(f)["file"])[1]
        except (MoepackError, ValueError, KeyError) as e:  # refused by llama.cpp, or a type gguf-py cannot read
            sizes[f] = f"not written or not read here: {' '.join(str(e).split())}"
    lo, hi = sizes["IQ1_S"], sizes["Q4_K_M"]
    fits = {f: s for f, s in sizes.items() if isinstance(s, int) and lo <= s <= hi
            and (f not in TERNARY or f in named or f in rec["cells"])}
    rec["points"] = dict(sorted(fits.items(), key=lambda fs: (fs[1], fs[0])))
    why = {f: s if isinstance(s, str) else "smaller than IQ1_S" if s < lo else "larger than Q4_K_M" if s > hi
           else "ternary, only with --ftypes" for f, s in sizes.items() if f not in fits}
    rec["left_out"] = {**why, **{f: "ternary, only with --ftypes" for f in TERNARY if f not in sizes}}
    for f in set(rec["left_out"]) - set(rec["cells"]):
        (fx.work / f"llama-{f}.gguf").unlink(missing_ok=True)  # a sizing file only


# ---- one cell ---------------------------------------------------------------------------------------------------
def needs(c: dict[str, Any] | None, args: argparse.Namespace) -> bool:
    """Whether cell `c` lacks what this run asks for: itself, an evaluation domain, the baselines. A size point
    llama.cpp refused is kept as measured."""
    if c is None:
        return True
    if not (c.get("uniform") or {}).get("file"):
        return False
    rows = [c.get("uniform"), c.get("moepack")] + ([c.get(k) for k in BASELINES] if args.baselines else [])
    return any(r is None or (r.get("file") and any(d not in evals(r) for d in args.domains)) for r in rows)


def _files_gone(fx: Fixture, c: dict[str, Any]) -> bool:
    """A row still to be evaluated whose file is no longer under --work, or baselines to make without the uniform
    file's size: the cell is made anew."""
    if fx.args.baselines and "overhead_bytes" not in c and any(k not in c for k in BASELINES):
        return not fx.path(c["uniform"]["file"]).is_file()
    return any(isinstance(r, dict) and r.get("file") and not fx.path(r["file"]).is_file()
               and any(d not in evals(r) for d in fx.args.domains) for r in (c.get(k) for k in ROWS))


def evaluate_row(fx: Fixture, row: dict[str, Any], rec: dict[str, Any]) -> None:
    """row's evaluation on every domain it lacks; a file another cell shares (the same size) is not scored again."""
    from moepack.errors import MoepackError

    if not row.get("file"):
        return
    me = fx.path(row["file"])
    for d in (d for d in fx.args.domains if d not in evals(row)):
        known = next((evals(r)[d] for c in rec["cells"].values() for r in (c.get(k) for k in ROWS)
                      if isinstance(r, dict) and r.get("file") and fx.path(r["file"]) == me and d in evals(r)), None)
        try:
            row.setdefault("evals", {})[d] = known or fx.evaluate[d](me)
            (row.get("eval_errors") or {}).pop(d, None)
        except MoepackError as e:
            row.setdefault("eval_errors", {})[d] = str(e)


def run_cell(fx: Fixture, ftype: str, c: dict[str, Any] | None, rec: dict[str, Any]) -> dict[str, Any]:
    """One size point: the uniform file, moepack's at its size (shared with an earlier point of the same size), the
    baselines when asked for, each evaluated on every domain asked for; what `c` holds already is kept."""
    from moepack.eval.reference import gguf_counts

    t0 = time.perf_counter()
    if c is not None and _files_gone(fx, c):
        log.warning("%s %s: files to evaluate are gone from --work: the cell is made anew", fx.model.name, ftype)
    if c is None or _files_gone(fx, c):
        c = {"ftype": ftype, "commit": code_commit(), "uniform": _attempt(lambda: fx.uniform(ftype))}
    rec["cells"][ftype] = c
    if c["uniform"].get("file"):
        path = fx.path(c["uniform"]["file"])
        target = c.get("target_bytes") or path.stat().st_size
        c["target_bytes"] = target
        twin = next((o for f, o in rec["cells"].items() if f != ftype and o.get("target_bytes") == target
                     and "moepack" in o and not o.get("same_size_as")), None)
        if "moepack" not in c and twin:
            c.update(moepack=twin["moepack"], same_size_as=twin["ftype"])
        elif "moepack" not in c:
            c["moepack"] = _attempt(lambda: fx.moepack(target))
        if fx.args.baselines and any(k not in c for k in BASELINES):
            t = time.perf_counter()
            fx.prepare(True)
            overhead = c.setdefault("overhead_bytes", target - gguf_counts(path)[1])  # metadata, vocabulary
            for name, make in fx.rules(target, overhead).items():
                c[name] = c.get(name) or (twin or {}).get(name) or _attempt(make)
            c["rules_seconds"] = round(time.perf_counter() - t, 1)
        for k in ROWS:
            if isinstance(c.get(k), dict):
                evaluate_row(fx, c[k], rec)
    c["verdicts"] = cell_verdicts(c)
    c["seconds"] = round(c.get("seconds", 0) + time.perf_counter() - t0, 1)
    return c


# ---- one fixture, the results JSON --------------------------------------------------------------------------------
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
    return migrate(results)


def bench_fixture(model: Path, results: dict[str, Any], args: argparse.Namespace) -> None:
    from moepack.model.checkpoint import open_checkpoint

    fx = Fixture(model, args)
    rec = results["fixtures"].setdefault(model.name, {"model": model, "cells": {}})
    record_points(fx, rec, args.ftypes or [])
    points = list(rec["points"])
    if unknown := sorted(set(args.ftypes or ()) - set(points)):
        log.warning("%s: %s not size points here (%s)", model.name, unknown, rec["left_out"])
    todo = [f for f in points if f in (args.ftypes or points) and needs(rec["cells"].get(f), args)]
    if todo:
        rec["prepare_seconds"] = round(rec.get("prepare_seconds", 0) + fx.prepare(args.baselines), 1)
        refs = rec.setdefault("references", {})
        for d in args.domains:
            ref = fx.evaluate[d].reference()
            refs[d] = {"text": rel(eval_text(d)), "ppl": ref.ppl, "scored_tokens": len(ref.nll),
                       "windows": len(ref.windows)}
        rec.update(params=ref.params, size_bytes=ref.size_bytes, n_experts=open_checkpoint(model).facts.n_experts)
    for f in todo:
        cell = run_cell(fx, f, rec["cells"].get(f), rec)
        write_json(args.out, portable(results, Path(args.work).resolve()))
        rows = [cell[k] for k in ROWS if isinstance(cell.get(k), dict)]
        times = ", ".join(f"{k} {cell[k]['seconds']:.0f} s" for k in ROWS[:2] if isinstance(cell.get(k), dict))
        scoring = sum(e.get("eval_seconds", 0) for r in rows for e in evals(r).values())
        print(f"{model.name} {f}: cell {cell['seconds']:.0f} s ({times}; evaluations {scoring:.0f} s)", flush=True)
    write_json(args.out, portable(results, Path(args.work).resolve()))


# ---- the page ---------------------------------------------------------------------------------------------------
def render(results: dict[str, Any], args: argparse.Namespace) -> int:
    from moepack.atomic import atomic_write_text

    migrate(results)
    pngs = {}
    for name, rec in results["fixtures"].items():
        path = plot_path(args.png, name)
        plot_fixture(rec, name, results["domains"], path)
        pngs[name] = page_link(path, args.md)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.md, markdown(results, pngs, portable(args.out, ROOT)))
    print(args.md.read_text())
    return 0


def default_domains(calib_text: Path | None) -> list[str]:
    """The one domain of a data/calib/D.txt calibration; else (the bundled text, or another) all five."""
    return [calib_text.stem] if calib_text is not None and calib_text.stem in DOMAINS else list(DOMAINS)


def default_models(calib_text: Path | None) -> tuple[str, ...]:
    return DEFAULT_MODELS + ((MULTI_MODEL,) if calib_text is None else ())


def command(results: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> str:
    """The command that makes every cell and domain `results` holds."""
    cmd = reproduce(results, argv, default_models(args.calib_text))
    held = results["domains"]
    return cmd + (" --domains " + " ".join(held) if held != default_domains(args.calib_text) else "")


def parse(argv: list[str] | None) -> argparse.Namespace:
    from moepack.pipeline.options import CompressOptions

    d = CompressOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path, help="fixtures (default: the two small ones; with --calib-text "
                   f"bundled, {MULTI_MODEL} too)")
    p.add_argument("--ftypes", nargs="+", help="size points to run (default: every file type IQ1_S..Q4_K_M)")
    p.add_argument("--calib-text", type=Path, default=CALIB_TEXT,
                   help="compress --calib-text, the importance matrix's text too (default: data/calib/stories.txt, "
                        "the evaluation's domain); 'bundled': compress's default, the bundled per-domain calibration")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, help="evaluation domains (default: D for "
                   "data/calib/D.txt, else all five)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="the hand rules' files too (default: with one evaluation domain)")
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens, help="compress --calib-tokens")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="compress --seq-len")
    p.add_argument("--sens-tokens", dest="selection_tokens", type=int, default=d.selection_tokens,
                   help="compress --sens-tokens")
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
    args.domains = args.domains or default_domains(args.calib_text)
    args.baselines = len(args.domains) == 1 if args.baselines is None else args.baselines
    args.models = args.models or [ROOT / m for m in default_models(args.calib_text)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render_only:
        return render(json.loads(args.out.read_text()), args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = load(args.out, settings(args))
    results["domains"] = [d for d in DOMAINS if d in set(results.get("domains") or ()) | set(args.domains)]
    results["done_when"] = {"share": SHARE}
    for m in args.models:
        bench_fixture(Path(m), results, args)
    results["command"] = command(results, args, sys.argv[1:] if argv is None else argv)
    write_json(args.out, portable(results, Path(args.work).resolve()))
    return render(json.loads(args.out.read_text()), args)


if __name__ == "__main__":
    sys.exit(main())
