"""prune_plan.json ("moepack.prune_plan/1"): the experts kept per MoE layer, k', groups, how they were chosen, and
(`merge`, only in plans that merge) which dropped experts were folded into which kept one, with what weights."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from moepack.atomic import save_json
from moepack.schema.base import PRUNE_PLAN_FORMAT, SchemaError, read_json

__all__ = ["PruneGroups", "PruneLayer", "TopKRow", "MergeGroup", "PruneMerge", "PrunePlan"]

log = logging.getLogger(__name__)


def _plain(cls: type, d: Any, where: str) -> Any:
    """A flat dataclass from its dict, naming the first missing key."""
    try:
        return cls(**{f.name: d[f.name] for f in fields(cls)})
    except (KeyError, TypeError) as e:
        raise SchemaError(f"{where}: the prune plan lacks {e}; rerun moepack prune") from None


@dataclass(frozen=True)
class PruneGroups:
    mode: str  # "preserve" | "collapse" | "none"
    n_group: int | None
    topk_group: int | None
    kept_per_group: int
    n_group_new: int | None
    topk_group_new: int | None


@dataclass(frozen=True)
class PruneLayer:
    kept: list[int]  # kept expert ids, ascending; new id = position
    removed: list[int]
    scores: list[float]  # importance of every original expert


@dataclass(frozen=True)
class TopKRow:
    """One measured k' of `--top-k auto`."""

    top_k: int
    kld_mean: float
    kld_p99: float
    top1_agree: float
    ppl: float
    active_bytes: int


@dataclass(frozen=True)
class MergeGroup:
    """One kept expert and the dropped experts folded into it (original ids)."""

    host: int
    members: list[int]  # the host first, then the dropped experts merged into it
    weights: list[float]  # each member's weight in the merged tensors (sum 1)


@dataclass(frozen=True)
class PruneMerge:
    """How dropped experts were merged (stages.merge): per MoE layer, the kept experts that received any."""

    similarity: str  # "output" | "weight": what "closest kept expert" was measured by
    weighting: str  # "frequency" | "saliency": what each member's weight in the average is proportional to
    router: str  # "mean": the host's router row is the members' weighted mean; "host": left as it was
    align: bool  # each member's intermediate neurons permuted to match the host's before averaging
    layers: dict[str, list[MergeGroup]]

    def to_dict(self) -> dict[str, Any]:
        return {"similarity": self.similarity, "weighting": self.weighting, "router": self.router,
                "align": self.align, "layers": {k: [dict(g.__dict__) for g in v] for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PruneMerge:
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: the prune plan's merge record is not an object; rerun moepack prune")
        layers = {k: [_plain(MergeGroup, g, where) for g in v] for k, v in (d.get("layers") or {}).items()}
        return _plain(cls, {**d, "layers": layers}, where)


@dataclass(frozen=True)
class PrunePlan:
    """prune_plan.json: the experts kept per MoE layer, k', groups, and how they were chosen."""

    model: str
    model_fingerprint: str
    calib: str | None
    calib_fingerprint: str
    criterion: str
    alpha: float
    keep: float
    seed: int
    normalisation: str
    n_experts: int
    n_kept: int
    top_k: int
    top_k_new: int
    top_k_policy: str
    groups: PruneGroups
    notes: list[str]
    layers: dict[str, PruneLayer]
    top_k_table: list[TopKRow] = field(default_factory=list)
    options: dict[str, Any] | None = None  # the stage's PruneOptions (set by run_prune)
    calib_dir: str | None = None
    active_bytes_per_token: dict[str, int] | None = None
    merge: PruneMerge | None = None  # None: dropped experts are discarded (absent from the JSON then)

    def kept(self, layer: int | str) -> list[int] | None:
        """Kept expert ids of a MoE layer; None for a layer without routed experts."""
        got = self.layers.get(str(layer))
        return got.kept if got is not None else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PRUNE_PLAN_FORMAT}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("options", "calib_dir", "active_bytes_per_token", "merge") and v is None:
                continue
            if f.name == "merge":
                v = v.to_dict()
            elif f.name == "groups":
                v = dict(v.__dict__)
            elif f.name == "layers":
                v = {k: dict(x.__dict__) for k, x in v.items()}
            elif f.name == "top_k_table":
                v = [dict(r.__dict__) for r in v]
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Any, where: Path | str = "prune plan") -> PrunePlan:
        if not isinstance(d, dict) or d.get("format") != PRUNE_PLAN_FORMAT:
            got = d.get("format") if isinstance(d, dict) else None
            raise SchemaError(f"{where}: not a moepack prune plan (format {got!r}, expected {PRUNE_PLAN_FORMAT!r}); "
                              "rerun moepack prune")
        nested = {"groups": _plain(PruneGroups, d.get("groups", {}), str(where)),
                  "layers": {k: _plain(PruneLayer, v, str(where)) for k, v in (d.get("layers") or {}).items()},
                  "top_k_table": [_plain(TopKRow, r, str(where)) for r in d.get("top_k_table") or []],
                  "merge": PruneMerge.from_dict(d["merge"], str(where)) if d.get("merge") is not None else None}
        flat = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in nested}
        return _plain(cls, {**flat, **nested, **{k: d.get(k) for k in ("options", "calib_dir",
                                                                      "active_bytes_per_token")}}, str(where))

    @classmethod
    def beside(cls, model_dir: str | Path) -> PrunePlan | None:
        """The plan a pruned checkpoint was written by (prune_plan.json in its directory), or None."""
        path = Path(model_dir) / "prune_plan.json"
        return cls.read(path) if path.is_file() else None

    @classmethod
    def read(cls, path: str | Path) -> PrunePlan:
        return cls.from_dict(read_json(Path(path), "prune plan"), path)

    def write(self, path: str | Path) -> Path:
        return save_json(self.to_dict(), path)

    def with_top_k(self, top_k: int, table: list[TopKRow]) -> PrunePlan:
        return replace(self, top_k_new=top_k, top_k_table=list(table))
