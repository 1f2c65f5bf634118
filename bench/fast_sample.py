"""Fast sensitivity's row sample: how the fraction of rows the types not probed are quantized on changes the table.

Per fixture: calibrate on one slice of text, then measure the fast table (one probe per group at its highest type,
every other type predicted from the proxy error; moepack.stages.sensitivity.fast) once per `--fractions` entry
(1 = every row, the reference), the default ladder. Against the whole-row table: Spearman of the predicted ΔKLD
over every upgrade and over the types not probed, the largest relative error of a sampled proxy error, and the
plan allocate() picks at each `--bpw` (the same file budget as compress: budget_for minus the table's overhead):
how many tensors get another type, and each plan's KLD (fake-quantized exactly as written) on held-out text.
Writes bench/results/fast_sample.json and prints the markdown table docs/performance.md shows.

    nice .venv/bin/python bench/fast_sample.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ROOT, file_limit, rel, write_json  # file_limit: compress's budgets


def _upgrades(t: Any) -> dict[tuple[str, str], Any]:
    return {(g.name, o.type): o for g in t.groups for o in g.options[1:]}


def compare(whole: Any, sampled: Any) -> dict[str, Any]:
    """How the sampled table's predictions differ from the whole-row table's."""
    from moepack.stages.sensitivity.table import spearman

    w, s = _upgrades(whole), _upgrades(sampled)
    keys = list(w)
    rest = [k for k in keys if w[k].kld is None]
    rel = [abs(s[k].proxy / w[k].proxy - 1) for k in rest if w[k].proxy]
    return {"spearman": spearman([s[k].dkld for k in keys], [w[k].dkld for k in keys]),
            "spearman_unprobed": spearman([s[k].dkld for k in rest], [w[k].dkld for k in rest]),
            "proxy_rel_err_max": max(rel, default=0.0), "proxy_rel_err_median": float(np.median(rel)) if rel else 0.0,
            "probed_same": all(s[k].kld == w[k].kld and s[k].proxy == w[k].proxy for k in keys if w[k].kld is not None)}


def bench_model(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from moepack.model.checkpoint import open_checkpoint
    from moepack.model.textdata import chunk_tokens, tokenize_file
    from moepack.stages.allocate import allocate
    from moepack.stages.calibrate import calibrate
    from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity, plan_kld

    view = open_checkpoint(model)
    n = args.calib_tokens + args.selection_tokens
    ids, ev = tokenize_file(model, args.calib_text, n), tokenize_file(model, args.eval_text, args.eval_tokens)
    calib, sens = np.split(ids[:n], [args.calib_tokens])
    stats = calibrate(view, chunk_tokens(calib, args.seq_len), progress=False, threads=args.threads)
    sens_ids, eval_ids = chunk_tokens(sens, args.seq_len), chunk_tokens(ev, args.seq_len)
    tables, rows = {}, []
    for f in args.fractions:
        cfg = SensitivityConfig(sensitivity="fast", proxy_sample=f, threads=args.threads, progress=False)
        t0 = time.perf_counter()
        tables[f] = measure_sensitivity(view, sens_ids, cfg, imatrix=stats)
        wall = time.perf_counter() - t0
        row = {"fraction": f, "wall_s": round(wall, 1), "probes_s": tables[f].timing["probes_s"],
               "sampled_errors": tables[f].timing["sampled_errors"], "plans": []}
        row |= compare(tables[args.fractions[0]], tables[f])
        for bpw in args.bpw:
            plans = {k: allocate(t, file_limit(model, bpw) - int(t.overhead_bytes or 0)).tensors
                     for k, t in ((0, tables[args.fractions[0]]), (1, tables[f]))}
            differ = sum(plans[0][k] != plans[1][k] for k in plans[0])
            kld = plan_kld(view, eval_ids, plans[1], imatrix=stats, threads=args.threads)
            row["plans"].append({"bpw": bpw, "tensors": len(plans[1]), "tensors_differ": differ, "kld": kld})
        print(f"{model.name} fraction {f:g}: {wall:.1f} s, rho {row['spearman']:.5f} (not probed "
              f"{row['spearman_unprobed']:.5f}), proxy rel. err max {row['proxy_rel_err_max']:.4f}, plans "
              + ", ".join(f"{p['bpw']:g} bpw {p['tensors_differ']}/{p['tensors']} differ KLD {p['kld']:.5f}"
                          for p in row["plans"]), flush=True)
        rows.append(row)
    return {"model": rel(model), "rows": rows}


def to_markdown(res: dict[str, Any]) -> str:
    bpws = [p["bpw"] for p in res["models"][0]["rows"][0]["plans"]]
    head = ("| fixture | row fraction | errors sampled | Spearman ΔKLD (all / not probed) | proxy rel. error max "
            "(median) | " + " | ".join(f"{b:g} bpw: tensors differing, plan KLD" for b in bpws) + " | wall s |")
    lines = [f"`{res['command']}`", "", head, "|" + "---|" * (6 + len(bpws))]
    for m in res["models"]:
        for r in m["rows"]:
            plans = " | ".join(f"{p['tensors_differ']}/{p['tensors']}, {p['kld']:.5f}" for p in r["plans"])
            lines.append(f"| {Path(m['model']).name} | {r['fraction']:g} | {r['sampled_errors']} | "
                         f"{r['spearman']:.5f} / {r['spearman_unprobed']:.5f} | {r['proxy_rel_err_max']:.4f} "
                         f"({r['proxy_rel_err_median']:.4f}) | {plans} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", type=Path,
                   default=[ROOT / "models" / "tiny-deepseek-v3", ROOT / "models" / "tiny-qwen3-moe"])
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 1 / 4, 1 / 8, 1 / 16, 1 / 32],
                   help="row fractions; the first is the reference (1: every row)")
    p.add_argument("--calib-text", type=Path, default=ROOT / "data" / "calib" / "stories.txt")
    p.add_argument("--eval-text", type=Path, default=ROOT / "data" / "tinystories-valid.txt")
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--sens-tokens", dest="selection_tokens", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bpw", nargs="+", type=float, default=[2.5])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fast_sample.json")
    args = p.parse_args(argv)
    res = {"command": "bench/fast_sample.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "models": [bench_model(m, args) for m in args.models]}
    write_json(args.out, res)
    print("\n" + to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
