"""Kimi-K2 (config.json model_type `kimi_k2`, architectures DeepseekV3ForCausalLM): DeepSeek-V3's layout with 384
routed experts in one group, 64 heads and one leading dense layer. llama.cpp's converter takes it as DeepSeek-V3
(`deepseek2`, no Kimi-specific tensors or metadata besides its tiktoken vocabulary, pre-tokenizer "kimi-k2").
transformers has no `kimi_k2` model class (the hub ships remote code): the layer runner builds DeepSeek-V3's."""
from __future__ import annotations

from moepack.model.arch import ArchSpec, register
from moepack.model.arch.deepseek import deepseek_rules

__all__: list[str] = []


@register
def kimi_k2() -> ArchSpec:
    return ArchSpec(
        model_type="kimi_k2",
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
        extra={"hf_model_type": "deepseek_v3",  # the transformers model class that runs it
               "group_top2": True},
    )
