"""Domain-targeted compression on the multi-domain fixture: does pruning pay when a deployment needs one domain?

Run: .venv/bin/python bench/domain.py [--model models/tiny-deepseek-v3-multi] [--domains code dialogue]
       [--bpw 1.8 2.5 3.5] [--work out/bench-domain] [--out bench/results/domain.json] [--md docs/pruning.md]

Per target domain D (calibration text data/calib/D.txt; evaluation text data/eval/D.txt, never calibrated on):
- moepack keep auto: `compress --keep auto --calib-text data/calib/D.txt --target-bpw B` (one run directory per
  domain: calibration and every retention's sensitivity table are measured once, the base type being fixed with
  --base, and reused for every budget);
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


def run_compress(model: Path, work: Path, domain: str, keep: float | str, bpw: float,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One compress run (cached by its output's JSON); a budget it cannot meet is a row with the reason."""
    from moepack.errors import MoepackError
    from moepack.pipeline.compress import compress
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.budget import BudgetRequest

    out = work / f"moepack-{domain}-r{keep}-b{bpw:g}.gguf"
    info = out.with_suffix(".json")
    if info.is_file():
        return json.loads(info.read_text())
    opts = CompressOptions(keep=keep, reference=args.base, ladder=tuple(args.ladder), calib_text=DATA / "calib" / f"{domain}.txt",
                           calib_tokens=args.calib_tokens, seq_len=args.seq_len, selection_tokens=args.selection_tokens,
                           threads=2, progress=False)
    t0 = time.perf_counter()
    try:
        r = compress(model, out, BudgetRequest(target_bpw=bpw), opts, work / f"run-{domain}")
    except MoepackError as e:
        d: dict[str, Any] = {"file": None, "error": str(e).replace(str(ROOT) + "/", "")}
    else:
        d = {"file": rel(out), "size_bytes": r.file_bytes, "keep": r.keep, "top_k": r.top_k,
             "n_experts": list(r.n_experts), "selection_kld": r.selection_kld, "criterion": opts.criterion,
             "candidates": r.candidates}
    d.update(method="keep auto" if keep == "auto" else f"keep {keep:g}", budget_bpw=bpw,
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


def bench_domain(model: Path, domain: str, args: argparse.Namespace, ev: Evaluator) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    points = []
    for bpw in args.bpw:  # keep auto first: it makes the run directory's calibration the mixtures use
        auto = run_compress(model, work, domain, "auto", bpw, args)
        quant = run_compress(model, work, domain, 1.0, bpw, args)
        points.append({"budget_bpw": bpw, "file_limit": file_limit(model, bpw), "auto": auto, "quant_only": quant})
    mixtures = uniform(model, work, domain)
    for m in mixtures:
        m["eval"] = {domain: ev(m["file"], domain)}
    for pt in points:
        for row in (pt["auto"], pt["quant_only"]):
            if row.get("file"):
                row["eval"] = {d: ev(row["file"], d) for d in DOMAINS}
        cap = pt["auto"].get("size_bytes") or pt["file_limit"]
        fitting = [m for m in mixtures if m["size_bytes"] <= cap]
        best = min(fitting, key=lambda m: m["eval"][domain]["kld_mean"], default=None)
        if best is not None:
            best = dict(best, eval={d: ev(best["file"], d) for d in DOMAINS})
        pt["llama_best"] = best
        pt["verdict"] = verdict(pt, domain)
    return {"domain": domain, "calib_text": rel(DATA / "calib" / f"{domain}.txt"), "eval_text": rel(eval_text(domain)),
            "points": points, "mixtures": [{k: m[k] for k in ("method", "size_bytes", "eval")} for m in mixtures],
            "seconds": round(time.perf_counter() - t0, 1)}


def _ci(row: dict | None, domain: str) -> tuple[float, float] | None:
    if not row or not row.get("eval"):
        return None
    e = row["eval"][domain]
    return e["kld_ci95_low"], e["kld_ci95_high"]


def verdict(pt: dict[str, Any], domain: str) -> dict[str, Any]:
    """Did keep auto prune, and did its file beat quant-only (at no larger size) and llama.cpp's best mixture within
    the same budget on the target domain, with 95 % CIs apart?"""
    a, q, l = pt["auto"], pt["quant_only"], pt["llama_best"]
    out: dict[str, Any] = {"pruned": bool(a.get("file")) and a["keep"] < 1.0}
    ca = _ci(a, domain)
    for name, other in (("vs_quant_only", q), ("vs_llama", l)):
        co = _ci(other, domain)
        if ca is None or co is None:
            out[name] = None
            continue
        out[name] = {"lower": a["eval"][domain]["kld_mean"] < other["eval"][domain]["kld_mean"],
                     "cis_apart": ca[1] < co[0], "no_larger": a["size_bytes"] <= other["size_bytes"],
                     "both_fit": max(a["size_bytes"], other["size_bytes"]) <= pt["file_limit"]}
    vq, vl = out["vs_quant_only"], out["vs_llama"]
    out["pruning_paid"] = bool(out["pruned"] and vq and vq["lower"] and vq["cis_apart"] and vq["no_larger"])
    out["beat_llama"] = bool(vl and vl["lower"] and vl["cis_apart"] and vl["both_fit"])
    return out


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


def markdown(results: dict[str, Any], command: str) -> str:
    s = results["settings"]
    lines = [BEGIN, "", "## Domain-targeted compression (bench/domain.py)", "",
             f"`{command}` on `{results['model']}` ({results['params']:,} parameters), {results['seconds'] / 60:.0f} "
             f"min. Calibration on the target domain's calibration text ({s['calib_tokens']:,} tokens, "
             f"{s['sens_tokens']:,} held out for selection); sensitivity base {s['base']}, ladder "
             f"{', '.join(s['ladder'])}; criterion {s['criterion']}. KLD vs the bf16 checkpoint on each domain's "
             f"evaluation text ({s['eval_tokens']:,} tokens in windows of {s['ctx']}, second halves scored), mean ± "
             "half-width of the 95 % CI from window means. llama.cpp: its standard mixtures with the same "
             "calibration's importance matrix; the column shows the lowest-KLD one no larger than the keep-auto "
             "file.", "",
             "| target | budget bpw | limit MiB | keep auto: keep, k', MiB | keep auto KLD | quant-only (keep 1) "
             "MiB, KLD | llama.cpp best fitting | its KLD | pruning paid | keep auto on other domains | "
             "quant-only on other domains |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["domains"]:
        d = r["domain"]
        for pt in r["points"]:
            a, q, lb, v = pt["auto"], pt["quant_only"], pt["llama_best"], pt["verdict"]
            auto_cell = (f"{a['keep']:g} ({a['n_experts'][0]}/{a['n_experts'][1]}), {a['top_k']}, {_mib(a)}"
                         if a.get("file") else "does not fit")
            paid = "yes" if v["pruning_paid"] else ("no (not pruned)" if not v["pruned"] else
                                                    "— (quant-only cannot fit)" if not q.get("file") else "no")
            small = min(r["mixtures"], key=lambda m: m["size_bytes"])
            llama_cell = (f"{lb['method']}, {_mib(lb)} MiB" if lb else
                          f"none fits (smallest: {small['method']}, {_mib(small)} MiB)")
            lines.append(f"| {d} | {pt['budget_bpw']:g} | {pt['file_limit'] / 2**20:.2f} | {auto_cell} | {_kld(a, d)} "
                         f"| {_quant_cell(q, d)} | {llama_cell} | "
                         f"{_kld(lb, d)} | {paid} | {_others(a, d)} | {_others(q, d)} |")
    paid = [(r["domain"], pt["budget_bpw"]) for r in results["domains"] for pt in r["points"]
            if pt["verdict"]["pruning_paid"]]
    beat = [(r["domain"], pt["budget_bpw"]) for r in results["domains"] for pt in r["points"] if pt["verdict"]["beat_llama"]]
    none = [(r["domain"], pt["budget_bpw"]) for r in results["domains"] for pt in r["points"] if pt["llama_best"] is None]
    n = sum(len(r["points"]) for r in results["domains"])
    lines += ["", f"Pruning paid (keep auto pruned, KLD on the target domain below quant-only's at no larger size, "
                  f"CIs apart) at {len(paid)} of {n} (domain, budget) points"
                  + (": " + ", ".join(f"{d} {b:g} bpw" for d, b in paid) if paid else "") + ". "
                  f"keep auto beat llama.cpp's best mixture within the same budget (lower KLD, CIs apart) at "
                  f"{len(beat)} of {n}" + (": " + ", ".join(f"{d} {b:g} bpw" for d, b in beat) if beat else "")
                  + f"; at {len(none)} of {n} no llama.cpp mixture fits the budget at all"
                  + (": " + ", ".join(f"{d} {b:g} bpw" for d, b in none) if none else "") + ".", "", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-deepseek-v3-multi")
    p.add_argument("--domains", nargs="+", default=["code", "dialogue"], choices=DOMAINS)
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
                pt["verdict"] = verdict(pt, r["domain"])
        write_json(args.out, results)
        write_section(args.md, markdown(results, results["command"]), BEGIN, END)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from moepack.model.checkpoint import open_checkpoint
    from moepack.pipeline.options import CompressOptions

    t0 = time.perf_counter()
    ev = Evaluator(args.model, Path(args.work), args)
    domains = [bench_domain(args.model, d, args, ev) for d in args.domains]
    results = {"model": rel(args.model), "params": sum(open_checkpoint(args.model).param_counts().values()),
               "settings": {"base": args.base, "ladder": args.ladder, "calib_tokens": args.calib_tokens,
                            "sens_tokens": args.selection_tokens, "seq_len": args.seq_len, "ctx": args.ctx,
                            "eval_tokens": args.eval_tokens, "criterion": CompressOptions().criterion,
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
