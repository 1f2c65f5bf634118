"""A structural summary of a checkpoint, from config.json and safetensors headers alone, and the types whose uniform
sizes `moepack inspect` shows (`moepack.stages.fit.uniform_bytes` computes them: one formula for inspect, fit and
compress)."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView, TensorRef

__all__ = ["describe", "ESTIMATE_TYPES"]

log = logging.getLogger(__name__)

ESTIMATE_TYPES = ("Q8_0", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S")


def stored_summary(refs: Iterable[TensorRef]) -> dict[str, Any]:
    """How the checkpoint stores `refs`: bytes on disk (each stored part counted once: gate and up of one fused
    slice share it), and parameters per storage ("fp8_block", "mxfp4", ... or the plain dtype, e.g. "BF16")."""
    parts: dict[tuple[Any, int], int] = {}
    params: dict[str, int] = {}
    for r in refs:
        fmt = r.dtype if r.stored is None or r.stored.format == "plain" else r.stored.format
        if r.stored is not None and r.stored.format == "plain":
            fmt = r.stored.parts[0].dtype
        params[fmt] = params.get(fmt, 0) + r.numel
        for p in r.stored.parts if r.stored is not None else ():
            parts[(p.name, p.offset)] = p.nbytes
        if r.stored is None:
            parts[(r.name, r.offset)] = r.nbytes
    return {"bytes": sum(parts.values()), "params": dict(sorted(params.items(), key=lambda kv: -kv[1]))}


def describe(view: CheckpointView, estimates: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The facts, parameter counts, fingerprint and stored bytes of `view`; `estimates` (type → GGUF tensor bytes
    with every tensor at it, as `uniform_bytes` gives them) is reported as gguf_estimates."""
    f = view.facts
    counts = view.param_counts()
    total = sum(counts.values())
    routed_per_expert = counts[Role.ROUTED_EXPERTS.value] / max(1, len(f.moe_layers) * f.n_experts)
    active = total - counts[Role.ROUTED_EXPERTS.value] + routed_per_expert * f.top_k * len(f.moe_layers)
    # The input embedding is a row lookup, not a matmul: some vendors (gpt-oss) leave it out of "active". Tied
    # embeddings are also the output head, which every token multiplies by in full, so they stay in.
    lookup = counts[Role.EMBEDDING.value] if counts[Role.OUTPUT.value] else 0
    return {
        "path": str(view.root),
        "architecture": f.arch,
        "hf_class": view.spec.hf_class,
        "gguf_arch": f.gguf_arch,
        "layers": f.n_layers,
        "moe_layers": list(f.moe_layers),
        "dense_layers": list(f.dense_layers),
        "routed_experts": f.n_experts,
        "top_k": f.top_k,
        "shared_experts": f.n_shared_experts,
        "expert_ffn": f.expert_ffn,
        "hidden": f.hidden,
        "vocab": f.vocab,
        "routing": {
            "scoring": f.scoring,
            "bias": f.router_bias,
            "n_group": f.n_group,
            "topk_group": f.topk_group,
            "routed_scaling_factor": f.routed_scaling_factor,
            "norm_topk_prob": f.norm_topk_prob,
        },
        "params": counts,
        "params_total": total,
        "params_active": int(active),
        "params_active_without_embedding": int(active - lookup),
        "bf16_bytes": 2 * total,
        "gguf_estimates": dict(estimates or {}),
        "fingerprint": view.fingerprint(),
        "stored": _stored(view, total),
    }


def _stored(view: CheckpointView, params: int) -> dict[str, Any]:
    """The checkpoint's own bytes (FP8 values and their block scales, ...), bits per weight over the parameters."""
    s = stored_summary(view.tensors.values())
    return s | {"bpw": 8 * s["bytes"] / max(1, params)}
