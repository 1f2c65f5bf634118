"""Qwen3-MoE (Qwen3MoeForCausalLM) and Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM)."""
from __future__ import annotations

from moepack.model.arch._common import dense_ffn, experts, gated_shared_expert, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, register

__all__: list[str] = []


@register
def qwen3_moe() -> ArchSpec:
    # Qwen3-30B-A3B, Qwen3-235B-A22B: softmax router, no shared expert, per-head q/k norms.
    return ArchSpec(
        model_type="qwen3_moe",
        hf_class="Qwen3MoeForCausalLM",
        gguf_arch="qwen3moe",
        n_experts_key="num_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=skeleton() + gqa_attention(qk_norm=True) + experts() + dense_ffn(),
        norm_topk_default=True,
    )


@register
def qwen2_moe() -> ArchSpec:
    # Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B: one shared expert behind a sigmoid gate, q/k/v biases.
    return ArchSpec(
        model_type="qwen2_moe",
        hf_class="Qwen2MoeForCausalLM",
        gguf_arch="qwen2moe",
        n_experts_key="num_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=skeleton()
        + gqa_attention(bias=True)
        + experts()
        + gated_shared_expert()
        + dense_ffn(),
        n_shared_default=1,
        norm_topk_default=False,
    )
