"""The part of a compressed GGUF's `moepack.recipe` only the compress run knows: the budget(s) it was allocated
under and where they came from. The writer adds what it writes (keep, k', experts, types; moepack.gguf.recipe)."""
from __future__ import annotations

from typing import Any

from moepack.pipeline.candidates import Candidate
from moepack.stages.budget import Budget

__all__ = ["compress_recipe", "budget_record"]


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    """The set numbers and names of a budget record, one level of nesting kept (e.g. a GPU part's own bytes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            if sub := _scalars({a: b for a, b in v.items() if not isinstance(b, dict)}):
                out[k] = sub
        elif isinstance(v, (bool, int, float, str)):
            out[k] = v
    return out


def budget_record(budget: Budget) -> dict[str, Any]:
    """Budget bytes as recorded: what allocation spent (`weights`), the file limit, and the inputs they came from
    (`from`: memory | target_size | target_bpw, with its memory / ctx / target / bpw); unset fields left out."""
    rec = _scalars(budget.to_dict())
    rec["from"] = rec.pop("source", None)
    rec["file_limit"] = budget.file_limit
    return rec


def compress_recipe(cand: Candidate, budget: Budget) -> dict[str, Any]:
    """The compress run's fields of the recipe of `cand`'s GGUF."""
    rec: dict[str, Any] = {"budget": budget_record(budget)}
    if cand.plan is not None:
        rec["solver"] = cand.plan.solver
    return rec
