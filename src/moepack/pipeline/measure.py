"""The KLDs every choice of `moepack compress` is made on, against the original model (one reference view, one
run's importance matrix): a plan's fake-quantized KLD, and what pruning alone costs. The same KLD
(moepack.model.metrics) throughout, so the numbers compare."""
from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from moepack.model.checkpoint import CheckpointView
from moepack.schema import CalibStats, PrunePlan

if TYPE_CHECKING:
    from moepack.pipeline.robust import DomainKLD
    from moepack.model.runner import KLDReference
    from moepack.stages.sensitivity.measure import PlanKLD

__all__ = ["KLDMeter"]

log = logging.getLogger(__name__)


class KLDMeter:
    """KLDs vs `ref` on the selection tokens (stats.selection) or others given (the report's). Plans measured on one
    view and token set share one PlanKLD (its reference, quantized tensors and unchanged layers' hidden states:
    the same numbers), and a view's PlanKLDs share their quantized tensors across token sets; they live as long as
    the meter. The pruning-only KLD's reference outputs are computed once."""

    def __init__(self, ref: CheckpointView, stats: CalibStats, threads: int) -> None:
        self.ref, self.stats, self.threads = ref, stats, threads
        # id(view) → (the view, held so that its id stays its own; token hash → its PlanKLD)
        self._plans: dict[int, tuple[CheckpointView, dict[str, PlanKLD]]] = {}
        self._prune_ref: KLDReference | None = None
        self._results: dict[tuple[int, str, str], tuple[float, np.ndarray]] = {}  # (view, tokens, plan) → measured

    def plan_kld(self, view: CheckpointView, tensors: dict[str, str], prune_plan: PrunePlan | None,
                 ids: np.ndarray | None = None) -> float:
        """KLD of `view` (pruned by `prune_plan`) with the plan's `tensors` types, fake-quantized with the run's
        imatrix, on `ids` (default the selection tokens)."""
        return self._measured(view, tensors, prune_plan, ids)[0]

    def tied(self, a: tuple[CheckpointView, dict[str, str], PrunePlan | None],
             best: tuple[CheckpointView, dict[str, str], PrunePlan | None]) -> bool:
        """Whether plan `a` is not measurably worse than `best` on the selection tokens: the 95 % CI of their paired
        window differences reaches zero (moepack.pipeline.robust)."""
        from moepack.pipeline.robust import DomainKLD

        ta, tb = (self._measured(v, t, p, None)[1] for v, t, p in (a, best))  # (N, L) each
        one = np.zeros(len(ta), dtype=int)
        gap, half = DomainKLD(("all",), one, ta).paired(DomainKLD(("all",), one, tb))
        return gap - half <= 0

    def domains(self, view: CheckpointView, tensors: dict[str, str], prune_plan: PrunePlan | None,
                report: bool = False) -> DomainKLD | None:
        """The plan's per-domain KLDs on the selection (or `report`) tokens; None when the calibration text had
        one domain. A plan measured before is not measured again."""
        from moepack.pipeline.robust import DomainKLD

        labels = self.stats.report_domain if report else self.stats.selection_domain
        if labels is None or not self.stats.domain_names:
            return None
        ids = self.stats.report if report else None
        return DomainKLD(tuple(self.stats.domain_names), labels, self._measured(view, tensors, prune_plan, ids)[1])

    def _measured(self, view: CheckpointView, tensors: dict[str, str], prune_plan: PrunePlan | None,
                  ids: np.ndarray | None) -> tuple[float, np.ndarray]:
        """(mean, per-token KLD (N, L)), measured once per (view, tokens, plan)."""
        from moepack.stages.sensitivity.measure import PlanKLD

        ids = self.stats.selection if ids is None else ids
        key = hashlib.sha1(np.ascontiguousarray(ids).tobytes()).hexdigest()
        memo = self._plans.setdefault(id(view), (view, {}))[1]
        if key not in memo:
            twin = next(iter(memo.values()), None)  # other tokens: the same tensor bytes
            memo[key] = PlanKLD(view, ids, reference_view=self.ref, imatrix=self.stats, prune_plan=prune_plan,
                                threads=self.threads)
            if twin is not None:
                memo[key].store = twin.store
        plan = (id(view), key, json.dumps(sorted(tensors.items())))
        if plan not in self._results:
            mean, tokens = memo[key].measure(tensors)
            self._results[plan] = (float(mean), tokens)
        mean, tokens = self._results[plan]
        return self._objective(tokens, ids is self.stats.selection, mean), tokens

    def _objective(self, tokens: np.ndarray, selection: bool, mean: float) -> float:
        """The mean KLD choices are made on: on the selection tokens with domain scales, each domain's mean over its
        scale (CalibStats.selection_weights), else `mean` (every token alike)."""
        w = self.stats.selection_weights() if selection else None
        return mean if w is None else float((w * tokens.mean(axis=1)).sum() / len(w))

    def measurers(self, view: CheckpointView) -> int:
        """How many PlanKLDs the meter holds for `view` (one per token set)."""
        return len(self._plans.get(id(view), (view, {}))[1])

    def prune_kld(self, view: CheckpointView) -> float:
        """KLD of the pruned model `view` alone (unquantized) on the selection tokens; the reference outputs are
        computed once, from the first MoE layer on."""
        from moepack.backends import torch_threads
        from moepack.model.runner import KLDReference, LayerRunner, moe_layers

        with torch_threads(self.threads):
            if self._prune_ref is None:
                self._prune_ref = KLDReference(LayerRunner(self.ref), self.stats.selection, min(moe_layers(self.ref)))
            mean = float(self._prune_ref.variant(LayerRunner(view))["kld_mean"])
            return self._objective(self._prune_ref.last_tokens, True, mean)
