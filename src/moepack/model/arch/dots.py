"""dots.llm1 (Dots1ForCausalLM); llama.cpp runs it as `dots1`."""
from __future__ import annotations

from moepack.model.arch._common import L, dense_ffn, experts, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__: list[str] = []


@register
def dots1() -> ArchSpec:
    # dots.llm1 (142B-A14B): DeepSeek-V3's MoE (sigmoid scores + e_score_correction_bias inside the gate, shared
    # experts, leading dense layers, n_group/topk_group) under Qwen3's attention (per-head q/k norms, multi-head).
    # Its config.json says scoring_func "noaux_tc" (a top-k method, not a score function); transformers' router
    # scores with sigmoid whatever it says, so the facts do too.
    return ArchSpec(
        model_type="dots1",
        hf_class="Dots1ForCausalLM",
        gguf_arch="dots1",
        n_experts_key="n_routed_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=skeleton()
        + gqa_attention(qk_norm=True)
        + experts()
        + (TensorRule(f"{L}.mlp.gate.e_score_correction_bias", Role.ROUTER, "router_bias"),)
        + dense_ffn("mlp.shared_experts", Role.SHARED_EXPERTS, "shexp_")
        + dense_ffn(),
        n_shared_key="n_shared_experts",
        scoring_default="sigmoid",
        norm_topk_default=False,  # transformers' Dots1Config default
        group_keys=("n_group", "topk_group"),
        router_bias_kind="router_bias",
        extra={"scoring": "sigmoid"},
    )
