"""Expert pruning criteria × top-k policies on the trained fixtures: perplexity and KLD vs the unpruned model.

Run: .venv/bin/python bench/prune.py [--models models/tiny-qwen3-moe models/tiny-deepseek-v3] [--keep 0.5 0.75]
       [--valid-tokens 8192] [--calib-tokens 50000] [--out bench/results/prune.json]

Calibration (cached under --work) uses tinystories-train.txt; the pruned models are evaluated in memory (lazy
pruned view + layer runner, no checkpoint written) on tinystories-valid.txt. k' policies: "k" (unchanged),
"round" (max(1, round(R·k)), the default), "auto" (moepack's --top-k auto on held-out calibration tokens).
Merge columns: each criterion but random once more with the dropped experts merged into kept ones (stages.merge,
default variant) — the same experts kept, so merged vs dropped at the same retention; KLD with its 95 % CI from
window means (moepack.model.runner), so the two compare.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moepack.model.checkpoint import open_checkpoint
from moepack.model.pruned import pruned_view
from moepack.model.runner import KLDReference, LayerRunner
from moepack.model.textdata import chunk_tokens, tokenize_file
from moepack.schema import CalibStats
from moepack.stages.calibrate import run_calibrate
from moepack.stages.merge import MergeOptions
from moepack.stages.prune import PruneOptions, auto_candidates, make_plan, top_k_auto

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
CRITERIA = [("score", 0), ("frequency", 0), ("reap", 0), ("random", 0), ("random", 1), ("random", 2)]
MERGED = ("score", "frequency", "reap")  # criteria measured once more with the dropped experts merged


def bench_model(model: Path, keeps: list[float], args: argparse.Namespace) -> list[dict]:
    view = open_checkpoint(model)
    work = Path(args.work) / model.name
    stats: CalibStats = run_calibrate(model, DATA / "tinystories-train.txt", work, tokens=args.calib_tokens,
                                      seq_len=args.seq_len, selection_tokens=4096, progress=False)
    ids = chunk_tokens(tokenize_file(model, DATA / "tinystories-valid.txt", args.valid_tokens), args.seq_len)
    first = min(view.facts.moe_layers)
    valid = KLDReference(LayerRunner(view), ids, first, args.batch)
    selection = KLDReference(LayerRunner(view), stats.selection, first, args.batch)
    rows = [dict(model=model.name, keep=1.0, criterion="unpruned", seed=None, policy="-", top_k=view.facts.top_k,
                 n_kept=view.facts.n_experts, **valid.base)]
    print(f"{model.name}: unpruned ppl {valid.base['ppl']:.3f} on {ids.size} tokens", file=sys.stderr)
    runs = [(c, s, False) for c, s in CRITERIA] + [(c, 0, True) for c in MERGED]
    for keep in keeps:
        for crit, seed, merge in runs:
            opts = PruneOptions(keep=keep, criterion=crit, seed=seed, merge=MergeOptions() if merge else None)
            plan = make_plan(view, stats, opts)
            cands = auto_candidates(plan, view, opts)
            auto, _ = top_k_auto(view, plan, stats.selection, cands, opts.kld_tol, args.batch, selection, False)
            measured: dict[int, dict[str, float]] = {}
            for policy, k in (("k", view.facts.top_k), ("round", plan.top_k_new), ("auto", auto)):
                if k not in measured:
                    measured[k] = valid.variant(LayerRunner(pruned_view(view, plan, top_k=k)))
                    measured[k].update(_ci(valid.last_tokens))
                rows.append(dict(model=model.name, keep=keep, criterion=crit + (" merged" if merge else ""),
                                 seed=seed, policy=policy, top_k=k, n_kept=plan.n_kept, **measured[k]))
                print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def _ci(tokens: np.ndarray) -> dict[str, float]:
    """95 % CI of the mean KLD from window means (per-token KLDs (N, L); moepack.pipeline.robust's windows)."""
    from moepack.pipeline.robust import DomainKLD

    mean, half = DomainKLD(("all",), np.zeros(len(tokens), dtype=int), tokens).means()["all"]
    return {"kld_ci95_low": mean - half, "kld_ci95_high": mean + half}


def _kld(r: dict) -> str:
    half = (r["kld_ci95_high"] - r["kld_ci95_low"]) / 2 if "kld_ci95_high" in r else None
    return f"{r['kld_mean']:.4f}" + (f" ± {half:.4f}" if half is not None else "")


def merge_table(rows: list[dict]) -> str:
    """Merged vs dropped at the same retention, criterion and k' policy "round": KLD vs the unpruned model."""
    out = ["| model | R | criterion | dropped: PPL, KLD | merged: PPL, KLD | merged lower, CIs apart |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if r["policy"] != "round" or r["criterion"] not in MERGED:
            continue
        m = next(x for x in rows if (x["model"], x["keep"], x["policy"], x["criterion"])
                 == (r["model"], r["keep"], "round", r["criterion"] + " merged"))
        apart = "kld_ci95_high" in m and m["kld_ci95_high"] < r["kld_ci95_low"]
        worse = "kld_ci95_high" in r and r["kld_ci95_high"] < m["kld_ci95_low"]
        out.append(f"| {r['model']} | {r['keep']} | {r['criterion']} | {r['ppl']:.3f}, {_kld(r)} | {m['ppl']:.3f}, "
                   f"{_kld(m)} | {'yes' if apart else 'no, higher (CIs apart)' if worse else 'no (CIs overlap)'} |")
    return "\n".join(out)


def to_markdown(rows: list[dict]) -> str:
    out = ["| model | R | kept | criterion | k' policy | k' | PPL | mean KLD | top-1 agree |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        crit = r["criterion"] + (f" (seed {r['seed']})" if r["criterion"] == "random" else "")
        out.append(f"| {r['model']} | {r['keep']} | {r['n_kept']} | {crit} | {r['policy']} | {r['top_k']} | "
                   f"{r['ppl']:.3f} | {r['kld_mean']:.4f} | {r['top1_agree']:.3f} |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    """Mean over the 3 random seeds next to the other criteria, per (model, R, policy)."""
    out = ["| model | R | k' policy | score | frequency | REAP | random (mean of 3) |", "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["keep"], r["policy"]) for r in rows if r["criterion"] != "unpruned"})
    for model, keep, policy in keys:
        sel = [r for r in rows if (r["model"], r["keep"], r["policy"]) == (model, keep, policy)]
        ppl = {c: np.mean([r["ppl"] for r in sel if r["criterion"] == c]) for c in ("score", "frequency", "reap",
                                                                                     "random")}
        out.append(f"| {model} | {keep} | {policy} | " + " | ".join(f"{ppl[c]:.3f}" for c in ppl) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[str(ROOT / "models/tiny-qwen3-moe"),
                                                    str(ROOT / "models/tiny-deepseek-v3")])
    ap.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.75])
    ap.add_argument("--calib-tokens", type=int, default=50_000)
    ap.add_argument("--valid-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench-prune"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/prune.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    rows: list[dict] = []
    for m in args.models:
        rows += bench_model(Path(m), args.keep, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(command=" ".join(sys.argv), rows=rows), indent=1))
    print(f"# {' '.join(sys.argv)}  ({time.time() - t0:.0f} s)\n")
    print("Perplexity (lower is better), mean of 3 seeds for random:\n")
    print(summary(rows) + "\n")
    print("Merged vs dropped (k' policy round):\n")
    print(merge_table(rows) + "\n")
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
