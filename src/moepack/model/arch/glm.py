"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (Glm4MoeForCausalLM); llama.cpp runs them as `glm4moe`.

DeepSeek-V3-style routing (sigmoid scores + e_score_correction_bias, n_group/topk_group, routed_scaling_factor),
one shared expert, first_k_dense_replace dense layers, GQA attention with q/k/v biases (attention_bias), optional
per-head q/k norms (use_qk_norm: GLM-4.5 355B has them, Air not) and partial rotary (partial_rotary_factor).
post_attention_layernorm is llama.cpp's `post_attention_norm` here (gguf's GLM4_MOE table), not `ffn_norm`.

The multi-token-prediction layer (model.layers.{num_hidden_layers}: eh_proj, enorm, hnorm, shared_head.*) is
skipped, as for DeepSeek-V3: llama.cpp's converter writes it unless --no-mtp, but the runtime's decoder graph
never runs it (it is only for speculative drafting) and llama.cpp loads files without it (nextn_predict_layers 0).
"""
from __future__ import annotations

from moepack.model.arch._common import L, dense_ffn, experts, gqa_attention, skeleton
from moepack.model.arch.deepseek import deepseek_rules
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__: list[str] = []


@register
def glm4_moe() -> ArchSpec:
    return ArchSpec(
        model_type="glm4_moe",
        hf_class="Glm4MoeForCausalLM",
        gguf_arch="glm4moe",
        n_experts_key="n_routed_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=skeleton()
        + gqa_attention(bias=True, qk_norm=True)
        + experts()
        + (TensorRule(f"{L}.mlp.gate.e_score_correction_bias", Role.ROUTER, "router_bias"),)
        + dense_ffn("mlp.shared_experts", Role.SHARED_EXPERTS, "shexp_")
        + dense_ffn(),
        n_shared_key="n_shared_experts",
        scoring_default="sigmoid",  # transformers' Glm4MoeTopkRouter: always sigmoid, no scoring_func key
        norm_topk_default=True,
        group_keys=("n_group", "topk_group"),
        router_bias_kind="router_bias",
        extra={
            # tensors only present when a config flag is on (model.shapes derives config-only views with it)
            "present_if": {"q_norm": "use_qk_norm", "k_norm": "use_qk_norm", "q_proj.bias": "attention_bias",
                           "k_proj.bias": "attention_bias", "v_proj.bias": "attention_bias"},
            "group_top2": True,  # the router scores each expert group by its top-2 experts (needs >= 2 per group)
        },
    )


def _dsa_indexer() -> tuple[TensorRule, ...]:
    a = f"{L}.self_attn.indexer"  # DeepSeek Sparse Attention's lightning indexer: picks the keys each query attends
    return (
        TensorRule(f"{a}.wq_b.weight", Role.ATTENTION, "indexer_wq_b"),
        TensorRule(f"{a}.wk.weight", Role.ATTENTION, "indexer_wk"),
        TensorRule(f"{a}.k_norm.weight", Role.NORM, "indexer_k_norm"),
        TensorRule(f"{a}.k_norm.bias", Role.NORM, "indexer_k_norm.bias"),
        TensorRule(f"{a}.weights_proj.weight", Role.ATTENTION, "indexer_proj"),  # llama.cpp keeps it F32
    )


@register
def glm_moe_dsa() -> ArchSpec:
    # GLM-5 (GlmMoeDsaForCausalLM; llama.cpp `glm-dsa`): DeepSeek-V3's MLA + MoE layout with a DSA indexer per
    # layer; its MTP layer (model.layers.{num_hidden_layers}) is skipped as for GLM-4.5.
    return ArchSpec(
        model_type="glm_moe_dsa",
        hf_class="GlmMoeDsaForCausalLM",
        gguf_arch="glm-dsa",
        n_experts_key="n_routed_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=deepseek_rules() + _dsa_indexer(),
        n_shared_key="n_shared_experts",
        scoring_default="sigmoid",
        norm_topk_default=True,
        group_keys=("n_group", "topk_group"),
        kv_cache="mla",
        router_bias_kind="router_bias",
        extra={"group_top2": True},
    )
