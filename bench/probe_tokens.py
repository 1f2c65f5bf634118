"""What fewer sensitivity probe tokens cost: `compress --sensitivity fast --probe-tokens N` against all of them.

Per fixture and `--bpw`: `moepack compress MODEL --target-bpw B --keep 1.0 --sensitivity fast` (compress's other
defaults: the bundled calibration text or --calib-text, 50,000 calibration tokens, 4,096 selection tokens), once
with the probes on every selection token and once per `--probe-tokens` value; each file scored by moepack.eval
against the bf16 checkpoint on data/tinystories-valid.txt (16k tokens scored, windows of 512; text no
calibration, selection or report token comes from), mean KLD ± the 95 % CI. Also each run's sensitivity-stage
seconds. The cost model of docs/performance.md (bench/distributed_cost.py --tokens) says what the probe count
buys on DeepSeek-V3; this says what it costs in quality on the fixtures. Writes bench/results/probe_tokens.json
(probe_tokens-CALIB.json with --calib-text) and prints a markdown table.

    nice .venv/bin/python bench/probe_tokens.py [--bpw 2.5 3.5] [--probe-tokens 1024]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, Evaluator, calib_tag, code_commit, write_json  # the claim's evaluation, commits, names


def run_one(model: Path, bpw: float, probe: int | None, args: argparse.Namespace) -> dict[str, Any]:
    from moepack.pipeline.compress import compress
    from moepack.pipeline.options import CompressOptions
    from moepack.stages.budget import BudgetRequest

    tag = f"{model.name}-{bpw:g}-{probe or 'all'}"
    work = args.work / tag
    work.mkdir(parents=True, exist_ok=True)
    opts = dataclasses.replace(CompressOptions(), keep=1.0, sensitivity="fast", probe_tokens=probe, progress=False,
                               threads=args.threads, calib_text=args.calib_text)
    t0 = time.perf_counter()
    r = compress(model, work / "out.gguf", BudgetRequest(target_bpw=bpw), opts, work / "run")
    wall = time.perf_counter() - t0
    sens_s = sum(v for k, v in r.timings.items() if k.startswith("sensitivity"))
    ev = args.evaluate[model.name](work / "out.gguf")
    row = {"model": model.name, "bpw": bpw, "probe_tokens": probe or opts.selection_tokens, "wall_s": round(wall, 1),
           "sensitivity_s": round(sens_s, 1), "selection_kld": r.selection_kld, "report_kld": r.report_kld,
           "size_bytes": ev["size_bytes"], "kld_mean": ev["kld_mean"], "kld_ci95_low": ev["kld_ci95_low"],
           "kld_ci95_high": ev["kld_ci95_high"]}
    print(f"{tag}: KLD {row['kld_mean']:.5f} ({row['kld_ci95_low']:.5f}-{row['kld_ci95_high']:.5f}), "
          f"sensitivity {sens_s:.0f} s, compress {wall:.0f} s", flush=True)
    return row


def to_markdown(res: dict[str, Any]) -> str:
    lines = [f"`{res['command']}` (commit {res['commit']})", "",
             "| fixture | bpw | probe tokens | file MiB | file KLD (95 % CI) | vs all tokens | sensitivity s | "
             "compress s |", "|---|---|---|---|---|---|---|---|"]
    rows = res["rows"]
    for r in rows:
        ref = next(x for x in rows if x["model"] == r["model"] and x["bpw"] == r["bpw"]
                   and x["probe_tokens"] == max(y["probe_tokens"] for y in rows if y["model"] == r["model"]))
        apart = r["kld_ci95_high"] < ref["kld_ci95_low"] or r["kld_ci95_low"] > ref["kld_ci95_high"]
        vs = "—" if r is ref else (f"{100 * (r['kld_mean'] / ref['kld_mean'] - 1):+.1f} %"
                                   f" ({'CIs apart' if apart else 'CIs overlap'})")
        lines.append(f"| {r['model']} | {r['bpw']:g} | {r['probe_tokens']:,} | {r['size_bytes'] / 2**20:.3f} | "
                     f"{r['kld_mean']:.5f} ({r['kld_ci95_low']:.5f} to {r['kld_ci95_high']:.5f}) | {vs} | "
                     f"{r['sensitivity_s']:.0f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", type=Path,
                   default=[ROOT / "models" / "tiny-deepseek-v3", ROOT / "models" / "tiny-qwen3-moe"])
    p.add_argument("--bpw", nargs="+", type=float, default=[2.5])
    p.add_argument("--probe-tokens", nargs="+", type=int, default=[1024], help="besides all selection tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-text", type=Path, help="compress --calib-text (default: the bundled multi-domain text); "
                   "e.g. data/calib/stories.txt, the evaluation text's domain")
    p.add_argument("--work", type=Path, help="default out/bench-probe-tokens[-CALIB] (CALIB: the text's stem)")
    p.add_argument("--out", type=Path, help="default bench/results/probe_tokens[-CALIB].json")
    args = p.parse_args(argv)
    tag = calib_tag(args.calib_text, None)  # other text: other results, never mixed
    args.work = args.work or ROOT / "out" / f"bench-probe-tokens{tag}"
    args.out = args.out or ROOT / "bench" / "results" / f"probe_tokens{tag}.json"
    # the claim's evaluation: windows of 512, eval's default 16k tokens scored
    args.evaluate = {m.name: Evaluator(m, args.work / m.name, ctx=512, tokens=0) for m in args.models}
    res = {"command": "bench/probe_tokens.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "commit": code_commit(), "calib_text": str(args.calib_text or "bundled"), "rows": []}
    for m in args.models:
        for b in args.bpw:
            for n in (None, *args.probe_tokens):
                res["rows"].append(run_one(m, b, n, args))
                write_json(args.out, res)  # each row at once: a long run keeps them
    print("\n" + to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
