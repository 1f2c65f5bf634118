"""`moepack compress`: calibrate → prune → adjust k' → sensitivity → allocate → write → verify, in one resumable run.

Every stage artifact lives in the run directory (default: OUT.gguf's name + ".run" beside it). Calibration and
pruning reuse their own outputs when the inputs match; sensitivity, allocation and the GGUF are recorded by
`RunDir`, so a rerun after an interruption redoes only unfinished stages and writes identical bytes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moepack.atomic import atomic_write_text
from moepack.backends import Backend, LocalBackend
from moepack.errors import MoepackError
from moepack.gguf.types import smallest_type
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.model.pruned import kept_count
from moepack.model.textdata import DEFAULT_CALIB_TEXT
from moepack.pipeline.candidates import Candidate, candidate, fits
from moepack.pipeline.options import KEEP_AUTO_CANDIDATES, CompressError, CompressOptions
from moepack.pipeline.runstate import RunDir
from moepack.schema import CalibStats, PrunePlan
from moepack.stages.budget import Budget, BudgetError, BudgetRequest, budget_for, format_size

__all__ = ["CompressResult", "calibrate_run", "compress", "dry_run", "render_summary"]

log = logging.getLogger(__name__)

SAMPLE_PROMPT = "Once upon a time, there was a little girl named"
VERIFY_TARGET = "moepack.gguf.runtime:sample_text"  # run in a child process by _verify


@dataclass
class CompressResult:
    out: Path
    run_dir: Path
    keep: float
    top_k: int
    n_experts: tuple[int, int]  # (kept, original)
    budget: dict[str, Any]
    file_bytes: int
    predicted_bytes: int
    bpw: float
    types: dict[str, dict[str, int]]  # tensor class → type → count
    selection_kld: float  # KLD vs the original on the selection tokens (every choice saw them), fake-quantized
    report_kld: float | None  # the same on the report tokens no choice saw: the result (None: text too short)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    mixtures: dict[str, Any] | None = None  # llama.cpp's fitting mixtures measured against the plan (dominance)
    refinement: dict[str, Any] | None = None  # the allocated plan's predicted vs measured KLD and the moves taken
    criterion: str = "score"  # the pruning criterion (and α) of the chosen candidate
    alpha: float = 0.5
    timings: dict[str, float] = field(default_factory=dict)
    report_tokens: int = 0
    sample: str = ""
    verify_error: str | None = None  # why llama.cpp could not run the written file here, if it could not
    llama_command: str = ""  # the llama.cpp command line that runs the file as it was placed and verified
    placement: dict[str, Any] | None = None  # GPU + RAM budgets: each side's tensor bytes and budget
    runtime: str = ""  # the llama.cpp build the file was verified with (the model card names it)

    @property
    def measured_kld(self) -> float:
        """The selection KLD (the name callers before the report split read)."""
        return self.selection_kld

    def summary(self) -> dict[str, Any]:
        """summary.json: the fields, and `measured_kld` (the result: report KLD, else selection) for its readers
        (moepack report, the model card)."""
        kld = self.report_kld if self.report_kld is not None else self.selection_kld
        return asdict(self) | {"measured_kld": kld}


def _validate(opts: CompressOptions, view: CheckpointView) -> list[float]:
    if not view.facts.moe_layers:
        raise CompressError(f"{view.root}: the model has no MoE layers; moepack compresses MoE models")
    if opts.keep == "auto":
        return list(KEEP_AUTO_CANDIDATES)
    keep = float(opts.keep)
    if not 0 < keep <= 1:
        raise CompressError(f"--keep must be in (0, 1] or 'auto' (got {opts.keep})")
    if isinstance(opts.top_k, int) and opts.top_k > (kept := kept_count(view, keep)):
        raise CompressError(f"--top-k {opts.top_k} exceeds the experts kept per layer at --keep {keep} ({kept})")
    return [keep]


def calibrate_run(model_dir: Path, run: RunDir, opts: CompressOptions, backend: Backend) -> CalibStats:
    """compress's calibration stage into `run` (reused when its inputs are unchanged); bench/claim.py runs it ahead."""
    from moepack.stages.calibrate import run_calibrate

    text = opts.calib_text or DEFAULT_CALIB_TEXT
    log.info("calibration text: %s%s", text, "" if opts.calib_text else
             " (moepack's bundled mix of stories, encyclopedic prose, dialogue, code and web text; pass --calib-text "
             "with text from your own domain for a better file)")
    t0 = time.perf_counter()
    stats = run_calibrate(model_dir, text, run.root, tokens=opts.calib_tokens, seq_len=opts.seq_len,
                          heldout_tokens=opts.sens_tokens, progress=opts.progress, backend=backend,
                          shards=opts.shards, threads=opts.threads,
                          report_tokens=opts.sens_tokens if opts.report_tokens is None else opts.report_tokens)
    run.timings["calibrate"] = time.perf_counter() - t0
    return stats


def _imatrix_for(view: CheckpointView, run: RunDir, prune_plan: PrunePlan | None) -> dict[str, Any]:
    """The original model's importance matrix, sliced to the kept experts (as `moepack quantize` does)."""
    from moepack.gguf.imatrix import load_imatrix, prune_imatrix

    im = load_imatrix(run.root, view)
    return prune_imatrix(im, prune_plan) if prune_plan else im


def _write(run: RunDir, cand: Candidate, out: Path, opts: CompressOptions, budget: Budget) -> None:
    """The GGUF, written once, at `out` (atomically); the run directory records it (stages/write.json: its inputs and
    sha256, so a rerun reuses it while it is intact) instead of holding a second copy."""
    from moepack.gguf.metadata import WRITER_ID
    from moepack.gguf.writer import write_gguf
    from moepack.pipeline.recipe import compress_recipe

    prune = cand.prune_plan.to_dict() if cand.prune_plan is not None else None
    recipe = compress_recipe(cand, budget)  # into the GGUF's moepack.recipe, so part of the stage key
    key = {"plan": cand.plan.to_dict(), "prune": prune, "model": cand.view.fingerprint(), "recipe": recipe,
           "writer": WRITER_ID, "out": str(out.resolve())}

    def work() -> None:
        write_gguf(cand.view, out, default_type=None, tensor_types=cand.plan.tensors,
                   imatrix=_imatrix_for(cand.view, run, cand.prune_plan), quant_plan=cand.plan.to_dict(),
                   prune_plan=cand.prune_plan, threads=opts.threads, progress=opts.progress, recipe=recipe)

    try:
        run.stage("write", key, out, work)
    except OSError as e:
        raise CompressError(f"{out}: cannot write the GGUF ({e.strerror or e})") from e


def _check_save_pruned(dest: Path | None, model_dir: Path) -> None:
    """Refuse a --save-pruned directory the checkpoint writer would refuse, before any work."""
    if dest is None:
        return
    if dest.resolve() == model_dir.resolve():
        raise CompressError(f"--save-pruned {dest} is the input checkpoint; choose a new directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "prune_plan.json").is_file():
        raise CompressError(f"--save-pruned {dest} exists and is not a moepack pruned checkpoint; choose an empty "
                            "or new directory")


def _save_pruned(best: Candidate, dest: Path | None, opts: CompressOptions) -> None:
    """--save-pruned DIR: the chosen candidate's pruned model as a Hugging Face checkpoint (nothing else is written
    per retention)."""
    if dest is None:
        return
    if best.prune_plan is None:
        log.info("--save-pruned: keep %g removed no expert; the source checkpoint is the model, nothing written",
                 best.keep)
        return
    from moepack.stages.prune import write_checkpoint

    write_checkpoint(best.view, dest, progress=opts.progress)
    best.prune_plan.write(dest / "prune_plan.json")  # last: marks the output complete, as `moepack prune` does
    log.info("--save-pruned: wrote the pruned checkpoint (keep %g) to %s", best.keep, dest)


def _check_size(out: Path, budget: Budget) -> None:
    size = out.stat().st_size
    if size > budget.file_limit:
        raise CompressError(f"{out} is {format_size(size)}, over the budget {format_size(budget.file_limit)}")


def _verify(out: Path, ctx: int, opts: CompressOptions, placed: bool) -> str:
    """Load the GGUF in llama.cpp with the device's context (and with `placed` the routed experts overridden to the
    CPU, as the printed command does) and generate a few tokens, in a child process (a crash inside llama.cpp
    raises NativeCrash here)."""
    from moepack.gguf.runtime import EXPERTS_ON_CPU, run_isolated

    res = run_isolated(VERIFY_TARGET, {"path": str(out), "prompt": SAMPLE_PROMPT, "n_ctx": ctx, "max_tokens": 32,
                                       "threads": opts.threads, "extra_bufts": opts.extra_bufts,
                                       "overrides": EXPERTS_ON_CPU if placed else None},
                       what=f"verifying {out.name}")
    return SAMPLE_PROMPT + res["text"]


def compress(model_dir: str | Path, out: str | Path, request: BudgetRequest, opts: CompressOptions,
             run_dir: str | Path | None = None, backend: Backend | None = None) -> CompressResult:
    """The whole pipeline; see the module docstring. The budget `request` is computed on the original checkpoint
    (`target_bpw` counts its parameters). `backend` runs calibration shards and sensitivity probes (default
    in-process; moepack.backends)."""
    model_dir, out = Path(model_dir), Path(out)
    if not out.parent.is_dir():
        raise CompressError(f"{out.parent}: output directory does not exist")
    if not os.access(out.parent, os.W_OK):
        raise CompressError(f"{out.parent}: output directory is not writable")
    ref = open_checkpoint(model_dir)
    keeps = _validate(opts, ref)
    _check_save_pruned(opts.save_pruned, model_dir)
    budget = budget_for(request, ref)
    _check_feasible(ref, budget, opts)
    if opts.shards is not None and opts.shards < 1:
        raise CompressError(f"--shards must be at least 1 (got {opts.shards})")
    try:
        log.info("%s", _plan_text(ref, budget, opts, keeps))
    except (MoepackError, ValueError, KeyError) as e:  # an estimate must never stop the run it describes
        log.warning("no cost estimate for this model (%s); compressing anyway", e)
    backend = backend or LocalBackend()
    run = RunDir(Path(run_dir) if run_dir else out.with_name(out.name + ".run"))
    stats = calibrate_run(model_dir, run, opts, backend)
    cands: list[Candidate] = []
    refs: dict[str, Any] = {}
    for k in keeps:  # largest retention first: it sets the bar the others are screened against
        cands.append(candidate(model_dir, ref, run, stats, budget, k, opts, backend, cands, refs))
    fitting = [c for c in cands if not c.screened]
    if not fitting:
        raise CompressError(f"no retention of {', '.join(f'{k:g}' for k in keeps)} fits the budget "
                            f"{format_size(budget.file_limit)} even at {smallest_type(opts.ladder)} everywhere; give a larger "
                            "budget or a lower --keep")
    best = min(fitting, key=lambda c: c.kld)
    _write(run, best, out, opts, budget)
    _save_pruned(best, opts.save_pruned, opts)
    _check_size(out, budget)
    from moepack.gguf.runtime import NativeCrash, llama_command

    sample, failure = "", None
    ctx = opts.verify_ctx if budget.ctx is None else budget.ctx  # the device's context, or a short one for a size
    try:
        sample = _verify(out, ctx, opts, budget.gpu_weights is not None)
    except NativeCrash as e:
        failure = str(e)
    command = llama_command(out, ctx, offload_experts=budget.gpu_weights is not None)
    result = _result(out, run, ref, best, budget, cands, stats, _report_kld(run, best, ref, stats, opts), sample,
                     failure, command)
    atomic_write_text(run.path("summary.json"), json.dumps(result.summary(), indent=2, default=str) + "\n")
    if failure:
        raise CompressError(f"{out} is written and its run summary is in {run.path('summary.json')}, but llama.cpp "
                            f"could not run it here: {failure}")
    return result


def _report_kld(run: RunDir, best: Candidate, ref: CheckpointView, stats: CalibStats,
                opts: CompressOptions) -> float | None:
    """The chosen plan's KLD on the report tokens (held out after the selection tokens; no choice saw them)."""
    from moepack.pipeline.candidates import measure_kld

    if stats.report is None:
        log.warning("the calibration text left no report tokens after the selection tokens; the KLD reported is "
                    "the selection KLD every choice was made on (use a longer --calib-text)")
        return None
    t0 = time.perf_counter()
    kld = measure_kld(best.view, ref, stats, best.plan.tensors, best.prune_plan, opts, ids=stats.report)
    run.timings["report KLD"] = time.perf_counter() - t0
    return kld


def _plan_text(view: CheckpointView, budget: Budget, opts: CompressOptions, keeps: list[float]) -> str:
    from moepack.pipeline.cost import estimate_cost, render_cost, timing_probe

    return render_cost(estimate_cost(view, budget, opts, keeps, timing_probe()))


def dry_run(model_dir: str | Path, request: BudgetRequest, opts: CompressOptions) -> str:
    """What `compress` would do and cost, checked as it checks (budget, retention, feasibility) without running it;
    works on a directory holding only config.json (moepack.model.shapes)."""
    from moepack.model.shapes import open_for_planning

    view = open_for_planning(model_dir)
    keeps = _validate(opts, view)
    budget = budget_for(request, view)
    _check_feasible(view, budget, opts)
    return f"{budget.describe()}\n{_plan_text(view, budget, opts, keeps)}"


def _check_feasible(view: CheckpointView, budget: Budget, opts: CompressOptions) -> None:
    """Fail before any work when even the smallest type everywhere, at the smallest retention, cannot fit."""
    smallest = min(KEEP_AUTO_CANDIDATES) if opts.keep == "auto" else float(opts.keep)
    try:
        fits(view, smallest_type(opts.ladder), budget, smallest)
    except BudgetError as e:
        raise CompressError(str(e)) from None


def _result(out: Path, run: RunDir, ref: CheckpointView, best: Candidate, budget: Budget, cands: list[Candidate],
            stats: CalibStats, report_kld: float | None, sample: str, verify_error: str | None,
            command: str) -> CompressResult:
    from moepack.gguf.recipe import types_by_class

    types = types_by_class(best.plan.tensors)
    size = out.stat().st_size
    n_params = sum(ref.param_counts().values())
    return CompressResult(
        out=out, run_dir=run.root, keep=best.keep, top_k=best.view.facts.top_k,
        n_experts=(best.view.facts.n_experts, ref.facts.n_experts), budget=budget.to_dict(), file_bytes=size,
        predicted_bytes=best.plan.predicted_bytes + best.overhead, bpw=8 * size / n_params, types=types,
        selection_kld=best.kld, report_kld=report_kld, report_tokens=0 if stats.report is None else stats.report.size,
        candidates=[{"keep": c.keep, "top_k": c.view.facts.top_k, "kld": None if c.screened else c.kld,
                     "prune_kld": c.prune_kld, "screened": c.screened, "same_as": c.same_as,
                     "infeasible": c.infeasible,
                     "tensor_bytes": None if c.screened else c.plan.predicted_bytes,
                     "mixtures": c.rivalry.to_dict() if c.rivalry else None,
                     "refinement": c.refinement.to_dict() if c.refinement else None,
                     "criterion": c.criterion, "alpha": c.alpha, "criteria": c.criteria,
                     "references": c.references} for c in cands],
        criterion=best.criterion, alpha=best.alpha,
        mixtures=best.rivalry.to_dict() if best.rivalry else None,
        refinement=best.refinement.to_dict() if best.refinement else None,
        timings=dict(run.timings), sample=sample, verify_error=verify_error,
        llama_command=command, placement=best.plan.base.get("placement"), runtime=_runtime())


def _runtime() -> str:
    """'llama-cpp-python 0.3.36 (llama.cpp 0.5.0-dev)': the runtime compress verifies with."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import llama_cpp

        return f"llama-cpp-python {version('llama-cpp-python')} (llama.cpp {llama_cpp.llama_version().decode()})"
    except (PackageNotFoundError, ImportError, AttributeError, OSError):
        return ""


def render_summary(r: CompressResult) -> str:
    lines = [
        f"wrote {r.out}: {format_size(r.file_bytes)} ({r.bpw:.2f} bits per original weight), "
        f"budget {format_size(r.budget['weights'] + r.budget['overhead'])}",
        f"  experts kept  {r.n_experts[0]} of {r.n_experts[1]} per MoE layer (keep {r.keep:g}), top-k {r.top_k}",
        f"  bytes         predicted tensors+metadata {r.predicted_bytes:,}; actual file {r.file_bytes:,}",
    ]
    if r.report_kld is not None:
        lines.append(f"  KLD vs original (fake-quantized forward, {r.report_tokens:,} held-out tokens no choice saw): "
                     f"{r.report_kld:.5f}; on the selection tokens {r.selection_kld:.5f}")
    else:
        lines.append(f"  KLD vs original on the selection tokens (the text left none for a report): "
                     f"{r.selection_kld:.5f}")
    chosen = next((c for c in r.candidates if c["keep"] == r.keep and not c["screened"]), None)
    if chosen and len(chosen.get("references") or []) > 1:
        refs = chosen["references"]
        won = min(refs, key=lambda x: x["kld"])["base"]
        lines.append("  reference types (selection KLD of each one's refined plan): "
                     + ", ".join(f"{x['base']} {x['kld']:.5f}" for x in refs) + f"; chose {won}")
    if r.refinement:
        lines.append(_refinement_line(r.refinement))
    if r.mixtures:
        lines.append(_mixtures_line(r.mixtures, r.selection_kld))
    for c in r.candidates:
        if c.get("criteria"):
            tried = ", ".join(f"{_criterion_name(t)} {t['prune_kld']:.5f}" for t in c["criteria"])
            lines.append(f"  criterion at keep {c['keep']:g} (pruning-only KLD on the selection tokens): {tried}; "
                         f"chose {_criterion_name(c)}")
    if len(r.candidates) > 1:
        lines.append("  retention search: " + ", ".join(_candidate_line(c) for c in r.candidates))
    lines.append("  types per tensor class:")
    for cls, counts in sorted(r.types.items()):
        lines.append(f"    {cls:<16} " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())))
    lines.append("  stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    lines.append(f"  sample: {r.sample!r}" if r.verify_error is None else f"  not verified: {r.verify_error}")
    if p := r.placement:
        sides = [f"{side} tensors {format_size(p[k]['bytes'])} of {format_size(p[k]['budget_bytes'])}"
                 for side, k in (("GPU", "gpu"), ("RAM", "ram"))]
        lines.append(f"  placement     {'; '.join(sides)} (-ot {p['override']})")
    lines.append(f"  run it:        {r.llama_command}")
    return "\n".join(lines)


def _mixtures_line(m: dict[str, Any], kld: float) -> str:
    """The llama.cpp mixtures measured on the selection tokens, which plan won and by how much."""
    measured = ", ".join(f"{x['name']} {x['kld']:.5f}" for x in m["mixtures"]) or "none fits"
    line = f"  llama.cpp mixtures (same imatrix, selection KLD): {measured}; plan: {m['chosen']}"
    if m["best_mixture"] is not None:
        top = min(x["kld"] for x in m["mixtures"])
        gain = f"{100 * (top - kld) / top:.1f}% below" if top > 0 else "equal to"
        line += f" ({gain} {m['best_mixture']}; allocated plan {m['allocated_kld']:.5f})"
    return line


def _refinement_line(f: dict[str, Any]) -> str:
    """The allocated plan's additive prediction vs its measured selection KLD, and what refinement changed."""
    pred = "n/a" if f["allocated_predicted_kld"] is None else f"{f['allocated_predicted_kld']:.5f}"
    line = (f"  refinement (selection KLD): allocated plan predicted {pred}, measured {f['allocated_kld']:.5f}; "
            f"{len(f['accepted'])} move(s) kept of {f['measured']} measured in {f['passes']} pass(es)")
    return line + (f", {f['kld']:.5f} ({100 * f['gain'] / f['allocated_kld']:.1f}% lower)"
                   if f["accepted"] and f["allocated_kld"] > 0 else "")


def _criterion_name(c: dict[str, Any]) -> str:
    return f"score alpha {c['alpha']:g}" if c["criterion"] == "score" else c["criterion"]


def _candidate_line(c: dict[str, Any]) -> str:
    if c.get("infeasible"):
        return f"keep {c['keep']:g} -> does not fit the budget at the smallest type (screened)"
    if c.get("same_as") is not None:
        return f"keep {c['keep']:g} -> same model as keep {c['same_as']:g} (screened)"
    if c.get("screened"):
        return f"keep {c['keep']:g} -> pruning alone KLD {c['prune_kld']:.5f}, not quantized (screened)"
    return f"keep {c['keep']:g} -> KLD {c['kld']:.5f}"
