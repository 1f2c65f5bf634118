"""ERNIE-4.5-MoE (Ernie4_5_MoeForCausalLM: ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B); llama.cpp runs it as
`ernie4_5-moe`.

Softmax router whose top-k choice adds a correction bias (`mlp.moe_statics.e_score_correction_bias`, stored as
(1, E): the expert axis is the last), top-k weights renormalised, shared experts, MoE layers from
moe_layer_start_index every moe_layer_interval (llama.cpp: leading_dense_block_count, interleave_moe_layer_step),
interleaved (GPT-J style) rotary, which is llama.cpp's own rope for this architecture: no q/k permutation. The
300B's multi-token-prediction tensors (`model.mtp_block.*`, `model.mtp_emb_norm.*`, ...) are skipped, as the
converter skips them.
"""
from __future__ import annotations

from moepack.model.arch._common import L, dense_ffn, experts, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__: list[str] = []


@register
def ernie4_5_moe() -> ArchSpec:
    return ArchSpec(
        model_type="ernie4_5_moe",
        hf_class="Ernie4_5_MoeForCausalLM",
        gguf_arch="ernie4_5-moe",
        n_experts_key="moe_num_experts",
        expert_ffn_key="moe_intermediate_size",
        top_k_key="moe_k",
        rules=skeleton()
        + gqa_attention()
        + experts()
        + (TensorRule(f"{L}.mlp.moe_statics.e_score_correction_bias", Role.ROUTER, "router_bias"),)
        + dense_ffn("mlp.shared_experts", Role.SHARED_EXPERTS, "shexp_")
        + dense_ffn(),
        n_shared_key="moe_num_shared_experts",
        scoring_default="softmax",
        norm_topk_default=True,  # transformers divides by the top-k sum; llama.cpp hard-codes the renormalisation
        router_bias_kind="router_bias",
        extra={
            # checkpoint key → transformers 5's in-memory key (its conversion mapping moves the statics into gate)
            "hf_keys": {"mlp.moe_statics.e_score_correction_bias": "mlp.gate.moe_statics.e_score_correction_bias"},
            "expert_axis": {"router_bias": -1},  # (1, E): pruning slices the last axis
            "unserved_prefixes": ("model.mtp_",),
        },
    )
