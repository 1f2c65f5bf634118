"""Mixtral 8x7B / 8x22B (MixtralForCausalLM); llama.cpp runs it as the `llama` architecture with experts."""
from __future__ import annotations

from moepack.model.arch._common import experts, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, register

__all__: list[str] = []


@register
def mixtral() -> ArchSpec:
    # Checkpoints name expert matrices w1 (gate), w3 (up), w2 (down) under block_sparse_moe.
    projs = ("w1", "w3", "w2")
    return ArchSpec(
        model_type="mixtral",
        hf_class="MixtralForCausalLM",
        gguf_arch="llama",
        n_experts_key="num_local_experts",
        expert_ffn_key="intermediate_size",
        rules=skeleton() + gqa_attention() + experts("block_sparse_moe", projs),
        norm_topk_default=True,  # softmax over the selected top-k logits
        expert_projs=projs,
    )
