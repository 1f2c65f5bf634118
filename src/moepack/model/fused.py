"""Per-expert tensors back into the stacked tensors of architectures whose checkpoints fuse their experts.

The reader splits gpt-oss's / Llama 4's stacked expert tensors per expert (`model.stored.split_fused`); everything
downstream (calibration, pruning, GGUF names) works on the per-expert tensors. A Hugging Face checkpoint of such an
architecture must hold the stacked tensors again, since that is what transformers loads: `stacked_view(view)` is
`view` with each layer's per-expert tensors replaced by its stacked tensors, built lazily, one at a time, in the
layout the checkpoint stored them (the inverse of each `FusedSplit`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointError, CheckpointView, TensorRef
from moepack.model.stored import DTYPE_BYTES, FusedSplit, fused_members, join_fused, unlayout_shape

__all__ = ["StackedView", "stacked_view"]


@dataclass
class StackedView(CheckpointView):
    """A view whose fused expert tensors are stacked again; other tensors are read from `inner`."""

    inner: CheckpointView | None = None
    members: dict[str, tuple[FusedSplit, list[list[str]]]] = dataclasses.field(default_factory=dict)

    def load(self, name: str):  # -> torch.Tensor
        if name not in self.members:
            return self.inner.load(name)
        split, names = self.members[name]
        return join_fused(split, names, self.inner.load)


def _stacked_ref(view: CheckpointView, split: FusedSplit, layer: int, names: list[list[str]]) -> TensorRef:
    first = [view.tensors[n] for n in names[0]]
    shapes = {unlayout_shape(r.shape, ops) for r, (_, ops) in zip(first, split.outputs)}
    if len(shapes) != 1:
        raise CheckpointError(f"{split.template}: the per-expert tensors of layer {layer} do not fit one stacked "
                              f"tensor (slices {sorted(shapes)})")
    shape = (len(names),) + shapes.pop()  # (E, *slice)
    name = split.template.replace("{bid}", str(layer))
    dtype = first[0].dtype
    return TensorRef(name, shape, dtype, None, 0, math.prod(shape) * DTYPE_BYTES[dtype], Role.ROUTED_EXPERTS,
                     name.rsplit(".", 1)[-1], layer)


def stacked_view(view: CheckpointView) -> CheckpointView:
    """`view` with its per-expert tensors stacked as the architecture's checkpoints store them (no data read);
    `view` itself when the architecture keeps one tensor per expert."""
    if not view.spec.fused:
        return view
    tensors: dict[str, TensorRef] = {}
    members: dict[str, tuple[FusedSplit, list[list[str]]]] = {}
    taken: set[str] = set()
    layers = sorted({t.layer for t in view.tensors.values() if t.role is Role.ROUTED_EXPERTS})
    for layer in layers:
        for split in view.spec.fused:
            names = fused_members(split, layer, view.facts.n_experts)
            if not all(n in view.tensors for per in names for n in per):
                continue
            ref = _stacked_ref(view, split, layer, names)
            tensors[ref.name] = ref
            members[ref.name] = (split, names)
            taken.update(n for per in names for n in per)
    left = [n for n, t in view.tensors.items() if t.role is Role.ROUTED_EXPERTS and n not in taken]
    if left:
        raise CheckpointError(f"{view.root}: {len(left)} expert tensor(s) belong to no stacked tensor, e.g. {left[0]}")
    tensors.update({n: t for n, t in view.tensors.items() if n not in taken})
    return StackedView(view.root, view.config, view.spec, view.facts, tensors, inner=view, members=members)

