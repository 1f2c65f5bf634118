"""`moepack compress`: calibrate → prune → adjust k' → sensitivity → allocate → write → verify, in one resumable run.

Every stage artifact lives in the run directory (default: OUT.gguf's name + ".run" beside it). Calibration and
pruning reuse their own outputs when the inputs match; sensitivity, allocation and the GGUF are recorded by
`RunDir`, so a rerun after an interruption redoes only unfinished stages and writes identical bytes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moepack.stages.budget import Budget, BudgetRequest, budget_for, format_size
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.backends import Backend, LocalBackend
from moepack.errors import MoepackError
from moepack.pipeline.runstate import RunDir, atomic_write_text
from moepack.model.textdata import DEFAULT_CALIB_TEXT

__all__ = ["CompressOptions", "CompressResult", "compress", "render_summary", "KEEP_AUTO_CANDIDATES", "choose_base"]

log = logging.getLogger(__name__)

KEEP_AUTO_CANDIDATES = (1.0, 0.875, 0.75, 0.625)
# A base type leaves this share of the budget to spend on measured upgrades.
BASE_SHARE = 0.7
SAMPLE_PROMPT = "Once upon a time, there was a little girl named"
VERIFY_TARGET = "moepack.gguf.runtime:sample_text"  # run in a child process by _verify


class CompressError(MoepackError, ValueError):
    pass


@dataclass
class CompressOptions:
    keep: float | str = 0.75  # retention R, or "auto"
    top_k: int | str | None = None  # None: max(1, round(R·k)); an int; or "auto"
    calib_text: Path | None = None
    calib_tokens: int = 50_000
    seq_len: int = 512
    sens_tokens: int = 4096
    solver: str = "greedy"
    base: str | None = None  # per-role base types; None: the largest ladder type leaving room for upgrades
    ladder: tuple[str, ...] = ("IQ2_XXS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
    criterion: str = "score"
    alpha: float = 0.5
    verify_ctx: int = 512
    extra_bufts: bool = False  # verify with llama.cpp's CPU extra buffer types (repacking) on
    threads: int = 2
    progress: bool = True
    shards: int | None = None  # calibration tasks (None: 1 in-process, one per task slot on Ray)
    cache_dir: Path | None = None  # sensitivity: quantized tensors on disk (shared storage on a cluster)


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
    measured_kld: float  # KLD vs the original on held-out tokens, fake-quantized forward
    candidates: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    sample: str = ""
    verify_error: str | None = None  # why llama.cpp could not run the written file here, if it could not


def _validate(opts: CompressOptions, view: CheckpointView) -> list[float]:
    if not view.facts.moe_layers:
        raise CompressError(f"{view.root}: the model has no MoE layers; moepack compresses MoE models")
    if opts.keep == "auto":
        return list(KEEP_AUTO_CANDIDATES)
    keep = float(opts.keep)
    if not 0 < keep <= 1:
        raise CompressError(f"--keep must be in (0, 1] or 'auto' (got {opts.keep})")
    if isinstance(opts.top_k, int) and opts.top_k > max(1, round(keep * view.facts.n_experts)):
        raise CompressError(f"--top-k {opts.top_k} exceeds the experts kept per layer at --keep {keep}")
    return [keep]


def choose_base(view: CheckpointView, budget_bytes: int, ladder: tuple[str, ...]) -> str:
    """The highest ladder type at which every quantizable tensor still fits in BASE_SHARE of the budget, so that
    measured upgrades decide where the rest goes; the lowest type when none does."""
    from moepack.gguf.estimate import estimate_size

    best = ladder[0]
    for t in ladder:
        if estimate_size(view, t) <= BASE_SHARE * budget_bytes:
            best = t
    return best


def _calibrate(model_dir: Path, run: RunDir, opts: CompressOptions, backend: Backend):  # -> CalibStats
    from moepack.stages.calibrate import run_calibrate

    text = opts.calib_text or DEFAULT_CALIB_TEXT
    log.info("calibration text: %s%s", text, "" if opts.calib_text else
             " (moepack's bundled mix of stories, encyclopedic prose, dialogue, code and web text; pass --calib-text "
             "with text from your own domain for a better file)")
    t0 = time.perf_counter()
    stats = run_calibrate(model_dir, text, run.root, tokens=opts.calib_tokens, seq_len=opts.seq_len,
                          heldout_tokens=opts.sens_tokens, progress=opts.progress, backend=backend,
                          shards=opts.shards, threads=opts.threads)
    run.timings["calibrate"] = time.perf_counter() - t0
    return stats


def _prune(model_dir: Path, run: RunDir, keep: float, opts: CompressOptions) -> tuple[CheckpointView, dict | None]:
    from moepack.stages.prune import PruneOptions, run_prune

    if keep >= 1.0 and opts.top_k is None:
        return open_checkpoint(model_dir), None
    out = run.path(f"pruned-r{keep:g}")
    if out.exists() and not (out / "prune_plan.json").is_file():
        log.info("removing %s: an interrupted prune (its plan, written last, is missing)", out)
        shutil.rmtree(out)
    t0 = time.perf_counter()
    plan = run_prune(model_dir, run.root, out, PruneOptions(keep=keep, alpha=opts.alpha, criterion=opts.criterion,
                                                            top_k=opts.top_k), progress=opts.progress)
    run.timings[f"prune r={keep:g}"] = time.perf_counter() - t0
    return open_checkpoint(out), plan


def _sensitivity(run: RunDir, view: CheckpointView, ref: CheckpointView, stats, plan: dict | None, base: str,
                 keep: float, opts: CompressOptions, backend: Backend) -> dict[str, Any]:
    from moepack.stages.sensitivity.measure import measure_sensitivity, save_json

    path = run.path(f"sensitivity-r{keep:g}.json")
    key = {"model": view.fingerprint(), "reference": ref.fingerprint(), "calib": stats.manifest.get("text_sha256"),
           "calib_tokens": stats.manifest.get("tokens"), "base": base, "ladder": list(opts.ladder),
           "prune": plan and plan.get("layers"), "top_k": view.facts.top_k}
    if stats.manifest.get("shards", 1) != 1:  # sums in another order: the imatrix may differ in its last bits
        key["calib_shards"] = stats.manifest["shards"]

    def work() -> None:
        ids = stats.heldout
        if ids is None:
            raise CompressError("calibration kept no held-out tokens for sensitivity; use a longer --calib-text")
        table = measure_sensitivity(view, ids, reference_view=ref, imatrix=stats, base=base, ladder=opts.ladder,
                                    threads=opts.threads, progress=opts.progress, prune_plan=plan,
                                    backend=backend, cache_dir=opts.cache_dir)
        save_json(table, path)

    run.stage(f"sensitivity-r{keep:g}", key, path, work)
    return json.loads(path.read_text())


def _allocate(run: RunDir, table: dict[str, Any], budget: Budget, keep: float, opts: CompressOptions):
    from moepack.stages.allocate import SensitivityTable, allocate

    overhead = int(table.get("overhead_bytes") or budget.overhead)
    weights = budget.file_limit - overhead
    plan = allocate(SensitivityTable.from_dict(table), weights, opts.solver)
    path = plan.save(run.path(f"quant_plan-r{keep:g}.json"))
    return plan, path, overhead


def _measure(view: CheckpointView, ref: CheckpointView, stats, plan_tensors: dict[str, str],
             prune_plan: dict | None, opts: CompressOptions) -> float:
    from moepack.stages.sensitivity.measure import plan_kld

    return float(plan_kld(view, stats.heldout, plan_tensors, reference_view=ref, imatrix=stats,
                          prune_plan=prune_plan, threads=opts.threads))


def _imatrix_for(view: CheckpointView, run: RunDir, prune_plan: dict | None):
    """The original model's importance matrix, sliced to the kept experts (as `moepack quantize` does)."""
    from moepack.gguf.writer import load_imatrix, prune_imatrix

    im = load_imatrix(run.root, view)
    return prune_imatrix(im, prune_plan) if prune_plan else im


@dataclass
class _Candidate:
    keep: float
    view: CheckpointView
    prune_plan: dict | None
    plan: Any  # allocate.QuantPlan; None when screened out
    plan_path: Path | None
    overhead: int  # predicted non-tensor GGUF bytes
    kld: float = float("nan")  # measured after allocation
    prune_kld: float | None = None  # KLD of pruning alone (unquantized), measured when screening
    same_as: float | None = None  # screened: the retention that gives the same pruned model

    @property
    def screened(self) -> bool:
        return self.plan is None


def _prune_kld(view: CheckpointView, ref: CheckpointView, stats, refs: dict[str, Any], opts: CompressOptions) -> float:
    """KLD of the pruned model alone (unquantized) vs the original on the held-out tokens; the reference outputs are
    computed once (kept in `refs`) from the first MoE layer on."""
    from moepack.backends import torch_threads
    from moepack.model.runner import KLDReference, LayerRunner, moe_layers

    with torch_threads(opts.threads):
        if "ref" not in refs:
            refs["ref"] = KLDReference(LayerRunner(ref), stats.heldout, min(moe_layers(ref)))
        return float(refs["ref"].variant(LayerRunner(view))["kld_mean"])


def _candidate(model_dir: Path, ref: CheckpointView, run: RunDir, stats, budget: Budget, keep: float,
               opts: CompressOptions, backend: Backend, done: list[_Candidate], refs: dict[str, Any]) -> _Candidate:
    """Prune, measure, allocate and check one retention. Screening against the candidates `done` before it: a
    retention that yields the same model as one of them (group rounding: keep 0.875 of 4 per group keeps 4) is not
    measured again; and since quantization only adds error to what pruning costs, a retention whose pruning alone
    already costs the best measured KLD is not measured further: its sensitivity table, the expensive part, is
    skipped."""
    view, prune_plan = _prune(model_dir, run, keep, opts)
    measured = [c for c in done if not c.screened]
    shape = (view.facts.n_experts, view.facts.top_k)
    twin = next((c for c in measured if (c.view.facts.n_experts, c.view.facts.top_k) == shape), None)
    if twin is not None:
        log.info("keep %.3f keeps the same experts and top-k as keep %.3f; not measured again", keep, twin.keep)
        return _Candidate(keep, view, prune_plan, None, None, 0, prune_kld=twin.prune_kld, same_as=twin.keep)
    best_kld = min((c.kld for c in measured), default=float("inf"))
    floor = None
    if prune_plan is not None and best_kld < float("inf") and stats.heldout is not None:
        t0 = time.perf_counter()
        floor = _prune_kld(view, ref, stats, refs, opts)
        run.timings[f"prune KLD r={keep:g}"] = time.perf_counter() - t0
        if floor >= best_kld:
            log.info("keep %.3f: pruning alone costs KLD %.5f >= %.5f of the best candidate; not measured further",
                     keep, floor, best_kld)
            return _Candidate(keep, view, prune_plan, None, None, 0, prune_kld=floor)
    base = opts.base or choose_base(view, budget.weights, opts.ladder)
    table = _sensitivity(run, view, ref, stats, prune_plan, base, keep, opts, backend)
    plan, path, overhead = _allocate(run, table, budget, keep, opts)
    cand = _Candidate(keep, view, prune_plan, plan, path, overhead, prune_kld=floor)
    t0 = time.perf_counter()
    cand.kld = _measure(view, ref, stats, plan.tensors, prune_plan, opts)
    run.timings[f"measure r={keep:g}"] = time.perf_counter() - t0
    log.info("keep %.3f: %s of tensors, measured KLD %.5f", keep, format_size(plan.predicted_bytes), cand.kld)
    return cand


def _write(run: RunDir, cand: _Candidate, out: Path, opts: CompressOptions) -> None:
    from moepack.gguf.writer import write_gguf

    staged = run.path("model.gguf")
    key = {"plan": cand.plan.to_dict(), "prune": cand.prune_plan, "model": cand.view.fingerprint()}

    def work() -> None:
        write_gguf(cand.view, staged, default_type=None, tensor_types=cand.plan.tensors,
                   imatrix=_imatrix_for(cand.view, run, cand.prune_plan), quant_plan=cand.plan.to_dict(),
                   prune_plan=cand.prune_plan, threads=opts.threads, progress=opts.progress)

    run.stage("write", key, staged, work)
    tmp = out.with_name(out.name + ".tmp")
    try:
        shutil.copyfile(staged, tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise CompressError(f"{out}: cannot write the GGUF ({e.strerror or e}); the finished file stays at "
                            f"{staged}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _check_size(out: Path, budget: Budget) -> None:
    size = out.stat().st_size
    if size > budget.file_limit:
        raise CompressError(f"{out} is {format_size(size)}, over the budget {format_size(budget.file_limit)}")


def _verify(out: Path, ctx: int, opts: CompressOptions) -> str:
    """Load the GGUF in llama.cpp with the device's context and generate a few tokens, in a child process (a crash
    inside llama.cpp raises NativeCrash here)."""
    from moepack.gguf.runtime import run_isolated

    res = run_isolated(VERIFY_TARGET, {"path": str(out), "prompt": SAMPLE_PROMPT, "n_ctx": ctx, "max_tokens": 32,
                                       "threads": opts.threads, "extra_bufts": opts.extra_bufts},
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
    budget = budget_for(request, ref)
    _check_feasible(ref, budget, opts)
    if opts.shards is not None and opts.shards < 1:
        raise CompressError(f"--shards must be at least 1 (got {opts.shards})")
    backend = backend or LocalBackend()
    run = RunDir(Path(run_dir) if run_dir else out.with_name(out.name + ".run"))
    stats = _calibrate(model_dir, run, opts, backend)
    cands: list[_Candidate] = []
    refs: dict[str, Any] = {}
    for k in keeps:  # largest retention first: it sets the bar the others are screened against
        cands.append(_candidate(model_dir, ref, run, stats, budget, k, opts, backend, cands, refs))
    best = min((c for c in cands if not c.screened), key=lambda c: c.kld)
    _write(run, best, out, opts)
    _check_size(out, budget)
    from moepack.gguf.runtime import NativeCrash

    sample, failure = "", None
    try:
        sample = _verify(out, opts.verify_ctx if budget.ctx is None else budget.ctx, opts)
    except NativeCrash as e:
        failure = str(e)
    result = _result(out, run, ref, best, budget, cands, sample, failure)
    atomic_write_text(run.path("summary.json"), json.dumps(asdict(result), indent=2, default=str) + "\n")
    if failure:
        raise CompressError(f"{out} is written and its run summary is in {run.path('summary.json')}, but llama.cpp "
                            f"could not run it here: {failure}")
    return result


def _check_feasible(view: CheckpointView, budget: Budget, opts: CompressOptions) -> None:
    """Fail before any work when even the smallest type everywhere, at the smallest retention, cannot fit."""
    import gguf

    from moepack.model.arch import Role
    from moepack.gguf.estimate import tensor_bytes

    smallest = min(KEEP_AUTO_CANDIDATES) if opts.keep == "auto" else float(opts.keep)
    low, f32 = gguf.GGMLQuantizationType[opts.ladder[0]], gguf.GGMLQuantizationType.F32
    floor = 0
    for t in view.tensors.values():
        b = tensor_bytes(t.shape, low if t.quantizable else f32)
        floor += int(b * smallest) if t.role is Role.ROUTED_EXPERTS else b  # routed experts shrink with R
    if floor > budget.weights:
        raise CompressError(
            f"the budget leaves {format_size(budget.weights)} for weights, but the smallest achievable model "
            f"(--keep {smallest:g}, every tensor at {opts.ladder[0]}) needs about {format_size(floor)} "
            f"(file about {format_size(floor + budget.overhead)}); give more memory or a larger target, or a lower --keep")


def _result(out: Path, run: RunDir, ref: CheckpointView, best: _Candidate, budget: Budget,
            cands: list[_Candidate], sample: str, verify_error: str | None) -> CompressResult:
    types: dict[str, dict[str, int]] = {}
    for name, t in best.plan.tensors.items():
        if name.startswith("blk."):
            cls = name.split(".")[2]
        else:
            cls = name.split(".")[0]
        types.setdefault(cls, {}).setdefault(t, 0)
        types[cls][t] += 1
    size = out.stat().st_size
    n_params = sum(ref.param_counts().values())
    return CompressResult(
        out=out, run_dir=run.root, keep=best.keep, top_k=best.view.facts.top_k,
        n_experts=(best.view.facts.n_experts, ref.facts.n_experts), budget=budget.to_dict(), file_bytes=size,
        predicted_bytes=best.plan.predicted_bytes + best.overhead, bpw=8 * size / n_params, types=types,
        measured_kld=best.kld,
        candidates=[{"keep": c.keep, "top_k": c.view.facts.top_k, "kld": None if c.screened else c.kld,
                     "prune_kld": c.prune_kld, "screened": c.screened, "same_as": c.same_as,
                     "tensor_bytes": None if c.screened else c.plan.predicted_bytes} for c in cands],
        timings=dict(run.timings), sample=sample, verify_error=verify_error)


def render_summary(r: CompressResult) -> str:
    lines = [
        f"wrote {r.out}: {format_size(r.file_bytes)} ({r.bpw:.2f} bits per original weight), "
        f"budget {format_size(r.budget['weights'] + r.budget['overhead'])}",
        f"  experts kept  {r.n_experts[0]} of {r.n_experts[1]} per MoE layer (keep {r.keep:g}), top-k {r.top_k}",
        f"  bytes         predicted tensors+metadata {r.predicted_bytes:,}; actual file {r.file_bytes:,}",
    ]
    lines.append(f"  KLD vs original (fake-quantized forward on held-out calibration tokens): {r.measured_kld:.5f}")
    if len(r.candidates) > 1:
        lines.append("  retention search: " + ", ".join(_candidate_line(c) for c in r.candidates))
    lines.append("  types per tensor class:")
    for cls, counts in sorted(r.types.items()):
        lines.append(f"    {cls:<16} " + ", ".join(f"{t} x{n}" for t, n in sorted(counts.items())))
    lines.append("  stage timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items()))
    lines.append(f"  sample: {r.sample!r}" if r.verify_error is None else f"  not verified: {r.verify_error}")
    return "\n".join(lines)


def _candidate_line(c: dict[str, Any]) -> str:
    if c.get("same_as") is not None:
        return f"keep {c['keep']:g} -> same model as keep {c['same_as']:g} (screened)"
    if c.get("screened"):
        return f"keep {c['keep']:g} -> pruning alone KLD {c['prune_kld']:.5f}, not quantized (screened)"
    return f"keep {c['keep']:g} -> KLD {c['kld']:.5f}"
