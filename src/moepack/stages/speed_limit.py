"""Allocation under a decode-speed limit (`--min-decode-tps`, `--speed-floor`): each group's predicted decode seconds
at each of its options (moepack.stages.speed), and the allocation within the byte budget that meets the limit with
the least predicted ΔKLD (Lagrangian relaxation of the time limit)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView
    from moepack.schema import QuantPlan, SensitivityTable
    from moepack.stages.speed import KernelClock, Work

__all__ = ["group_seconds", "speed_choice", "limited_plan"]


def group_seconds(table: SensitivityTable, work: list[Work], clock: KernelClock) -> tuple[list[list[float]], float]:
    """Decode seconds per token of each group at each of its options, and of the tensors outside every group (as
    `work` has them)."""
    from moepack.gguf.types import fallback_type

    by_name = {m.name: m for m in work}
    grouped = {t for g in table.groups for t in g.tensors}

    seconds = [[sum(by_name[t].decode_seconds(clock, fallback_type(o.type, by_name[t].n).name)
                    for t in g.tensors if t in by_name) for o in g.options] for g in table.groups]
    fixed = sum(m.decode_seconds(clock) for m in work if m.name not in grouped)
    return seconds, fixed


def speed_choice(table: SensitivityTable, budget_bytes: int, seconds: list[list[float]], fixed_s: float,
                 limit_s: float, solver: str = "greedy") -> tuple[list[int], float]:
    """The allocation within `budget_bytes` whose predicted decode seconds per token are at most `limit_s`, with the
    least predicted ΔKLD the allocator finds: the budget allocated on ΔKLD + λ · seconds (Lagrangian relaxation of
    the time limit), λ the smallest that meets it (a bisection on log λ). Returns the choice and its seconds: above
    `limit_s` when even the largest λ cannot meet it (then the fastest plan found)."""
    from moepack.stages.allocate import allocate, choice_of

    def solve(lam: float) -> tuple[list[int], float]:
        penalized = dataclasses.replace(table, groups=tuple(
            dataclasses.replace(g, options=tuple(dataclasses.replace(o, dkld=o.dkld + lam * t)
                                                 for o, t in zip(g.options, ts)))
            for g, ts in zip(table.groups, seconds)))
        choice = choice_of(penalized, allocate(penalized, budget_bytes, solver))
        assert choice is not None
        return choice, fixed_s + sum(ts[c] for ts, c in zip(seconds, choice))

    best = solve(0.0)
    if best[1] <= limit_s:
        return best
    lo, hi = -12.0, 12.0  # log10 λ: ΔKLD in nats against seconds per token
    fast = solve(10.0 ** hi)
    if fast[1] > limit_s:
        return fast
    for _ in range(30):
        mid = (lo + hi) / 2
        found = solve(10.0 ** mid)
        if found[1] <= limit_s:
            hi, fast = mid, found
        else:
            lo = mid
        if hi - lo < 0.05:
            break
    return fast


def limited_plan(table: SensitivityTable, plan: QuantPlan, view: CheckpointView, clock: KernelClock, limit: float,
                 solver: str = "greedy") -> tuple[QuantPlan, float, float]:
    """(`plan` allocated again on `table` within its budget with its predicted decode at least `limit` tokens/s,
    its predicted tokens/s before, after): `plan` itself when it meets the limit already; after < limit when no
    plan can (then the fastest the allocator found)."""
    from moepack.stages.allocate import choice_plan
    from moepack.stages.speed import decode_tps, matmuls

    work = matmuls(view, plan.tensors)
    before = decode_tps(work, clock)
    if before >= limit:
        return plan, before, before
    seconds, fixed = group_seconds(table, work, clock)
    choice, total = speed_choice(table, plan.budget_bytes, seconds, fixed, 1.0 / limit, solver)
    fast = choice_plan(table, choice, f"{plan.solver}, speed-limited", plan.budget_bytes, plan.tensors, plan.base)
    return fast, before, 1.0 / total
