"""llama.cpp's own mixtures as rivals of compress's plan: a compressed file is never worse, on the selection
tokens, than the standard llama-quantize mixture (Q3_K_M, IQ2_XXS, ...) a user could make at the same budget.

For one candidate view (pruned or not) the largest few mixtures whose file fits the budget (their per-tensor
types and bytes predicted by moepack.stages.mixtures, no quantizing; the file's metadata as the writer writes it)
are measured with the same fake-quantized forward and importance matrix as compress's own plan. moepack's metadata
never pushes a mixture out: when the full records (every tensor's type, the plan's fields, the run's budget) would
take it over, it is recorded as short as llama.cpp's own file of the mixture records it (moepack.gguf.writer
.SHORT_RECORD), so a budget of llama.cpp's file size measures that mixture. When the best of them measures below
the allocated plan, the greedy also starts from it (each group at the ladder option nearest below the mixture's
bytes) and spends what is left by measured sensitivity; of the allocated plan, the mixture and that seeded plan the
lowest measured KLD wins — among those no worse than the best mixture on any domain of the selection tokens
(moepack.pipeline.robust), so the seeded plan is also measured when the allocated plan fails on one domain.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from moepack.errors import MoepackError
from moepack.model.checkpoint import CheckpointView
from moepack.schema import QuantPlan, SensitivityTable
from moepack.stages.budget import Budget
from moepack.stages.mixtures import MixtureSize

if TYPE_CHECKING:
    from moepack.pipeline.robust import DomainKLD

__all__ = ["Rivalry", "fitting_mixtures", "short_file_fits", "mixture_file_bytes", "mixture_plan", "snap_to_options",
           "shapes_of", "seeded_plan", "Referee", "challenge"]

log = logging.getLogger(__name__)

Measure = Callable[[dict[str, str]], float]  # plan tensors → selection KLD
Judge = Callable[[dict[str, str]], "DomainKLD | None"]  # plan tensors → its per-domain selection KLDs
Replan = Callable[[SensitivityTable], "QuantPlan | None"]  # a (reweighted) table → the plan allocated on it


@dataclass
class Rivalry:
    """What compress measured against one candidate's allocated plan."""
    allocated_kld: float
    mixtures: list[dict[str, float | int | str]] = field(default_factory=list)  # name, tensor_bytes, kld
    seeded_kld: float | None = None  # the greedy started from the best mixture
    repair: list[dict[str, Any]] | None = None  # the allocated plan lost on a domain: each reweighted try
    chosen: str = "allocated"  # allocated | mixture NAME | seeded from NAME
    # per-domain selection KLDs [mean, CI half-width] of the best mixture and the chosen plan, and the plans found
    # worse than the mixture on some domain (None: one domain)
    domains: dict[str, Any] | None = None
    mixture_plans: dict[str, QuantPlan] = field(default_factory=dict, repr=False)  # every fitting mixture measured
    envelope: DomainKLD | None = field(default=None, repr=False)  # per domain the best mixture's KLDs

    @property
    def best_mixture(self) -> dict[str, float | int | str] | None:
        return min(self.mixtures, key=lambda m: m["kld"], default=None)

    def to_dict(self) -> dict[str, object]:
        best = self.best_mixture
        return {"allocated_kld": self.allocated_kld, "mixtures": self.mixtures, "seeded_kld": self.seeded_kld,
                "chosen": self.chosen, "best_mixture": best["name"] if best else None} | (
                    {"domains": self.domains} if self.domains is not None else {}) | (
                    {"repair": self.repair} if self.repair is not None else {})


def mixture_file_bytes(view: CheckpointView, plan: QuantPlan) -> int:
    """Bytes of the GGUF the writer makes of `plan` on `view`: its header (metadata as written, the recipe at its
    allowance unless the plan is recorded short) and each tensor padded to the alignment. Reads no weights."""
    from moepack.gguf.names import gguf_outputs
    from moepack.gguf.writer import ALIGNMENT, overhead_bytes, resolve_types

    typed = resolve_types(gguf_outputs(view), None, plan.tensors)
    quiet = logging.getLogger("gguf.gguf_writer")
    level, quiet.level = quiet.level, logging.WARNING  # its INFO lines name a temporary file
    try:
        head = overhead_bytes(view, plan, prune_plan=getattr(view, "plan", None), default_type=None)
    finally:
        quiet.setLevel(level)
    return head + sum(t.nbytes + -t.nbytes % ALIGNMENT for t in typed)


def _fits(budget: Budget, size: MixtureSize, file_bytes: int) -> bool:
    """Whether a file of `file_bytes` with `size`'s tensors fits `budget` (each side of a GPU + RAM budget: the
    non-tensor bytes are the RAM side's, as the budget counts them)."""
    if file_bytes > budget.file_limit:
        return False
    if budget.gpu_weights is None:
        return True
    return size.gpu <= budget.gpu_weights and file_bytes - size.gpu <= budget.file_limit - budget.gpu_weights


def short_file_fits(view: CheckpointView, budget: Budget, name: str, tensor_bytes: int) -> bool:
    """Whether mixture `name`'s file of `view`, its records as short as llama.cpp's own, fits the file budget (not
    for a GPU + RAM budget, whose sides are judged by the mixtures' measurement)."""
    from moepack.gguf.writer import SHORT_RECORD
    from moepack.stages.mixtures import mixture_types

    if budget.gpu_weights is not None or tensor_bytes > budget.file_limit:
        return False
    plan = QuantPlan.by_hand({k: v.name for k, v in mixture_types(view, name).items()})
    try:
        return mixture_file_bytes(view, dataclasses.replace(plan, base={"mixture": name, SHORT_RECORD: True})
                                  ) <= budget.file_limit
    except MoepackError:
        return False


def fitting_mixtures(view: CheckpointView, table: SensitivityTable, budget: Budget, allocated: QuantPlan,
                     n: int) -> list[tuple[str, MixtureSize, QuantPlan]]:
    """(mixture, its sizes, its plan) of the `n` largest llama.cpp mixtures whose GGUF of `view` fits `budget`
    (and, with a GPU + RAM budget, each side its own), largest first. A mixture that fits only with its records
    short gets a plan recorded short (SHORT_RECORD); one that fits with neither is left out, logged with its bytes."""
    from moepack.gguf.writer import SHORT_RECORD
    from moepack.stages.mixtures import mixture_sizes
    from moepack.stages.placement import on_gpu

    placed = budget.gpu_weights is not None
    sizes = mixture_sizes(view, on_gpu=on_gpu if placed else None)
    fit: list[tuple[str, MixtureSize, QuantPlan]] = []
    for name, size in sorted(sizes.items(), key=lambda ms: -ms[1].total):
        if len(fit) >= n:
            break
        if size.total > budget.file_limit:  # tensors alone are over: no metadata can help
            continue
        plan = mixture_plan(view, table, name, size, allocated)
        try:
            full = mixture_file_bytes(view, plan)
            short = plan if _fits(budget, size, full) else dataclasses.replace(
                plan, base=plan.base | {SHORT_RECORD: True})
            nbytes = full if short is plan else mixture_file_bytes(view, short)
        except MoepackError as e:  # the writer refuses this checkpoint: judge by the tensor bytes allocation had
            log.info("mixture %s: file size not known (%s); judged by its tensor bytes", name, e)
            short, nbytes = plan, size.total + budget.file_limit - allocated.budget_bytes
        if _fits(budget, size, nbytes):
            if short is not plan:
                log.info("llama.cpp mixture %s fits only with moepack's records short: %d bytes with the full "
                         "ones, %d short, budget %d", name, full, nbytes, budget.file_limit)
            fit.append((name, size, short))
        else:
            log.info("llama.cpp mixture %s: its file would be %d bytes (%d of tensors), over the budget %d", name,
                     nbytes, size.total, budget.file_limit)
    return fit


def shapes_of(view: CheckpointView) -> dict[str, tuple[int, ...]]:
    from moepack.gguf.names import gguf_outputs

    return {t.name: tuple(t.shape) for t in gguf_outputs(view)}


def mixture_plan(view: CheckpointView, table: SensitivityTable, name: str, size: MixtureSize,
                 allocated: QuantPlan) -> QuantPlan:
    """Mixture `name`'s types for every tensor of `view` as a quant plan over `table`'s groups (a group whose
    tensors get different types is "mixed"); its predicted ΔKLD counts the groups whose type is a measured option.
    Budget and placement budgets as the `allocated` plan's."""
    from moepack.stages.mixtures import mixture_types

    tensors = {k: v.name for k, v in mixture_types(view, name).items()}
    groups, dkld = {}, 0.0
    for g in table.groups:
        types = {tensors[t] for t in g.tensors}
        groups[g.name] = types.pop() if len(types) == 1 else "mixed"
        dkld += next((o.dkld for o in g.options if o.type == groups[g.name]), 0.0)
    base = table.base | {"mixture": name}
    if (placed := allocated.base.get("placement")) is not None and size.gpu is not None:
        base["placement"] = placed | {"gpu": placed["gpu"] | {"bytes": size.gpu},
                                      "ram": placed["ram"] | {"bytes": size.total - size.gpu}}
    return QuantPlan(f"mixture {name}", allocated.budget_bytes, size.total, table.fixed_bytes, dkld, groups, tensors,
                     None, None, base)


def snap_to_options(table: SensitivityTable, mixture: dict[str, str],
                    shapes: dict[str, tuple[int, ...]]) -> list[int]:
    """Per group the option of the mixture's type, else the largest option no larger than the mixture's bytes."""
    from moepack.gguf.types import written_bytes

    choice = []
    for g in table.groups:
        types = {mixture[t] for t in g.tensors}
        exact = [i for i, o in enumerate(g.options) if types == {o.type}]
        if exact:
            choice.append(exact[0])
            continue
        nbytes = sum(written_bytes(shapes[t], mixture[t]) for t in g.tensors)
        fit = [i for i, o in enumerate(g.options) if o.bytes <= nbytes]
        choice.append(max(fit, key=lambda i: g.options[i].bytes) if fit else 0)
    return choice


def seeded_plan(view: CheckpointView, table: SensitivityTable, mixture: QuantPlan,
                budget_bytes: int) -> QuantPlan | None:
    """The greedy's plan started from `mixture` snapped to the table's options (None when that start does not fit:
    the mixture's bytes sit in tensors the table keeps fixed)."""
    from moepack.stages.allocate import AllocationError, choice_plan, fit_start, solve_greedy

    start = fit_start(table, snap_to_options(table, mixture.tensors, shapes_of(view)), budget_bytes)
    try:
        choice = solve_greedy(table, budget_bytes, start=start)
    except AllocationError as e:
        log.info("greedy from %s: %s", mixture.solver, e)
        return None
    return choice_plan(table, choice, f"greedy from {mixture.solver}", budget_bytes,
                       base=table.base | {"seeded_from": mixture.base.get("mixture")})


@dataclass(frozen=True)
class Referee:
    """How `challenge` measures: a plan's selection KLD, its per-domain KLDs (None: one domain), and the plan
    allocated on a reweighted table (None: no repair, moepack.pipeline.repair)."""

    measure: Measure
    judge: Judge = field(default=lambda tensors: None)
    replan: Replan | None = None


def _measured_mixtures(view: CheckpointView, table: SensitivityTable, budget: Budget, plan: QuantPlan, kld: float,
                       n: int, measure: Measure, rivalry: Rivalry) -> tuple[dict[str, QuantPlan], dict[str, float]]:
    """The fitting mixtures' plans and selection KLDs, each recorded in `rivalry`."""
    from moepack.gguf.writer import SHORT_RECORD

    mixtures: dict[str, QuantPlan] = {}
    klds: dict[str, float] = {}
    for name, size, mixture in fitting_mixtures(view, table, budget, plan, n):
        mixtures[name] = mixture
        klds[name] = m_kld = measure(mixture.tensors)
        rivalry.mixtures.append({"name": name, "tensor_bytes": size.total, "kld": m_kld}
                                | ({"record": "short"} if mixture.base.get(SHORT_RECORD) else {}))
        log.info("llama.cpp mixture %s: %d tensor bytes, selection KLD %.5f (allocated plan %.5f)",
                 name, size.total, m_kld, kld)
    return mixtures, klds


def challenge(view: CheckpointView, table: SensitivityTable, budget: Budget, plan: QuantPlan, kld: float, n: int,
              ref: Referee) -> tuple[QuantPlan, float, Rivalry]:
    """The plan (of `plan` with selection KLD `kld`, the fitting mixtures, the greedy seeded by the best of them
    when it beats `plan` or `plan` is worse on a domain, and, when `plan` is worse on a domain, the plans
    `ref.replan` allocates with that domain weighed up, moepack.pipeline.repair) with the lowest measured KLD among
    those no worse than the best mixture on any selection domain (`ref.judge`: a plan's per-domain KLDs,
    moepack.pipeline.robust; None or one domain: the lowest), and the record of what was measured."""
    from moepack.pipeline.robust import envelope, robust_choice

    measure, judge = ref.measure, ref.judge
    rivalry = Rivalry(kld)
    mixtures, klds = _measured_mixtures(view, table, budget, plan, kld, n, measure, rivalry)
    top = rivalry.best_mixture
    if top is None:
        return plan, kld, rivalry
    rival = mixtures[str(top["name"])]
    rivalry.mixture_plans = mixtures
    judged = [(name, judge(m.tensors)) for name, m in mixtures.items()]
    baseline, which = envelope(judged) if all(d is not None for _, d in judged) else (None, {})
    options = [(plan, kld, judge(plan.tensors), "allocated")] + [
        (mixtures[name], klds[name], d, f"mixture {name}") for name, d in judged]
    lost = options[0][2].worse_than(baseline) if baseline is not None and options[0][2] is not None else []
    if top["kld"] < kld or lost:
        if budget.gpu_weights is None and (seeded := seeded_plan(view, table, rival, plan.budget_bytes)) is not None:
            rivalry.seeded_kld = measure(seeded.tensors)
            options.append((seeded, rivalry.seeded_kld, judge(seeded.tensors), f"seeded from {top['name']}"))
    if lost and ref.replan is not None and baseline is not None:
        from moepack.pipeline.repair import repair

        repaired, rivalry.repair = repair(table, lost, baseline, ref.replan, measure, judge)
        options += repaired
    i, worse = robust_choice([(o[3], o[1], o[2]) for o in options], baseline)
    rivalry.chosen = options[i][3]
    if baseline is not None:
        rivalry.envelope = baseline
        rivalry.domains = {"best_mixture": baseline.record(), "best_mixture_by_domain": which,
                           "chosen": options[i][2].record(),
                           "worse_on": {options[j][3]: names for j, names in worse.items() if names}}
    if i:
        log.info("plan: %s, selection KLD %.5f (allocated %.5f)", rivalry.chosen, options[i][1], kld)
    return options[i][0], options[i][1], rivalry
