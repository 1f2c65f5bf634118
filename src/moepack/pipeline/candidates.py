"""One retention candidate of `moepack compress`, as a value: the pruned model, its plan and what was measured.
A refined or challenged candidate is a new one (`dataclasses.replace`); moepack.pipeline.search makes them."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from moepack.model.checkpoint import CheckpointView
from moepack.pipeline.dominance import Rivalry
from moepack.pipeline.refine import Refinement
from moepack.schema import PrunePlan, QuantPlan
from moepack.stages.merge import MergeOptions

__all__ = ["Candidate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    keep: float
    view: CheckpointView  # the model at this retention (the reference view itself at keep 1.0)
    prune_plan: PrunePlan | None
    plan: QuantPlan | None = None  # None when screened out (or not allocated yet)
    overhead: int = 0  # predicted non-tensor GGUF bytes
    kld: float = float("nan")  # measured after allocation
    prune_kld: float | None = None  # KLD of pruning alone (unquantized), measured when screening
    same_as: float | None = None  # screened: the retention that gives the same pruned model
    infeasible: bool = False  # screened: even the smallest type everywhere does not fit the budget
    rivalry: Rivalry | None = None  # llama.cpp's fitting mixtures measured against the allocated plan
    refinement: Refinement | None = None  # measured moves after allocation, before the mixtures
    criterion: str = "score"  # the pruning criterion and its α (score only)
    alpha: float = 0.5
    criteria: list[dict[str, Any]] | None = None  # --criterion auto: each criterion's (and merging's) pruning KLD
    references: list[dict[str, Any]] | None = None  # each reference type measured: base, sensitivity, selection KLD
    merge: MergeOptions | None = None  # the dropped experts merged into kept ones so (None: discarded)
    # --min-decode-tps or --speed-floor: predicted decode tok/s of the plan before and after it was moved to faster
    # types, and its selection KLD before and after
    speed_limited: dict[str, Any] | None = None

    @property
    def screened(self) -> bool:
        return self.plan is None

    def record(self) -> dict[str, Any]:
        """The candidate as summary.json's `candidates` list holds it."""
        return {"keep": self.keep, "top_k": self.view.facts.top_k, "kld": None if self.screened else self.kld,
                "prune_kld": self.prune_kld, "screened": self.screened, "same_as": self.same_as,
                "infeasible": self.infeasible,
                "tensor_bytes": None if self.plan is None else self.plan.predicted_bytes,
                "mixtures": self.rivalry.to_dict() if self.rivalry else None,
                "refinement": self.refinement.to_dict() if self.refinement else None,
                "criterion": self.criterion, "alpha": self.alpha, "criteria": self.criteria,
                "references": self.references, "merge": self.merge_record} | (
                    {"speed_limited": self.speed_limited} if self.speed_limited else {})

    @property
    def merge_record(self) -> dict[str, Any] | None:
        """The merge options as summary.json records them (None: the dropped experts were discarded)."""
        return None if self.merge is None else dataclasses.asdict(self.merge)
