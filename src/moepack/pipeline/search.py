"""The retention search of `moepack compress`: for each retention, prune to it, screen it against the candidates
measured before, measure its sensitivity from each reference type, allocate the budget, measure the KLD its plan
really gets, refine it by measured moves and challenge it with llama.cpp's own mixtures; the lowest selection KLD
wins.

    search = CandidateSearch(run, ref, stats, budget, opts, backend)
    for keep in keeps:              # largest first: it sets the bar the others are screened against
        search.candidate(keep)
    best = search.best()

Screening: a retention that yields the same model as one measured before (group rounding: keep 0.875 of 4 per
group keeps 4) is not measured again; one whose smallest plan cannot fit is passed over; and since quantization only
adds error to what pruning costs, one whose pruning alone already costs the best measured KLD gets no sensitivity
table, the expensive part.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from moepack.backends import Backend
from moepack.errors import MoepackError
from moepack.model.checkpoint import CheckpointView
from moepack.pipeline.budget_check import allocate_within, check_floor, nothing_fits
from moepack.pipeline.candidates import Candidate
from moepack.pipeline.criterion import Pruning, choose_pruning
from moepack.pipeline.measure import KLDMeter
from moepack.pipeline.options import CompressError, CompressOptions
from moepack.pipeline.reference import reference_mode, reference_types
from moepack.pipeline.steps import prune_stage, sensitivity_stage
from moepack.rundir import RunDir
from moepack.schema import CalibStats, QuantPlan, SensitivityTable
from moepack.stages.budget import Budget, BudgetError, format_size

if TYPE_CHECKING:
    from moepack.pipeline.robust import DomainKLD
    from moepack.stages.speed import KernelClock

__all__ = ["CandidateSearch"]

log = logging.getLogger(__name__)

# The tie-break moves to a faster retention only for a predicted decode gain this large: smaller ones are within the
# prediction's own error (docs/performance.md), and a tie on 4,096 selection tokens can still be a loss held out
# (`make demo`: keep 0.625 tied with 0.75 on the selection tokens, 2 % faster predicted, 11 % more KLD held out).
TIE_SPEEDUP = 1.10


class CandidateSearch:
    """One compress run's candidates and what they share: the run directory, the reference view (opened once),
    the calibration statistics, the budget, the options, the backend, and the measurements kept between
    candidates (the KLD meter, each criterion choice)."""

    def __init__(self, run: RunDir, ref: CheckpointView, stats: CalibStats, budget: Budget, opts: CompressOptions,
                 backend: Backend | None) -> None:
        self.run, self.ref, self.stats, self.budget, self.opts, self.backend = run, ref, stats, budget, opts, backend
        self.meter = KLDMeter(ref, stats, opts.threads)
        self._clock: KernelClock | None = None
        self.tie_break: dict[str, Any] | None = None  # best(): the candidates tied on KLD and their speeds
        self.candidates: list[Candidate] = []  # in the order measured
        self._criteria: dict[tuple[int, int], Pruning] = {}  # (experts kept, k') → the pruning chosen
        self._scales: dict[str, Any] | None = None  # the domain scales (balance) and the mixture they came from

    # ------------------------------------------------------------------------------------------------ the search

    @functools.cached_property
    def reference_mixture(self) -> str | None:
        """The largest llama.cpp mixture of the unpruned model that fits the budget (else the smallest one): the
        file a user would otherwise make at this size — at a budget of exactly that file's size, that mixture (its
        file as llama.cpp writes it fits, though its tensors exceed what the budget leaves after moepack's own
        metadata reserve)."""
        from moepack.pipeline.dominance import short_file_fits
        from moepack.stages.mixtures import mixture_sizes

        sizes = sorted(mixture_sizes(self.ref).items(), key=lambda ms: ms[1].total)
        if not sizes:
            return None
        fits = (n for n, s in reversed(sizes)
                if s.total <= self.budget.weights or short_file_fits(self.ref, self.budget, n, s.total))
        return next(fits, sizes[0][0])

    def balance(self) -> None:
        """With several calibration domains, weigh each in every mean KLD by its own level: the per-domain KLD of
        the largest llama.cpp mixture of the unpruned model that fits the budget (else the smallest one). A plain
        mean follows the domains the model knows least (their KLDs are largest) and can lose where it is good; the
        balanced mean counts a domain's loss relative to what a same-size file costs there (moepack.pipeline
        .robust)."""
        from moepack.stages.mixtures import mixture_types

        if len(self.stats.domain_names) < 2 or self.stats.selection_domain is None:
            return
        name = self.reference_mixture
        if name is None:
            return
        tensors = {k: v.name for k, v in mixture_types(self.ref, name).items()}
        t0 = time.perf_counter()
        dom = self.meter.domains(self.ref, tensors, None)
        self.run.timings["domain scales"] = time.perf_counter() - t0
        scales = [m for m, _ in dom.means().values()] if dom is not None else []
        if not scales or min(scales) <= 0:
            log.info("domain scales: %s measures no KLD on some domain; every token weighs alike", name)
            return
        self.stats.domain_scales, self._scales = np.asarray(scales), {"mixture": name} | dict(zip(dom.names, scales))
        log.info("domains weighed by the KLD of llama.cpp's %s on each: %s", name,
                 ", ".join(f"{d} {x:.5f}" for d, x in zip(dom.names, scales)))

    def candidate(self, keep: float) -> Candidate:
        """Retention `keep`, pruned (with --criterion auto by the criterion whose pruning alone costs the least
        KLD on the selection tokens, merged where merging measures lower), screened, measured; its final plan
        written once (quant_plan-rKEEP.json)."""
        how = self._pruning(keep)
        cand = self._measured(prune_stage(self.run, self.ref, self.stats, keep, how, self.opts), how.prune_kld)
        cand = dataclasses.replace(cand, criterion=how.criterion, alpha=how.alpha, criteria=how.tried,
                                   merge=how.merge)
        if cand.plan is not None:
            cand.plan.write(self.run.layout.quant_plan(keep))
        self.candidates.append(cand)
        return cand

    def best(self) -> Candidate:
        """The measured candidate with the lowest selection KLD among those no worse on any selection domain than the
        best llama.cpp mixture of the unpruned model (moepack.pipeline.robust; CompressError when every one was
        screened)."""
        from moepack.pipeline.robust import robust_choice

        fitting = [c for c in self.candidates if not c.screened]
        if not fitting:
            raise nothing_fits([c.keep for c in self.candidates], self.budget, self.opts.ladder)
        base = self.baseline()
        options = [(f"keep {c.keep:g}", c.kld, self.domains(c)) for c in fitting]
        i, worse = robust_choice(options, base[1] if base else None)
        return self._fastest_tie(fitting, i, [c for j, c in enumerate(fitting) if not worse[j]])

    def _fastest_tie(self, fitting: list[Candidate], i: int, fine: list[Candidate]) -> Candidate:
        """Among the candidates as good as fitting[i] on the selection tokens (not measurably worse: the 95 % CI of
        their paired window differences reaches zero; and no worse than the best mixture on any domain), the one with
        the fastest predicted decode when it is at least TIE_SPEEDUP times fitting[i]'s (--no-speed-tiebreak:
        fitting[i])."""
        best = fitting[i]
        if not self.opts.speed_tiebreak or best not in fine:
            return best
        plans = {c.keep: (c.view, c.plan.tensors, c.prune_plan) for c in fine}
        ties = [c for c in fine if c is best or self.meter.tied(plans[c.keep], plans[best.keep])]
        if len(ties) < 2:
            return best
        try:
            speed = {c.keep: self.decode_tps(c) for c in ties}
        except (MoepackError, OSError, AttributeError) as e:  # no kernel times: the lowest KLD
            log.warning("no speed tie-break: %s", e)
            return best
        fastest = max(ties, key=lambda c: (speed[c.keep], -c.kld))
        if speed[fastest.keep] < TIE_SPEEDUP * speed[best.keep]:  # a gain the prediction cannot vouch for
            fastest = best
        self.tie_break = {"lowest_kld": best.keep, "tied": [c.keep for c in ties], "chosen": fastest.keep,
                          "decode_tps": {f"{k:g}": round(v, 2) for k, v in speed.items()}}
        if fastest is not best:
            log.info("keep %g is not measurably worse than keep %g (KLD %.5f vs %.5f, paired 95 %% CI) and predicts "
                     "%.1f decode tok/s against %.1f: chosen", fastest.keep, best.keep, fastest.kld, best.kld,
                     speed[fastest.keep], speed[best.keep])
        return fastest

    def domains(self, cand: Candidate, report: bool = False) -> DomainKLD | None:
        """`cand`'s plan's per-domain KLDs on the selection (or report) tokens (None: one domain)."""
        return self.meter.domains(cand.view, cand.plan.tensors, cand.prune_plan, report)

    def baseline(self, report: bool = False) -> tuple[str, DomainKLD] | None:
        """(name, per-domain KLDs on the selection or report tokens) of the best llama.cpp mixture of the unpruned
        model on each domain (moepack.pipeline.robust.envelope): the file a user would otherwise make (None: one
        domain, or no mixture measured)."""
        from moepack.pipeline.robust import envelope

        unpruned = next((c for c in self.candidates if not c.screened and c.prune_plan is None and c.rivalry
                         and c.rivalry.envelope is not None), None)
        if unpruned is None:
            return None
        which = unpruned.rivalry.domains["best_mixture_by_domain"]
        names = sorted(set(which.values()))
        label = names[0] if len(names) == 1 else "best mixture per domain"
        if not report:
            return label, unpruned.rivalry.envelope
        plans = unpruned.rivalry.mixture_plans
        measured = [(n, self.meter.domains(unpruned.view, plans[n].tensors, None, report=True)) for n in names]
        whole = envelope(measured)[0]
        return label, whole

    def report_kld(self, best: Candidate) -> float | None:
        """The chosen plan's KLD on the report tokens (held out after the selection tokens; no choice saw them)."""
        if self.stats.report is None:
            log.warning("the calibration text left no report tokens after the selection tokens; the KLD reported is "
                        "the selection KLD every choice was made on (use a longer --calib-text)")
            return None
        t0 = time.perf_counter()
        kld = self.meter.plan_kld(best.view, best.plan.tensors, best.prune_plan, ids=self.stats.report)
        self.run.timings["report KLD"] = time.perf_counter() - t0
        return kld

    def domain_record(self, best: Candidate) -> dict[str, Any] | None:
        """summary.json's per-domain KLDs [mean, CI half-width] of the chosen plan and of the best llama.cpp mixture
        of the unpruned model, on the selection tokens and (measured here) on the report tokens no choice saw; None
        with one domain."""
        sel = self.domains(best)
        if sel is None:
            return None
        rec: dict[str, Any] = {"names": list(sel.names), "selection": {"chosen": sel.record()}}
        if self._scales is not None:
            rec["scales"] = self._scales
        parts = [("selection", False)] + ([("report", True)] if self.stats.report_domain is not None else [])
        t0 = time.perf_counter()
        for part, report in parts:
            rec[part] = {"chosen": self.domains(best, report).record()}
            if (base := self.baseline(report)) is not None:
                rec[part]["best_mixture"] = {"name": base[0], "kld": base[1].record()}
        self.run.timings["domains"] = time.perf_counter() - t0
        return rec

    def _pruning(self, keep: float) -> Pruning:
        """How retention `keep` is pruned: --criterion (and --merge) as given, or with auto the criterion measured
        best, merged where merging measures lower (moepack.pipeline.criterion; retentions that round to the same
        experts and k' share the choice)."""
        from moepack.model.pruned import default_top_k, kept_count

        opts = self.opts
        n_kept = kept_count(self.ref, keep)
        fixed = opts.criterion if opts.criterion != "auto" else "score"
        if n_kept >= self.ref.facts.n_experts:  # drops no expert: any criterion gives the same model, none merges
            return Pruning(fixed, opts.alpha)
        if opts.criterion != "auto" or self.stats.selection is None:
            return Pruning(fixed, opts.alpha, opts.merge)
        k = opts.top_k if isinstance(opts.top_k, int) else min(default_top_k(keep, self.ref.facts.top_k), n_kept)
        if (n_kept, k) not in self._criteria:
            t0 = time.perf_counter()
            self._criteria[n_kept, k] = choose_pruning(self.ref, self.stats, keep, self.meter.prune_kld,
                                                       opts.top_k, opts.merge)
            self.run.timings[f"criterion r={keep:g}"] = time.perf_counter() - t0
        return self._criteria[n_kept, k]

    # ------------------------------------------------------------------------------------------------ one retention

    def _measured(self, pruned: Candidate, known_prune_kld: float | None) -> Candidate:
        """`pruned` screened, or measured from each reference type and challenged: the lowest plan found."""
        screened, further = self._screen(pruned, known_prune_kld)
        if not further:
            return screened
        found = self._references(screened)
        if found is None:
            return dataclasses.replace(screened, infeasible=True)
        cand, table = found
        if (floor := self.speed_floor) is not None:  # before the mixtures: they still judge the faster plan
            cand = self._speed_limited(cand, table, floor["decode_tps"], hard=False)
        if self.opts.mixtures:
            cand = self._challenge(cand, table)
        if self.opts.min_decode_tps is not None:
            cand = self._speed_limited(cand, table, float(self.opts.min_decode_tps), hard=True)
        log.info("keep %.3f: %s of tensors, measured KLD %.5f", cand.keep, format_size(cand.plan.predicted_bytes),
                 cand.kld)
        return cand

    def _screen(self, cand: Candidate, known_prune_kld: float | None) -> tuple[Candidate, bool]:
        """(`cand` screened, False) when it is the same model as one measured, over the budget, or its pruning alone
        is already worse than the best measured; else (`cand` with its pruning-only KLD where measured, True)."""
        measured = [c for c in self.candidates if not c.screened]
        shape = (cand.view.facts.n_experts, cand.view.facts.top_k)
        twin = next((c for c in measured if (c.view.facts.n_experts, c.view.facts.top_k) == shape), None)
        if twin is not None:
            log.info("keep %.3f keeps the same experts and top-k as keep %.3f; not measured again", cand.keep,
                     twin.keep)
            return dataclasses.replace(cand, prune_kld=twin.prune_kld, same_as=twin.keep), False
        try:
            check_floor(cand.view, self.budget, self.opts.ladder, named=cand.keep)
        except BudgetError as e:  # e.g. keep 1.0 under a budget only a pruned model fits: try the next retention
            log.info("keep %.3f: not measured: %s", cand.keep, e)
            return dataclasses.replace(cand, infeasible=True), False
        best_kld = min((c.kld for c in measured), default=float("inf"))
        floor = known_prune_kld  # measured when choosing the criterion
        if cand.prune_plan is not None and best_kld < float("inf") and self.stats.selection is not None:
            if floor is None:
                t0 = time.perf_counter()
                floor = self.meter.prune_kld(cand.view)
                self.run.timings[f"prune KLD r={cand.keep:g}"] = time.perf_counter() - t0
            if floor >= best_kld:
                log.info("keep %.3f: pruning alone costs KLD %.5f >= %.5f of the best candidate; not measured "
                         "further", cand.keep, floor, best_kld)
                return dataclasses.replace(cand, prune_kld=floor), False
        return dataclasses.replace(cand, prune_kld=floor), True

    def _references(self, cand: Candidate) -> tuple[Candidate, SensitivityTable] | None:
        """`cand` measured from each reference type (moepack.pipeline.reference), each plan allocated, measured
        and refined: the lowest, with the table it was allocated from and every reference's record (None when no
        reference's plan fits)."""
        bases = reference_types(cand.view, self.budget, self.opts)
        best: tuple[Candidate, SensitivityTable] | None = None
        records: list[dict[str, Any]] = []
        first: SensitivityTable | None = None
        for i, base in enumerate(bases):
            mode = reference_mode(i, len(bases), first, self.opts)
            if mode is None:
                break
            # Tables are named by reference: the budget's own type (or the only one) untagged, the smallest tagged.
            table = sensitivity_stage(self.run, self.ref, self.stats, cand, base,
                                      dataclasses.replace(self.opts, sensitivity=mode), self.backend,
                                      None if base == bases[-1] else base)
            first = table if first is None else first
            planned = self._allocated(cand, table, base, "" if i == 0 else " " + base)
            if planned is None:
                continue
            records.append({"base": base, "sensitivity": table.base.get("sensitivity"), "kld": planned.kld,
                            "refine_measured": len(planned.refinement.tried) if planned.refinement else 0})
            log.info("keep %.3f, reference %s: selection KLD %.5f", cand.keep, base, planned.kld)
            if best is None or planned.kld < best[0].kld:
                best = (planned, table)
        return None if best is None else (dataclasses.replace(best[0], references=records), best[1])

    def _allocated(self, cand: Candidate, table: SensitivityTable, base: str, label: str) -> Candidate | None:
        """`cand` with the plan allocated from `table`, its measured selection KLD, refined (None when the
        table's smallest plan does not fit: the measured minimum can be a little above the estimate)."""
        from moepack.stages.allocate import AllocationError

        try:
            plan, overhead = allocate_within(table, self.budget, self.opts.solver)
        except AllocationError as e:
            log.info("keep %.3f, reference %s: %s", cand.keep, base, e)
            return None
        t0 = time.perf_counter()
        kld = self.meter.plan_kld(cand.view, plan.tensors, cand.prune_plan)
        self.run.timings[f"measure r={cand.keep:g}{label}"] = time.perf_counter() - t0
        cand = dataclasses.replace(cand, plan=plan, overhead=overhead, kld=kld)
        return self._refine(cand, table) if self.opts.refine > 0 else cand

    def _refine(self, cand: Candidate, table: SensitivityTable) -> Candidate:
        """Measured moves of `cand`'s allocated plan that the additive model misses (moepack.pipeline.refine),
        chosen on the selection tokens."""
        from moepack.pipeline.refine import refine

        t0 = time.perf_counter()
        plan, kld, rec = refine(table, cand.plan, cand.kld, self._measure(cand), self.opts.refine)
        key = f"refine r={cand.keep:g}"  # summed over the reference types refined
        self.run.timings[key] = self.run.timings.get(key, 0.0) + time.perf_counter() - t0
        return dataclasses.replace(cand, plan=plan, kld=kld, refinement=rec)

    @property
    def clock(self) -> KernelClock:
        """The kernel times speed is predicted from: --speed-table's, else this machine's (measured, cached)."""
        from moepack.stages.speed import KernelClock

        if self._clock is None:
            self._clock = (KernelClock.from_file(self.opts.speed_table) if self.opts.speed_table is not None
                           else KernelClock.here(self.opts.threads))
        return self._clock

    def decode_tps(self, cand: Candidate) -> float:
        from moepack.stages.speed import decode_tps, matmuls

        return decode_tps(matmuls(cand.view, cand.plan.tensors), self.clock)

    @functools.cached_property
    def speed_floor(self) -> dict[str, Any] | None:
        """--speed-floor's limit: that share of the predicted decode tokens/s of the same-size llama.cpp mixture
        (`reference_mixture`); None when off, on a GPU + RAM device (the prediction is for CPU decoding) or when
        there is no mixture or no kernel time to predict from."""
        from moepack.stages.mixtures import mixture_types
        from moepack.stages.speed import decode_tps, matmuls

        name = self.reference_mixture
        if not self.opts.speed_floor or name is None or self.budget.gpu_weights is not None:
            return None
        try:
            types = {k: v.name for k, v in mixture_types(self.ref, name).items()}
            tps = decode_tps(matmuls(self.ref, types), self.clock)
        except (MoepackError, OSError, AttributeError) as e:  # AttributeError: a libggml without the symbols
            log.warning("no speed floor: %s", e)
            return None
        return {"mixture": name, "mixture_decode_tps": round(tps, 2), "factor": self.opts.speed_floor,
                "decode_tps": round(tps * self.opts.speed_floor, 2)}

    def _speed_limited(self, cand: Candidate, table: SensitivityTable, limit: float, hard: bool) -> Candidate:
        """`cand`'s plan allocated again with its predicted decode time limited to `limit` tokens/s (within the same
        budget: stages.speed.speed_choice), then measured; unchanged when it already meets the limit, and (not
        `hard`: the speed floor) when no plan can."""
        from moepack.stages.speed_limit import limited_plan

        plan, before, after = limited_plan(table, cand.plan, cand.view, self.clock, limit, self.opts.solver)
        if plan is cand.plan:
            return cand
        what = "--min-decode-tps" if hard else "the speed floor"
        if not hard and after < limit:
            log.info("keep %.3f: predicted decode %.1f tok/s < %s %.1f, and no plan within the budget reaches it "
                     "(fastest %.1f): kept", cand.keep, before, what, limit, after)
            return cand
        t0 = time.perf_counter()
        kld = self._measure(cand)(plan.tensors)
        self.run.timings[f"speed limit r={cand.keep:g}"] = time.perf_counter() - t0
        log.info("keep %.3f: predicted decode %.1f tok/s < %s %.1f: faster types give %.1f tok/s, selection KLD "
                 "%.5f (was %.5f)", cand.keep, before, what, limit, after, kld, cand.kld)
        return dataclasses.replace(cand, plan=plan, kld=kld, speed_limited={
            "limit": "min_decode_tps" if hard else "speed_floor", "before": before, "after": after,
            "kld_before": cand.kld, "kld_after": kld})

    def check_speed(self, best: Candidate) -> None:
        """CompressError when the chosen plan's predicted decode speed is under --min-decode-tps (before writing)."""
        limit = self.opts.min_decode_tps
        if limit is None or (tps := self.decode_tps(best)) >= limit:
            return
        raise CompressError(
            f"no plan within the budget reaches --min-decode-tps {limit:g}: the fastest compress made predicts "
            f"{tps:.1f} decode tok/s on {self.clock.describe()}. Lower --min-decode-tps, give a larger budget (the "
            "fast types are not the smallest), or use fewer experts per token (--top-k)")

    def _challenge(self, cand: Candidate, table: SensitivityTable) -> Candidate:
        """llama.cpp's largest fitting mixtures measured against `cand`'s plan, the lowest kept (moepack.pipeline
        .dominance): the plan is never worse on the selection tokens than the mixture a user would otherwise make."""
        from moepack.pipeline.dominance import Referee, challenge

        t0 = time.perf_counter()
        referee = Referee(self._measure(cand), lambda tensors: self.meter.domains(cand.view, tensors, cand.prune_plan),
                          lambda reweighted: self._replan(cand, reweighted))
        plan, kld, rivalry = challenge(cand.view, table, self.budget, cand.plan, cand.kld, self.opts.mixtures, referee)
        self.run.timings[f"mixtures r={cand.keep:g}"] = time.perf_counter() - t0
        return dataclasses.replace(cand, plan=plan, kld=kld, rivalry=rivalry)

    def _replan(self, cand: Candidate, table: SensitivityTable) -> QuantPlan | None:
        """The plan allocated on `table` (a reweighted one, moepack.pipeline.repair) within the budget, the speed
        floor where it can and --min-decode-tps (a repaired plan must not fail the run's speed check); None when
        none fits."""
        from moepack.stages.allocate import AllocationError
        from moepack.stages.speed_limit import limited_plan

        try:
            plan, _ = allocate_within(table, self.budget, self.opts.solver)
        except AllocationError:
            return None
        floor, hard = self.speed_floor, self.opts.min_decode_tps  # as _measured applies them: the floor where
        for limit, must in ((floor and floor["decode_tps"], False), (hard, True)):  # it can, --min-decode-tps always
            if limit is not None:
                fast, _, after = limited_plan(table, plan, cand.view, self.clock, float(limit), self.opts.solver)
                plan = fast if must or after >= limit else plan
        return plan

    def _measure(self, cand: Candidate) -> Callable[[dict[str, str]], float]:
        """Plan tensors → their selection KLD on `cand`'s model."""
        return lambda tensors: self.meter.plan_kld(cand.view, tensors, cand.prune_plan)
