"""Expert merging vs dropping on the trained fixtures: KLD of the pruned model vs the unpruned one on held-out text.

Run: .venv/bin/python bench/merge.py [--models ...] [--keep 0.75 0.5] [--eval-tokens 4096] [--calib-tokens 16384]
       [--out bench/results/merge.json]

Per fixture: calibration (cached under --work) on calibration text only (data/calib/stories.txt for the two
TinyStories fixtures, the bundled calibration text for the multi-domain one); evaluation on text no choice saw
(tinystories-valid.txt; for the multi-domain fixture the first tokens of each domain's evaluation text). At each
retention the kept experts are the same (criterion score, k' = round(R·k)); "drop" discards the rest, each merge
variant folds them into kept experts (stages.merge). Pruned models are evaluated in memory through the lazy pruned
view and the layer runner. KLD: mean over scored tokens ± half-width of the 95 % CI from the spread of window means;
"Δ vs drop" is the paired per-window difference (negative: merging is better) with its own CI.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import DATA, DOMAINS, EVAL_TEXT, ROOT, eval_text, write_json

from moepack.model import metrics
from moepack.model.checkpoint import open_checkpoint
from moepack.model.pruned import pruned_view
from moepack.model.runner import KLDReference, LayerRunner
from moepack.model.textdata import DEFAULT_CALIB_TEXT, chunk_tokens, tokenize_file
from moepack.stages.calibrate import run_calibrate
from moepack.stages.merge import MergeOptions
from moepack.stages.prune import PruneOptions, make_plan

# (name, merge options or None for drop)
VARIANTS: list[tuple[str, MergeOptions | None]] = [("drop", None)] + [
    (f"{sim}/{w}/{router}" + ("" if align else "/unaligned"), MergeOptions(sim, w, router, align))
    for sim, w, router, align in (("output", "frequency", "mean", True), ("output", "saliency", "mean", True),
                                  ("weight", "frequency", "mean", True), ("weight", "saliency", "mean", True),
                                  ("output", "frequency", "host", True), ("output", "saliency", "host", True),
                                  ("output", "frequency", "mean", False), ("output", "saliency", "mean", False))]


def eval_ids(model: Path, multi: bool, tokens: int, seq_len: int) -> np.ndarray:
    """Evaluation windows (N, L): tinystories-valid.txt, or an equal share of each domain's evaluation text."""
    if not multi:
        return chunk_tokens(tokenize_file(model, EVAL_TEXT, tokens), seq_len)
    per = tokens // len(DOMAINS)
    return np.concatenate([chunk_tokens(tokenize_file(model, eval_text(d), per), seq_len) for d in DOMAINS])


@torch.inference_mode()
def window_kld(ref: KLDReference, runner: LayerRunner) -> np.ndarray:
    """Per-token KLD (N, L) of a variant vs the reference, run from the reference's cached first MoE layer input."""
    h = runner.run(ref.h_start, ref.start, None, batch_size=ref.batch_size)
    out = []
    for b0 in range(0, h.shape[0], ref.batch_size):
        sl = slice(b0, b0 + ref.batch_size)
        lp_ref = metrics.log_probs(ref.runner.logits(ref.h_final[sl]))  # (B, L, V)
        out.append(metrics.token_kld(lp_ref, metrics.log_probs(runner.logits(h[sl]))).double().numpy())  # (B, L)
    return np.concatenate(out)


def _ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95 % CI of per-window means x (N,)."""
    lo, hi = metrics.mean_ci95(x, len(x))
    return float(x.mean()), (hi - lo) / 2


def bench_model(model: Path, keeps: list[float], args: argparse.Namespace) -> list[dict]:
    view = open_checkpoint(model)
    multi = model.name.endswith("multi")
    calib = DEFAULT_CALIB_TEXT if multi else DATA / "calib" / "stories.txt"
    stats = run_calibrate(view, calib, Path(args.work) / model.name, tokens=args.calib_tokens, seq_len=args.seq_len,
                          selection_tokens=0, batch_size=args.batch, progress=False)  # reused when unchanged
    ids = eval_ids(model, multi, args.eval_tokens, args.seq_len)
    ref = KLDReference(LayerRunner(view), ids, min(view.facts.moe_layers), args.batch)
    print(f"{model.name}: {ids.size} evaluation tokens, calibration {calib.name}", file=sys.stderr)
    rows: list[dict] = []
    for keep in keeps:
        drop = None
        for name, merge in VARIANTS:
            t0 = time.time()
            plan = make_plan(view, stats, PruneOptions(keep=keep, merge=merge))
            kld = window_kld(ref, LayerRunner(pruned_view(view, plan))).mean(axis=1)  # (N,) window means
            drop = kld if merge is None else drop
            m, h = _ci(kld)
            d, dh = _ci(kld - drop)
            rows.append(dict(model=model.name, keep=keep, n_kept=plan.n_kept, top_k=plan.top_k_new, variant=name,
                             kld=m, kld_ci=h, delta=d, delta_ci=dh, windows=len(kld), seconds=time.time() - t0))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def to_markdown(rows: list[dict]) -> str:
    out = ["| model | R (kept) | k' | variant | mean KLD | Δ vs drop |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "—" if r["variant"] == "drop" else f"{r['delta']:+.4f} ± {r['delta_ci']:.4f}"
        out.append(f"| {r['model']} | {r['keep']} ({r['n_kept']}) | {r['top_k']} | {r['variant']} | "
                   f"{r['kld']:.4f} ± {r['kld_ci']:.4f} | {delta} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[str(ROOT / f"models/{m}") for m in
                                                    ("tiny-qwen3-moe", "tiny-deepseek-v3", "tiny-deepseek-v3-multi")])
    ap.add_argument("--keep", nargs="+", type=float, default=[0.75, 0.5])
    ap.add_argument("--calib-tokens", type=int, default=16_384)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=str(ROOT / "out" / "bench-merge"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/merge.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    rows: list[dict] = []
    for m in args.models:
        rows += bench_model(Path(m), args.keep, args)
    cmd = " ".join(["bench/merge.py", *sys.argv[1:]])
    write_json(Path(args.out), dict(command=cmd, seconds=round(time.time() - t0), rows=rows))
    print(f"# .venv/bin/python {cmd}  ({time.time() - t0:.0f} s)\n")
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
