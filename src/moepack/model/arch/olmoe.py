"""OLMoE-1B-7B (OlmoeForCausalLM): 64 experts, top-8, full-width q/k norms."""
from __future__ import annotations

from moepack.model.arch._common import experts, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, register

__all__: list[str] = []


@register
def olmoe() -> ArchSpec:
    return ArchSpec(
        model_type="olmoe",
        hf_class="OlmoeForCausalLM",
        gguf_arch="olmoe",
        n_experts_key="num_experts",
        expert_ffn_key="intermediate_size",
        rules=skeleton() + gqa_attention(qk_norm=True) + experts(),
        norm_topk_default=False,
    )
