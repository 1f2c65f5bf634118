"""`moepack.recipe`: how a GGUF was made, in one short JSON string a model hub's metadata viewer shows whole.

    {"v": 1, "keep": 0.75, "top_k": 2, "experts": {"kept": 6, "of": 8, "layers": 2},
     "types": {"ffn_up_exps": {"IQ3_XXS": 2}, ...}, "budget": {"from": "target_size", ...}}

The writer derives what it writes (keep, k', experts per MoE layer, the GGML types per tensor class after
llama.cpp's fallbacks); the caller adds what only it knows (`moepack compress`: the budget and where it came from).
The string is at most RECIPE_MAX_BYTES long, and `overhead_bytes` counts that many, so a budget planned before the
recipe exists still covers it.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moepack.gguf.keys import Keys
from moepack.gguf.metadata import WriteError, moepack_value

__all__ = ["RECIPE_MAX_BYTES", "RECIPE_VERSION", "tensor_class", "types_by_class", "file_recipe",
           "recipe_json", "recipe_placeholder", "recipe_bound", "read_recipe"]

RECIPE_VERSION = 1
RECIPE_MAX_BYTES = 2048  # the allowance overhead_bytes plans for; ~600 B for DeepSeek-V3's 17 tensor classes
_DERIVED = ("v", "keep", "top_k", "experts", "types", "ftype")


def tensor_class(name: str) -> str:
    """'blk.3.ffn_up_exps.weight' → 'ffn_up_exps'; 'token_embd.weight' → 'token_embd'."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def types_by_class(types: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """GGUF tensor name → GGML type, counted per tensor class: {'attn_q': {'Q4_K': 1, 'Q6_K': 1}, ...}."""
    items = types.items() if isinstance(types, Mapping) else types
    out: dict[str, dict[str, int]] = {}
    for name, t in items:
        counts = out.setdefault(tensor_class(name), {})
        counts[t] = counts.get(t, 0) + 1
    return out


def file_recipe(types: Mapping[str, str] | str, n_expert: int, n_moe_layers: int, top_k: int,
                prune_plan: Any | None, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The recipe of a file: `types` (quantizable tensor → type as written; or the name of the llama.cpp mixture
    that quantizes this file afterwards, e.g. "Q4_K_M"), the experts and k' written, the prune plan's keep, and the
    caller's `given` fields (which may not restate a derived one)."""
    given = dict(given or {})
    clash = sorted(k for k in given if k in _DERIVED)
    if clash:
        raise WriteError(f"moepack.recipe: {', '.join(clash)} are derived from what is written; do not pass them")
    of = prune_plan.n_experts if prune_plan is not None else n_expert
    keep = float(prune_plan.keep) if prune_plan is not None else 1.0
    recipe: dict[str, Any] = {"v": RECIPE_VERSION, "keep": keep, "top_k": int(top_k)}
    if n_expert:
        recipe["experts"] = {"kept": int(n_expert), "of": int(of), "layers": int(n_moe_layers)}
    if isinstance(types, str):
        recipe["ftype"] = types
    else:
        recipe["types"] = types_by_class(types)
    return recipe | given


def recipe_json(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """`recipe` as written: unchanged when its JSON fits RECIPE_MAX_BYTES; else the types are counted over the whole
    file instead of per class ("types_total"; every tensor's type stays in moepack.quant_plan). Raises when even
    that does not fit."""
    rec = dict(recipe)
    if len(moepack_value(rec)) <= RECIPE_MAX_BYTES:
        return rec
    if "types" in rec:
        total: dict[str, int] = {}
        for counts in rec.pop("types").values():
            for t, n in counts.items():
                total[t] = total.get(t, 0) + n
        rec["types_total"] = total
    n = len(moepack_value(rec))
    if n > RECIPE_MAX_BYTES:
        raise WriteError(f"moepack.recipe is {n} bytes, over its {RECIPE_MAX_BYTES}-byte allowance; shorten the "
                           "fields passed to the writer")
    return rec


def recipe_placeholder() -> str:
    """A value whose metadata string is exactly RECIPE_MAX_BYTES long: what overhead_bytes counts for the recipe."""
    return "~" * (RECIPE_MAX_BYTES - 2)  # JSON adds the two quotes


def recipe_bound(types: Mapping[str, Iterable[str]], given: Mapping[str, Any] | None) -> int:
    """The longest moepack.recipe string (at most RECIPE_MAX_BYTES) of a file whose quantizable tensors may be
    written in `types` (GGUF name → its possible types), with the caller's `given` fields: each class at its most
    distinct types (the longest names), every count, keep, k' and expert count at their widest."""
    by_class: dict[str, tuple[int, set[str]]] = {}
    for name, possible in types.items():
        n, seen = by_class.get(tensor_class(name), (0, set()))
        by_class[tensor_class(name)] = (n + 1, seen | set(possible))
    wide = 10 ** 9
    classes = {c: {t: n for t in sorted(seen, key=len, reverse=True)[:n]} for c, (n, seen) in by_class.items()}
    rec = {"v": RECIPE_VERSION, "keep": 0.12345678901234566, "top_k": wide,
           "experts": {"kept": wide, "of": wide, "layers": wide}, "types": classes} | dict(given or {})
    return min(len(moepack_value(rec)), RECIPE_MAX_BYTES)


def read_recipe(path: str | Path) -> dict[str, Any] | None:
    """moepack.recipe of a GGUF file (None for a file without one)."""
    import gguf

    field = gguf.GGUFReader(path).fields.get(Keys.RECIPE)
    return None if field is None else json.loads(field.contents())
