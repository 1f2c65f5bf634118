"""Every budget check of `moepack compress`, in one place: before any work (the smallest retention with every
tensor at the ladder's smallest type), per candidate (the same floor at its retention), at allocation (the bytes
the table's metadata leaves for tensors) and after writing (the file on disk). The floors are
moepack.stages.fit.uniform_bytes, the formula `moepack inspect` uses too."""
from __future__ import annotations

import logging
from pathlib import Path

from moepack.gguf.types import smallest_type
from moepack.model.checkpoint import CheckpointView
from moepack.pipeline.options import KEEP_AUTO_CANDIDATES, CompressError, CompressOptions
from moepack.schema import QuantPlan, SensitivityTable
from moepack.stages.budget import Budget, BudgetError, format_size
from moepack.stages.fit import uniform_bytes

__all__ = ["check_floor", "check_feasible", "allocate_within", "reserve", "check_file", "nothing_fits"]

log = logging.getLogger(__name__)


def check_floor(view: CheckpointView, budget: Budget, ladder: tuple[str, ...], keep: float = 1.0,
                named: float | None = None) -> None:
    """BudgetError unless `view` at retention `keep` with every tensor at the ladder's smallest type fits `budget`
    (each of a GPU + RAM pair); the message says what would, naming the retention `named` (default `keep`; an
    already pruned view is checked at keep 1.0 of its experts but was asked for as its own retention)."""
    from moepack.stages.budget import check_floors

    smallest = smallest_type(ladder)
    what = f"--keep {keep if named is None else named:g} with every tensor at {smallest}"
    if budget.gpu_weights is not None:
        check_floors(budget, uniform_bytes(view, smallest, keep, "gpu"), uniform_bytes(view, smallest, keep, "ram"),
                     what)
    elif (floor := uniform_bytes(view, smallest, keep)) > budget.weights:
        raise BudgetError(
            f"the budget leaves {format_size(budget.weights)} for weights, but the smallest achievable model "
            f"({what}) needs about {format_size(floor)} (file about {format_size(floor + budget.overhead)}); give "
            "more memory or a larger target, or a lower --keep")


def check_feasible(view: CheckpointView, budget: Budget, opts: CompressOptions) -> None:
    """CompressError before any work when even the smallest type everywhere, at the smallest retention asked for,
    cannot fit."""
    smallest = min(KEEP_AUTO_CANDIDATES) if opts.keep == "auto" else float(opts.keep)
    try:
        check_floor(view, budget, opts.ladder, smallest)
    except BudgetError as e:
        raise CompressError(str(e)) from None


def allocate_within(table: SensitivityTable, budget: Budget, solver: str) -> tuple[QuantPlan, int]:
    """The allocated plan of `table` within the budget, and the non-tensor GGUF bytes it assumed (AllocationError,
    from moepack.stages.allocate, when the table's smallest plan is over the bytes left for tensors)."""
    from moepack.stages.allocate import allocate

    # No overhead_bytes: the checkpoint could not be written as GGUF when it was measured (sensitivity warned).
    # The budget's own estimate errs large, and compress checks the written file against the budget.
    overhead = reserve(table, budget) if table.overhead_bytes is not None else budget.overhead
    weights = budget.file_limit - overhead
    if budget.gpu_weights is not None:
        from moepack.stages.placement import allocate_placed

        return allocate_placed(table, budget.gpu_weights, weights - budget.gpu_weights, solver), overhead
    return allocate(table, weights, solver), overhead


def reserve(table: SensitivityTable, budget: Budget) -> int:
    """The non-tensor GGUF bytes compress reserves for a plan of `table`: the table's bound (overhead_bytes, the
    recipe at its RECIPE_MAX_BYTES allowance) with the recipe at the most compress's own can take instead (its
    types, this budget's record and the longest solver name; moepack.pipeline.recipe.compress_recipe), plus GPU
    placement's note for a GPU + RAM budget and the header's alignment, which the smaller recipe can move."""
    from moepack.gguf.recipe import RECIPE_MAX_BYTES, recipe_bound
    from moepack.gguf.writer import ALIGNMENT
    from moepack.pipeline.recipe import budget_record
    from moepack.stages.sensitivity.table import SOLVER_WIDTH, placement_bytes

    assert table.overhead_bytes is not None
    types = {t: {(o.written or {}).get(t, o.type) for o in g.options} for g in table.groups for t in g.tensors}
    given = {"budget": budget_record(budget), "solver": "x" * SOLVER_WIDTH}
    placed = placement_bytes() if budget.gpu_weights is not None else 0
    return table.overhead_bytes - RECIPE_MAX_BYTES + recipe_bound(types, given) + placed + ALIGNMENT - 1


def check_file(out: Path, budget: Budget) -> None:
    """CompressError when the GGUF written is over the budget's file limit."""
    size = out.stat().st_size
    if size > budget.file_limit:
        raise CompressError(f"{out} is {format_size(size)}, over the budget {format_size(budget.file_limit)}")


def nothing_fits(keeps: list[float], budget: Budget, ladder: tuple[str, ...]) -> CompressError:
    """The error when no retention tried fits the budget (each one screened as infeasible)."""
    return CompressError(f"no retention of {', '.join(f'{k:g}' for k in keeps)} fits the budget "
                         f"{format_size(budget.file_limit)} even at {smallest_type(ladder)} everywhere; give a larger "
                         "budget or a lower --keep")
