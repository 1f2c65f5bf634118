"""The model as a prune plan leaves it, as a lazy checkpoint view, and the counts pruning keeps.

`pruned_view(view, plan)` renumbers the kept experts, slices router rows and e_score_correction_bias, drops the
multi-token-prediction layer and updates the config, without reading any data: tensors are read from the original
view when loaded. A plan that merges (`plan.merge`) makes each host expert's tensors the weighted sum of its
members' (computed in float32 when loaded, from decoded values: no stored FP8/MXFP4 bytes are reused for them), each
member's intermediate neurons first permuted to match the host's where the plan aligns (`align_neurons`), and, with
router "mean", the host's router rows the same weighted mean. `kept_count` is the one formula for how many experts a
retention keeps (what prune writes, what compress validates and budgets with).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moepack.model.arch import ArchSpec, Role, beyond_decoder, renumber_expert
from moepack.model.arch import expert_id as expert_id_of
from moepack.model.checkpoint import CheckpointError, CheckpointView, TensorRef
from moepack.schema import PrunePlan
from moepack.schema.prune import MergeGroup

__all__ = ["PrunedView", "Mix", "align_neurons", "pruned_view", "kept_count", "group_limited", "selection_groups",
           "default_top_k", "round_half_up", "mtp_layers", "EXPERT_COUNT_KEYS"]

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


@dataclass(frozen=True)
class Mix:
    """One merged expert tensor: Σ weight · member's tensor, the host first."""

    parts: tuple[tuple[str, float], ...]  # (original tensor, weight)
    axis: int | None = None  # the axis over intermediate neurons, aligned to the host's; None: not aligned
    neurons: tuple[tuple[str, str, str], ...] = ()  # each member's (gate, up, down) matrices, for the alignment


@dataclass
class PrunedView(CheckpointView):
    """A CheckpointView of the pruned model: names, shapes and config as pruned; tensors read lazily from `base`."""

    source: CheckpointView | None = None  # the unpruned checkpoint
    sources: dict[str, tuple[str, tuple[int, ...] | None]] = dataclasses.field(default_factory=dict)
    plan: PrunePlan | None = None  # the plan it was pruned by (its top_k_new may differ from facts.top_k)
    mixes: dict[str, Mix] = dataclasses.field(default_factory=dict)  # merged expert tensors, computed when loaded
    # router tensors whose rows are weighted means (merge router "mean"): name → per kept row ((old row, weight), ...)
    row_mixes: dict[str, tuple[tuple[tuple[int, float], ...], ...]] = dataclasses.field(default_factory=dict)

    def load(self, name: str):  # -> torch.Tensor
        import torch

        if name in self.mixes:
            return self._merged(self.mixes[name])
        src, rows = self.sources[name]
        t = self.source.load(src)
        axis = _expert_axis(self.spec, self.tensors[name].kind)
        if name in self.row_mixes:
            return _mix_rows(t, self.row_mixes[name], axis)
        return t if rows is None else t.index_select(axis, torch.tensor(rows))

    def _merged(self, mix: Mix):  # -> torch.Tensor
        """Σ weight · tensor over the members, in float32 in order, cast back to the host tensor's dtype."""
        import torch

        out, dtype = None, None
        for i, (src, w) in enumerate(mix.parts):
            t = self.source.load(src)
            dtype = dtype or t.dtype
            if i and mix.axis is not None:
                t = t.index_select(mix.axis, torch.from_numpy(self._perm(mix.neurons[0], mix.neurons[i])))
            out = t.float() * w if out is None else out + t.float() * w
        return out.to(dtype)

    def _perm(self, host: tuple[str, str, str], member: tuple[str, str, str]) -> np.ndarray:
        key = (host, member)
        cache = self.__dict__.setdefault("_perms", {})  # one alignment per (host, member), whatever is loaded
        if key not in cache:
            cache[key] = align_neurons(*(self.source.load(n).float().numpy() for n in host + member))
        return cache[key]

    @property
    def merged(self) -> bool:
        """Whether some tensors are merges of several experts (then none is the source's stored bytes)."""
        return bool(self.mixes)

    def fingerprint(self) -> str:
        """The pruned table's fingerprint; a merging plan's merges are part of it (caches keyed by it must not take
        the dropped model's tensors for the merged one's)."""
        fp = super().fingerprint()
        if self.plan is None or self.plan.merge is None:
            return fp
        blob = json.dumps(self.plan.merge.to_dict(), sort_keys=True)
        return hashlib.sha256(f"{fp}|merge|{blob}".encode()).hexdigest()[:16]


def align_neurons(gate_h: np.ndarray, up_h: np.ndarray, down_h: np.ndarray, gate_m: np.ndarray, up_m: np.ndarray,
                  down_m: np.ndarray) -> np.ndarray:
    """The member's intermediate neurons in the host's order, perm (I,): host neuron i is matched with member neuron
    perm[i], greedily by descending similarity of their weights (gate row, up row, down column; gate/up (I, H),
    down (H, I)). Averaging two experts' neurons in arbitrary order mixes unrelated features."""
    vh = np.concatenate([gate_h, up_h, down_h.T], axis=1)  # (I, 3H)
    vm = np.concatenate([gate_m, up_m, down_m.T], axis=1)  # (I, 3H)
    sim = vh @ vm.T  # (I, I)
    n = sim.shape[0]
    rows, cols = np.divmod(np.argsort(-sim, axis=None, kind="stable"), n)  # all pairs, most similar first
    perm = np.full(n, -1, dtype=np.int64)
    used = np.zeros(n, dtype=bool)
    left = n
    for r, c in zip(rows.tolist(), cols.tolist()):
        if perm[r] < 0 and not used[c]:
            perm[r], used[c] = c, True
            left -= 1
            if not left:
                break
    return perm


def _mix_rows(t, rows: tuple[tuple[tuple[int, float], ...], ...], axis: int):  # -> torch.Tensor
    """Router tensor t with `axis` over the E experts → the same with n_kept rows, row j = Σ weight · t[old]."""
    import torch

    m = torch.zeros(len(rows), t.shape[axis], dtype=torch.float32)  # (n_kept, E)
    for j, members in enumerate(rows):
        for old, w in members:
            m[j, old] = w
    x = t.float().movedim(axis, 0)  # (E, ...)
    out = torch.tensordot(m, x, dims=([1], [0]))  # (n_kept, ...)
    return out.movedim(0, axis).to(t.dtype).contiguous()


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


def _merge_groups(plan: PrunePlan, layer: int | None) -> dict[int, MergeGroup]:
    """Host id → its merge group, for one layer of a merging plan (empty for other plans and layers)."""
    if plan.merge is None or layer is None:
        return {}
    return {g.host: g for g in plan.merge.layers.get(str(layer), [])}


def _neuron_axis(spec: ArchSpec, kind: str) -> int | None:
    """The axis over the intermediate neurons of an expert tensor: rows of gate/up (and their biases), columns of
    down; None for the down bias (one per hidden unit)."""
    gate, up, down = spec.expert_projs
    if kind in (gate, up, f"{gate}.bias", f"{up}.bias"):
        return 0
    return 1 if kind == down else None


def _merged_ref(view: CheckpointView, ref: TensorRef, new: TensorRef, g: MergeGroup,
                projs: dict[tuple[int | None, int | None, str], str] | None) -> tuple[TensorRef, Mix]:
    """A host expert's tensor as the weighted sum of its members' (decoded: no stored format); `projs`
    ((layer, expert, kind) → name) when the members' neurons are aligned to the host's."""
    parts = tuple((renumber_expert(ref.name, m), float(w)) for m, w in zip(g.members, g.weights) if w or m == g.host)
    missing = [n for n, _ in parts if n not in view.tensors]
    if missing:
        raise CheckpointError(f"merge of layer {ref.layer} expert {g.host}: {missing[0]} is not in the checkpoint")
    axis = _neuron_axis(view.spec, ref.kind) if projs is not None else None
    if axis is None or projs is None:
        return dataclasses.replace(new, stored=None), Mix(parts)
    neurons = tuple(tuple(projs[(ref.layer, expert_id_of(src), k)] for k in view.spec.expert_projs) for src, _ in parts)
    return dataclasses.replace(new, stored=None), Mix(parts, axis, neurons)


def _expert_index(view: CheckpointView, plan: PrunePlan) -> dict[tuple[int | None, int | None, str], str] | None:
    """(layer, expert, kind) → name of every routed expert tensor, when the plan aligns neurons; else None."""
    if plan.merge is None or not plan.merge.align:
        return None
    return {(t.layer, t.expert, t.kind): n for n, t in view.tensors.items() if t.role is Role.ROUTED_EXPERTS}


def _router_rows(kept: list[int], groups: dict[int, MergeGroup]) -> tuple[tuple[tuple[int, float], ...], ...]:
    return tuple(tuple(zip(groups[h].members, groups[h].weights)) if h in groups else ((h, 1.0),) for h in kept)


def pruned_view(view: CheckpointView, plan: PrunePlan, top_k: int | None = None) -> PrunedView:
    """The pruned model as a lazy view (no data read); `top_k` overrides the plan's k'."""
    k = plan.top_k_new if top_k is None else top_k
    tensors: dict[str, TensorRef] = {}
    sources: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    mixes: dict[str, Mix] = {}
    projs = _expert_index(view, plan)
    row_mixes: dict[str, tuple[tuple[tuple[int, float], ...], ...]] = {}
    for name, ref in view.tensors.items():
        if beyond_decoder(ref.layer, view.facts.n_layers):
            continue
        kept = plan.kept(ref.layer) if ref.layer is not None else None
        got = _pruned_ref(ref, kept, _expert_axis(view.spec, ref.kind))
        if got is None:
            continue
        new, rows = got
        groups = _merge_groups(plan, ref.layer)
        if ref.role is Role.ROUTED_EXPERTS and ref.expert in groups:
            new, mixes[new.name] = _merged_ref(view, ref, new, groups[ref.expert], projs)
        elif ref.role is Role.ROUTER and groups and plan.merge is not None and plan.merge.router == "mean":
            row_mixes[new.name] = _router_rows(kept or [], groups)
        tensors[new.name] = new
        sources[new.name] = (name, rows)
    g = plan.groups
    facts = dataclasses.replace(view.facts, n_experts=plan.n_kept, top_k=k, n_group=g.n_group_new,
                                topk_group=g.topk_group_new)
    return PrunedView(view.root, _pruned_config(view, plan, k), view.spec, facts, tensors,
                      source=view, sources=sources, plan=plan, mixes=mixes, row_mixes=row_mixes)
