"""MiniMax-M2 (MiniMaxM2ForCausalLM); llama.cpp runs it as `minimax-m2`."""
from __future__ import annotations

from moepack.model.arch._common import L, experts, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__: list[str] = []


@register
def minimax_m2() -> ArchSpec:
    # MiniMax-M2 (230B-A10B): Mixtral-style w1 (gate) / w3 (up) / w2 (down) experts under block_sparse_moe, sigmoid
    # router with a correction bias beside the gate (not inside it, as DeepSeek-V3 has it), no shared expert,
    # full-width q/k RMS norms (q: heads x head_dim, k: kv heads x head_dim), partial rotary (rotary_dim).
    # Its intermediate_size is the expert width: every layer is MoE.
    projs = ("w1", "w3", "w2")
    return ArchSpec(
        model_type="minimax_m2",
        hf_class="MiniMaxM2ForCausalLM",
        gguf_arch="minimax-m2",
        n_experts_key="num_local_experts",
        expert_ffn_key="intermediate_size",
        rules=skeleton()
        + gqa_attention(qk_norm=True)
        + experts("block_sparse_moe", projs)
        + (TensorRule(f"{L}.block_sparse_moe.e_score_correction_bias", Role.ROUTER, "router_bias"),),
        scoring_default="sigmoid",
        norm_topk_default=True,  # transformers and llama.cpp both renormalise the top-k sigmoid weights
        router_bias_kind="router_bias",
        expert_projs=projs,
    )
