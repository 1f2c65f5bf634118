"""Kimi-K2 (config.json model_type `kimi_k2`, architectures DeepseekV3ForCausalLM): DeepSeek-V3's layout with 384
routed experts in one group, 64 heads and one leading dense layer. llama.cpp's converter takes it as DeepSeek-V3
(`deepseek2`, no Kimi-specific tensors or metadata besides its tiktoken vocabulary, pre-tokenizer "kimi-k2").
transformers has no `kimi_k2` model class (the hub ships remote code): the layer runner builds DeepSeek-V3's."""
from __future__ import annotations

import dataclasses

from moepack.model.arch.deepseek import deepseek_v3
from moepack.model.arch.spec import ArchSpec, register

__all__: list[str] = []


@register
def kimi_k2() -> ArchSpec:
    v3 = deepseek_v3()  # the same tables and routing; only the config's model_type and the transformers class differ
    return dataclasses.replace(v3, model_type="kimi_k2",
                               extra={**v3.extra, "hf_model_type": "deepseek_v3"})  # the class that runs it
