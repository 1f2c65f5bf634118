"""The model as a prune plan leaves it, as a lazy checkpoint view, and the counts pruning keeps.

`pruned_view(view, plan)` renumbers the kept experts, slices router rows and e_score_correction_bias, drops the
multi-token-prediction layer and updates the config, without reading any data: tensors are read from the original
view when loaded. `kept_count` is the one formula for how many experts a retention keeps (what prune writes, what
compress validates and budgets with).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from moepack.model.arch import ArchSpec, Role, beyond_decoder, renumber_expert
from moepack.model.checkpoint import CheckpointView, TensorRef
from moepack.schema import PrunePlan

__all__ = ["PrunedView", "pruned_view", "kept_count", "group_limited", "selection_groups", "default_top_k",
           "round_half_up", "mtp_layers", "EXPERT_COUNT_KEYS"]

log = logging.getLogger(__name__)

# Config keys that carry the routed expert count (transformers 5 renames some when it saves).
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def group_limited(view: CheckpointView) -> bool:
    """Whether routing picks groups first (DeepSeek-V3 noaux_tc, DeepSeek-V2 group_limited_greedy)."""
    f = view.facts
    if not f.n_group or f.n_group <= 1:
        return False
    if f.arch == "deepseek_v2":
        # DeepSeek-V2's config.json names its router; transformers' DeepseekV2Config defaults to plain greedy.
        return view.config.get("topk_method", "greedy") == "group_limited_greedy"
    return True


def selection_groups(view: CheckpointView, groups: str = "preserve") -> int:
    """Groups the kept experts are chosen in: the router's groups when they are preserved, else 1 (global)."""
    return view.facts.n_group if group_limited(view) and groups == "preserve" else 1


def kept_count(view: CheckpointView, keep: float, groups: str = "preserve") -> int:
    """Experts every MoE layer keeps at retention `keep`: ⌈keep·E⌉ (at least 1; the product rounded to 9 digits
    first so that 0.7·10 keeps 7), rounded up to a multiple of the group count when groups are preserved (every
    group keeps the same number). Keep 0.8 of 8 experts keeps 7."""
    n_keep = max(1, math.ceil(round(keep * view.facts.n_experts, 9)))
    n_group = selection_groups(view, groups)
    return math.ceil(n_keep / n_group) * n_group


def default_top_k(keep: float, top_k: int) -> int:
    """k' when none is given: max(1, round(R·k)), halves rounded up."""
    return max(1, round_half_up(keep * top_k))


def mtp_layers(view: CheckpointView) -> list[int]:
    """Layers of tensors past the decoder stack (multi-token prediction)."""
    n = view.facts.n_layers
    return sorted({t.layer for t in view.tensors.values() if beyond_decoder(t.layer, n)})


@dataclass
class PrunedView(CheckpointView):
    """A CheckpointView of the pruned model: names, shapes and config as pruned; tensors read lazily from `base`."""

    base: CheckpointView | None = None
    sources: dict[str, tuple[str, tuple[int, ...] | None]] = dataclasses.field(default_factory=dict)
    plan: PrunePlan | None = None  # the plan it was pruned by (its top_k_new may differ from facts.top_k)

    def load(self, name: str):  # -> torch.Tensor
        import torch

        src, rows = self.sources[name]
        t = self.base.load(src)
        return t if rows is None else t.index_select(_expert_axis(self.spec, self.tensors[name].kind),
                                                     torch.tensor(rows))


def _pruned_config(view: CheckpointView, plan: PrunePlan, top_k: int) -> dict[str, Any]:
    cfg = dict(view.config)
    present = [k for k in EXPERT_COUNT_KEYS if k in cfg] or [view.spec.n_experts_key]
    for k in present:
        cfg[k] = plan.n_kept
    cfg[view.spec.top_k_key] = top_k
    if cfg.get("num_nextn_predict_layers") and mtp_layers(view):
        cfg["num_nextn_predict_layers"] = 0  # their tensors are not written (see pruned_view)
    g = plan.groups
    if view.spec.group_keys and g.n_group:
        cfg[view.spec.group_keys[0]], cfg[view.spec.group_keys[1]] = g.n_group_new, g.topk_group_new
    return cfg


def _expert_axis(spec: ArchSpec, kind: str) -> int:
    """The axis of a router tensor that runs over experts: the first unless the spec says (ERNIE's (1, E) bias)."""
    return spec.extra.get("expert_axis", {}).get(kind, 0)


def _pruned_ref(ref: TensorRef, kept: list[int] | None,
                axis: int = 0) -> tuple[TensorRef, tuple[int, ...] | None] | None:
    if kept is None:
        return ref, None
    if ref.role is Role.ROUTED_EXPERTS:
        if ref.expert not in kept:
            return None
        new = kept.index(ref.expert)
        return dataclasses.replace(ref, name=renumber_expert(ref.name, new), expert=new), None
    if ref.role is Role.ROUTER:
        shape = list(ref.shape)  # (E, H) router, (E,) bias; ERNIE's bias (1, E) with axis -1
        shape[axis] = len(kept)
        nbytes = ref.nbytes // ref.shape[axis] * len(kept)
        return dataclasses.replace(ref, shape=tuple(shape), nbytes=nbytes), tuple(kept)
    return ref, None


def pruned_view(view: CheckpointView, plan: PrunePlan, top_k: int | None = None) -> PrunedView:
    """The pruned model as a lazy view (no data read); `top_k` overrides the plan's k'."""
    k = plan.top_k_new if top_k is None else top_k
    tensors: dict[str, TensorRef] = {}
    sources: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for name, ref in view.tensors.items():
        if beyond_decoder(ref.layer, view.facts.n_layers):
            continue
        got = _pruned_ref(ref, plan.kept(ref.layer) if ref.layer is not None else None,
                          _expert_axis(view.spec, ref.kind))
        if got is None:
            continue
        new, rows = got
        tensors[new.name] = new
        sources[new.name] = (name, rows)
    g = plan.groups
    facts = dataclasses.replace(view.facts, n_experts=plan.n_kept, top_k=k, n_group=g.n_group_new,
                                topk_group=g.topk_group_new)
    return PrunedView(view.root, _pruned_config(view, plan, k), view.spec, facts, tensors,
                      base=view, sources=sources, plan=plan)
