"""`--criterion auto` (compress's default): which experts to drop, chosen by measurement. Each criterion below
prunes the original model in memory to the retention asked for, its pruning-only KLD (unquantized, vs the
original) is measured on the selection tokens, and the lowest wins; on the fixtures the paper's score with
α = 0.5 rarely does (docs/pruning.md).
"""
from __future__ import annotations

import logging
from typing import Callable

from moepack.model.checkpoint import CheckpointView
from moepack.schema import CalibStats

__all__ = ["AUTO_CRITERIA", "choose_criterion"]

log = logging.getLogger(__name__)

# (criterion, α): the paper's score at three weights of frequency vs mean routing weight, REAP's saliency, frequency
# (α only matters to "score").
AUTO_CRITERIA: tuple[tuple[str, float], ...] = (("score", 0.0), ("score", 0.5), ("score", 1.0), ("reap", 0.5),
                                                ("frequency", 0.5))

PruneKLD = Callable[[CheckpointView], float]  # pruned view → its pruning-only KLD on the selection tokens


def choose_criterion(ref: CheckpointView, stats: CalibStats, keep: float, prune_kld: PruneKLD,
                     top_k: int | None = None) -> tuple[str, float, float, list[dict[str, float | str]]]:
    """(criterion, α, its pruning-only KLD, every candidate measured as {criterion, alpha, prune_kld}); the
    first of AUTO_CRITERIA wins a tie. `top_k` an int pins k' as compress's --top-k does."""
    from moepack.model.pruned import pruned_view
    from moepack.stages.prune import PruneOptions, make_plan

    tried: list[dict[str, float | str]] = []
    for crit, alpha in AUTO_CRITERIA:
        plan = make_plan(ref, stats, PruneOptions(keep=keep, alpha=alpha, criterion=crit, top_k=top_k))
        kld = prune_kld(pruned_view(ref, plan))
        tried.append({"criterion": crit, "alpha": alpha, "prune_kld": kld})
        log.info("keep %g, criterion %s (alpha %g): pruning alone KLD %.5f", keep, crit, alpha, kld)
    best = min(tried, key=lambda t: t["prune_kld"])
    return str(best["criterion"]), float(best["alpha"]), float(best["prune_kld"]), tried
