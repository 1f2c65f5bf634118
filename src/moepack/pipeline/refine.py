"""Interaction refinement of an allocated plan, measured end to end.

The allocator's model is additive: a plan's predicted KLD is the all-base KLD plus each group's ΔKLD, every ΔKLD
measured with that group alone above the base. Quantization errors of different groups do not add exactly (they
compound through the layers, or partly cancel), so the allocated plan is optimal only for that model. Refinement
measures moves of the plan with the same fake-quantized forward on the selection tokens as every other choice, and
keeps the best improving one, pass by pass:

- moves: budget-neutral swaps (one group one option down, another up, the plan still within its budget, each side
  of a GPU + RAM budget on its own) and single upgrades into the bytes left over;
- ranking: each move's additive prediction plus a correction learned from the moves measured so far (per group, the
  mean share of measured minus predicted effect of the measured moves that touched it, signed by the direction it
  moved): where the measured effect of a group differs most from the table, its moves are tried first when it
  measured better and put back when it measured worse;
- a pass measures the `width` best-ranked moves not measured before and accepts the one that lowers the measured
  KLD most; refinement stops at the first pass where none does, or after `passes` passes.

The plan returned is never measured above the plan given.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from moepack.pipeline.options import REFINE_PASSES
from moepack.schema import QuantPlan, SensitivityTable
from moepack.stages.allocate import choice_of, choice_plan

__all__ = ["Move", "Refinement", "REFINE_WIDTH", "byte_sides", "candidate_moves", "refine"]

log = logging.getLogger(__name__)

Measure = Callable[[dict[str, str]], float]  # plan tensors → selection KLD
REFINE_WIDTH = 3  # moves measured end to end per pass


@dataclass(frozen=True)
class Move:
    """New option indices of one or two groups (a swap: the first goes down; an upgrade: one group up)."""
    steps: tuple[tuple[int, int], ...]  # (group index, new option index)


@dataclass
class Refinement:
    """What refinement measured: the allocated plan's predicted (additive) and measured selection KLD, every move
    measured (its predicted and measured change), and the moves accepted."""
    allocated_predicted_kld: float | None
    allocated_kld: float
    kld: float  # measured selection KLD of the plan returned
    passes: int = 0
    tried: list[dict[str, Any]] = field(default_factory=list)  # pass, steps, predicted_delta, measured_delta
    accepted: list[dict[str, Any]] = field(default_factory=list)  # pass, steps, bytes, predicted_kld, measured_kld
    skipped: str | None = None  # why the plan was not refined

    @property
    def gain(self) -> float:
        """Selection KLD refinement removed from the allocated plan (>= 0)."""
        return self.allocated_kld - self.kld

    def to_dict(self) -> dict[str, Any]:
        return {"allocated_predicted_kld": self.allocated_predicted_kld, "allocated_kld": self.allocated_kld,
                "kld": self.kld, "gain": self.gain, "passes": self.passes, "measured": len(self.tried),
                "accepted": self.accepted, "tried": self.tried, "skipped": self.skipped}


# ------------------------------------------------------------------------------------------------------- bytes

Side = tuple[tuple[bool, ...], int]  # (which groups count, the group bytes they may use)


def byte_sides(table: SensitivityTable, plan: QuantPlan) -> list[Side]:
    """The byte limits a plan must keep: its budget less the fixed tensors, or with a GPU + RAM placement each
    side's budget (the fixed tensors on the GPU, as moepack.stages.placement places them)."""
    placed = plan.base.get("placement")
    if placed is None:
        return [(tuple(True for _ in table.groups), plan.budget_bytes - table.fixed_bytes)]
    from moepack.stages.placement import on_gpu

    gpu = tuple(on_gpu(g.tensors[0]) for g in table.groups)
    return [(gpu, placed["gpu"]["budget_bytes"] - table.fixed_bytes),
            (tuple(not x for x in gpu), placed["ram"]["budget_bytes"])]


def _used(table: SensitivityTable, choice: list[int], members: tuple[bool, ...]) -> int:
    return sum(g.options[c].bytes for g, c, m in zip(table.groups, choice, members) if m)


def _order(table: SensitivityTable) -> list[list[int]]:
    """Per group its option indices from the fewest bytes up (ties in table order): "up" and "down" follow it."""
    return [sorted(range(len(g.options)), key=lambda i, g=g: (g.options[i].bytes, i)) for g in table.groups]


# ------------------------------------------------------------------------------------------------------- moves

def candidate_moves(table: SensitivityTable, choice: list[int], sides: list[Side]) -> list[Move]:
    """Every swap (a group one option down, another to any option above its own) and every single upgrade whose
    plan stays within each side's bytes."""
    order = _order(table)
    free = [(m, limit - _used(table, choice, m)) for m, limit in sides]

    def extra(g: int, o: int) -> int:
        return table.groups[g].options[o].bytes - table.groups[g].options[choice[g]].bytes

    def fits(steps: tuple[tuple[int, int], ...]) -> bool:
        return all(sum(extra(g, o) for g, o in steps if m[g]) <= left for m, left in free)

    ups = [(g, o) for g in range(len(choice)) for o in order[g][order[g].index(choice[g]) + 1:]]
    moves = [Move(((g, o),)) for g, o in ups if fits(((g, o),))]
    for a in range(len(choice)):
        pos = order[a].index(choice[a])
        if pos == 0:
            continue
        down = (a, order[a][pos - 1])
        moves += [Move((down, up)) for up in ups if up[0] != a and fits((down, up))]
    return moves


def _predicted(table: SensitivityTable, choice: list[int], move: Move) -> float:
    """The additive model's change of KLD of `move`."""
    return math.fsum(table.groups[g].options[o].dkld - table.groups[g].options[choice[g]].dkld for g, o in move.steps)


class _Corrections:
    """Per group how much more raising it lowers the measured KLD than the table says: the mean share of
    (measured − predicted) change of the measured moves that touched it, signed by the direction it moved (a group
    whose lowering measured worse than predicted is worth more raised), applied to a move by the same sign."""

    def __init__(self, table: SensitivityTable) -> None:
        self.table = table
        self.sum, self.count = [0.0] * len(table.groups), [0] * len(table.groups)

    def _sign(self, choice: list[int], g: int, o: int) -> int:
        opts = self.table.groups[g].options
        return 1 if opts[o].bytes > opts[choice[g]].bytes else -1

    def learn(self, choice: list[int], move: Move, predicted: float, measured: float) -> None:
        share = (measured - predicted) / len(move.steps)
        for g, o in move.steps:
            self.sum[g] += self._sign(choice, g, o) * share
            self.count[g] += 1

    def of(self, choice: list[int], move: Move) -> float:
        return math.fsum(self._sign(choice, g, o) * self.sum[g] / self.count[g] for g, o in move.steps
                         if self.count[g])


def _apply(choice: list[int], move: Move) -> list[int]:
    new = list(choice)
    for g, o in move.steps:
        new[g] = o
    return new


def _steps(table: SensitivityTable, choice: list[int], move: Move) -> list[list[str]]:
    return [[table.groups[g].name, table.groups[g].options[choice[g]].type, table.groups[g].options[o].type]
            for g, o in move.steps]


# -------------------------------------------------------------------------------------------------------- plan

def _additive_kld(table: SensitivityTable, choice: list[int]) -> float | None:
    return choice_plan(table, choice, "", 0).predicted_kld


def _tensors(table: SensitivityTable, plan: QuantPlan, choice: list[int]) -> dict[str, str]:
    """`plan`'s tensor types with the groups at `choice`."""
    return choice_plan(table, choice, "", 0, tensors=plan.tensors).tensors


def _plan(table: SensitivityTable, plan: QuantPlan, choice: list[int], sides: list[Side]) -> QuantPlan:
    """`plan` with the groups at `choice`: its tensors, bytes and additive predictions follow."""
    used = [_used(table, choice, m) for m, _ in sides]
    base = plan.base
    if (placed := base.get("placement")) is not None:
        base = base | {"placement": placed | {"gpu": placed["gpu"] | {"bytes": used[0] + table.fixed_bytes},
                                              "ram": placed["ram"] | {"bytes": used[1]}}}
    new = choice_plan(table, choice, f"{plan.solver} refined", plan.budget_bytes, plan.tensors, base,
                      plan.bucket_bytes)
    assert new.predicted_bytes == table.fixed_bytes + sum(used), (new.predicted_bytes, used)
    return new


# ------------------------------------------------------------------------------------------------------ search

@dataclass
class _Search:
    table: SensitivityTable
    plan: QuantPlan  # the allocated plan: the types of the tensors outside every group
    sides: list[Side]
    measure: Measure
    width: int
    rec: Refinement
    seen: set[tuple[int, ...]] = field(default_factory=set)  # choices measured (or the start)

    def __post_init__(self) -> None:
        self.corr = _Corrections(self.table)

    def step(self, choice: list[int], kld: float) -> tuple[Move, float] | None:
        """Measure the `width` best-ranked unmeasured moves from `choice` (measured at `kld`); the one that lowers
        the measured KLD most, if any does."""
        moves = [m for m in candidate_moves(self.table, choice, self.sides)
                 if tuple(_apply(choice, m)) not in self.seen]
        pred = {m: _predicted(self.table, choice, m) for m in moves}
        moves.sort(key=lambda m: pred[m] + self.corr.of(choice, m))
        best: tuple[Move, float] | None = None
        for m in moves[:self.width]:
            new = _apply(choice, m)
            self.seen.add(tuple(new))
            m_kld = self.measure(_tensors(self.table, self.plan, new))
            self.corr.learn(choice, m, pred[m], m_kld - kld)
            self.rec.tried.append({"pass": self.rec.passes, "steps": _steps(self.table, choice, m),
                                   "predicted_delta": pred[m], "measured_delta": m_kld - kld})
            if m_kld < kld and (best is None or m_kld < best[1]):
                best = (m, m_kld)
        return best


def refine(table: SensitivityTable, plan: QuantPlan, kld: float, measure: Measure, passes: int = REFINE_PASSES,
           width: int = REFINE_WIDTH) -> tuple[QuantPlan, float, Refinement]:
    """(plan, its measured selection KLD, the record) after up to `passes` passes of measured moves from `plan`,
    whose measured KLD is `kld`; `measure` maps a plan's tensors to its selection KLD."""
    choice = choice_of(table, plan)
    rec = Refinement(_additive_kld(table, choice) if choice is not None else plan.predicted_kld, kld, kld)
    if choice is None:
        rec.skipped = "the plan has a type that is not one of the table's options"
        return plan, kld, rec
    search = _Search(table, plan, byte_sides(table, plan), measure, width, rec, {tuple(choice)})
    start = list(choice)
    while rec.passes < passes:
        rec.passes += 1
        found = search.step(choice, rec.kld)
        if found is None:
            break
        move, m_kld = found
        new = _apply(choice, move)
        rec.accepted.append({"pass": rec.passes, "steps": _steps(table, choice, move),
                             "bytes": table.fixed_bytes + sum(_used(table, new, m) for m, _ in search.sides),
                             "predicted_kld": _additive_kld(table, new), "measured_kld": m_kld})
        choice, rec.kld = new, m_kld
        log.info("refine pass %d: %s, selection KLD %.5f", rec.passes,
                 "; ".join(f"{g} {a}->{b}" for g, a, b in rec.accepted[-1]["steps"]), m_kld)
    if choice == start:
        return plan, kld, rec
    return _plan(table, plan, choice, search.sides), rec.kld, rec
