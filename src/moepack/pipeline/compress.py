"""`moepack compress`: calibrate → prune → adjust k' → sensitivity → allocate → write → verify, in one resumable run.

Read top to bottom, `compress` is: check the request and the budget before any work (moepack.pipeline
.budget_check), open the checkpoint once, calibrate, search the retentions (moepack.pipeline.search
.CandidateSearch), write the chosen plan's GGUF once at OUT, check its size, run it in llama.cpp, and write the run's
RunSummary (summary.json). Every stage artifact lives in the run directory (default: OUT.gguf's name + ".run" beside
it; its files are named by moepack.schema.run.RunLayout) and is recorded by moepack.rundir.RunDir, so a rerun after
an interruption redoes only unfinished stages and writes identical bytes.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moepack.backends import Backend, LocalBackend
from moepack.errors import MoepackError
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.model.pruned import kept_count
from moepack.pipeline.budget_check import check_feasible, check_file
from moepack.pipeline.candidates import Candidate
from moepack.pipeline.options import KEEP_AUTO_CANDIDATES, CompressError, CompressOptions
from moepack.pipeline.search import CandidateSearch
from moepack.rundir import RunDir
from moepack.schema import CalibStats, PrunePlan, RunSummary
from moepack.stages.budget import Budget, BudgetRequest, budget_for

__all__ = ["calibrate_run", "compress", "dry_run"]

log = logging.getLogger(__name__)

SAMPLE_PROMPT = "Once upon a time, there was a little girl named"
VERIFY_TARGET = "moepack.gguf.runtime:sample_text"  # run in a child process by _verify


def compress(model_dir: str | Path, out: str | Path, request: BudgetRequest, opts: CompressOptions,
             run_dir: str | Path | None = None, backend: Backend | None = None) -> RunSummary:
    """The whole pipeline; see the module docstring. The budget `request` is computed on the original checkpoint
    (`target_bpw` counts its parameters). `backend` runs calibration shards and sensitivity probes (default
    in-process; moepack.backends)."""
    model_dir, out = Path(model_dir), Path(out)
    ref, keeps, budget = _checked(model_dir, out, request, opts)
    backend = backend or LocalBackend()
    run = RunDir(Path(run_dir) if run_dir else out.with_name(out.name + ".run"))
    stats = calibrate_run(ref, run, opts, backend)
    search = CandidateSearch(run, ref, stats, budget, opts, backend)
    search.balance()
    for k in keeps:  # largest retention first: it sets the bar the others are screened against
        search.candidate(k)
    best = search.best()
    search.check_speed(best)
    _write(run, best, out, opts, budget)
    _save_pruned(best, opts.save_pruned, opts)
    check_file(out, budget)
    verified = _verified(out, budget, opts)
    summary = _summary(search, best, out, search.report_kld(best), verified)
    summary.write(run.layout.summary)
    if verified.error:
        raise CompressError(f"{out} is written and its run summary is in {run.layout.summary}, but llama.cpp "
                            f"could not run it here: {verified.error}")
    return summary


def _checked(model_dir: Path, out: Path, request: BudgetRequest,
             opts: CompressOptions) -> tuple[CheckpointView, list[float], Budget]:
    """The checkpoint (opened once, for the whole run), the retentions to try and the budget, every request checked
    before any work; logs the plan (stages, predicted time, peak RAM, scratch disk)."""
    if not out.parent.is_dir():
        raise CompressError(f"{out.parent}: output directory does not exist")
    if not os.access(out.parent, os.W_OK):
        raise CompressError(f"{out.parent}: output directory is not writable")
    ref = open_checkpoint(model_dir)
    keeps = _validate(opts, ref)
    _check_save_pruned(opts.save_pruned, model_dir)
    budget = budget_for(request, ref)
    check_feasible(ref, budget, opts)
    if opts.shards is not None and opts.shards < 1:
        raise CompressError(f"--shards must be at least 1 (got {opts.shards})")
    _check_speed_options(opts, budget)
    try:
        log.info("%s", _plan_text(ref, budget, opts, keeps))
    except (MoepackError, ValueError, KeyError) as e:  # an estimate must never stop the run it describes
        log.warning("no cost estimate for this model (%s); compressing anyway", e)
    return ref, keeps, budget


def _check_speed_options(opts: CompressOptions, budget: Budget) -> None:
    if opts.min_decode_tps is None:
        return
    if not opts.min_decode_tps > 0:
        raise CompressError(f"--min-decode-tps must be a positive number of tokens per second (got "
                            f"{opts.min_decode_tps:g})")
    if budget.gpu_weights is not None:
        raise CompressError("--min-decode-tps predicts CPU decoding; with a GPU + RAM device it is not supported yet "
                            "(drop it, or give a --memory budget without --gpu-memory)")


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


def calibrate_run(view: CheckpointView, run: RunDir, opts: CompressOptions, backend: Backend) -> CalibStats:
    """compress's calibration stage of `view` into `run` (reused when its inputs are unchanged); bench/claim.py runs
    it ahead."""
    from moepack.stages.calibrate import run_calibrate

    text = opts.calib_text
    if text is None:
        log.info("calibration text: moepack's bundled stories, encyclopedic prose, dialogue, code and web text; pass "
                 "--calib-text with text from your own domain for a better file")
    t0 = time.perf_counter()
    stats = run_calibrate(view, text, run.root, tokens=opts.calib_tokens, seq_len=opts.seq_len,
                          selection_tokens=opts.selection_tokens, progress=opts.progress, backend=backend,
                          shards=opts.shards, threads=opts.threads,
                          report_tokens=opts.selection_tokens if opts.report_tokens is None else opts.report_tokens)
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
        write_gguf(cand.view, out, cand.plan, imatrix=_imatrix_for(cand.view, run, cand.prune_plan),
                   prune_plan=cand.prune_plan, threads=opts.threads, progress=opts.progress, recipe=recipe,
                   default_type=None)

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


@dataclass(frozen=True)
class Verification:
    sample: str  # what llama.cpp generated from the file ("" when it could not run it)
    error: str | None  # why llama.cpp could not run the file here
    command: str  # the llama.cpp command line that runs the file as placed


def _verified(out: Path, budget: Budget, opts: CompressOptions) -> Verification:
    """The written file run in llama.cpp with the device's context (or a short one for a size budget)."""
    from moepack.gguf.runtime import NativeCrash, llama_command

    placed = budget.gpu_weights is not None
    ctx = opts.verify_ctx if budget.ctx is None else budget.ctx
    sample, failure = "", None
    try:
        sample = _verify(out, ctx, opts, placed)
    except NativeCrash as e:
        failure = str(e)
    return Verification(sample, failure, llama_command(out, ctx, offload_experts=placed))


def _verify(out: Path, ctx: int, opts: CompressOptions, placed: bool) -> str:
    """Load the GGUF in llama.cpp with the device's context (and with `placed` the routed experts overridden to the
    CPU, as the printed command does) and generate a few tokens, in a child process (a crash inside llama.cpp
    raises NativeCrash here)."""
    from moepack.gguf.runtime import EXPERTS_ON_CPU, run_isolated

    res = run_isolated(VERIFY_TARGET, {"path": str(out), "prompt": SAMPLE_PROMPT, "n_ctx": ctx, "max_tokens": 32,
                                       "threads": opts.threads, "repack": opts.repack,
                                       "overrides": EXPERTS_ON_CPU if placed else None},
                       what=f"verifying {out.name}")
    return SAMPLE_PROMPT + res["text"]


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
    check_feasible(view, budget, opts)
    return f"{budget.describe()}\n{_plan_text(view, budget, opts, keeps)}"


def _summary(search: CandidateSearch, best: Candidate, out: Path, report_kld: float | None,
             verified: Verification) -> RunSummary:
    from moepack.gguf.recipe import types_by_class

    size, ref, report = out.stat().st_size, search.ref, search.stats.report
    return RunSummary(
        out=str(out), run_dir=str(search.run.root), keep=best.keep, top_k=best.view.facts.top_k,
        n_experts=[best.view.facts.n_experts, ref.facts.n_experts], budget=search.budget.to_dict(),
        file_bytes=size, predicted_bytes=best.plan.predicted_bytes + best.overhead,
        bpw=8 * size / sum(ref.param_counts().values()), types=types_by_class(best.plan.tensors),
        selection_kld=best.kld, report_kld=report_kld, report_tokens=0 if report is None else report.size,
        candidates=[c.record() for c in search.candidates], criterion=best.criterion, alpha=best.alpha,
        merge=best.merge_record, domains=search.domain_record(best),
        mixtures=best.rivalry.to_dict() if best.rivalry else None,
        refinement=best.refinement.to_dict() if best.refinement else None,
        speed=_speed(search, best), timings=dict(search.run.timings), sample=verified.sample,
        verify_error=verified.error,
        llama_command=verified.command, placement=best.plan.base.get("placement"), runtime=_runtime())


def _speed(search: CandidateSearch, best: Candidate) -> dict[str, Any] | None:
    """Predicted tokens per second of the chosen plan and of the same-size llama.cpp mixture (stages.speed)."""
    from moepack.stages.mixtures import mixture_types
    from moepack.stages.speed import plan_speed

    try:
        clock = search.clock
        rec = plan_speed(best.view, best.plan.tensors, clock).to_dict()
        if (name := search.reference_mixture) is not None:
            other = plan_speed(search.ref, mixture_types(search.ref, name), clock)
            rec["mixture"] = {"name": name, "decode_tps": round(other.decode_tps, 2),
                              "prompt_tps": round(other.prompt_tps, 2)}
    except (MoepackError, OSError, AttributeError) as e:  # AttributeError: a libggml without the symbols
        log.warning("tokens per second not predicted: %s", e)
        return None
    rec |= {"tie_break": search.tie_break} if search.tie_break else {}
    if (floor := search.speed_floor) is not None:
        moved = best.speed_limited if (best.speed_limited or {}).get("limit") == "speed_floor" else None
        rec["floor"] = floor | {"met": rec["decode_tps"] >= floor["decode_tps"]} | ({"moved": moved} if moved else {})
    return rec | {"kernels": clock.describe(), "threads": clock.times.threads}


def _runtime() -> str:
    """'llama-cpp-python 0.3.36 (llama.cpp 0.5.0-dev)': the runtime compress verifies with."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import llama_cpp

        return f"llama-cpp-python {version('llama-cpp-python')} (llama.cpp {llama_cpp.llama_version().decode()})"
    except (PackageNotFoundError, ImportError, AttributeError, OSError):
        return ""
