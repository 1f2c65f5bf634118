"""Architecture knowledge as data: one `ArchSpec` per supported Hugging Face model type.

Each spec names the config keys that carry the MoE facts and lists the checkpoint's tensor name templates
(`{bid}` = layer, `{xid}` = routed expert) with the role each tensor plays. Modules register themselves with
`@register`; `spec_for(model_type)` is the only lookup. The types and the registry live in `spec`, which the
table modules import; this package imports the tables so that they register, and re-exports `spec`.
"""
from __future__ import annotations

from moepack.model.arch import spec
from moepack.model.arch.spec import *  # noqa: F403  the types and the registry, re-exported

__all__ = list(spec.__all__)

# Import the table modules so that they register.
from moepack.model.arch import (deepseek, dots, ernie, glm, gpt_oss, hunyuan, kimi, llama4,  # noqa: F401
                                minimax, mixtral, olmoe, qwen, qwen35, qwen_next)
