"""GGUF size estimates and a structural summary of a checkpoint, from config.json and safetensors headers alone."""
from __future__ import annotations

import logging
from typing import Any

import gguf

from moepack.gguf.types import written_bytes
from moepack.model.arch import Role
from moepack.model.checkpoint import CheckpointView
from moepack.model.formats import stored_summary

__all__ = ["describe", "estimate_size", "ESTIMATE_TYPES"]

log = logging.getLogger(__name__)

ESTIMATE_TYPES = ("Q8_0", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S")
_F32 = gguf.GGMLQuantizationType.F32


def estimate_size(view: CheckpointView, type_name: str) -> int:
    """GGUF tensor data bytes with every quantizable tensor at `type_name` and the rest at F32."""
    qtype = gguf.GGMLQuantizationType[type_name]
    return sum(written_bytes(t.shape, qtype if t.quantizable else _F32) for t in view.tensors.values())


def describe(view: CheckpointView) -> dict[str, Any]:
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
        "gguf_estimates": {t: estimate_size(view, t) for t in ESTIMATE_TYPES},
        "fingerprint": view.fingerprint(),
        "stored": _stored(view, total),
    }


def _stored(view: CheckpointView, params: int) -> dict[str, Any]:
    """The checkpoint's own bytes (FP8 values and their block scales, ...), bits per weight over the parameters."""
    s = stored_summary(view.tensors.values())
    return s | {"bpw": 8 * s["bytes"] / max(1, params)}
