"""Repairing a plan that loses on one calibration domain, instead of falling back to llama.cpp's mixture.

A plan allocated on the domain-weighted mean ΔKLD can buy a large gain on most domains with a small loss on one;
compress's robust choice (moepack.pipeline.robust) then refuses it, and without a repair the file is the mixture
itself — no worse anywhere, but none of the gain kept. The sensitivity table keeps every option's ΔKLD per domain
(SensitivityTable option `domains`, with base["domains"]["coef"] weighing them into the mean), so the allocation can
be made again with the lost domains weighed more (multiplicative weights, as in group-robust optimisation): each
step multiplies the weight of every domain lost so far by REPAIR_STEPS' factor, allocates (with the same budget and
speed floor: `replan`), measures the plan, and stops at the first that is no worse than the best mixture anywhere.
Every plan tried is an option of the robust choice, which takes the lowest mean among those no worse anywhere.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable

from moepack.schema import QuantPlan, SensitivityTable

if TYPE_CHECKING:
    from moepack.pipeline.robust import DomainKLD

__all__ = ["REPAIR_STEPS", "reweighted", "repair"]

log = logging.getLogger(__name__)

REPAIR_STEPS = (2.0, 4.0, 8.0)  # the lost domains' weight, relative to the others, at each try

Option = tuple[QuantPlan, float, "DomainKLD | None", str]  # plan, its selection KLD, per domain, what it is


def reweighted(table: SensitivityTable, factors: dict[str, float]) -> SensitivityTable | None:
    """`table` with each option's ΔKLD the per-domain ΔKLDs weighed by the table's coefficients times `factors`
    (domain name → factor, 1 where unnamed); None when the table has no per-domain ΔKLDs."""
    info = table.base.get("domains")
    if not info or any(o.domains is None for g in table.groups for o in g.options):
        return None
    coef = [c * factors.get(n, 1.0) for n, c in zip(info["names"], info["coef"])]
    groups = tuple(dataclasses.replace(g, options=tuple(
        dataclasses.replace(o, dkld=sum(c * d for c, d in zip(coef, o.domains or ()))) for o in g.options))
        for g in table.groups)
    return dataclasses.replace(table, groups=groups)


def repair(table: SensitivityTable, lost: list[str], baseline: DomainKLD,
           replan: Callable[[SensitivityTable], QuantPlan | None], measure: Callable[[dict[str, str]], float],
           judge: Callable[[dict[str, str]], DomainKLD | None]) -> tuple[list[Option], list[dict[str, Any]]]:
    """The plans allocated with the domains `lost` (and any lost on the way) weighed up, step by step, until one is
    no worse than `baseline` on any domain: (those plans as options of the robust choice, a record of each try)."""
    options: list[Option] = []
    record: list[dict[str, Any]] = []
    weak = list(lost)
    for step in REPAIR_STEPS:
        factors = {d: step for d in weak}
        table_w = reweighted(table, factors)
        plan = None if table_w is None else replan(table_w)
        if plan is None:
            break
        kld, dom = measure(plan.tensors), judge(plan.tensors)
        worse = [] if dom is None else dom.worse_than(baseline)
        label = f"repaired for {', '.join(weak)} (x{step:g})"
        options.append((plan, kld, dom, label))
        record.append({"factors": factors, "kld": kld, "worse_on": worse})
        log.info("%s: selection KLD %.5f, %s", label, kld,
                 f"still worse on {', '.join(worse)}" if worse else "no worse than the best mixture anywhere")
        if not worse:
            break
        weak += [d for d in worse if d not in weak]
    return options, record
