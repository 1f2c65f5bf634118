"""The central claim, measured: moepack compress vs uniform low-bit quantization at the same size.

Run: .venv/bin/python bench/claim.py [--models models/tiny-qwen3-moe models/tiny-deepseek-v3] [--bpw 1.8 2.5 3.5]
       [--auto] [--work out/bench-claim] [--out bench/results/claim.json] [--md docs/results.md]

Per fixture, one compress run directory per retention (calibration and sensitivity computed once, reused for every
budget because the base type is fixed with --base), then:
- moepack: compress --keep 0.75 (and --keep auto with --auto) at each --target-bpw;
- quantization only: compress --keep 1.0 at each budget;
- pruning only: the run's pruned-r0.75 checkpoint, `quantize --type T` with the largest T that fits the budget;
- llama.cpp uniform mixtures with the importance matrix (`quantize --ftype F --calib-dir RUN_DIR`), natural sizes;
- the paper authors' fixed per-tensor rules on the pruned-r0.75 checkpoint (`quantize --plan`), the base type
  being the largest whose plan fits the budget.
Every GGUF is evaluated with moepack.eval.evaluate against the HF checkpoint on tinystories-valid.txt (cloze only).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ1_M")
# upgrade order for the uniform (pruning only) and the authors' rules; "one step higher" = the next entry
LADDER = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
SENS_LADDER = ("IQ1_S", "IQ2_XXS", "IQ2_S", "IQ3_S", "Q4_K", "Q6_K")

log = logging.getLogger("claim")


def file_limit(model: Path, bpw: float) -> int:
    from moepack.stages.budget import BudgetRequest, budget_for
    from moepack.model.checkpoint import open_checkpoint

    return int(budget_for(BudgetRequest(target_bpw=bpw), open_checkpoint(model)).file_limit)


def run_compress(model: Path, work: Path, keep: float | str, bpw: float, args: argparse.Namespace) -> dict:
    from moepack.pipeline.compress import compress
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.budget import BudgetRequest

    out = work / f"moepack-r{keep}-b{bpw:g}.gguf"
    run_dir = work / ("run-auto" if keep == "auto" else f"run-r{keep:g}")
    info = out.with_suffix(".json")
    if out.is_file() and info.is_file():
        return json.loads(info.read_text())
    opts = CompressOptions(keep=keep, base=args.base, ladder=tuple(args.ladder), calib_text=DATA / "tinystories-train.txt",
                           calib_tokens=args.calib_tokens, seq_len=args.seq_len, sens_tokens=args.sens_tokens,
                           threads=2, progress=False)
    t0 = time.perf_counter()
    r = compress(model, out, BudgetRequest(target_bpw=bpw), opts, run_dir)
    d = {"file": str(out), "run_dir": str(run_dir), "keep": r.keep, "top_k": r.top_k,
         "candidates": r.candidates, "timings": r.timings, "seconds": time.perf_counter() - t0}
    info.write_text(json.dumps(d, indent=1, default=str))
    return d


def _plan_bytes(outs: list, types: dict[str, str]) -> int:
    import gguf

    from moepack.gguf.types import written_bytes

    f32 = gguf.GGMLQuantizationType.F32
    return sum(written_bytes(o.shape, gguf.GGMLQuantizationType[types[o.name]] if o.name in types else f32)
               for o in outs)


def authors_plan(view: Any, base: str) -> dict[str, str]:
    """Chen et al.'s fixed rules: routed experts at `base`, the first and last eighth of MoE layers one step higher,
    ffn_down_exps one more step; attention Q4_K (dense FFN too), shared experts Q6_K, token_embd Q2_K, output Q5_K."""
    from moepack.model.arch import Role
    from moepack.gguf.names import gguf_outputs

    outs = [o for o in gguf_outputs(view) if o.quantizable]
    moe = sorted({o.layer for o in outs if o.role is Role.ROUTED_EXPERTS})
    edge = max(1, math.ceil(len(moe) / 8))
    edges = set(moe[:edge]) | set(moe[-edge:])
    up = lambda t, n: LADDER[min(LADDER.index(t) + n, len(LADDER) - 1)]  # noqa: E731
    plan: dict[str, str] = {}
    for o in outs:
        if o.role is Role.ROUTED_EXPERTS:
            plan[o.name] = up(base, (o.layer in edges) + ("ffn_down" in o.name))
        elif o.role is Role.SHARED_EXPERTS:
            plan[o.name] = "Q6_K"
        elif o.name.startswith("token_embd"):
            plan[o.name] = "Q2_K"
        elif o.name.startswith("output"):
            plan[o.name] = "Q5_K"
        else:
            plan[o.name] = "Q4_K"
    return plan


def largest_fitting(view: Any, limit: int, overhead: int, plan_for) -> tuple[str, dict[str, str]] | None:
    from moepack.gguf.names import gguf_outputs

    outs = gguf_outputs(view)
    best = None
    for t in LADDER:
        types = plan_for(t)
        if _plan_bytes(outs, types) + overhead <= limit:
            best = (t, types)
    return best


def write_plan(pruned: Path, out: Path, types: dict[str, str], imatrix: Path, note: dict) -> None:
    from moepack.gguf.quantize import quantize_model

    plan = out.with_suffix(".quant_plan.json")
    plan.write_text(json.dumps({"tensors": types, **note}, indent=1))
    quantize_model(pruned, out, plan=plan, imatrix=imatrix, threads=2, progress=False)


def baselines(model: Path, work: Path, bpw: float, run_dir: Path, overhead: int) -> list[dict]:
    """Pruning only and the authors' rules at one budget, each the largest base that fits."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.gguf.names import gguf_outputs

    pruned = run_dir / "pruned-r0.75"
    view = open_checkpoint(pruned)
    limit = file_limit(model, bpw)
    rows = []
    quant = [o.name for o in gguf_outputs(view) if o.quantizable]
    for method, plan_for in (("prune-only", lambda t: {n: t for n in quant}),
                             ("authors", lambda t: authors_plan(view, t))):
        out = work / f"{method}-b{bpw:g}.gguf"
        fit = largest_fitting(view, limit, overhead, plan_for)
        if fit is None:
            rows.append({"method": method, "budget_bpw": bpw, "file": None, "note": "no base type fits"})
            continue
        t, types = fit
        if not out.is_file():
            write_plan(pruned, out, types, run_dir, {"rule": method, "base": t})
        rows.append({"method": method, "budget_bpw": bpw, "file": str(out), "base": t})
    return rows


def uniform(model: Path, work: Path, run_dir: Path) -> list[dict]:
    from moepack.gguf.quantize import quantize_model

    rows = []
    for f in FTYPES:
        out = work / f"llama-{f}.gguf"
        if not out.is_file():
            quantize_model(model, out, ftype=f, imatrix=run_dir, threads=2, progress=False)
        rows.append({"method": f"llama.cpp {f}", "budget_bpw": None, "file": str(out)})
    return rows


def evaluate_all(model: Path, rows: list[dict], work: Path, args: argparse.Namespace) -> dict:
    from moepack.eval import mc
    from moepack.eval.evaluate import evaluate_model
    from moepack.eval.reference import EvalConfig, prepare_reference
    from moepack.model.textdata import read_text

    text = DATA / "tinystories-valid.txt"
    cfg = EvalConfig(ctx=args.ctx, tokens=args.eval_tokens, mc=("cloze",), mc_items=args.mc_items, threads=1,
                     prompt_tokens=64, gen_tokens=32, cache_dir=work.parent / "evalcache", cloze_text=text)
    tasks = {"cloze": mc.load_task("cloze", n=args.mc_items, cloze_text=text)}
    ref = prepare_reference(model, text, cfg)
    ref_cloze = mc.score_items("cloze", ref.scorer(cfg), ref.tokenize, tasks["cloze"], desc="cloze ref").to_dict()
    ref.release()
    sample = read_text(text)[:4000]
    for r in rows:
        if not r.get("file"):
            continue
        p = Path(r["file"])
        cache = p.with_suffix(".eval.json")
        stamp = [p.stat().st_size, p.stat().st_mtime_ns]
        if cache.is_file() and json.loads(cache.read_text()).get("stamp") == stamp:
            r["eval"] = json.loads(cache.read_text())["eval"]
            continue
        r["eval"] = evaluate_model(p, ref, tasks, cfg, sample)
        cache.write_text(json.dumps({"stamp": stamp, "eval": r["eval"]}))
    return {"params": ref.params, "size_bytes": ref.size_bytes, "ppl": ref.ppl, "cloze": ref_cloze["score"],
            "settings": {"ctx": cfg.ctx, "tokens": cfg.tokens, "windows": len(ref.windows),
                         "scored_tokens": len(ref.nll), "cloze_items": len(tasks["cloze"]), "threads": 1,
                         "prompt_tokens": cfg.prompt_tokens, "gen_tokens": cfg.gen_tokens}}


def bench_fixture(model: Path, args: argparse.Namespace) -> dict:
    work = Path(args.work) / model.name
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    rows: list[dict] = []
    keeps: list[float | str] = [0.75, 1.0] + (["auto"] if args.auto else [])
    t0 = time.perf_counter()
    for bpw in args.bpw:
        for keep in keeps:
            t = time.perf_counter()
            d = run_compress(model, work, keep, bpw, args)
            timings[f"compress keep={keep} bpw={bpw:g}"] = round(time.perf_counter() - t, 1)
            method = "moepack quant-only (keep 1.0)" if keep == 1.0 else f"moepack keep {keep}"
            rows.append({"method": method, "budget_bpw": bpw, "file": d["file"], "keep": d["keep"],
                         "top_k": d["top_k"], "candidates": d["candidates"]})
    run_dir = work / "run-r0.75"
    overhead = int(json.loads((run_dir / "sensitivity-r0.75.json").read_text()).get("overhead_bytes") or 0)
    t = time.perf_counter()
    for bpw in args.bpw:
        rows += baselines(model, work, bpw, run_dir, overhead)
    timings["prune-only + authors"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    rows += uniform(model, work, run_dir)
    timings["llama.cpp ftypes"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ref = evaluate_all(model, rows, work, args)
    timings["evaluate"] = round(time.perf_counter() - t, 1)
    timings["total"] = round(time.perf_counter() - t0, 1)
    limits = {str(b): file_limit(model, b) for b in args.bpw}
    return {"model": model.name, "reference": ref, "rows": rows, "limits": limits, "timings": timings}


def verdicts(fx: dict) -> list[dict]:
    """Per budget and moepack variant: the best uniform mixture that fits, and whether the claim holds."""
    out = []
    uni = [r for r in fx["rows"] if r["method"].startswith("llama.cpp") and r.get("eval")]
    for b, limit in fx["limits"].items():
        fits = [r for r in uni if r["eval"]["size_bytes"] <= limit]
        best = min(fits, key=lambda r: r["eval"]["kld_mean"]) if fits else None
        for r in fx["rows"]:
            if not r["method"].startswith("moepack") or str(r["budget_bpw"]) != b or not r.get("eval"):
                continue
            e = r["eval"]
            v = {"budget_bpw": float(b), "limit_bytes": limit, "method": r["method"], "size": e["size_bytes"],
                 "kld": e["kld_mean"], "baseline": best and best["method"],
                 "baseline_size": best and best["eval"]["size_bytes"], "baseline_kld": best and best["eval"]["kld_mean"]}
            if best:
                v["smaller"] = e["size_bytes"] <= best["eval"]["size_bytes"]
                v["kld_reduction"] = 1 - e["kld_mean"] / best["eval"]["kld_mean"]
                v["holds"] = v["smaller"] and v["kld_reduction"] >= 0.25
            out.append(v)
    return out


def _label(r: dict) -> str:
    s = r["method"]
    if r.get("budget_bpw") is not None:
        s += f" @{r['budget_bpw']:g}"
    if r.get("base"):
        s += f" ({r['base']})"
    return s


def table(fx: dict) -> str:
    ref = fx["reference"]
    head = ["method", "size MiB", "bpw", "PPL", "KLD mean", "KLD p99", "top-1 %", "cloze %", "decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| reference (HF bf16) | {ref['size_bytes'] / 2**20:.2f} | {8 * ref['size_bytes'] / ref['params']:.2f} "
             f"| {ref['ppl']:.3f} | — | — | — | {100 * ref['cloze']:.1f} | — |"]
    rows = [r for r in fx["rows"] if r.get("eval")]
    for r in sorted(rows, key=lambda r: r["eval"]["size_bytes"]):
        e = r["eval"]
        dec = e.get("decode_tps")
        lines.append(f"| {_label(r)} | {e['size_bytes'] / 2**20:.2f} | {e['bpw']:.2f} | {e['ppl']:.3f} | "
                     f"{e['kld_mean']:.4f} | {e['kld_p99']:.3f} | {100 * e['top1']:.1f} | "
                     f"{100 * e['mc']['cloze']['score']:.1f} | {'—' if dec is None else f'{dec:.0f}'} |")
    for r in fx["rows"]:
        if not r.get("file"):
            lines.append(f"| {_label(r)} | — | — | — | — | — | — | — | — ({r.get('note')}) |")
    return "\n".join(lines)


def plot(fixtures: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fixtures), figsize=(6.5 * len(fixtures), 5), squeeze=False)
    style = {"moepack keep 0.75": ("o", "C0"), "moepack keep auto": ("D", "C5"),
             "moepack quant-only (keep 1.0)": ("s", "C1"), "prune-only": ("^", "C2"), "authors": ("v", "C3")}
    for ax, fx in zip(axes[0], fixtures):
        for r in fx["rows"]:
            if not r.get("eval"):
                continue
            x, y = r["eval"]["size_bytes"] / 2**20, r["eval"]["kld_mean"]
            if r["method"].startswith("llama.cpp"):
                ax.scatter(x, y, marker="x", color="k", label="llama.cpp uniform (imatrix)")
                ax.annotate(r["method"].split()[-1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            else:
                m, c = style.get(r["method"], ("*", "C4"))
                ax.scatter(x, y, marker=m, color=c, label=r["method"])
        for b, limit in fx["limits"].items():
            ax.axvline(limit / 2**20, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("GGUF size (MiB); dotted: budgets " + ", ".join(fx["limits"]) + " bpw")
        ax.set_ylabel("mean KLD vs bf16 (nats, log)")
        ax.set_title(fx["model"])
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def _verdict_lines(fx: dict) -> list[str]:
    lines = []
    for v in verdicts(fx):
        head = f"- **{v['budget_bpw']:g} bpw** (file limit {v['limit_bytes'] / 2**20:.2f} MiB), {v['method']}: "
        if not v.get("baseline"):
            lines.append(head + f"{v['size'] / 2**20:.2f} MiB, KLD {v['kld']:.4f}; no llama.cpp uniform mixture "
                         "fits this budget, so there is nothing to beat at this size.")
            continue
        ok = "**holds**" if v["holds"] else "**falls short**"
        red = v["kld_reduction"]
        cmp = (f"{100 * red:.1f}% lower" if red >= 0 else f"{v['kld'] / v['baseline_kld']:.1f}x the baseline's")
        lines.append(head + f"{ok}: {v['size'] / 2**20:.3f} MiB vs {v['baseline']} {v['baseline_size'] / 2**20:.3f} "
                     f"MiB ({'no larger' if v['smaller'] else 'LARGER by %.1f%%' % (100 * (v['size'] / v['baseline_size'] - 1))}"
                     f"); mean KLD {v['kld']:.4f} vs {v['baseline_kld']:.4f}: {cmp} (goal: >= 25% lower).")
    return lines


def discussion(fx: dict) -> list[str]:
    """Why the pruned files fall short, from the measured rows: the KLD floor that pruning alone sets."""
    ev = {(r["method"], r.get("budget_bpw")): r["eval"] for r in fx["rows"] if r.get("eval")}
    prune = [e["kld_mean"] for (m, _), e in ev.items() if m == "prune-only"]
    pruned = [e["kld_mean"] for (m, _), e in ev.items() if m == "moepack keep 0.75"]
    qonly = {b: e["kld_mean"] for (m, b), e in ev.items() if m.startswith("moepack quant-only")}
    if not (prune and pruned and qonly):
        return []
    floor = min(pruned + prune)
    return [f"Why: every file with 25% of the experts removed sits at a KLD floor of about {min(pruned + prune):.3f} "
            f"(moepack keep 0.75: {min(pruned):.3f}-{max(pruned):.3f}; pruning with a uniform type: "
            f"{min(prune):.3f}-{max(prune):.3f}) whatever the bits, while quantization alone costs "
            + ", ".join(f"{v:.4f} at {b:g} bpw" for b, v in sorted(qonly.items()))
            + f". On this 4-layer, 16-expert fixture trained to use every expert, removing a quarter of them costs "
            f"more KLD than quantization alone at {', '.join(f'{b:g}' for b, v in sorted(qonly.items()) if v < floor) or 'no'}"
            " bpw. moepack's own mixed precision without pruning "
            "(quant-only rows) is the fair measure of its allocator here. `--keep auto` measures the KLD at every "
            "retention and so picks 1.0 whenever pruning's KLD exceeds its savings (the keep auto rows, when run "
            "with --auto). What would close the rest: a larger "
            "fixture with more, more specialised experts (where the paper's pruning is cheap), and comparing at "
            "`--target-size` equal to the uniform file's own size where the uniform mixture lands below the budget "
            "(the size test above is against the baseline's file, not the budget).", ""]


def markdown(fixtures: list[dict], command: str, png: str, args: argparse.Namespace) -> str:
    s = fixtures[0]["reference"]["settings"]
    out = ["# moepack vs uniform low-bit quantization on the trained fixtures", "",
           "Produced by `bench/claim.py`; rerun to reproduce:", "", f"    {command}", "",
           f"Evaluation: `moepack.eval.evaluate` through llama-cpp-python against the bf16 HF checkpoint on "
           f"tinystories-valid.txt: {s['scored_tokens']} tokens scored in {s['windows']} windows of {s['ctx']} "
           f"(KLD = KL(reference || model), nats); TinyStories cloze on {s['cloze_items']} items; decode tok/s "
           f"on {s['threads']} thread, {s['prompt_tokens']}-token prompt, {s['gen_tokens']} decode steps, on a "
           "shared 2-core machine (speed is noisy). bpw = 8 x file size / original parameter count.", "",
           f"Compress settings: calibration {args.calib_tokens} tokens of tinystories-train.txt (seq {args.seq_len}),"
           f" sensitivity on {args.sens_tokens} held-out tokens, base {args.base}, ladder {' '.join(args.ladder)}, "
           "greedy allocation. Budgets via `--target-bpw`. One run directory per (fixture, keep); its calibration "
           "and sensitivity table serve all three budgets.", "",
           f"![Pareto: size vs mean KLD]({png})", ""]
    if not args.auto:
        out += ["`--keep auto` was not run: it measures a sensitivity table for each of 4 retentions "
                "(1.0, 0.875, 0.75, 0.625) per fixture, which does not fit the time box this run had; "
                "rerun with `--auto` to add it.", ""]
    for fx in fixtures:
        out += [f"## {fx['model']}", "", table(fx), "", "Verdict per budget (best llama.cpp uniform mixture that "
                "fits the budget = lowest mean KLD among those no larger than the file limit):", ""]
        out += _verdict_lines(fx)
        out += [""] + discussion(fx)
        out += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in fx["timings"].items()), ""]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path,
                   default=[ROOT / "models" / "tiny-qwen3-moe", ROOT / "models" / "tiny-deepseek-v3"])
    p.add_argument("--bpw", nargs="+", type=float, default=[1.8, 2.5, 3.5])
    p.add_argument("--auto", action="store_true", help="also run compress --keep auto (slow)")
    p.add_argument("--base", default="IQ1_S", help="compress --base (fixed so sensitivity is reused)")
    p.add_argument("--ladder", nargs="+", default=list(SENS_LADDER))
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sens-tokens", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--mc-items", type=int, default=200)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-claim")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "claim.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "results-pareto.png")
    p.add_argument("--render-only", action="store_true", help="redo the page and plot from --out's JSON")
    args = p.parse_args(argv)
    if args.render_only:
        d = json.loads(args.out.read_text())
        return render(d["fixtures"], d["command"], args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = ".venv/bin/python bench/claim.py " + " ".join(sys.argv[1:] if argv is None else argv)
    fixtures = []
    for m in args.models:
        fixtures.append(bench_fixture(Path(m), args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        body = json.dumps({"command": command, "fixtures": fixtures,
                           "verdicts": {f["model"]: verdicts(f) for f in fixtures}}, indent=1, default=str)
        tmp.write_text(body.replace(str(args.work.resolve()) + "/", ""))  # paths relative to --work
        tmp.replace(args.out)
    return render(fixtures, command, args)


def render(fixtures: list[dict], command: str, args: argparse.Namespace) -> int:
    plot(fixtures, args.png)
    rel = args.png.relative_to(args.md.parent) if args.png.is_relative_to(args.md.parent) else args.png
    tmp = args.md.with_name(args.md.name + ".tmp")
    tmp.write_text(markdown(fixtures, command, str(rel), args))
    tmp.replace(args.md)
    print(args.md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
