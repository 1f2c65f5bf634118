"""Architecture knowledge as data: one `ArchSpec` per supported Hugging Face model type.

Each spec names the config keys that carry the MoE facts and lists the checkpoint's tensor name templates
(`{bid}` = layer, `{xid}` = routed expert) with the role each tensor plays. Modules register themselves with
`@register`; `spec_for(model_type)` is the only lookup. The types and the registry live in `spec`, which the
table modules import; this package imports the tables so that they register, and re-exports `spec`.
"""
from __future__ import annotations

from moepack.model.arch.spec import *  # noqa: F403  the types and the registry, re-exported
from moepack.model.arch.spec import __all__  # noqa: F401  (the same names)

# Import the table modules so that they register.
import moepack.model.arch.deepseek  # noqa: E402,F401
import moepack.model.arch.dots  # noqa: E402,F401
import moepack.model.arch.ernie  # noqa: E402,F401
import moepack.model.arch.glm  # noqa: E402,F401
import moepack.model.arch.gpt_oss  # noqa: E402,F401
import moepack.model.arch.hunyuan  # noqa: E402,F401
import moepack.model.arch.kimi  # noqa: E402,F401
import moepack.model.arch.llama4  # noqa: E402,F401
import moepack.model.arch.minimax  # noqa: E402,F401
import moepack.model.arch.mixtral  # noqa: E402,F401
import moepack.model.arch.olmoe  # noqa: E402,F401
import moepack.model.arch.qwen  # noqa: E402,F401
import moepack.model.arch.qwen35  # noqa: E402,F401
import moepack.model.arch.qwen_next  # noqa: E402,F401
