"""Expert merging: fold each expert a prune plan drops into the kept expert closest to it, instead of discarding it.

After the criterion has chosen the kept experts of a layer (stages.prune), every dropped expert d is assigned to the
kept expert h most similar to it, within d's routing group where the router is group-limited (DeepSeek-V3 n_group:
a token that could reach d through its group still reaches h). Similarity is

- "output": cosine of the experts' outputs on the same tokens, from the Gram matrix calibration sums over a fixed
  sample of each layer's tokens with every expert applied to every sampled token (calib_hooks; no second forward);
- "weight": cosine of the experts' flattened gate, up and down weights (a fixed sample of their entries).

Each host's tensors become the weighted average of its members' (gate, up, down, and the biases where the family has
them), weights proportional to the members' routed token slots ("frequency") or summed REAP saliency ("saliency").
Before averaging, each member's intermediate neurons are permuted to match the host's (`align`, greedy matching of
their weights, model.pruned.align_neurons): two experts' neurons are in no common order, and averaging them unaligned
mixes unrelated features (on tiny-qwen3-moe at R = 0.75 it doubles the KLD merging adds; docs/pruning.md).
Router: "mean" makes the host's router row (and bias) the same weighted mean of the members' rows, so that tokens
that chose a dropped expert lean towards its host; "host" leaves the host's row as it was. The plan records the
groups (`PrunePlan.merge`); the pruned view computes the merged tensors when they are loaded, in float32 from
decoded values, so GGUF and checkpoint writers write them like any other tensor.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from moepack.errors import MoepackError
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView
from moepack.schema import CalibStats, PrunePlan, RouterStats
from moepack.schema.prune import MergeGroup, PruneMerge

__all__ = ["MergeError", "MergeOptions", "SIMILARITIES", "WEIGHTINGS", "ROUTERS", "output_similarity",
           "weight_similarity", "assign_hosts", "member_weights", "merge_layer", "merge_plan"]

log = logging.getLogger(__name__)

SIMILARITIES = ("output", "weight")
WEIGHTINGS = ("frequency", "saliency")
ROUTERS = ("mean", "host")
_WEIGHT_SAMPLE = 1 << 16  # entries per expert matrix compared by weight similarity (all of a smaller matrix)


class MergeError(MoepackError, ValueError):
    pass


@dataclass(frozen=True)
class MergeOptions:
    """How `prune --merge` merges (see the module docstring)."""

    similarity: str = "output"
    weighting: str = "saliency"  # measured better than frequency on every fixture (docs/pruning.md)
    router: str = "mean"
    align: bool = True  # permute each member's neurons to match the host's before averaging

    def __post_init__(self) -> None:  # validated when made, before anything is read
        self.check()

    def check(self) -> None:
        for flag, value, allowed in (("--merge-similarity", self.similarity, SIMILARITIES),
                                     ("--merge-weighting", self.weighting, WEIGHTINGS),
                                     ("--merge-router", self.router, ROUTERS)):
            if value not in allowed:
                raise MergeError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")


# ---- similarity ------------------------------------------------------------------------------------------------
def _cosine(gram: np.ndarray) -> np.ndarray:
    """Cosine similarity (E, E) from a Gram matrix (E, E); an expert with a zero vector is similar to nothing."""
    norm = np.sqrt(np.clip(np.diag(gram), 0.0, None))  # (E,)
    denom = np.outer(norm, norm)  # (E, E)
    return np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)


def output_similarity(r: RouterStats) -> np.ndarray:
    """Cosine of the experts' outputs on calibration's token sample (E, E)."""
    if r.out_gram is None:
        raise MergeError("the calibration statistics have no expert output Gram (made by an older moepack): rerun "
                         "moepack calibrate, or merge by --merge-similarity weight")
    return _cosine(np.asarray(r.out_gram, dtype=np.float64))


def _expert_names(view: CheckpointView, layer: int) -> dict[int, list[str]]:
    """Expert id → its weight matrices' names in a fixed order (kinds sorted), biases left out."""
    out: dict[int, list[tuple[str, str]]] = {}
    for t in view.tensors.values():
        if t.role is Role.ROUTED_EXPERTS and t.layer == layer and len(t.shape) >= 2 and t.expert is not None:
            out.setdefault(t.expert, []).append((t.kind, t.name))
    return {e: [n for _, n in sorted(v)] for e, v in out.items()}


def weight_similarity(view: CheckpointView, layer: int, seed: int = 0) -> np.ndarray:
    """Cosine (E, E) of the experts' flattened weight matrices, each sampled at the same fixed positions (at most
    _WEIGHT_SAMPLE entries per matrix); experts are read one at a time."""
    names = _expert_names(view, layer)
    rng = np.random.default_rng(seed)
    picks: list[np.ndarray | None] = []
    for n in names[min(names)]:
        numel = view.tensors[n].numel
        picks.append(None if numel <= _WEIGHT_SAMPLE else np.sort(rng.choice(numel, _WEIGHT_SAMPLE, replace=False)))
    n_exp = max(names) + 1
    vecs = []
    for e in range(n_exp):
        parts = [view.load(n).float().reshape(-1).numpy() for n in names[e]]  # flattened (numel,) each
        vecs.append(np.concatenate([p if idx is None else p[idx] for p, idx in zip(parts, picks)]))
    x = np.stack(vecs).astype(np.float64)  # (E, D)
    return _cosine(x @ x.T)


# ---- assignment and weights ------------------------------------------------------------------------------------
def assign_hosts(sim: np.ndarray, kept: list[int], n_group: int = 1) -> dict[int, int]:
    """Dropped expert → the kept expert most similar to it (ties: lower id), within its group of E / n_group
    consecutive experts when `n_group` > 1."""
    e = sim.shape[0]
    size = e // n_group
    hosts: dict[int, int] = {}
    for d in (x for x in range(e) if x not in kept):
        cands = [k for k in kept if k // size == d // size]
        if not cands:
            raise MergeError(f"expert {d}'s group keeps no expert to merge it into")
        hosts[d] = max(cands, key=lambda k: (sim[d, k], -k))
    return hosts


def member_weights(r: RouterStats, members: list[int], weighting: str) -> list[float]:
    """Each member's weight in the merged expert (sum 1): routed slots or summed saliency; the host alone when none
    of them was ever routed."""
    usage = r.counts if weighting == "frequency" else r.saliency_sum
    u = np.asarray([max(float(usage[m]), 0.0) for m in members])
    if u.sum() <= 0:
        return [1.0] + [0.0] * (len(members) - 1)
    return [float(x) for x in u / u.sum()]


def merge_layer(sim: np.ndarray, r: RouterStats, kept: list[int], n_group: int, weighting: str) -> list[MergeGroup]:
    """The merge groups of one layer: the kept experts that receive dropped ones, each with its members' weights."""
    hosts = assign_hosts(sim, kept, n_group)
    groups: list[MergeGroup] = []
    for h in kept:
        members = [h] + sorted(d for d, x in hosts.items() if x == h)
        if len(members) > 1:
            groups.append(MergeGroup(host=h, members=members, weights=member_weights(r, members, weighting)))
    return groups


def merge_plan(view: CheckpointView, stats: CalibStats, plan: PrunePlan, opts: MergeOptions) -> PrunePlan:
    """`plan` with its dropped experts merged into the kept ones (PrunePlan.merge)."""
    opts.check()
    n_group = plan.groups.n_group if plan.groups.mode == "preserve" and plan.groups.n_group else 1
    layers: dict[str, list[MergeGroup]] = {}
    for key, pl in plan.layers.items():
        layer = int(key)
        if not pl.removed:
            continue
        sim = output_similarity(stats.router[layer]) if opts.similarity == "output" else \
            weight_similarity(view, layer)
        layers[key] = merge_layer(sim, stats.router[layer], pl.kept, n_group, opts.weighting)
    merge = PruneMerge(similarity=opts.similarity, weighting=opts.weighting, router=opts.router, align=opts.align,
                       layers=layers)
    note = (f"dropped experts merged into the most {opts.similarity}-similar kept expert of their group, "
            f"{opts.weighting}-weighted{', neurons aligned' if opts.align else ''}; router rows: {opts.router}")
    log.info("merge: %s", note)
    return dataclasses.replace(plan, merge=merge, notes=[*plan.notes, note])
