"""`--criterion auto` (compress's default): which experts to drop, and whether to merge them, chosen by measurement.
Each criterion below prunes the original model in memory to the retention asked for, its pruning-only KLD
(unquantized, vs the original) is measured on the selection tokens, and the lowest wins; on the fixtures the paper's
score with α = 0.5 rarely does (docs/pruning.md). Then the winner is measured once more with its dropped experts
merged into kept ones (stages.merge, default options), and merging is taken where that measures lower. With
`--merge` every criterion is measured merged, and the winner merges.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

from moepack.model.checkpoint import CheckpointView
from moepack.schema import CalibStats
from moepack.stages.merge import MergeOptions

__all__ = ["AUTO_CRITERIA", "Pruning", "auto_merge_options", "choose_criterion", "choose_pruning"]

log = logging.getLogger(__name__)

# (criterion, α): the paper's score at three weights of frequency vs mean routing weight, REAP's saliency, frequency
# (α only matters to "score").
AUTO_CRITERIA: tuple[tuple[str, float], ...] = (("score", 0.0), ("score", 0.5), ("score", 1.0), ("reap", 0.5),
                                                ("frequency", 0.5))

PruneKLD = Callable[[CheckpointView], float]  # pruned view → its pruning-only KLD on the selection tokens


@dataclass(frozen=True)
class Pruning:
    """How one retention is pruned: the criterion, its α and the merge options (None: dropped experts are
    discarded); with --criterion auto also the pruning-only KLD of that choice and every measurement made for it."""

    criterion: str
    alpha: float
    merge: MergeOptions | None = None
    prune_kld: float | None = None
    tried: list[dict[str, Any]] | None = None


def _measure(ref: CheckpointView, stats: CalibStats, keep: float, prune_kld: PruneKLD, top_k: int | None,
             how: tuple[str, float, MergeOptions | None]) -> dict[str, Any]:
    """{criterion, alpha, [merge,] prune_kld} of pruning `ref` to `keep` by `how` (criterion, α, merge)."""
    from moepack.model.pruned import pruned_view
    from moepack.stages.prune import PruneOptions, make_plan

    crit, alpha, merge = how
    plan = make_plan(ref, stats, PruneOptions(keep=keep, alpha=alpha, criterion=crit, top_k=top_k, merge=merge))
    kld = prune_kld(pruned_view(ref, plan))
    log.info("keep %g, criterion %s (alpha %g)%s: pruning alone KLD %.5f", keep, crit, alpha,
             "" if merge is None else ", dropped experts merged", kld)
    rec: dict[str, Any] = {"criterion": crit, "alpha": alpha}
    if merge is not None:
        rec["merge"] = dataclasses.asdict(merge)
    return rec | {"prune_kld": kld}


def choose_criterion(ref: CheckpointView, stats: CalibStats, keep: float, prune_kld: PruneKLD,
                     top_k: int | None = None,
                     merge: MergeOptions | None = None) -> tuple[str, float, float, list[dict[str, Any]]]:
    """(criterion, α, its pruning-only KLD, every candidate measured as {criterion, alpha, [merge,] prune_kld}); the
    first of AUTO_CRITERIA wins a tie. `top_k` an int pins k' as compress's --top-k does; `merge` measures each
    criterion with its dropped experts merged so."""
    tried = [_measure(ref, stats, keep, prune_kld, top_k, (crit, alpha, merge)) for crit, alpha in AUTO_CRITERIA]
    best = min(tried, key=lambda t: t["prune_kld"])
    return str(best["criterion"]), float(best["alpha"]), float(best["prune_kld"]), tried


def auto_merge_options(stats: CalibStats) -> MergeOptions:
    """The merge criterion auto measures: the defaults, or by weight similarity where the statistics predate the
    expert output Gram that output similarity needs."""
    if all(r.out_gram is not None for r in stats.router.values()):
        return MergeOptions()
    log.info("criterion auto: the calibration statistics have no expert output Gram (written by an older moepack); "
             "merging is measured by weight similarity instead (rerun calibration for output similarity)")
    return MergeOptions(similarity="weight")


def choose_pruning(ref: CheckpointView, stats: CalibStats, keep: float, prune_kld: PruneKLD,
                   top_k: int | None = None, merge: MergeOptions | None = None) -> Pruning:
    """The criterion measured best (choose_criterion) and, without `merge` (--merge), whether merging its dropped
    experts measures lower than discarding them: then it merges (the measurement is the last of `tried`)."""
    crit, alpha, kld, tried = choose_criterion(ref, stats, keep, prune_kld, top_k, merge)
    if merge is not None:
        return Pruning(crit, alpha, merge, kld, tried)
    opts = auto_merge_options(stats)
    tried.append(_measure(ref, stats, keep, prune_kld, top_k, (crit, alpha, opts)))
    merged = float(tried[-1]["prune_kld"])
    if merged < kld:
        log.info("keep %g: merging the dropped experts measured lower (%.5f < %.5f): merged", keep, merged, kld)
        return Pruning(crit, alpha, opts, merged, tried)
    log.info("keep %g: merging the dropped experts measured no lower (%.5f >= %.5f): dropped", keep, merged, kld)
    return Pruning(crit, alpha, None, kld, tried)
