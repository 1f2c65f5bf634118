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
A subset of size points:   --ftypes IQ2_XXS Q2_K Q3_K_M
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
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
EVAL_TEXT = DATA / "tinystories-valid.txt"
# The calibration (and importance matrix) text by default: the fixtures' own domain, held out from EVAL_TEXT (the
# fixtures were trained on it, which calibration may be; data/SOURCES.md). `--calib-text bundled`: compress's own
# default, the bundled multi-domain text.
CALIB_TEXT = DATA / "calib" / "stories.txt"
GOAL = 0.25  # the KLD reduction the claim asks for
HAND_STEPS = 3  # Unsloth-style rule: non-expert tensors this many ladder steps above the routed experts
DEFAULT_MODELS = ("models/tiny-deepseek-v3", "models/tiny-qwen3-moe")
PAPER_PRUNE = {"keep": 0.75, "criterion": "score", "alpha": 0.5}
# bench/domain.py imports these three: the mixtures and sensitivity ladder of its own comparison.
FTYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ1_M")
SENS_LADDER = ("IQ1_S", "IQ2_XXS", "IQ2_S", "IQ3_S", "Q4_K", "Q6_K")
EVAL_KEYS = ("size_bytes", "tensor_bytes", "bpw", "ppl", "kld_mean", "kld_ci95_low", "kld_ci95_high", "kld_median",
             "kld_p99", "kld_p999", "top1", "top1_ci95_low", "top1_ci95_high", "dp_rms", "dp_rms_ci95_low",
             "dp_rms_ci95_high", "ppl_ratio", "ppl_ratio_ci95_low", "ppl_ratio_ci95_high", "eval_seconds")
ROWS = ("uniform", "moepack", "unsloth", "authors", "prune_only")
LABELS = {"uniform": "llama.cpp uniform", "moepack": "moepack compress", "unsloth": "Unsloth-style rule",
          "authors": "authors' rules (pruned)", "prune_only": "prune-only (uniform)"}

log = logging.getLogger("claim")


def file_limit(model: Path, bpw: float) -> int:
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.budget import BudgetRequest, budget_for

    return int(budget_for(BudgetRequest(target_bpw=bpw), open_checkpoint(model)).file_limit)


def _ladder() -> tuple[str, ...]:
    from moepack.gguf.types import LADDER

    return LADDER


def _up(t: str, n: int) -> str:
    lad = _ladder()
    return lad[min(lad.index(t) + n, len(lad) - 1)]


def size_points(model: Path) -> list[str]:
    """llama.cpp's mixtures predicted between IQ1_S and Q4_K_M in size for `model`, smallest first."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.mixtures import mixture_sizes

    sizes = {f: s.total for f, s in mixture_sizes(open_checkpoint(model)).items()}
    lo, hi = sizes["IQ1_S"], sizes["Q4_K_M"]
    return sorted((f for f, s in sizes.items() if lo <= s <= hi), key=lambda f: (sizes[f], f))


# ---- the hand rules ---------------------------------------------------------------------------------------------
def unsloth_plan(view: Any, base: str) -> dict[str, str]:
    """Unsloth-style dynamic mixture: ffn_gate/up_exps at `base`, ffn_down_exps and token_embd one step up; attention,
    shared experts, dense FFN and output HAND_STEPS steps up."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.arch import Role

    plan = {}
    for o in (o for o in gguf_outputs(view) if o.quantizable):
        if o.role is Role.ROUTED_EXPERTS:
            plan[o.name] = _up(base, "ffn_down" in o.name)
        elif o.role is Role.EMBEDDING:
            plan[o.name] = _up(base, 1)
        else:
            plan[o.name] = _up(base, HAND_STEPS)
    return plan


def authors_plan(view: Any, base: str) -> dict[str, str]:
    """Chen et al.'s fixed rules: routed experts at `base`, the first and last eighth of MoE layers one step higher,
    ffn_down_exps one more step; attention Q4_K (dense FFN too), shared experts Q6_K, token_embd Q2_K, output Q5_K."""
    from moepack.gguf.names import gguf_outputs
    from moepack.model.arch import Role

    outs = [o for o in gguf_outputs(view) if o.quantizable]
    moe = sorted({o.layer for o in outs if o.role is Role.ROUTED_EXPERTS})
    edge = max(1, math.ceil(len(moe) / 8))
    edges = set(moe[:edge]) | set(moe[-edge:])
    plan: dict[str, str] = {}
    for o in outs:
        if o.role is Role.ROUTED_EXPERTS:
            plan[o.name] = _up(base, (o.layer in edges) + ("ffn_down" in o.name))
        elif o.role is Role.SHARED_EXPERTS:
            plan[o.name] = "Q6_K"
        elif o.name.startswith("token_embd"):
            plan[o.name] = "Q2_K"
        elif o.name.startswith("output"):
            plan[o.name] = "Q5_K"
        else:
            plan[o.name] = "Q4_K"
    return plan


def plan_bytes(view: Any, types: dict[str, str]) -> int:
    """Tensor bytes of `view` written with `types` (F32 for tensors the plan leaves out), fallbacks included."""
    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.types import written_bytes

    return sum(written_bytes(o.shape, types.get(o.name, "F32")) for o in gguf_outputs(view))


def fitting_bases(view: Any, limit: int, overhead: int, plan_for: Callable[[str], dict[str, str]]) -> list[str]:
    """Ladder types whose plan is predicted to fit `limit` file bytes, largest first."""
    return [t for t in reversed(_ladder()) if plan_bytes(view, plan_for(t)) + overhead <= limit]


def write_rule(src: Path, out: Path, run_dir: Path, limit: int, overhead: int,
               plan_for: Callable[[str], dict[str, str]]) -> dict[str, Any]:
    """The largest base whose rule's file is no larger than `limit`, written; the next base down whenever the
    written file (its metadata larger than predicted) is over."""
    from moepack.gguf.quantize import quantize_model
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(src)
    for base in fitting_bases(view, limit, overhead, plan_for):
        plan = out.with_suffix(".quant_plan.json")
        plan.write_text(json.dumps({"tensors": plan_for(base)}, indent=1))
        quantize_model(src, out, plan=plan, imatrix=run_dir, threads=2, progress=False)
        if out.stat().st_size <= limit:
            return {"file": out, "base": base}
        out.unlink()
    return {"file": None, "error": "no base type fits"}


# ---- the verdict ------------------------------------------------------------------------------------------------
def verdict(moe: dict[str, Any] | None, uni: dict[str, Any] | None, goal: float = GOAL) -> dict[str, Any] | None:
    """moepack's eval vs the uniform file's: the KLD reduction, no larger, CIs apart, and whether all three hold."""
    if not moe or not uni:
        return None
    reduction = 1 - moe["kld_mean"] / uni["kld_mean"] if uni["kld_mean"] > 0 else float("-inf")
    out = {"kld_reduction": reduction, "no_larger": moe["size_bytes"] <= uni["size_bytes"],
           "cis_apart": moe["kld_ci95_high"] < uni["kld_ci95_low"], "goal": goal}
    out["holds"] = bool(reduction >= goal and out["no_larger"] and out["cis_apart"])
    return out


# ---- one fixture ------------------------------------------------------------------------------------------------
class Evaluator:
    """moepack.eval of GGUF files against one checkpoint on EVAL_TEXT; the reference's log-probs cached."""

    def __init__(self, model: Path, work: Path, args: argparse.Namespace) -> None:
        from moepack.eval.reference import EvalConfig

        self.model = model
        self.cfg = EvalConfig(ctx=args.ctx, tokens=args.eval_tokens, mc=(), threads=1, speed=False,
                              cache_dir=work / "evalcache")
        self.ref: Any = None

    def reference(self) -> Any:
        from moepack.eval.reference import prepare_reference

        if self.ref is None:
            self.ref = prepare_reference(self.model, EVAL_TEXT, self.cfg)
            self.ref.release()
        return self.ref

    def __call__(self, path: Path) -> dict[str, Any]:
        from moepack.eval.evaluate import evaluate_model

        e = evaluate_model(path, self.reference(), {}, self.cfg)
        return {k: e[k] for k in EVAL_KEYS if k in e}


class Fixture:
    """The shared work of one fixture's size points: calibration, the paper's pruned checkpoint, the evaluator."""

    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from moepack.pipeline.options import CompressOptions

        self.model, self.args = model, args
        self.work = Path(args.work) / model.name
        self.work.mkdir(parents=True, exist_ok=True)
        self.run_dir = self.work / "run"
        self.opts = dataclasses.replace(CompressOptions(), calib_text=args.calib_text, calib_tokens=args.calib_tokens,
                                        seq_len=args.seq_len, sens_tokens=args.sens_tokens, progress=False)
        self.evaluate = Evaluator(model, self.work, args)
        self.pruned = self.work / "pruned-paper"

    def prepare(self) -> float:
        """Compress's own calibration stage (so compress reuses it) and the paper's pruning; seconds spent."""
        from moepack.backends import LocalBackend
        from moepack.pipeline.compress import calibrate_run  # compress's calibration, exactly as compress calls it
        from moepack.pipeline.runstate import RunDir
        from moepack.stages.prune import PruneOptions, run_prune

        t0 = time.perf_counter()
        calibrate_run(self.model, RunDir(self.run_dir), self.opts, LocalBackend())
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
        from moepack.model.checkpoint import open_checkpoint

        full, pruned = open_checkpoint(self.model), open_checkpoint(self.pruned)
        flat = self._quantizable(pruned)
        rules = {"unsloth": (self.model, lambda t: unsloth_plan(full, t)),
                 "authors": (self.pruned, lambda t: authors_plan(pruned, t)),
                 "prune_only": (self.pruned, lambda t: dict.fromkeys(flat, t))}
        return {name: (lambda src=src, plan_for=plan_for, name=name: write_rule(
            src, self.work / f"{name}-{target}.gguf", self.run_dir, target, overhead, plan_for))
            for name, (src, plan_for) in rules.items()}

    @staticmethod
    def _quantizable(view: Any) -> list[str]:
        from moepack.gguf.names import gguf_outputs

        return [o.name for o in gguf_outputs(view) if o.quantizable]


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


def code_commit() -> str | None:
    """The commit the cells are measured with (`+changes` where src/ or bench/ differ from it); None outside git."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "src", "bench")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


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
def settings(args: argparse.Namespace) -> dict[str, Any]:
    from moepack.pipeline.options import CompressOptions

    d = CompressOptions()
    calib = ("bundled (src/moepack/data/calibration.txt)" if args.calib_text is None
             else f"`{_portable(args.calib_text, ROOT)}`")
    return {"calib_text": calib, "calib_tokens": args.calib_tokens,
            "seq_len": args.seq_len, "sens_tokens": args.sens_tokens, "keep": d.keep, "criterion": d.criterion,
            "sensitivity": d.sensitivity, "eval_text": str(EVAL_TEXT.relative_to(ROOT)), "ctx": args.ctx,
            "eval_tokens": args.eval_tokens, "goal": GOAL, "hand_steps": HAND_STEPS, "paper_prune": PAPER_PRUNE}


def _portable(obj: Any, work: Path) -> Any:
    """`obj` with every path relative to --work (files) or the repository (anything else), as JSON-ready values."""
    if isinstance(obj, dict):
        return {k: _portable(v, work) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_portable(v, work) for v in obj]
    if isinstance(obj, Path):
        p = obj.resolve()
        return str(p.relative_to(work) if p.is_relative_to(work) else p.relative_to(ROOT) if p.is_relative_to(ROOT)
                   else p.name)
    if isinstance(obj, str):
        for base in (str(work) + "/", str(ROOT) + "/"):
            obj = obj.replace(base, "")
        return obj
    return obj


def save(results: dict[str, Any], path: Path, work: Path) -> None:
    from moepack.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_portable(results, work.resolve()), indent=1, default=str) + "\n")


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
        save(results, args.out, Path(args.work))
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


def _verdict_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "— (not measured)"
    worse = v["kld_reduction"] < 0  # then the CIs are not "overlapping" but on the wrong side, or both
    why = [w for w, ok in (("KLD higher" if worse else f"reduction below {100 * v['goal']:.0f} %",
                            v["kld_reduction"] >= v["goal"]), ("file larger", v["no_larger"]),
                           ("CIs overlap", v["cis_apart"] or worse)) if not ok]
    return "**holds**" if v["holds"] else "falls short: " + ", ".join(why)


def commits_line(rec: dict[str, Any]) -> str:
    """Which commit of moepack measured which size points (a page can hold cells of several runs)."""
    by: dict[str, list[str]] = {}
    for f, c in _cells(rec):
        by.setdefault(c.get("commit") or "not recorded", []).append(f)
    return "Measured at commit " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by.items()) + "."


def fixture_table(rec: dict[str, Any]) -> list[str]:
    head = ["size point", "uniform MiB", "uniform KLD", "moepack MiB", "moepack KLD", "KLD lower by", "verdict",
            "moepack: keep, k', criterion, started from", "Unsloth-style rule", "authors' rules (pruned)",
            "prune-only (pruned)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, c in _cells(rec):
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
                     f"{_mib(me and me['size_bytes'])} | {_pm(me, 'kld_mean', '.5f')} | {red} | {_verdict_cell(v)} | "
                     f"{how} | {_row_cell(c.get('unsloth'))} | {_row_cell(c.get('authors'))} | "
                     f"{_row_cell(c.get('prune_only'))} |")
    return lines


def pair_table(rec: dict[str, Any]) -> list[str]:
    """llama-perplexity's other statistics for the uniform and moepack files, where eval reported them."""
    keys = [("ppl_ratio", ".4f", 1.0, "PPL ratio"), ("dp_rms", ".2f", 100.0, "RMS Δp %"),
            ("top1", ".2f", 100.0, "same top %")]
    evals = [e for _, c in _cells(rec) for e in ((c["uniform"] or {}).get("eval"), (c.get("moepack") or {}).get("eval"))
             if e]
    keys = [k for k in keys if any(k[0] in e for e in evals)]
    if not keys:
        return []
    head = ["size point"] + [f"{side} {k[3]}" for k in keys for side in ("uniform", "moepack")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, c in _cells(rec):
        ue, me = (c["uniform"] or {}).get("eval"), (c.get("moepack") or {}).get("eval")
        lines.append(f"| {f} | " + " | ".join(_pm(e, k, spec, sc) for k, spec, sc, _ in keys for e in (ue, me)) + " |")
    return lines


def _cells(rec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The fixture's size points in order of the uniform file's size (unmade ones last)."""
    return sorted(rec["cells"].items(), key=lambda fc: (fc[1].get("target_bytes") or math.inf, fc[0]))


def holds_count(rec: dict[str, Any]) -> tuple[int, int]:
    vs = [c.get("verdict") for _, c in _cells(rec) if (c["uniform"] or {}).get("eval")]
    return sum(bool(v and v["holds"]) for v in vs), len(vs)


def timing_line(rec: dict[str, Any]) -> str:
    cells = ", ".join(f"{f} {c['seconds']:.0f}" for f, c in _cells(rec))
    total = rec.get("prepare_seconds", 0) + sum(c["seconds"] for _, c in _cells(rec))
    return (f"Wall time (s): calibration and the paper's pruning {rec.get('prepare_seconds', 0):.0f}; per size point "
            f"(uniform file, compress, hand rules, their evaluation) {cells}; total {total / 60:.1f} min.")


def plot_fixture(rec: dict[str, Any], name: str, path: Path) -> None:
    """Size vs mean KLD with 95 % CI bars, one series per method."""
    from moepack.eval.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    style = {"uniform": ("x", "k"), "moepack": ("o", "C0"), "unsloth": ("s", "C1"), "authors": ("v", "C3"),
             "prune_only": ("^", "C2")}
    for method in ROWS:
        pts = sorted({(e["size_bytes"], e["kld_mean"], e["kld_ci95_low"], e["kld_ci95_high"])
                      for _, c in _cells(rec) for e in [((c.get(method) or {}).get("eval"))] if e})
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
    atomic_write_text(args.md, markdown(results, pngs, _portable(args.out, ROOT)))
    print(args.md.read_text())
    return 0


def reproduce(results: dict[str, Any], argv: list[str]) -> str:
    """The one command that makes every cell in `results` (runs that added size points or fixtures one at a time
    resume into the same JSON): this run's other flags, with --models and --ftypes widened to all cells held."""
    keep, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in ("--models", "--ftypes")
        if not skip:
            keep.append(a)
    models = [str(rec["model"]) for rec in results["fixtures"].values()]
    if sorted(models) != sorted(DEFAULT_MODELS):
        keep += ["--models", *models]
    held = {f for rec in results["fixtures"].values() for f in rec["cells"]}
    order = [f for rec in results["fixtures"].values() for f in size_points(ROOT / str(rec["model"]))]
    if held != set(order):
        keep += ["--ftypes", *sorted(held, key=lambda f: order.index(f) if f in order else len(order))]
    return "python bench/claim.py " + " ".join(keep)


def calib_tag(text: Path | None, default: Path | None) -> str:
    """The suffix of a bench's result names for calibration text `text` (None: compress's bundled text): none for the
    bench's `default`, "-bundled", or "-STEM"; bench/probe_tokens.py names its results the same way."""
    if text == default or (text is not None and default is not None and text.resolve() == default.resolve()):
        return ""
    return "-bundled" if text is None else f"-{text.stem}"


def _default_paths(args: argparse.Namespace) -> None:
    """Paths not given follow the calibration text (CALIB: none for CALIB_TEXT, "bundled" for compress's bundled
    text, else the file's stem), so runs on different calibration texts never resume into, or overwrite, each other's
    results."""
    if args.calib_text == Path("bundled"):
        args.calib_text = None
    tag = calib_tag(args.calib_text, CALIB_TEXT)
    args.work = args.work or ROOT / "out" / f"bench-claim{tag}"
    args.out = args.out or ROOT / "bench" / "results" / f"claim{tag}.json"
    args.md = args.md or ROOT / "docs" / f"results{tag}.md"
    args.png = args.png or ROOT / "docs" / f"results{tag}-pareto.png"


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
    p.add_argument("--sens-tokens", type=int, default=d.sens_tokens, help="compress --sens-tokens")
    p.add_argument("--ctx", type=int, default=512, help="evaluation window")
    p.add_argument("--eval-tokens", type=int, default=0, help="evaluation text tokens (0: 16k scored, eval's default)")
    p.add_argument("--work", type=Path, help="run directories (default out/bench-claim[-CALIB])")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/claim[-CALIB].json)")
    p.add_argument("--md", type=Path, help="the page (default docs/results[-CALIB].md)")
    p.add_argument("--png", type=Path, help="plot path (default docs/results[-CALIB]-pareto.png); one per fixture, "
                   "named PNG-STEM-FIXTURE.png")
    p.add_argument("--render-only", action="store_true", help="redo the page and plots from --out's JSON")
    args = p.parse_args(argv)
    _default_paths(args)
    if args.render_only:
        return render(json.loads(args.out.read_text()), args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = load(args.out, settings(args))
    for m in args.models:
        bench_fixture(Path(m), args.ftypes, results, args)
    results["command"] = reproduce(results, sys.argv[1:] if argv is None else argv)
    save(results, args.out, Path(args.work))
    return render(json.loads(args.out.read_text()), args)


if __name__ == "__main__":
    sys.exit(main())
