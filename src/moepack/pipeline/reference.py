"""The reference-type policy of `moepack compress`: which reference (base) types a candidate's sensitivity is
measured from, in which sensitivity mode each, and when the second one is affordable (docs/performance.md
"Reference type and ladder"). Byte floors are moepack.stages.fit.uniform_bytes, the one formula."""
from __future__ import annotations

import logging

from moepack.gguf.types import smallest_type
from moepack.model.checkpoint import CheckpointView
from moepack.pipeline.options import CompressOptions
from moepack.schema import SensitivityTable
from moepack.stages.budget import Budget
from moepack.stages.fit import uniform_bytes

__all__ = ["budget_type", "reference_types", "full_estimate_s", "budget_reference_affordable", "reference_mode"]

log = logging.getLogger(__name__)


def budget_type(view: CheckpointView, budget: Budget, ladder: tuple[str, ...]) -> str:
    """The largest ladder type at which every quantizable tensor of `view` fits the budget (each side of a GPU + RAM
    budget): the uniform plan nearest the budget, the smallest type where none fits."""
    fitting = {t: uniform_bytes(view, t) for t in ladder
               if all(uniform_bytes(view, t, side=side) <= limit for side, limit in budget.sides())}
    # the most bytes, not the last in the ladder: llama.cpp's fallbacks for odd row widths can reorder them
    return max(reversed(list(fitting)), key=fitting.__getitem__, default=smallest_type(ladder))


def reference_types(view: CheckpointView, budget: Budget, opts: CompressOptions) -> list[str]:
    """The reference (base) types compress measures ΔKLD from, in the order measured: --base alone when given;
    else the ladder's smallest type with a fast table (one probe per group: the reference fast mode measures best
    from), then the budget's own uniform type with a full table (moves both ways from it stay near the plan, where
    the additive model holds best) where that is affordable: always with --sensitivity full, never with fast, and
    with auto when the smallest type's table, timed, puts the full one under the auto limit
    (`budget_reference_affordable`)."""
    if opts.reference:
        return [opts.reference]
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


def reference_mode(i: int, n: int, first: SensitivityTable | None, opts: CompressOptions) -> str | None:
    """The sensitivity mode of reference i of n (None: not measured): one reference (--base, fast mode, or the
    budget's type is the smallest) as asked; the smallest type fast (as measured best; it times the probes); the
    budget's type full where affordable."""
    if n == 1:
        return opts.sensitivity
    if i == 0:
        return "fast"
    return "full" if first is not None and budget_reference_affordable(first, opts) else None
