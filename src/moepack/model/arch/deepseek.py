"""DeepSeek-V3 / R1 (DeepseekV3ForCausalLM) and DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM): MLA attention,
shared experts, leading dense layers, group-limited routing."""
from __future__ import annotations

from moepack.model.arch._common import L, dense_ffn, experts, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__ = ["deepseek_rules"]


def _mla() -> tuple[TensorRule, ...]:
    a = f"{L}.self_attn"
    return (
        TensorRule(f"{a}.q_proj.weight", Role.ATTENTION, "q_proj"),  # V2-Lite: no q LoRA
        TensorRule(f"{a}.q_a_proj.weight", Role.ATTENTION, "q_a_proj"),
        TensorRule(f"{a}.q_a_layernorm.weight", Role.NORM, "q_a_norm"),
        TensorRule(f"{a}.q_b_proj.weight", Role.ATTENTION, "q_b_proj"),
        TensorRule(f"{a}.kv_a_proj_with_mqa.weight", Role.ATTENTION, "kv_a_proj"),
        TensorRule(f"{a}.kv_a_layernorm.weight", Role.NORM, "kv_a_norm"),
        TensorRule(f"{a}.kv_b_proj.weight", Role.ATTENTION, "kv_b_proj"),
        TensorRule(f"{a}.o_proj.weight", Role.ATTENTION, "o_proj"),
    )


def deepseek_rules() -> tuple[TensorRule, ...]:
    """DeepSeek-V3's tensors (MLA, routed + shared experts, router bias, dense FFN); Kimi-K2 and GLM-5 reuse them."""
    return (
        skeleton()
        + _mla()
        + experts()
        + (TensorRule(f"{L}.mlp.gate.e_score_correction_bias", Role.ROUTER, "router_bias"),)
        + dense_ffn("mlp.shared_experts", Role.SHARED_EXPERTS, "shexp_")
        + dense_ffn()
    )


@register
def deepseek_v3() -> ArchSpec:
    # DeepSeek-V3 (671B), R1, Kimi-K2-style: sigmoid scores + correction bias (noaux_tc), n_group/topk_group.
    return ArchSpec(
        model_type="deepseek_v3",
        hf_class="DeepseekV3ForCausalLM",
        gguf_arch="deepseek2",
        n_experts_key="n_routed_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=deepseek_rules(),
        n_shared_key="n_shared_experts",
        scoring_default="sigmoid",
        norm_topk_default=True,
        group_keys=("n_group", "topk_group"),
        kv_cache="mla",
        router_bias_kind="router_bias",
        extra={"group_top2": True},  # noaux_tc scores each expert group by its top-2 experts
    )


@register
def deepseek_v2() -> ArchSpec:
    # DeepSeek-V2 (236B) and V2-Lite (16B): softmax scores, group_limited_greedy or greedy top-k.
    return ArchSpec(
        model_type="deepseek_v2",
        hf_class="DeepseekV2ForCausalLM",
        gguf_arch="deepseek2",
        n_experts_key="n_routed_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=deepseek_rules(),
        n_shared_key="n_shared_experts",
        scoring_default="softmax",
        norm_topk_default=False,
        group_keys=("n_group", "topk_group"),
        kv_cache="mla",
    )
