"""Tensor groups of the sensitivity stage and the type options of each.

Groups are one GGUF tensor class in one layer ("blk.3.ffn_down_exps", "blk.0.attn_kv_b" = attn_k_b + attn_v_b),
plus token_embd and output; each option's bytes are the GGUF bytes of the group's tensors at that type after
llama.cpp's row-width fallbacks, as the writer resolves them (an option that falls back to the types written for
an earlier one is dropped). Options are the base (the reference of the ΔKLD measurements) and every other ladder
type the group can be written at, smaller ones included: the allocator may move a group down from the base as well
as up. Groups whose source is MXFP4 (gpt-oss's experts) also get MXFP4: the release's own bytes, kept losslessly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from gguf import GGMLQuantizationType

from moepack.errors import MoepackError
from moepack.gguf import mxfp4
from moepack.gguf.imatrix import importance_rows
from moepack.gguf.kernels import requires_imatrix
from moepack.gguf.names import gguf_group_name, gguf_outputs
from moepack.gguf.types import DEFAULT_REFERENCE, LADDER, bits_per_weight, parse_type, smallest_type
from moepack.gguf.tensors import OutTensor, TypedTensor
from moepack.gguf.writer import resolve_types
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView

__all__ = ["SensitivityError", "GroupOption", "GroupSpec", "default_reference", "parse_reference", "plan_groups"]

log = logging.getLogger(__name__)


class SensitivityError(MoepackError, ValueError):
    """Sensitivity cannot be measured as asked; the message says what to change."""


@dataclass(frozen=True)
class GroupOption:
    type: str  # the requested (ladder) type; the plan names it and the writer applies the same fallbacks
    typed: tuple[TypedTensor, ...]  # one per GGUF tensor of the group, as the writer resolves it

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.typed)

    @property
    def written(self) -> tuple[GGMLQuantizationType, ...]:
        return tuple(t.qtype for t in self.typed)


@dataclass(frozen=True)
class GroupSpec:
    name: str  # "blk.3.ffn_down_exps", "token_embd"
    cls: str  # gguf_group_name: "ffn_down_exps"
    role: Role
    layer: int | None
    outs: tuple[OutTensor, ...]
    options: tuple[GroupOption, ...]  # options[0] is the base; the others in order of bytes, below it and above

    @property
    def sources(self) -> frozenset[str]:
        return frozenset(s for o in self.outs for s in o.sources)


def parse_reference(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """"routed_experts=IQ2_XXS,attention=Q4_K" (or "Q4_K" for every group) → {key: type name}."""
    if spec is None:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else (
        (kv.split("=", 1) if "=" in kv else ("default", kv)) for kv in str(spec).split(",") if kv.strip())
    return {k.strip(): parse_type(v).name for k, v in items}


def default_reference(ladder: Iterable[str]) -> str:
    """The base of groups that --base does not name: the ladder's smallest type (DEFAULT_REFERENCE for the default
    ladder)."""
    ladder = list(ladder)
    return smallest_type(ladder) if ladder else DEFAULT_REFERENCE


def _reference_for(base: Mapping[str, str], g_name: str, cls: str, role: Role, default: str) -> str:
    for key in (g_name, cls, role.value, "default", "*"):
        if key in base:
            return base[key]
    return default


def _typed(o: OutTensor, qtype: str, imatrix: Mapping[str, np.ndarray] | None) -> TypedTensor | None:
    """The writer's resolution of `o` at `qtype`; None where llama.cpp cannot write it (no fallback, no imatrix)."""
    try:
        t = resolve_types([o], qtype)[0]
    except MoepackError:
        return None
    if t.qtype != GGMLQuantizationType.F32 and requires_imatrix(t.qtype) and importance_rows(t, imatrix) is None:
        return None
    return t


def _candidates(base: str, ladder: list[str]) -> list[str]:
    """The base, then every other ladder type (downgrades and upgrades) in order of bits per weight."""
    return [base] + sorted((t for t in ladder if t != base), key=bits_per_weight)


def _source_types(view: CheckpointView, outs: list[OutTensor], ladder: list[str]) -> list[str]:
    """Types the source already holds these tensors in, lossless to keep: MXFP4 for gpt-oss's MXFP4 experts."""
    keep = "MXFP4" not in ladder and all(mxfp4.is_source(view, o) for o in outs)
    return ["MXFP4"] if keep else []


def _options(name: str, outs: list[OutTensor], cands: list[str],
             imatrix: Mapping[str, np.ndarray] | None) -> list[GroupOption]:
    opts: list[GroupOption] = []
    seen: set[tuple[GGMLQuantizationType, ...]] = set()
    for t in cands:
        typed = [_typed(o, t, imatrix) for o in outs]
        if any(x is None for x in typed):
            log.debug("%s: %s cannot be written (row width or importance matrix); skipped", name, t)
            continue
        opt = GroupOption(t, tuple(typed))  # type: ignore[arg-type]
        if opt.written in seen:
            continue  # the same written types as the base or a smaller option, after fallbacks
        seen.add(opt.written)
        opts.append(opt)
    if not opts:
        raise SensitivityError(f"group {name} can be written at none of {', '.join(cands)} (row width "
                               f"{outs[0].n_per_row}); add a type that suits it to the ladder or --base")
    if opts[0].type != cands[0]:
        log.debug("%s: base %s cannot be written here; its base is %s", name, cands[0], opts[0].type)
    return [opts[0], *sorted(opts[1:], key=lambda o: o.bytes)]  # fallbacks can reorder the bytes


def plan_groups(view: CheckpointView, base: Mapping[str, str] | None = None, ladder: Iterable[str] = LADDER,
                imatrix: Mapping[str, np.ndarray] | None = None) -> tuple[list[GroupSpec], list[OutTensor]]:
    """(groups with their options, fixed F32 tensors) of the GGUF that `view` becomes."""
    base = parse_reference(base)
    ladder = [parse_type(t).name for t in ladder]
    by_name: dict[str, list[OutTensor]] = {}
    fixed: list[OutTensor] = []
    for o in gguf_outputs(view):
        if not o.quantizable:
            fixed.append(o)
            continue
        cls = gguf_group_name(view, o.sources[0])
        by_name.setdefault(cls if o.layer is None else f"blk.{o.layer}.{cls}", []).append(o)
    groups: list[GroupSpec] = []
    moved: dict[tuple[str, str], list[str]] = {}
    for name, outs in by_name.items():
        cls = name.rsplit(".", 1)[-1]
        cands = _candidates(_reference_for(base, name, cls, outs[0].role, default_reference(ladder)),
                            ladder + _source_types(view, outs, ladder))
        groups.append(GroupSpec(name, cls, outs[0].role, outs[0].layer, tuple(outs),
                                tuple(_options(name, outs, cands, imatrix))))
        if groups[-1].options[0].type != cands[0]:
            moved.setdefault((cands[0], groups[-1].options[0].type), []).append(name)
    for (asked, got), names in moved.items():  # one line per change, not one per group (DeepSeek-V3 has ~500)
        log.info("%d group(s) cannot be written at base %s (row width, or no importance matrix yet), so their base "
                 "is %s, e.g. %s", len(names), asked, got, names[0])
    known = {g.name for g in groups} | {g.cls for g in groups} | {g.role.value for g in groups} | {"default", "*"}
    if unknown := sorted(set(base) - known):
        raise SensitivityError(f"--base names {', '.join(unknown)}, which this model has no group of; use roles "
                               f"({', '.join(sorted({g.role.value for g in groups}))}), tensor classes (e.g. "
                               f"{groups[0].cls}) or group names")
    return groups, fixed
