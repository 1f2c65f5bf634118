"""The sensitivity table's numbers besides the probes: the proxy ΔKLD of each upgrade and its rank agreement with
the measured KLD, the GGUF overhead a plan from this table will have, and the table's groups.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np

from moepack.errors import MoepackError
from moepack.gguf.kernels import requires_imatrix
from moepack.gguf.metadata import moepack_value
from moepack.gguf.names import gguf_outputs
from moepack.gguf.tensors import OutTensor
from moepack.gguf.runtime import EXPERTS_ON_CPU
from moepack.gguf.types import QUANT_TYPES, block_size, parse_type
from moepack.gguf.writer import ALIGNMENT, overhead_bytes, plan_record, resolve_types
from moepack.model.checkpoint import CheckpointView
from moepack.schema import Group, Option, PrunePlan, QuantPlan
from moepack.stages.mixtures import MIXTURES
from moepack.stages.sensitivity.fakequant import QuantStore
from moepack.stages.sensitivity.groups import GroupSpec

__all__ = ["spearman", "agreement", "overhead", "table_groups", "proxies", "placement_bytes", "SOLVER_WIDTH"]

log = logging.getLogger(__name__)

# The longest solver a plan of a table can name: allocate's, refined, or the greedy seeded from a llama.cpp mixture.
SOLVER_WIDTH = len(f"greedy from mixture {max(MIXTURES, key=len)} refined")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0 with ties averaged."""
    _, inv, cnt = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(cnt)
    return ((ends - cnt + ends - 1) / 2.0)[inv]


def spearman(a: Iterable[float], b: Iterable[float]) -> float | None:
    """Spearman rank correlation (ties averaged); None for fewer than 3 pairs or a constant side."""
    x, y = np.asarray(list(a), dtype=np.float64), np.asarray(list(b), dtype=np.float64)
    if x.size < 3 or x.size != y.size:
        return None
    rx, ry = _ranks(x) - (x.size - 1) / 2.0, _ranks(y) - (y.size - 1) / 2.0
    den = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return None if den == 0 else float((rx * ry).sum() / den)


def agreement(groups: list[GroupSpec], proxy: Mapping[tuple[str, str], float],
               kld: Mapping[tuple[str, str], float], base_kld: float) -> dict[str, Any]:
    keys = [(g.name, o.type) for g in groups for o in g.options[1:] if (g.name, o.type) in kld]  # fast: probed ones
    out: dict[str, Any] = {"spearman": spearman([proxy[k] for k in keys], [kld[k] - base_kld for k in keys]),
                           "n": len(keys), "by_type": {}}
    for t in sorted({k[1] for k in keys}):
        ks = [k for k in keys if k[1] == t]
        out["by_type"][t] = spearman([proxy[k] for k in ks], [kld[k] - base_kld for k in ks])
    return out


def _header_type(name: str) -> str:
    """A type whose name is as long as `name`'s and that needs no importance matrix (the header is estimated
    without one): the metadata is then as long as with `name`."""
    block = block_size(name)
    for t in [parse_type(name)] + QUANT_TYPES:
        if len(t.name) == len(name) and block_size(t) == block and not requires_imatrix(t):
            return t.name
    return name


def _widest(groups: list[GroupSpec]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per tensor the longest type name any option writes, the longest it asks for, and, for a tensor some option
    falls back on, the longest type asked for that falls back."""
    written: dict[str, int] = {}
    asked: dict[str, int] = {}
    fallback: dict[str, int] = {}
    for g in groups:
        for opt in g.options:
            for t in opt.typed:
                name = t.out.name
                written[name] = max(written.get(name, 0), len(t.qtype.name))
                asked[name] = max(asked.get(name, 0), len(opt.type))
                if t.qtype != t.requested:
                    fallback[name] = max(fallback.get(name, 0), len(t.requested.name))
    return written, asked, fallback


def _widened(record: dict[str, Any], groups: list[GroupSpec], fixed: list[OutTensor],
             base: dict[str, Any]) -> dict[str, Any]:
    """moepack.quant_plan's `record` of the placeholder plan with every field any plan of `groups` can have at
    its longest: each tensor's written and asked type, a fallback for every tensor an option falls back on, every
    number, the solver a refined or seeded plan has and the base note seeding adds (GPU placement's: placement_bytes).
    JSON's length depends only on these lengths, so the widened record's is a bound."""
    written, asked, fallback = _widest(groups)
    num, kld = 10 ** 15, -1.2345678901234567e-100  # 16 digits; the longest float repr
    widest_mixture, solver = "x" * max(map(len, MIXTURES)), "x" * SOLVER_WIDTH
    tensors = {o.name: "F32" for o in fixed} | {k: "x" * n for k, n in asked.items()}  # as the table's plans
    plan = QuantPlan(solver, num, num, num, kld, {g.name: "x" * max(len(o.type) for o in g.options) for g in groups},
                     tensors, num, kld, base | {"seeded_from": widest_mixture})
    return record | {"tensors": {k: ("x" * written[k] if k in written else v) for k, v in record["tensors"].items()},
                     "fallbacks": {k: "x" * n for k, n in fallback.items()}, "source": plan.source}


def placement_bytes() -> int:
    """The most bytes GPU placement adds to moepack.quant_plan (the plan's base notes its sides,
    moepack.stages.placement), which `overhead` leaves out: a GPU + RAM budget reserves them too."""
    side = {"budget_bytes": 10 ** 15, "bytes": 10 ** 15}
    note = {"override": "x" * len(",".join(f"{k}={v}" for k, v in EXPERTS_ON_CPU.items())), "gpu": side, "ram": side}
    return len(moepack_value({"placement": note})) - 1  # its "key":value and a comma, less the braces


def overhead(view: CheckpointView, groups: list[GroupSpec], fixed: list[OutTensor], base: dict[str, Any],
             prune_plan: PrunePlan | None) -> int | None:
    """GGUF bytes outside the tensor data, at most, for any plan of these groups: the writer's own header with
    moepack.quant_plan at its longest (`_widened`) and the recipe at its allowance (RECIPE_MAX_BYTES; compress
    counts it at its own bound, moepack.pipeline.budget_check), plus every tensor's worst alignment padding."""
    longest = {o.name: max((opt.type for opt in g.options), key=len) for g in groups for o in g.outs}
    types = {k: _header_type(v) for k, v in longest.items()}
    plan = QuantPlan("greedy", 0, 0, 0, 0.0, {g.name: longest[g.outs[0].name] for g in groups}, types, base=base)
    quiet = logging.getLogger("gguf.gguf_writer")
    level, quiet.level = quiet.level, logging.WARNING  # its INFO lines name a temporary file
    try:
        head = overhead_bytes(view, plan, prune_plan=prune_plan, default_type=None)
        record = plan_record(resolve_types(gguf_outputs(view), None, plan.tensors), plan, None, None)
    except MoepackError as e:
        # Sensitivity still means something for a checkpoint the writer refuses as it stands (e.g. no tokenizer
        # yet); the table then has no overhead_bytes, and a file-size target refuses it (allocate.file_budget).
        log.warning("GGUF overhead not estimated: %s", e)
        return None
    finally:
        quiet.setLevel(level)
    pad = ALIGNMENT
    head += len(moepack_value(_widened(record, groups, fixed, base))) - len(moepack_value(record))
    head += -head % pad
    worst = sum(max(-t.nbytes % pad for t in (opt.typed[i] for opt in g.options))
                for g in groups for i in range(len(g.outs)))
    return head + worst + sum(-(o.numel * 4) % pad for o in fixed)


def table_groups(groups: list[GroupSpec], proxy: dict[tuple[str, str], float],
                 kld: dict[tuple[str, str], float] | None, base_kld: float | None,
                 predicted: Mapping[tuple[str, str], float] | None = None,
                 domains: Mapping[tuple[str, str], tuple[float, ...]] | None = None) -> tuple[Group, ...]:
    """The table's groups: per option its bytes, ΔKLD vs the all-base model (the proxy in proxy mode; `predicted`
    where fast sensitivity did not probe it, moepack.stages.sensitivity.fast), the KLD measured (None where
    predicted), the proxy, the types written where a fallback replaced the requested one, and its ΔKLD per
    calibration domain where `domains` has them (the base: zeros)."""
    out = []
    for g in groups:
        opts = []
        for i, opt in enumerate(g.options):
            k = (g.name, opt.type)
            if kld is not None and i > 0 and k not in kld:
                assert predicted is not None, k
                dkld, measured = predicted[k], None
            elif kld is not None:
                dkld, measured = (0.0, base_kld) if i == 0 else (kld[k] - base_kld, kld[k])
            else:
                dkld, measured = (0.0 if i == 0 else proxy[k]), None
            written = ({t.out.name: t.qtype.name for t in opt.typed}
                       if any(t.qtype != t.requested for t in opt.typed) else None)
            per = None
            if domains:
                width = len(next(iter(domains.values())))
                per = (0.0,) * width if i == 0 else domains.get(k)
            opts.append(Option(opt.type, opt.bytes, dkld, measured, 0.0 if i == 0 else proxy[k], written, per))
        out.append(Group(g.name, tuple(o.name for o in g.outs), tuple(opts), g.cls, g.role.value, g.layer))
    return tuple(out)


def proxies(store: QuantStore, groups: list[GroupSpec]) -> dict[tuple[str, str], float]:
    """Proxy ΔKLD of each upgrade: −(err_base − err_t), summed over the group's tensors."""
    out = {}
    for g in groups:
        errs = [sum(store.err(t.out.name, t.qtype) for t in opt.typed) for opt in g.options]
        for opt, e in zip(g.options[1:], errs[1:]):
            out[(g.name, opt.type)] = e - errs[0]
    return out
