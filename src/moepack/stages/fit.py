"""Plan before you compress (or download): what a budget leaves a model, from its tensor table alone.

For a device or size budget (`moepack.stages.budget`), `fit_report` gives the weight bytes it leaves, the bits per
weight that makes at expert retention 1.0 and 0.75 (routed experts shrink with the retention, everything else
stays), and which single GGML types fit when every quantizable tensor takes that type and norms, routers and
biases stay F32 (the same estimate `moepack inspect` prints). It reads no weights, so it works on a
`moepack.model.shapes.config_view` of a config.json alone.
"""
from __future__ import annotations

from typing import Any

import gguf

from moepack.gguf.estimate import ESTIMATE_TYPES, estimate_size
from moepack.gguf.types import written_bytes
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView
from moepack.stages.budget import BudgetRequest, budget_for

__all__ = ["fit_report", "RETENTIONS"]

RETENTIONS = (1.0, 0.75)  # keep everything; the paper's retention


def _kept_bytes(view: CheckpointView, type_name: str, keep: float) -> int:
    """estimate_size with the routed experts scaled by the retention (pruning keeps a share of them per layer)."""
    qtype = gguf.GGMLQuantizationType[type_name]  # routed experts are weight matrices: always at the type
    routed = sum(written_bytes(t.shape, qtype) for t in view.tensors.values() if t.role is Role.ROUTED_EXPERTS)
    return estimate_size(view, type_name) - int(round((1 - keep) * routed))


def fit_report(view: CheckpointView, request: BudgetRequest) -> dict[str, Any]:
    """Budget, bits per weight at each retention, and the uniform types that fit at each (see the module doc)."""
    budget = budget_for(request, view)
    counts = view.param_counts()
    total, routed = sum(counts.values()), counts[Role.ROUTED_EXPERTS.value]
    rows = []
    for keep in RETENTIONS:
        params = total - int(round((1 - keep) * routed))
        fits = {t: _kept_bytes(view, t, keep) for t in ESTIMATE_TYPES}
        rows.append({"keep": keep, "params": params, "bpw": 8 * budget.weights / params,
                     "types": {t: {"bytes": b, "fits": b <= budget.weights} for t, b in fits.items()}})
    return {"budget": budget.to_dict(), "file_limit": budget.file_limit, "retentions": rows}
