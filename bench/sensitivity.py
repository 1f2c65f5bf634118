"""Fast vs full sensitivity: rank agreement of predicted and measured ΔKLD, wall time, and the KLD of each table's plan.

Per fixture: calibrate on one slice of text, measure the full table (every (group, type) probed) and the fast one
(one probe per group; moepack.stages.sensitivity.fast) on a second slice, allocate both at each bpw under the same
file budget as compress (budget_for(target_bpw) minus the table's GGUF overhead), and measure each plan's KLD
(fake-quantized exactly as written) against the unquantized model on a third slice neither table saw. The Spearman
of other probe choices (which upgrade fast mode probes) is computed from the full table: a fast table is exactly
the full table's measurement at the probed type plus predictions from it. Writes bench/results/sensitivity.json and
the section between the markers in docs/performance.md.

    nice .venv/bin/python bench/sensitivity.py --sens-tokens 512
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ROOT, SENS_LADDER, code_commit, file_limit, rel, write_json, write_section

BEGIN, END = "<!-- bench/sensitivity.py: begin -->", "<!-- bench/sensitivity.py: end -->"


def _upgrades(t: Any) -> dict[tuple[str, str], Any]:
    return {(g.name, o.type): o for g in t.groups for o in g.options[1:]}


def probe_choices(full: Any) -> dict[str, float | None]:
    """Spearman of fast tables probing each upgrade index, predicted from the full table's measurements."""
    from moepack.stages.sensitivity.fast import predict
    from moepack.stages.sensitivity.table import spearman

    ups = _upgrades(full)
    proxy = {k: o.proxy for k, o in ups.items()}
    base = full.base["kld"]
    out = {}
    for at in range(max(len(g.options) for g in full.groups) - 1):
        probed = {}
        for g in full.groups:
            if len(g.options) > 1:
                o = g.options[1:][min(at, len(g.options) - 2)]
                probed[(g.name, o.type)] = o.kld
        pred = predict(list(full.groups), proxy, probed, base)
        out[str(at)] = spearman([pred[k] for k in ups], [ups[k].dkld for k in ups])
    return out


def bench_model(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from moepack.model.checkpoint import open_checkpoint
    from moepack.model.textdata import chunk_tokens, tokenize_file
    from moepack.stages.allocate import allocate
    from moepack.stages.calibrate import calibrate
    from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity, plan_kld
    from moepack.stages.sensitivity.table import spearman

    view = open_checkpoint(model)
    n = args.calib_tokens + args.selection_tokens
    ids, ev = tokenize_file(model, args.calib_text, n), tokenize_file(model, args.eval_text, args.eval_tokens)
    if len(ids) < n or len(ev) < args.eval_tokens:
        raise SystemExit(f"{args.calib_text} or {args.eval_text} has fewer tokens than asked")
    calib, sens = np.split(ids[:n], [args.calib_tokens])
    stats = calibrate(view, chunk_tokens(calib, args.seq_len), progress=False, threads=args.threads)
    tables, wall = {}, {}
    sens_ids = chunk_tokens(sens, args.seq_len)
    for mode in ("full", "fast"):
        cfg = SensitivityConfig(reference=args.ladder[0], ladder=tuple(args.ladder), sensitivity=mode,
                                threads=args.threads, progress=False)
        t0 = time.perf_counter()
        tables[mode] = measure_sensitivity(view, sens_ids, cfg, imatrix=stats)
        wall[mode] = time.perf_counter() - t0
        print(f"{model.name} {mode}: {tables[mode].timing['probes']} probes, {wall[mode]:.1f} s", flush=True)
    full, fast = _upgrades(tables["full"]), _upgrades(tables["fast"])
    keys = list(full)
    unprobed = [k for k in keys if fast[k].kld is None]
    row: dict[str, Any] = {
        "model": rel(model), "groups": len(tables["full"].groups), "upgrades": len(keys),
        "probes": {m: t.timing["probes"] for m, t in tables.items()},
        "wall_s": {m: round(s, 1) for m, s in wall.items()},
        "probes_s": {m: t.timing["probes_s"] for m, t in tables.items()},
        "spearman": spearman([fast[k].dkld for k in keys], [full[k].dkld for k in keys]),
        "spearman_unprobed": spearman([fast[k].dkld for k in unprobed], [full[k].dkld for k in unprobed]),
        "spearman_proxy": tables["full"].proxy["spearman"] if tables["full"].proxy else None,
        "spearman_by_probe_index": probe_choices(tables["full"]), "plans": []}
    eval_ids = chunk_tokens(ev, args.seq_len)
    for bpw in args.bpw:
        p: dict[str, Any] = {"bpw": bpw}
        for mode, t in tables.items():
            plan = allocate(t, file_limit(model, bpw) - int(t.overhead_bytes or 0))
            p[mode] = {"kld": plan_kld(view, eval_ids, plan.tensors, imatrix=stats, threads=args.threads),
                       "kld_sens": plan_kld(view, sens_ids, plan.tensors, imatrix=stats, threads=args.threads),
                       "bytes": plan.predicted_bytes}
        p["fast_vs_full"] = p["fast"]["kld"] / p["full"]["kld"] - 1
        print(f"  {bpw:g} bpw: KLD full {p['full']['kld']:.5f} fast {p['fast']['kld']:.5f} "
              f"({100 * p['fast_vs_full']:+.1f} %)", flush=True)
        row["plans"].append(p)
    return row


def bench_compress(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`moepack compress ... --sensitivity fast` and `full`, interleaved `--repeats` times (median wall), timed end to
    end from scratch with compress's own stage timings; each file evaluated once by moepack eval (the files of
    repeats are the same)."""
    import subprocess

    from moepack.schema import RunSummary
    from moepack.schema.run import RunLayout

    exe = str(Path(sys.executable).parent / "moepack")
    flags = (f"--calib-text {rel(args.calib_text)} --calib-tokens {args.calib_tokens} --sens-tokens "
             f"{args.selection_tokens} --seq-len {args.seq_len} -t {args.threads}")
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"model": rel(model), "bpw": args.compress_bpw, "flags": flags,
                           "eval_tokens": args.eval_tokens, "commit": code_commit(),
                           "repeats": args.repeats}
    walls: dict[str, list[float]] = {"full": [], "fast": []}
    for _ in range(args.repeats):
        for mode in ("full", "fast"):
            gguf = args.work / f"{model.name}-{mode}.gguf"
            run_dir = args.work / f"{model.name}-{mode}.run"
            subprocess.run(["rm", "-rf", str(run_dir), str(gguf)], check=True)  # timed from scratch
            t0 = time.perf_counter()
            subprocess.run([exe, "compress", str(model), "--target-bpw", str(args.compress_bpw), "--keep", "1.0",
                            "--sensitivity", mode, *flags.split(), "-o", str(gguf), "--run-dir", str(run_dir)],
                           check=True, cwd=ROOT)
            walls[mode].append(time.perf_counter() - t0)
            print(f"compress {model.name} {mode}: {walls[mode][-1]:.0f} s", flush=True)
    for mode in ("full", "fast"):
        gguf, run_dir = args.work / f"{model.name}-{mode}.gguf", args.work / f"{model.name}-{mode}.run"
        # every reference's table (the smallest type's fast one, the budget type's full one where measured)
        layout = RunLayout(run_dir)
        sens_s = sum(json.loads(f.read_text())["seconds"] for f in layout.stages.glob("sensitivity-r1*.json"))
        stages = RunSummary.read(layout.summary).timings
        ev = args.work / f"{model.name}-{mode}.eval.json"
        subprocess.run([exe, "eval", str(gguf), "--reference", str(model), "--text", str(args.eval_text),
                        "--tokens", str(args.eval_tokens), "--no-speed", "-t", "1", "--json-out", str(ev)],
                       check=True, cwd=ROOT)
        m = json.loads(ev.read_text())["models"][0]
        out[mode] = {"wall_s": round(float(np.median(walls[mode])), 1),
                     "walls_s": [round(w, 1) for w in walls[mode]],
                     "sensitivity_s": round(sens_s, 1), "stages_s": {k: round(v, 1) for k, v in stages.items()},
                     "kld": m["kld_mean"], "kld_ci95": [m.get("kld_ci95_low"), m.get("kld_ci95_high")],
                     "bytes": m.get("size_bytes")}
    return out


def to_markdown(res: dict[str, Any]) -> str:
    a = res["settings"]
    lines = [BEGIN, "", "## Fast vs full sensitivity (bench/sensitivity.py)", "",
             "Full mode probes every (tensor group, ladder type): a forward pass from the group's layer with that "
             "group fake-quantized. Fast mode (`--sensitivity fast`) probes one type per group (its highest "
             "upgrade), learns α_g = ΔKLD / Δ(imatrix-weighted squared error) from it, and predicts every other "
             "type as α_g × its error, computed with llama.cpp's quantize/dequantize kernels alone. "
             f"Settings: ladder {','.join(a['ladder'])} (base {a['ladder'][0]}), calibration {a['calib_tokens']} "
             f"tokens of {a['calib_text']}, sensitivity on the {a['sens_tokens']} tokens after them, plan KLD on the "
             f"first {a['eval_tokens']} tokens of {a['eval_text']} (neither table saw them; sequences of "
             f"{a['seq_len']}), {a['threads']} threads on a "
             "shared 2-core machine. `" + res["command"] + "`", "",
             "| fixture | groups | probes full / fast | wall s full / fast | Spearman fast vs full (all / unprobed) "
             "| Spearman imatrix proxy |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['groups']} | {r['probes']['full']} / {r['probes']['fast']} | "
                     f"{r['wall_s']['full']} / {r['wall_s']['fast']} | {r['spearman']:.3f} / "
                     f"{r['spearman_unprobed']:.3f} | {r['spearman_proxy']:.3f} |")
    lines += ["", "Held-out KLD of the plan each table gives under the same file budget:", "",
              "| fixture | bpw | KLD full plan | KLD fast plan | fast vs full | on the sensitivity tokens: full / fast |",
              "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        for p in r["plans"]:
            lines.append(f"| {r['model']} | {p['bpw']:g} | {p['full']['kld']:.5f} | {p['fast']['kld']:.5f} | "
                         f"{100 * p['fast_vs_full']:+.1f} % | {p['full']['kld_sens']:.5f} / "
                         f"{p['fast']['kld_sens']:.5f} |")
    pts = [p for r in res["rows"] for p in r["plans"]]
    ok = sum(p["fast_vs_full"] <= 0.05 for p in pts)
    worse_in = sum(p["full"]["kld_sens"] > p["fast"]["kld_sens"] for p in pts)
    lines += ["", f"The fast plan is within 5 % of the full plan's held-out KLD, or better, at {ok} of {len(pts)} "
              f"points. The full plan loses even on the tokens its own table was measured on at {worse_in} of "
              f"{len(pts)}: measured single-group ΔKLDs on few tokens are small and noisy (an upgrade can measure as "
              "harmful, a group's curve need not be convex in bytes), and the allocator adds them as if "
              "independent; α_g × error is monotone in the type, which suits the greedy solver."]
    lines += ["", "Spearman (fast vs full, all upgrades) by the upgrade fast mode probes (0 = lowest; fast mode "
              "probes the highest), from the full table:", ""]
    for r in res["rows"]:
        lines.append(f"- {r['model']}: " + ", ".join(f"{k}: {v:.3f}" for k, v in r["spearman_by_probe_index"].items()
                                                     if v is not None))
    for c in res.get("compress", []):
        lines += ["", f"`moepack compress {c['model']} --target-bpw {c['bpw']:g} --keep 1.0 --sensitivity fast|full` "
                  f"({c['flags']}) at commit {c.get('commit')}, interleaved, median wall of {c.get('repeats', 1)}; "
                  f"the file's KLD from `moepack eval` on "
                  f"{c['eval_tokens'] or 'enough'} tokens of {a['eval_text']}"
                  f"{' to score 16,384 (its default)' if not c['eval_tokens'] else ''}:", "",
                  "| mode | compress wall s | sensitivity stages s | file KLD (eval, 95 % CI) |", "|---|---|---|---|"]
        for mode in ("full", "fast"):
            r = c[mode]
            lo, hi = r["kld_ci95"]
            lines.append(f"| {mode} | {r['wall_s']:.0f} | {r['sensitivity_s']:.0f} | {r['kld']:.5f} "
                         f"({lo:.5f} to {hi:.5f}) |")
        lines.append(f"\nfast / full: compress wall {100 * c['fast']['wall_s'] / c['full']['wall_s']:.0f} %, the "
                     f"sensitivity stages {100 * c['fast']['sensitivity_s'] / c['full']['sensitivity_s']:.0f} %, file "
                     f"KLD {100 * (c['fast']['kld'] / c['full']['kld'] - 1):+.1f} %. Stage seconds (compress's "
                     "run.timings, last run of each):")
        for mode in ("full", "fast"):
            st = c[mode].get("stages_s", {})
            lines.append(f"- {mode}: " + ", ".join(f"{k} {v:.0f}" for k, v in st.items()))
    return "\n".join(lines + ["", END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", type=Path, default=[ROOT / "models" / "tiny-deepseek-v3"])
    p.add_argument("--calib-text", type=Path, default=ROOT / "data" / "calib" / "stories.txt",
                   help="calibration tokens, then the sensitivity tokens after them")
    p.add_argument("--eval-text", type=Path, default=ROOT / "data" / "tinystories-valid.txt",
                   help="the plans' KLD (and --compress's eval)")
    p.add_argument("--compress", action="store_true",
                   help="also time `moepack compress --sensitivity fast` and `full` at --compress-bpw and eval both")
    p.add_argument("--compress-bpw", type=float, default=2.5)
    p.add_argument("--compress-only", action="store_true", help="add --compress's rows to the existing --out")
    p.add_argument("--repeats", type=int, default=1, help="--compress: interleaved full / fast runs (median wall)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-sensitivity")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--sens-tokens", dest="selection_tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--ladder", nargs="+", default=list(SENS_LADDER))
    p.add_argument("--bpw", nargs="+", type=float, default=[1.8, 2.5, 3.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sensitivity.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "performance.md")
    args = p.parse_args(argv)
    if args.compress_only:
        res = json.loads(args.out.read_text())
        res["compress"] = [bench_compress(m, args) for m in args.models]
        res["compress_command"] = "bench/sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])
        _write(res, args)
        return 0
    rows = [bench_model(m, args) for m in args.models]
    settings = {k: getattr(args, k) for k in ("calib_tokens", "eval_tokens", "seq_len", "ladder",
                                              "threads")}
    settings |= {"sens_tokens": args.selection_tokens, "calib_text": rel(args.calib_text),
                 "eval_text": rel(args.eval_text)}
    res = {"command": "bench/sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "settings": settings, "rows": rows}
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if not args.compress and "compress" in old:  # the tables again: the compress rows (their own flags) stay
        res |= {k: old[k] for k in ("compress", "compress_command") if k in old}
    _write(res, args)
    if args.compress:  # written again with it: the tables part stays when a compress run fails
        res["compress"] = [bench_compress(m, args) for m in args.models]
        _write(res, args)
    return 0


def _write(res: dict[str, Any], args: argparse.Namespace) -> None:
    write_json(args.out, res)
    write_section(args.md, to_markdown(res), BEGIN, END)


if __name__ == "__main__":
    sys.exit(main())
