"""One retention candidate of `moepack compress`: prune to it, screen it against the candidates measured before,
measure its sensitivity, allocate the budget, and measure the KLD its plan really gets.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moepack.backends import Backend
from moepack.gguf.metadata import WRITER_ID
from moepack.gguf.types import smallest_type
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.pipeline.dominance import Rivalry
from moepack.pipeline.refine import Refinement
from moepack.pipeline.options import CompressError, CompressOptions
from moepack.pipeline.runstate import RunDir
from moepack.schema import CalibStats, PrunePlan, QuantPlan, SensitivityTable
from moepack.stages.budget import Budget, BudgetError, format_size

__all__ = ["Candidate", "candidate", "budget_type", "floor_bytes", "fits", "measure_kld", "probe_ids",
           "reference_types", "sensitivity_stage"]

log = logging.getLogger(__name__)

_PLAN_KLD: dict[int, dict[tuple[Any, ...], Any]] = {}  # id(view) → measure_kld's PlanKLDs, dropped with the view


def floor_bytes(view: CheckpointView, smallest: str, keep: float = 1.0, side: str | None = None) -> int:
    """Tensor bytes of `view` at retention `keep` with every quantizable tensor at `smallest`: the one formula,
    moepack.stages.fit.uniform_bytes (which inspect uses too)."""
    from moepack.stages.fit import uniform_bytes

    return uniform_bytes(view, smallest, keep, side)


def budget_type(view: CheckpointView, budget: Budget, ladder: tuple[str, ...]) -> str:
    """The largest ladder type at which every quantizable tensor of `view` fits the budget (each side of a GPU + RAM
    budget): the uniform plan nearest the budget, the smallest type where none fits."""
    fitting = {t: floor_bytes(view, t) for t in ladder
               if all(floor_bytes(view, t, side=side) <= limit for side, limit in budget.sides())}
    # the most bytes, not the last in the ladder: llama.cpp's fallbacks for odd row widths can reorder them
    return max(reversed(list(fitting)), key=fitting.__getitem__, default=smallest_type(ladder))


def reference_types(view: CheckpointView, budget: Budget, opts: CompressOptions) -> list[str]:
    """The reference (base) types compress measures ΔKLD from, in the order measured: --base alone when given;
    else the ladder's smallest type with a fast table (one probe per group: the reference fast mode measures best
    from, docs/performance.md "Reference type and ladder"), then the budget's own uniform type with a full table
    (moves both ways from it stay near the plan, where the additive model holds best) where that is affordable:
    always with --sensitivity full, never with fast, and with auto when the smallest type's table, timed, puts the
    full one under the auto limit (`budget_reference_affordable`)."""
    if opts.base:
        return [opts.base]
    first, smallest = budget_type(view, budget, opts.ladder), smallest_type(opts.ladder)
    if first == smallest:
        return [first]
    return [smallest] if opts.sensitivity == "fast" else [smallest, first]


def full_estimate_s(table: SensitivityTable) -> float | None:
    """Seconds a full table of `table`'s groups would take, at the seconds per probe `table` measured (its fast
    probes' own; for a table written before that was recorded, its probe stage over its probes), None when it
    recorded no timing."""
    t = table.timing or {}
    per = t.get("s_per_probe")
    if per is None and t.get("probes") and t.get("probes_s") is not None:
        per = float(t["probes_s"]) / int(t["probes"])
    return None if per is None else sum(len(g.options) - 1 for g in table.groups) * float(per)


def budget_reference_affordable(first: SensitivityTable, opts: CompressOptions) -> bool:
    """Whether the budget type's full table runs after the smallest type's fast one (`first`): with auto, when its
    estimate from `first`'s measured seconds per probe is under the auto limit (printed before it starts)."""
    from moepack.stages.sensitivity.fast import AUTO_LIMIT_S

    if opts.sensitivity != "auto":
        return opts.sensitivity == "full"
    est = full_estimate_s(first)
    ok = est is not None and est <= AUTO_LIMIT_S
    log.info("sensitivity auto: a full table from the budget's own type needs about %s (limit %.0f s): %s",
             "an unknown time" if est is None else f"{est:.0f} s", AUTO_LIMIT_S,
             "measuring it" if ok else "one reference, the smallest type's fast table")
    return ok


def _reference_mode(i: int, n: int, first: SensitivityTable | None, opts: CompressOptions) -> str | None:
    """The sensitivity mode of reference i of n (None: not measured): one reference (--base, fast mode, or the
    budget's type is the smallest) as asked; the smallest type fast (as measured best; it times the probes); the
    budget's type full where affordable."""
    if n == 1:
        return opts.sensitivity
    if i == 0:
        return "fast"
    return "full" if first is not None and budget_reference_affordable(first, opts) else None


def fits(view: CheckpointView, smallest: str, budget: Budget, keep: float = 1.0, named: float | None = None) -> None:
    """BudgetError unless `view` at retention `keep` with every tensor at `smallest` fits `budget` (each of a GPU +
    RAM pair); the message says what would, naming the retention `named` (default `keep`; an already pruned view is
    checked at keep 1.0 of its experts but was asked for as its own retention)."""
    from moepack.stages.budget import BudgetError
    from moepack.stages.placement import check_floors

    what = f"--keep {keep if named is None else named:g} with every tensor at {smallest}"
    if budget.gpu_weights is not None:
        check_floors(budget, floor_bytes(view, smallest, keep, "gpu"), floor_bytes(view, smallest, keep, "ram"), what)
    elif (floor := floor_bytes(view, smallest, keep)) > budget.weights:
        raise BudgetError(
            f"the budget leaves {format_size(budget.weights)} for weights, but the smallest achievable model "
            f"({what}) needs about {format_size(floor)} (file about {format_size(floor + budget.overhead)}); give "
            "more memory or a larger target, or a lower --keep")


def _prune(model_dir: Path, ref: CheckpointView, run: RunDir, stats: CalibStats, keep: float,
           opts: CompressOptions) -> tuple[CheckpointView, PrunePlan | None]:
    """Retention `keep` as a prune plan (prune_plan-rKEEP.json) and the lazy view of the model it leaves: no pruned
    checkpoint is written (`--save-pruned` writes the chosen one), every stage reads the original's tensors."""
    from moepack.stages.prune import PruneOptions, plan_prune

    if keep >= 1.0 and opts.top_k is None:
        return open_checkpoint(model_dir), None
    path = run.path(f"prune_plan-r{keep:g}.json")
    popts = PruneOptions(keep=keep, alpha=opts.alpha, criterion=opts.criterion, top_k=opts.top_k)
    m = stats.manifest
    key = {"model": ref.fingerprint(), "calib": m.text_sha256, "calib_tokens": m.tokens, "heldout": m.heldout_tokens,
           "calib_shards": m.shards, "options": dataclasses.asdict(popts)}
    run.stage(f"prune-r{keep:g}", key, path,  # timed as the stage
              lambda: plan_prune(ref, run.root, popts, progress=opts.progress).write(path))
    plan = PrunePlan.read(path)
    return ref.with_plan(plan), plan


def probe_ids(heldout: Any, probe_tokens: int | None) -> Any:
    """The selection sequences (N, L) the sensitivity probes run on: the first ceil(probe_tokens / L) of them, at
    least one (None: all). Fewer probe tokens make a table cheaper in proportion (the forward is most of a probe);
    the plans built from it are still measured on every selection token."""
    if heldout is None or probe_tokens is None:
        return heldout
    if probe_tokens < 1:
        raise CompressError(f"probe tokens must be at least 1 (got {probe_tokens})")
    return heldout[:max(1, -(-probe_tokens // heldout.shape[1]))]


def sensitivity_stage(run: RunDir, view: CheckpointView, ref: CheckpointView, stats: CalibStats,
                      plan: PrunePlan | None, base: str, keep: float, opts: CompressOptions,
                      backend: Backend, tag: str = "") -> SensitivityTable:
    """The sensitivity table of one candidate, cached in the run directory under every input it depends on (`tag`
    tells apart the tables of one retention measured from different references)."""
    from moepack.stages.sensitivity.fast import PROXY_SAMPLE
    from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity

    path = run.path(f"sensitivity-r{keep:g}{tag}.json")
    key = {"model": view.fingerprint(), "reference": ref.fingerprint(), "calib": stats.manifest.text_sha256,
           "calib_tokens": stats.manifest.tokens, "base": base, "ladder": list(opts.ladder),
           "sensitivity": opts.sensitivity,
           "prune": plan.to_dict()["layers"] if plan is not None else None, "top_k": view.facts.top_k,
           "writer": WRITER_ID}  # the table holds the writer's overhead_bytes
    if opts.sensitivity != "full":  # a fast table's errors of the types not probed come from this row fraction
        key["proxy_sample"] = PROXY_SAMPLE
    if stats.manifest.shards != 1:  # sums in another order: the imatrix may differ in its last bits
        key["calib_shards"] = stats.manifest.shards
    ids = probe_ids(stats.heldout, opts.probe_tokens)
    if ids is not None and stats.heldout is not None and ids.shape[0] < stats.heldout.shape[0]:
        key["probe_tokens"] = int(ids.size)

    def work() -> None:
        if ids is None:
            raise CompressError("calibration kept no held-out tokens for sensitivity; use a longer --calib-text")
        if "probe_tokens" in key:
            log.info("sensitivity probes on %d of the %d selection tokens (--probe-tokens)", ids.size,
                     stats.heldout.size)
        cfg = SensitivityConfig(base=base, ladder=opts.ladder, threads=opts.threads, progress=opts.progress,
                                cache_dir=opts.cache_dir, sensitivity=opts.sensitivity)
        measure_sensitivity(view, ids, cfg, reference_view=ref, imatrix=stats, prune_plan=plan,
                            backend=backend).write(path)

    run.stage(f"sensitivity-r{keep:g}{tag}", key, path, work)
    return SensitivityTable.read(path)  # from the file: a reused stage and a fresh one give the same table


def _allocate(run: RunDir, table: SensitivityTable, budget: Budget, keep: float,
              opts: CompressOptions) -> tuple[QuantPlan, Path, int]:
    from moepack.stages.allocate import allocate

    # No overhead_bytes: the checkpoint could not be written as GGUF when it was measured (sensitivity warned).
    # The budget's own estimate errs large, and compress checks the written file against the budget.
    overhead = table.overhead_bytes if table.overhead_bytes is not None else budget.overhead
    weights = budget.file_limit - overhead
    if budget.gpu_weights is not None:
        from moepack.stages.placement import allocate_placed

        plan = allocate_placed(table, budget.gpu_weights, weights - budget.gpu_weights, opts.solver)
    else:
        plan = allocate(table, weights, opts.solver)
    path = plan.save(run.path(f"quant_plan-r{keep:g}.json"))
    return plan, path, overhead


def measure_kld(view: CheckpointView, ref: CheckpointView, stats: CalibStats, plan_tensors: dict[str, str],
                prune_plan: PrunePlan | None, opts: CompressOptions, ids: Any = None) -> float:
    """KLD vs `ref` of `view` with the plan's types, fake-quantized with the run's imatrix, on `ids` (default the
    selection tokens, stats.heldout; compress's report uses stats.report). The plans measured on one view and token
    set share one PlanKLD (its reference, quantized tensors and unchanged layers' hidden states: the same numbers),
    which lives as long as the view."""
    import hashlib

    import numpy as np

    from moepack.stages.sensitivity.measure import PlanKLD

    ids = stats.heldout if ids is None else ids
    key = (id(ref), id(stats), id(prune_plan), opts.threads,
           hashlib.sha1(np.ascontiguousarray(ids).tobytes()).hexdigest())  # ref, stats, plan: held by the caller
    if id(view) not in _PLAN_KLD:
        weakref.finalize(view, _PLAN_KLD.pop, id(view), None)
    memo = _PLAN_KLD.setdefault(id(view), {})
    if key not in memo:
        twin = next((m for k, m in memo.items() if k[:4] == key[:4]), None)  # other tokens: the same tensor bytes
        memo[key] = PlanKLD(view, ids, reference_view=ref, imatrix=stats, prune_plan=prune_plan, threads=opts.threads)
        if twin is not None:
            memo[key].store = twin.store
    return float(memo[key](plan_tensors))


def cached_measurers(view: CheckpointView) -> int:
    """How many PlanKLDs measure_kld holds for `view` (one per token set)."""
    return len(_PLAN_KLD.get(id(view), {}))


def _challenge(cand: Candidate, run: RunDir, table: SensitivityTable, budget: Budget, ref: CheckpointView,
               stats: CalibStats, opts: CompressOptions) -> None:
    """Measure llama.cpp's largest fitting mixtures against `cand`'s plan and keep the lowest (moepack.pipeline
    .dominance): the plan is never worse on the selection tokens than the mixture a user would otherwise make."""
    from moepack.pipeline.dominance import challenge

    t0 = time.perf_counter()
    allocated = cand.plan
    cand.plan, cand.kld, cand.rivalry = challenge(
        cand.view, table, budget, allocated, cand.kld, allocated.budget_bytes,
        lambda tensors: measure_kld(cand.view, ref, stats, tensors, cand.prune_plan, opts), opts.mixtures)
    if cand.plan is not allocated:
        cand.plan_path = cand.plan.save(run.path(f"quant_plan-r{cand.keep:g}.json"))
    run.timings[f"mixtures r={cand.keep:g}"] = time.perf_counter() - t0


def _refine(cand: Candidate, run: RunDir, table: SensitivityTable, ref: CheckpointView, stats: CalibStats,
            opts: CompressOptions) -> None:
    """Measured moves of `cand`'s allocated plan that the additive model misses (moepack.pipeline.refine), chosen
    on the selection tokens."""
    from moepack.pipeline.refine import refine

    t0 = time.perf_counter()
    allocated = cand.plan
    cand.plan, cand.kld, cand.refinement = refine(
        table, allocated, cand.kld, lambda tensors: measure_kld(cand.view, ref, stats, tensors, cand.prune_plan, opts),
        opts.refine)
    if cand.plan is not allocated:
        cand.plan_path = cand.plan.save(run.path(f"quant_plan-r{cand.keep:g}.json"))
    key = f"refine r={cand.keep:g}"  # summed over the reference types refined
    run.timings[key] = run.timings.get(key, 0.0) + time.perf_counter() - t0


@dataclass
class Candidate:
    keep: float
    view: CheckpointView
    prune_plan: PrunePlan | None
    plan: QuantPlan | None  # None when screened out
    plan_path: Path | None
    overhead: int  # predicted non-tensor GGUF bytes
    kld: float = float("nan")  # measured after allocation
    prune_kld: float | None = None  # KLD of pruning alone (unquantized), measured when screening
    same_as: float | None = None  # screened: the retention that gives the same pruned model
    infeasible: bool = False  # screened: even the smallest type everywhere does not fit the budget
    rivalry: Rivalry | None = None  # llama.cpp's fitting mixtures measured against the allocated plan
    refinement: Refinement | None = None  # measured moves after allocation, before the mixtures
    criterion: str = "score"  # the pruning criterion and its α (score only)
    alpha: float = 0.5
    criteria: list[dict[str, Any]] | None = None  # --criterion auto: each criterion's pruning-only KLD
    references: list[dict[str, Any]] | None = None  # each reference type measured: base, sensitivity, selection KLD

    @property
    def screened(self) -> bool:
        return self.plan is None


def _prune_kld(view: CheckpointView, ref: CheckpointView, stats: CalibStats, refs: dict[str, Any],
               opts: CompressOptions) -> float:
    """KLD of the pruned model alone (unquantized) vs the original on the held-out tokens; the reference outputs are
    computed once (kept in `refs`) from the first MoE layer on. The same KLD (moepack.model.metrics) as the
    candidates' measured KLD it is screened against."""
    from moepack.backends import torch_threads
    from moepack.model.runner import KLDReference, LayerRunner, moe_layers

    with torch_threads(opts.threads):
        if "ref" not in refs:
            refs["ref"] = KLDReference(LayerRunner(ref), stats.heldout, min(moe_layers(ref)))
        return float(refs["ref"].variant(LayerRunner(view))["kld_mean"])


def candidate(model_dir: Path, ref: CheckpointView, run: RunDir, stats: CalibStats, budget: Budget, keep: float,
              opts: CompressOptions, backend: Backend, done: list[Candidate], refs: dict[str, Any]) -> Candidate:
    """One retention (see _candidate); with --criterion auto, pruned by the criterion whose pruning alone costs the
    least KLD on the selection tokens (moepack.pipeline.criterion)."""
    tried, known = None, None
    if opts.criterion == "auto":
        from moepack.model.pruned import default_top_k, kept_count

        crit, alpha = "score", opts.alpha  # a retention that drops no expert: any criterion gives the same model
        n_kept = kept_count(ref, keep)
        if n_kept < ref.facts.n_experts and stats.heldout is not None:
            from moepack.pipeline.criterion import choose_criterion

            k = opts.top_k if isinstance(opts.top_k, int) else min(default_top_k(keep, ref.facts.top_k), n_kept)
            memo = refs.setdefault("criteria", {})  # retentions that round to the same experts and k' share it
            if (n_kept, k) not in memo:
                t0 = time.perf_counter()
                memo[n_kept, k] = choose_criterion(ref, stats, keep, lambda v: _prune_kld(v, ref, stats, refs, opts),
                                                   opts.top_k)
                run.timings[f"criterion r={keep:g}"] = time.perf_counter() - t0
            crit, alpha, known, tried = memo[n_kept, k]
        opts = dataclasses.replace(opts, criterion=crit, alpha=alpha)
    cand = _candidate(model_dir, ref, run, stats, budget, keep, opts, backend, done, refs, known)
    cand.criterion, cand.alpha, cand.criteria = opts.criterion, opts.alpha, tried
    return cand


def _candidate(model_dir: Path, ref: CheckpointView, run: RunDir, stats: CalibStats, budget: Budget, keep: float,
               opts: CompressOptions, backend: Backend, done: list[Candidate], refs: dict[str, Any],
               known_prune_kld: float | None) -> Candidate:
    """Prune, measure, allocate and check one retention. Screening against the candidates `done` before it: a
    retention that yields the same model as one of them (group rounding: keep 0.875 of 4 per group keeps 4) is not
    measured again; and since quantization only adds error to what pruning costs, a retention whose pruning alone
    already costs the best measured KLD is not measured further: its sensitivity table, the expensive part, is
    skipped."""
    view, prune_plan = _prune(model_dir, ref, run, stats, keep, opts)
    measured = [c for c in done if not c.screened]
    shape = (view.facts.n_experts, view.facts.top_k)
    twin = next((c for c in measured if (c.view.facts.n_experts, c.view.facts.top_k) == shape), None)
    if twin is not None:
        log.info("keep %.3f keeps the same experts and top-k as keep %.3f; not measured again", keep, twin.keep)
        return Candidate(keep, view, prune_plan, None, None, 0, prune_kld=twin.prune_kld, same_as=twin.keep)
    try:
        fits(view, smallest_type(opts.ladder), budget, named=keep)
    except BudgetError as e:  # e.g. keep 1.0 under a budget only a pruned model fits: try the next retention
        log.info("keep %.3f: not measured: %s", keep, e)
        return Candidate(keep, view, prune_plan, None, None, 0, infeasible=True)
    best_kld = min((c.kld for c in measured), default=float("inf"))
    prune_floor = known_prune_kld  # measured when choosing the criterion
    if prune_plan is not None and best_kld < float("inf") and stats.heldout is not None:
        if prune_floor is None:
            t0 = time.perf_counter()
            prune_floor = _prune_kld(view, ref, stats, refs, opts)
            run.timings[f"prune KLD r={keep:g}"] = time.perf_counter() - t0
        if prune_floor >= best_kld:
            log.info("keep %.3f: pruning alone costs KLD %.5f >= %.5f of the best candidate; not measured further",
                     keep, prune_floor, best_kld)
            return Candidate(keep, view, prune_plan, None, None, 0, prune_kld=prune_floor)
    from moepack.stages.allocate import AllocationError

    best: tuple[Candidate, SensitivityTable] | None = None
    references: list[dict[str, Any]] = []
    refs = reference_types(view, budget, opts)
    first_table: SensitivityTable | None = None
    for i, base in enumerate(refs):
        mode = _reference_mode(i, len(refs), first_table, opts)
        if mode is None:
            break
        # Tables are named by reference: the budget's own type (or the only one) untagged, the smallest tagged.
        table = sensitivity_stage(run, view, ref, stats, prune_plan, base, keep,
                                  dataclasses.replace(opts, sensitivity=mode), backend,
                                  "" if base == refs[-1] else f"-{base}")
        first_table = first_table or table
        try:
            plan, path, overhead = _allocate(run, table, budget, keep, opts)
        except AllocationError as e:  # the measured minimum is a little above the estimate above
            log.info("keep %.3f, reference %s: %s", keep, base, e)
            continue
        cand = Candidate(keep, view, prune_plan, plan, path, overhead, prune_kld=prune_floor)
        t0 = time.perf_counter()
        cand.kld = measure_kld(view, ref, stats, plan.tensors, prune_plan, opts)
        run.timings[f"measure r={keep:g}{'' if i == 0 else ' ' + base}"] = time.perf_counter() - t0
        if opts.refine > 0:
            _refine(cand, run, table, ref, stats, opts)
        references.append({"base": base, "sensitivity": table.base.get("sensitivity"), "kld": cand.kld,
                           "refine_measured": len(cand.refinement.tried) if cand.refinement else 0})
        log.info("keep %.3f, reference %s: selection KLD %.5f", keep, base, cand.kld)
        if best is None or cand.kld < best[0].kld:
            best = (cand, table)
    if best is None:
        return Candidate(keep, view, prune_plan, None, None, 0, prune_kld=prune_floor, infeasible=True)
    cand, table = best
    cand.references = references
    if len(references) > 1:  # the run directory's plan is the chosen reference's (its table: table_path)
        cand.plan_path = cand.plan.save(run.path(f"quant_plan-r{keep:g}.json"))
    if opts.mixtures:
        _challenge(cand, run, table, budget, ref, stats, opts)
    log.info("keep %.3f: %s of tensors, measured KLD %.5f", keep, format_size(cand.plan.predicted_bytes), cand.kld)
    return cand
