"""Mixed precision under a byte budget: pick one GGML type per tensor group from measured sensitivity.

Pure Python (no torch): reads sensitivity.json, writes quant_plan.json (both moepack.schema contracts).

sensitivity.json (schema version 1)::

    {
      "version": 1,                        # optional; 1 if absent
      "base": {...},                       # free-form, copied into the plan (e.g. base types, model fingerprint);
                                           #   a number under "kld" (KLD of the all-base model) gives predicted_kld
      "fixed_bytes": 123456,               # tensor bytes outside every group (norms, routers, biases at F32)
      "fixed": {"blk.0.attn_norm.weight": "F32", ...},   # optional: types of those tensors, copied into the plan
      "overhead_bytes": 65536,             # optional: GGUF bytes that are not tensor data (--target-size subtracts)
      "groups": [
        {"name": "blk.3.ffn_down_exps",
         "tensors": ["blk.3.ffn_down_exps.weight"],           # GGUF tensor names, each in one group only
         "options": [{"type": "IQ2_XXS", "bytes": 123, "dkld": 0.0},      # first = base (reference): dkld 0
                     {"type": "IQ1_S", "bytes": 93, "dkld": 0.031},       # a downgrade: smaller, dkld > 0
                     {"type": "IQ3_S", "bytes": 200, "dkld": -0.012}, ...]}
      ]
    }

`bytes` is the group's total tensor data at that type (after llama.cpp's fallbacks for odd row widths); `dkld` is
the change of the KL divergence vs the all-base model when only this group is moved to that type (negative =
better). The base is only the reference point of these measurements: options smaller than it are downgrades the
solvers may take as well, and quality need not follow bytes (Q2_K is larger than IQ2_S and can be worse). The model
is additive: the predicted change of a plan is the sum over groups.

quant_plan.json::

    {"version": 1, "solver": "greedy" | "exact", "budget_bytes": N, "predicted_bytes": N (<= budget),
     "fixed_bytes": N, "bucket_bytes": q | null, "predicted_dkld": x, "predicted_kld": x | null,
     "groups": {group: type}, "tensors": {gguf tensor name: type}, "base": {...}}

Solvers (both return plans whose true byte total is within the budget):

- ``greedy`` — the paper's dynamic budgeting with back-off, started from every group at its smallest option:
  repeatedly take the upgrade (from each group's current type to any larger option, not only the next one, so an
  option worse than a smaller one is skipped) with the most KLD saved per extra byte; when it would overshoot the
  budget, back off and take the next best one that fits; stop when nothing fits. Upgrades that save nothing are
  never taken.
- ``exact`` — multiple-choice knapsack by dynamic programming over byte buckets of q bytes above the all-smallest
  size, with every extra cost rounded *up* to whole buckets, so the rounded plan can never exceed the budget.
  q is the gcd of all extra costs (real tensor sizes share large factors) when Σ options × (slack / q + 1)
  fits `max_work` DP cells — then the DP is exact, hence also monotone in the budget; otherwise q is the
  smallest multiple of that gcd which fits (≈ 1 s for 100 groups × 8 types), and each chosen upgrade may waste
  up to q bytes. Bytes lost to rounding are then spent by the greedy, and if the plain greedy is better still
  (possible only when rounding) its plan is returned, so ``exact`` is never worse than ``greedy``.
"""
from __future__ import annotations

import heapq
import logging
import math
from typing import Any
from array import array
from operator import lt

from moepack.errors import MoepackError
from moepack.schema import QuantPlan, SensitivityTable
from moepack.stages.sizes import format_size, parse_size

__all__ = [
    "AllocationError",
    "allocate",
    "choice_plan",
    "choice_of",
    "budget_bytes_for",
    "file_budget",
    "fit_start",
    "solve_greedy",
    "solve_exact",
    "smallest",
    "objective",
    "SOLVERS",
    "MAX_WORK",
]

log = logging.getLogger(__name__)

SOLVERS = ("greedy", "exact")
MAX_WORK = 5_000_000  # DP cells (options × buckets): about a second of pure Python


class AllocationError(MoepackError, ValueError):
    """A malformed sensitivity table or an impossible budget; the message says what to change."""


# ------------------------------------------------------------------------------------------------------- solvers

def smallest(table: SensitivityTable) -> list[int]:
    """Each group's smallest option (the lowest dkld among equal bytes): the plan of table.min_bytes."""
    return [min(range(len(g.options)), key=lambda i: (g.options[i].bytes, g.options[i].dkld)) for g in table.groups]


def _used(table: SensitivityTable, choice: list[int]) -> int:
    return table.fixed_bytes + sum(g.options[c].bytes for g, c in zip(table.groups, choice))


def choice_of(table: SensitivityTable, plan: QuantPlan) -> list[int] | None:
    """The option index of each group's type in `plan` (None when one is not among its options)."""
    choice = []
    for g in table.groups:
        idx = [i for i, o in enumerate(g.options) if o.type == plan.groups.get(g.name)]
        if not idx:
            return None
        choice.append(idx[0])
    return choice


def objective(table: SensitivityTable, choice: list[int]) -> float:
    """Predicted ΔKLD of a choice (one option index per group): the sum of the chosen options' dkld."""
    return math.fsum(g.options[c].dkld for g, c in zip(table.groups, choice))


def _check_feasible(table: SensitivityTable, budget: int) -> None:
    if budget < table.min_bytes:
        raise AllocationError(
            f"budget {format_size(budget)} is below the minimum achievable size {format_size(table.min_bytes)}: every "
            f"group at its smallest type plus {table.fixed_bytes:,} fixed bytes; give a budget of at least "
            f"{table.min_bytes:,} bytes, or use smaller base types / keep fewer experts")


def fit_start(table: SensitivityTable, start: list[int], budget_bytes: int) -> list[int]:
    """`start` stepped down until its tensors fit `budget_bytes` (a llama.cpp mixture snapped to the table's options,
    moepack.pipeline.dominance, can be a few bytes over: the options' bytes are the table's, not the mixture file's):
    the group whose next smaller option loses the least measured KLD per byte saved moves down, one at a time.
    Unchanged when it fits, or when nothing smaller is left."""
    choice = list(start)
    used = _used(table, choice)
    while used > budget_bytes:
        steps = []
        for i, (g, c) in enumerate(zip(table.groups, choice)):
            smaller = [j for j, o in enumerate(g.options) if o.bytes < g.options[c].bytes]
            if smaller:
                j = max(smaller, key=lambda k: g.options[k].bytes)  # the next one down
                saved = g.options[c].bytes - g.options[j].bytes
                steps.append(((g.options[j].dkld - g.options[c].dkld) / saved, i, j, saved))
        if not steps:
            break
        _, i, j, saved = min(steps)
        choice[i], used = j, used - saved
    return choice


def solve_greedy(table: SensitivityTable, budget: int, start: list[int] | None = None) -> list[int]:
    """Dynamic budgeting with back-off (see the module docstring); `start` defaults to all-smallest."""
    _check_feasible(table, budget)
    choice = list(start) if start is not None else smallest(table)
    used = _used(table, choice)
    if used > budget:
        raise AllocationError(f"greedy start uses {used} bytes, over the budget {budget}")
    version = [0] * len(choice)
    heap: list[tuple[float, float, int, int, int]] = []

    def push(g: int) -> None:
        opts = table.groups[g].options
        cur = opts[choice[g]]
        for o, opt in enumerate(opts):
            gain, cost = cur.dkld - opt.dkld, opt.bytes - cur.bytes
            if gain > 0 and cost >= 0:  # upgrades only: the free bytes never grow, so a misfit stays a misfit
                heapq.heappush(heap, (-(gain / cost if cost else math.inf), -gain, g, o, version[g]))

    for g in range(len(choice)):
        push(g)
    while heap:
        _, _, g, o, ver = heapq.heappop(heap)
        if ver != version[g]:
            continue  # the group moved since this upgrade was priced
        cost = table.groups[g].options[o].bytes - table.groups[g].options[choice[g]].bytes
        if used + cost > budget:
            continue  # back off: try the next best upgrade
        choice[g], used, version[g] = o, used + cost, version[g] + 1
        push(g)
    return choice


def _bucket(table: SensitivityTable, budget: int, max_work: int) -> int:
    """Bucket size q: a multiple of the gcd of all extra costs (so q = gcd is exact), no finer than max_work allows
    over the usable slack: Σ options × (slack / q + 1) ≤ max_work."""
    extras = [o.bytes - min(x.bytes for x in g.options) for g in table.groups for o in g.options]
    step = math.gcd(*extras) or 1
    slack = min(budget, table.max_bytes) - table.min_bytes
    cells = max(1, max_work // max(1, len(extras)) - 1)
    return step * max(1, -(-slack // (step * cells)))


def _dp_group(f: list[float], costs: list[int], dklds: list[float]) -> tuple[list[float], array]:
    """One knapsack stage: new[b] = min over options o of f[b − costs[o]] + dklds[o] (costs[m] == 0 for the
    smallest option m).

    Whole-list operations (map, zip) rather than an index loop: about 3× faster in CPython.
    """
    n = len(f)
    m = costs.index(0)
    new = list(map(dklds[m].__add__, f))
    pick = [m] * n
    for o in range(len(costs)):
        c = costs[o]
        if o == m or c >= n:
            continue
        seg = new[c:]
        cand = list(map(dklds[o].__add__, f[: n - c]))  # f[b − c] + d for b = c … n−1
        better = list(map(lt, cand, seg))
        new[c:] = [x if m else y for x, y, m in zip(cand, seg, better)]
        pick[c:] = [o if m else p for p, m in zip(pick[c:], better)]
    return new, array("H", pick)


def solve_exact(table: SensitivityTable, budget: int, max_work: int = MAX_WORK) -> tuple[list[int], int]:
    """(choice, bucket bytes q): the multiple-choice knapsack optimum over costs rounded up to q bytes."""
    _check_feasible(table, budget)
    q = _bucket(table, budget, max_work)
    n = (min(budget, table.max_bytes) - table.min_bytes) // q + 1  # buckets 0 … n−1 of extra bytes
    f = [0.0] * n  # f[b] = best objective of the groups so far with at most b buckets of extra bytes
    picks, costs = [], []
    for g in table.groups:
        low = min(o.bytes for o in g.options)
        c = [-(-(o.bytes - low) // q) for o in g.options]
        f, pick = _dp_group(f, c, [o.dkld for o in g.options])
        picks.append(pick)
        costs.append(c)
    choice, b = [0] * len(table.groups), n - 1
    for i in range(len(table.groups) - 1, -1, -1):
        choice[i] = picks[i][b]
        b -= costs[i][choice[i]]
    return choice, q


def _better(table: SensitivityTable, a: list[int], b: list[int]) -> list[int]:
    ka, kb = (objective(table, a), _used(table, a)), (objective(table, b), _used(table, b))
    return b if kb < ka else a


# ---------------------------------------------------------------------------------------------------------- plan

def allocate(table: SensitivityTable, budget_bytes: int, solver: str = "greedy",
             max_work: int = MAX_WORK) -> QuantPlan:
    """The plan of one type per group with the lowest predicted ΔKLD whose tensor bytes fit `budget_bytes`."""
    if solver not in SOLVERS:
        raise AllocationError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    _check_feasible(table, budget_bytes)
    q = None
    greedy = solve_greedy(table, budget_bytes)
    choice = greedy
    if solver == "exact":
        dp, q = solve_exact(table, budget_bytes, max_work)
        choice = _better(table, solve_greedy(table, budget_bytes, start=dp), greedy)
    plan = choice_plan(table, choice, solver, budget_bytes, bucket_bytes=q)
    assert plan.predicted_bytes <= budget_bytes, (plan.predicted_bytes, budget_bytes)
    log.debug("%s: %s of %s budget, predicted ΔKLD %.5g", solver, format_size(plan.predicted_bytes),
              format_size(budget_bytes), plan.predicted_dkld)
    return plan


def choice_plan(table: SensitivityTable, choice: list[int], solver: str, budget_bytes: int,
                tensors: dict[str, str] | None = None, base: dict[str, Any] | None = None,
                bucket_bytes: int | None = None) -> QuantPlan:
    """The quant plan of one option index per group: its groups' types over `tensors` (default the table's fixed
    tensors), its bytes, and its additive ΔKLD and KLD (the table's base KLD + ΔKLD, when it has one). The one
    place a choice becomes a plan: allocate, the refinement and the mixture-seeded greedy go through it."""
    tensors = dict(table.fixed if tensors is None else tensors)
    for g, c in zip(table.groups, choice):
        tensors.update({t: g.options[c].type for t in g.tensors})
    dkld = objective(table, choice)
    kld = table.base.get("kld")
    kld = float(kld) + dkld if isinstance(kld, (int, float)) and not isinstance(kld, bool) else None
    return QuantPlan(solver, budget_bytes, _used(table, choice), table.fixed_bytes, dkld,
                     {g.name: g.options[c].type for g, c in zip(table.groups, choice)}, tensors, bucket_bytes, kld,
                     table.base if base is None else base)


def budget_bytes_for(table: SensitivityTable, *, target_size: int | str | None = None,
                     budget_bytes: int | str | None = None) -> int:
    """The tensor bytes a plan may use: `budget_bytes` as given, or `file_budget` of a GGUF file of `target_size`;
    exactly one of the two. Sizes as `parse_size` reads them."""
    if (target_size is None) == (budget_bytes is None):
        raise AllocationError("give exactly one of --target-size SIZE or --budget-bytes N")
    if budget_bytes is not None:
        return parse_size(budget_bytes)
    return file_budget(table, parse_size(target_size))


def file_budget(table: SensitivityTable, target: int) -> int:
    """Tensor bytes a plan may use for a GGUF file of at most `target` bytes: the target less the table's
    overhead_bytes (the GGUF's non-tensor bytes)."""
    overhead = table.overhead_bytes
    if overhead is None:
        raise AllocationError("the sensitivity table has no overhead_bytes, so a --target-size cannot be turned into "
                              "a tensor budget; rerun `moepack sensitivity` (it records them), or give "
                              "--budget-bytes (tensor data only)")
    if target - overhead < table.min_bytes:
        raise AllocationError(f"--target-size {format_size(target)} is below the minimum achievable file size "
                              f"{format_size(table.min_bytes + overhead)} ({table.min_bytes:,} bytes of tensors at "
                              f"their base types + {overhead:,} bytes of GGUF metadata)")
    return target - overhead
