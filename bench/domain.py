"""Domain-targeted compression on the multi-domain fixture: does pruning pay when a deployment needs one domain?

Run: .venv/bin/python bench/domain.py [--model models/tiny-deepseek-v3-multi] [--domains code dialogue]
       [--bpw 1.8 2.5 3.5] [--work out/bench-domain] [--out bench/results/domain.json] [--md docs/pruning.md]

Per target domain D (calibration text data/calib/D.txt; evaluation text data/eval/D.txt, never calibrated on;
`bundled`: compress's default bundled calibration, the target being every domain):
- moepack keep auto: `compress --keep auto --criterion score --calib-text data/calib/D.txt --target-bpw B` (one run
  directory per domain: calibration and every retention's sensitivity table are measured once, the base type being
  fixed with --base, and reused for every budget) — dropped experts discarded;
- the same with `--merge`: every pruned retention folds its dropped experts into kept ones (stages.merge, default
  variant), so keep auto chooses among merged candidates;
- quantization only: the same with --keep 1.0 (same run directory, so the same keep-1.0 table) — or the reason it
  cannot fit;
- llama.cpp's standard mixtures with the importance matrix of the same calibration text; at each budget, the one
  with the lowest KLD on D among those no larger than the keep-auto file.
Each file is evaluated (moepack.eval: KLD vs the bf16 checkpoint, 95 % CI from window means) on D's evaluation text
and on every other domain's, so the table shows what the domain-targeted file costs elsewhere.
The Markdown section replaces the one between its markers in --md; every number in it comes from the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common import DATA, DOMAINS, FTYPES, ROOT, SENS_LADDER, eval_text, file_limit, rel, write_json, write_section

BEGIN, END = "<!-- bench/domain.py: begin -->", "<!-- bench/domain.py: end -->"

log = logging.getLogger("domain")


BUNDLED = "bundled"  # the target "domain" of compress's default calibration: all five


def calib_text(domain: str) -> Path | None:
    return None if domain == BUNDLED else DATA / "calib" / f"{domain}.txt"


def targets(domain: str) -> tuple[str, ...]:
    """The evaluation domains a verdict is taken on."""
    return DOMAINS if domain == BUNDLED else (domain,)


CANDIDATE_KEYS = ("keep", "top_k", "kld", "prune_kld", "screened", "infeasible", "same_as", "tensor_bytes", "criterion")


def compact(c: dict[str, Any]) -> dict[str, Any]:
    """What the page uses of a retention compress measured (the full record is in its run's summary.json)."""
    return {k: c.get(k) for k in CANDIDATE_KEYS}


def run_compress(model: Path, work: Path, domain: str, keep: float | str, bpw: float,
                 args: argparse.Namespace, merge: bool = False) -> dict[str, Any]:
    """One compress run (cached by its output's JSON); a budget it cannot meet is a row with the reason."""
    from moepack.errors import MoepackError
    from moepack.pipeline.compress import compress
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.budget import BudgetRequest
    from moepack.stages.merge import MergeOptions

    out = work / f"moepack-{domain}-r{keep}-b{bpw:g}{'-merge' if merge else ''}.gguf"
    info = out.with_suffix(".json")
    if info.is_file():
        return json.loads(info.read_text())
    opts = CompressOptions(keep=keep, reference=args.base, ladder=tuple(args.ladder), calib_text=calib_text(domain),
                           calib_tokens=args.calib_tokens, seq_len=args.seq_len, selection_tokens=args.selection_tokens,
                           criterion=args.criterion, merge=MergeOptions() if merge else None, threads=2,
                           progress=False)
    t0 = time.perf_counter()
    try:
        r = compress(model, out, BudgetRequest(target_bpw=bpw), opts, work / f"run-{domain}")
    except MoepackError as e:
        d: dict[str, Any] = {"file": None, "error": str(e).replace(str(ROOT) + "/", "")}
    else:
        d = {"file": rel(out), "size_bytes": r.file_bytes, "keep": r.keep, "top_k": r.top_k,
             "n_experts": list(r.n_experts), "selection_kld": r.selection_kld, "criterion": opts.criterion,
             "candidates": [compact(c) for c in r.candidates], "merge": r.merge}
    d.update(method=("keep auto" if keep == "auto" else f"keep {keep:g}") + (", merged" if merge else ""), budget_bpw=bpw,
             seconds=round(time.perf_counter() - t0, 1))
    info.write_text(json.dumps(d, indent=1, default=str))
    return d


def uniform(model: Path, work: Path, domain: str) -> list[dict[str, Any]]:
    """llama.cpp's mixtures with the importance matrix of the domain's calibration."""
    from moepack.gguf.quantize import quantize_model

    rows = []
    for f in FTYPES:
        out = work / f"llama-{domain}-{f}.gguf"
        if not out.is_file():
            quantize_model(model, out, ftype=f, imatrix=work / f"run-{domain}", threads=2, progress=False)
        rows.append({"method": f"llama.cpp {f}", "file": rel(out), "size_bytes": out.stat().st_size})
    return rows


class Evaluator:
    """KLD of GGUF files vs the checkpoint on each domain's evaluation text; references and results cached."""

    def __init__(self, model: Path, work: Path, args: argparse.Namespace) -> None:
        from moepack.eval.reference import EvalConfig

        self.model, self.work = model, work
        self.cfg = EvalConfig(ctx=args.ctx, tokens=args.eval_tokens, mc=(), threads=1, speed=False,
                              cache_dir=work / "evalcache")
        self.refs: dict[str, Any] = {}
        self.settings: dict[str, Any] = {"ctx": args.ctx, "tokens": args.eval_tokens}

    def _ref(self, domain: str):
        from moepack.eval.reference import prepare_reference

        if domain not in self.refs:
            self.refs[domain] = prepare_reference(self.model, eval_text(domain), self.cfg)
            self.settings[domain] = {"text": rel(eval_text(domain)), "scored_tokens": len(self.refs[domain].nll),
                                     "windows": len(self.refs[domain].windows)}
        return self.refs[domain]

    def __call__(self, file: str, domain: str) -> dict[str, float]:
        from moepack.eval.evaluate import evaluate_model

        p = ROOT / file
        cache = p.with_suffix(f".eval-{domain}.json")
        stamp = [p.stat().st_size, p.stat().st_mtime_ns, self.cfg.tokens, self.cfg.ctx]
        if cache.is_file() and (hit := json.loads(cache.read_text())).get("stamp") == stamp and "text" in hit:
            self.settings.setdefault(domain, hit["text"])  # the scored-token counts, without preparing the reference
            return hit["eval"]
        e = evaluate_model(p, self._ref(domain), {}, self.cfg)
        keep = ("ppl", "kld_mean", "kld_ci95_low", "kld_ci95_high", "kld_median", "kld_p99", "top1")
        r = {k: e[k] for k in keep}
        cache.write_text(json.dumps({"stamp": stamp, "eval": r, "text": self.settings[domain]}))
        return r


ROWS = ("auto", "auto_merge", "quant_only")  # a point's moepack files: keep auto dropped / merged, keep 1


def bench_domain(model: Path, domain: str, args: argparse.Namespace, ev: Evaluator) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    points = []
    for bpw in args.bpw:  # keep auto first: it makes the run directory's calibration the mixtures use
        points.append({"budget_bpw": bpw, "file_limit": file_limit(model, bpw),
                       "auto": run_compress(model, work, domain, "auto", bpw, args),
                       "auto_merge": run_compress(model, work, domain, "auto", bpw, args, merge=True),
                       "quant_only": run_compress(model, work, domain, 1.0, bpw, args)})
    mixtures = uniform(model, work, domain)
    goal = targets(domain)
    for m in mixtures:
        m["eval"] = {d: ev(m["file"], d) for d in goal}
    for pt in points:
        for row in (pt[k] for k in ROWS):
            if row.get("file"):
                row["eval"] = {d: ev(row["file"], d) for d in DOMAINS}
        cap = pt["auto"].get("size_bytes") or pt["file_limit"]
        fitting = [m for m in mixtures if m["size_bytes"] <= cap]
        best = min(fitting, key=lambda m: sum(m["eval"][d]["kld_mean"] for d in goal), default=None)
        if best is not None:
            best = dict(best, eval={d: ev(best["file"], d) for d in DOMAINS})
        pt["llama_best"] = best
        pt["verdict"] = {d: verdict(pt, d) for d in goal}
    return {"domain": domain, "calib_text": rel(calib_text(domain)) if calib_text(domain) else "bundled (default)",
            "eval_text": {d: rel(eval_text(d)) for d in goal}, "points": points,
            "mixtures": [{k: m[k] for k in ("method", "size_bytes", "eval")} for m in mixtures],
            "seconds": round(time.perf_counter() - t0, 1)}


def _ci(row: dict | None, domain: str) -> tuple[float, float] | None:
    if not row or not row.get("eval"):
        return None
    e = row["eval"][domain]
    return e["kld_ci95_low"], e["kld_ci95_high"]


def _versus(a: dict, other: dict | None, domain: str, limit: int) -> dict[str, bool] | None:
    ca, co = _ci(a, domain), _ci(other, domain)
    if ca is None or co is None:
        return None
    return {"lower": a["eval"][domain]["kld_mean"] < other["eval"][domain]["kld_mean"], "cis_apart": ca[1] < co[0],
            "no_larger": a["size_bytes"] <= other["size_bytes"],
            "both_fit": max(a["size_bytes"], other["size_bytes"]) <= limit}


def _judge(a: dict, q: dict, lb: dict | None, domain: str, limit: int) -> dict[str, Any]:
    """Did this keep-auto file prune, and beat quant-only (at no larger size) and llama.cpp's best mixture within the
    same budget on `domain`, with 95 % CIs apart?"""
    out: dict[str, Any] = {"pruned": bool(a.get("file")) and a["keep"] < 1.0,
                           "vs_quant_only": _versus(a, q, domain, limit), "vs_llama": _versus(a, lb, domain, limit)}
    vq, vl = out["vs_quant_only"], out["vs_llama"]
    out["pruning_paid"] = bool(out["pruned"] and vq and vq["lower"] and vq["cis_apart"] and vq["no_larger"])
    out["beat_llama"] = bool(vl and vl["lower"] and vl["cis_apart"] and vl["both_fit"])
    return out


def verdict(pt: dict[str, Any], domain: str) -> dict[str, Any]:
    """The verdicts of keep auto with dropped experts (`auto`) and with merged ones (`auto_merge`) on `domain`, and
    whether the merged file's KLD is below the dropped one's with CIs apart (`merge_better`)."""
    a, m = pt["auto"], pt.get("auto_merge", {})
    out: dict[str, Any] = {k: _judge(pt[k], pt["quant_only"], pt["llama_best"], domain, pt["file_limit"])
           for k in ("auto", "auto_merge") if k in pt}
    vm = _versus(m, a, domain, pt["file_limit"]) if m.get("file") else None
    out["merge_better"] = bool(vm and vm["lower"] and vm["cis_apart"])
    return out


def why_not(row: dict[str, Any]) -> str:
    """Each retention keep auto measured at this budget: its plan's selection KLD (or its pruning-only KLD where it
    was screened out before a plan) — why the chosen one won."""
    parts = []
    for c in row.get("candidates") or []:
        if c.get("infeasible"):
            parts.append(f"{c['keep']:g}: does not fit")
        elif c.get("kld") is not None:
            parts.append(f"{c['keep']:g}: {c['kld']:.4f}")
        elif c.get("prune_kld") is not None:
            parts.append(f"{c['keep']:g}: pruning alone {c['prune_kld']:.4f}")
    return "; ".join(parts) or "—"


def _kld(row: dict | None, domain: str) -> str:
    if not row or not row.get("eval"):
        return "—"
    e = row["eval"][domain]
    return f"{e['kld_mean']:.4f} ± {(e['kld_ci95_high'] - e['kld_ci95_low']) / 2:.4f}"


def _mib(row: dict | None) -> str:
    return f"{row['size_bytes'] / 2**20:.2f}" if row and row.get("size_bytes") else "—"


def _others(row: dict | None, domain: str) -> str:
    if not row or not row.get("eval"):
        return "—"
    return ", ".join(f"{d} {row['eval'][d]['kld_mean']:.3f}" for d in DOMAINS if d != domain)


def _quant_cell(q: dict, domain: str) -> str:
    return f"{_mib(q)} MiB, {_kld(q, domain)}" if q.get("file") else "does not fit"


def _auto_cell(a: dict, d: str) -> str:
    if not a.get("file"):
        return "does not fit"
    return f"{a['keep']:g} ({a['n_experts'][0]}/{a['n_experts'][1]}), {a['top_k']}, {_mib(a)} MiB, {_kld(a, d)}"


def _paid(v: dict, a: dict, q: dict) -> str:
    vq = v["vs_quant_only"]
    if vq and v["pruned"] and vq["lower"] and vq["cis_apart"] and not vq["no_larger"]:
        return f"no: {a['size_bytes'] - q['size_bytes']:,} B larger (both within the budget)"
    return "yes" if v["pruning_paid"] else ("no (not pruned)" if not v["pruned"] else
                                            "— (quant-only cannot fit)" if not q.get("file") else "no")


def _row(r: dict, pt: dict, d: str) -> str:
    q, lb, v = pt["quant_only"], pt["llama_best"], pt["verdict"][d]
    small = min(r["mixtures"], key=lambda m: m["size_bytes"])
    llama = (f"{lb['method'].removeprefix('llama.cpp ')}, {_mib(lb)} MiB, {_kld(lb, d)}" if lb else
             f"none fits (smallest: {small['method'].removeprefix('llama.cpp ')}, {_mib(small)} MiB)")
    merged = "yes" if v["merge_better"] else ("same file" if pt["auto_merge"].get("keep") == 1.0 and
                                                pt["auto"].get("keep") == 1.0 else "no")
    return (f"| {r['domain']} | {d} | {pt['budget_bpw']:g} | {pt['file_limit'] / 2**20:.2f} | {_quant_cell(q, d)} | "
            f"{_auto_cell(pt['auto'], d)} | {_paid(v['auto'], pt['auto'], q)} | {_auto_cell(pt['auto_merge'], d)} | "
            f"{_paid(v['auto_merge'], pt['auto_merge'], q)} | {merged} | {llama} |")


def _counts(results: dict[str, Any], key: str, test: str) -> tuple[list[str], int]:
    hits, n = [], 0
    for r in results["domains"]:
        if r["domain"] == BUNDLED:
            continue
        for pt in r["points"]:
            n += 1
            if pt["verdict"][r["domain"]][key][test]:
                hits.append(f"{r['domain']} {pt['budget_bpw']:g} bpw")
    return hits, n


def markdown(results: dict[str, Any], command: str) -> str:
    s = results["settings"]
    lines = [BEGIN, "", "## Domain-targeted compression, experts dropped or merged (bench/domain.py)", "",
             f"`{command}` on `{results['model']}` ({results['params']:,} parameters), {results['seconds'] / 60:.0f} "
             f"min. Calibration on the target domain's calibration text ({s['calib_tokens']:,} tokens, "
             f"{s['sens_tokens']:,} held out for selection; `bundled`: compress's default bundled calibration, judged "
             f"on every domain); sensitivity base {s['base']}, ladder {', '.join(s['ladder'])}; criterion "
             f"{s['criterion']}. keep auto chooses the retention by measurement, once with dropped experts discarded "
             "and once with `--merge` (every pruned candidate merged). KLD vs the bf16 checkpoint on each domain's "
             f"evaluation text ({s['eval_tokens']:,} tokens in windows of {s['ctx']}, second halves scored), mean ± "
             "half-width of the 95 % CI from window means. \"pays\": pruned, KLD below quant-only's (keep 1) at no "
             "larger size, CIs apart. llama.cpp: its standard mixtures with the same calibration's importance matrix, "
             "the lowest-KLD one no larger than the keep-auto file.", "",
             "| calibration | evaluated on | budget bpw | limit MiB | quant-only (keep 1): MiB, KLD | keep auto, dropped: "
             "keep (experts), k', MiB, KLD | pays | keep auto, merged: keep (experts), k', MiB, KLD | pays | merged "
             "below dropped (CIs apart) | llama.cpp best fitting: MiB, KLD |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["domains"]:
        lines += [_row(r, pt, d) for pt in r["points"] for d in pt["verdict"]]
    lines += ["", "What keep auto measured at each retention (selection KLD of its plan, on the calibration's held-out "
              "selection tokens; \"pruning alone\": screened out by its pruning-only KLD before a plan was made):", "",
              "| calibration | budget bpw | dropped | merged |", "|---|---|---|---|"]
    lines += [f"| {r['domain']} | {pt['budget_bpw']:g} | {why_not(pt['auto'])} | {why_not(pt['auto_merge'])} |"
              for r in results["domains"] for pt in r["points"]]
    lines += ["", "The target-domain files on the other domains (mean KLD):", "",
              "| calibration | budget bpw | keep auto, dropped | keep auto, merged | quant-only |", "|---|---|---|---|---|"]
    lines += [f"| {r['domain']} | {pt['budget_bpw']:g} | {_others(pt['auto'], r['domain'])} | "
              f"{_others(pt['auto_merge'], r['domain'])} | {_others(pt['quant_only'], r['domain'])} |"
              for r in results["domains"] if r["domain"] != BUNDLED for pt in r["points"]]
    for key, name in (("auto", "dropped"), ("auto_merge", "merged")):
        paid, n = _counts(results, key, "pruning_paid")
        beat, _ = _counts(results, key, "beat_llama")
        lines += ["", f"keep auto, {name}: pruning paid at {len(paid)} of {n} (domain, budget) points"
                  + (" (" + ", ".join(paid) + ")" if paid else "") + f"; beat llama.cpp's best fitting mixture (CIs "
                  f"apart) at {len(beat)} of {n}" + (" (" + ", ".join(beat) + ")" if beat else "") + "."]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-deepseek-v3-multi")
    p.add_argument("--domains", nargs="+", default=["code", "dialogue"], choices=(*DOMAINS, BUNDLED),
                   help=f"target domains; {BUNDLED!r}: the bundled calibration, judged on all five")
    p.add_argument("--criterion", default="score", help="fixed, so dropped and merged runs prune the same experts")
    p.add_argument("--bpw", nargs="+", type=float, default=[1.8, 2.5, 3.5])
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-domain")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "domain.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "pruning.md")
    p.add_argument("--base", default="IQ1_S", help="fixed sensitivity base, so tables serve every budget")
    p.add_argument("--ladder", nargs="+", default=list(SENS_LADDER))
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--sens-tokens", dest="selection_tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--from-json", action="store_true", help="only rewrite the section from --out's results")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(args.out.read_text())
        for r in results["domains"]:
            for pt in r["points"]:
                pt["verdict"] = {d: verdict(pt, d) for d in targets(r["domain"])}
        write_json(args.out, results)
        write_section(args.md, markdown(results, results["command"]), BEGIN, END)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from moepack.model.checkpoint import open_checkpoint

    t0 = time.perf_counter()
    ev = Evaluator(args.model, Path(args.work), args)
    domains = [bench_domain(args.model, d, args, ev) for d in args.domains]
    results = {"model": rel(args.model), "params": sum(open_checkpoint(args.model).param_counts().values()),
               "settings": {"base": args.base, "ladder": args.ladder, "calib_tokens": args.calib_tokens,
                            "sens_tokens": args.selection_tokens, "seq_len": args.seq_len, "ctx": args.ctx,
                            "eval_tokens": args.eval_tokens, "criterion": args.criterion,
                            "eval": ev.settings},
               "domains": domains, "seconds": round(time.perf_counter() - t0, 1)}
    command = "python bench/domain.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results["command"] = command.strip()
    write_json(args.out, results)
    write_section(args.md, markdown(results, command.strip()), BEGIN, END)
    print(markdown(results, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
