"""The types of the architecture tables (`ArchSpec`, `TensorRule`, `Role`), the registry the table modules fill with
`@register`, and the checkpoint-name helpers every architecture shares.

The table modules import this module, never the package: `moepack.model.arch` imports them so that they register,
and a table importing the package back would close an import cycle.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from moepack.errors import MoepackError
from moepack.model.stored import FusedSplit

__all__ = [
    "Role",
    "TensorRule",
    "ArchSpec",
    "UnsupportedArchitecture",
    "register",
    "spec_for",
    "supported",
    "MatchedName",
    "EXPERT_COUNT_KEYS",
    "expert_id",
    "expert_key",
    "renumber_expert",
    "is_expert_key",
    "beyond_decoder",
    "layer_index",
    "DERIVED_BUFFERS",
    "F32_KINDS",
]

# Config keys that may carry the routed expert count besides the spec's own (transformers 5 saves Qwen3-MoE's as
# num_local_experts).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class Role(str, Enum):
    """What a tensor is for; parameter counts and quantization groups are keyed by it."""

    ATTENTION = "attention"
    ROUTED_EXPERTS = "routed_experts"
    SHARED_EXPERTS = "shared_experts"
    ROUTER = "router"
    DENSE_FFN = "dense_ffn"
    EMBEDDING = "embedding"
    OUTPUT = "output"
    NORM = "norm"


@dataclass(frozen=True)
class TensorRule:
    """One checkpoint tensor name template and what it is.

    `kind` is the short name of the tensor within its role (e.g. "gate_proj", "q_a_proj"); quantization groups
    and GGUF names are derived from (role, kind).
    """

    template: str
    role: Role
    kind: str

    @property
    def pattern(self) -> re.Pattern[str]:
        rx = re.escape(self.template).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
        return re.compile(rx + r"\Z")


@dataclass(frozen=True)
class MatchedName:
    rule: TensorRule
    layer: int | None
    expert: int | None


@dataclass(frozen=True)
class ArchSpec:
    """Everything moepack needs to know about one architecture, as data."""

    model_type: str  # config.json "model_type"
    hf_class: str  # transformers class name in config.json "architectures"
    gguf_arch: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES value)
    n_experts_key: str  # config key for the routed expert count
    expert_ffn_key: str  # config key for the routed expert intermediate size
    rules: tuple[TensorRule, ...]
    top_k_key: str = "num_experts_per_tok"
    n_shared_key: str | None = None  # config key for shared expert count, if any
    n_shared_default: int = 0  # shared experts when the key is absent (qwen2_moe: always one)
    scoring_default: str = "softmax"  # "softmax" or "sigmoid" when config carries no "scoring_func"
    norm_topk_default: bool = True  # renormalise the top-k weights when config says nothing
    group_keys: tuple[str, str] | None = None  # (n_group, topk_group) for group-limited routers
    router_bias_kind: str | None = None  # kind of the router bias tensor (DeepSeek-V3 e_score_correction_bias)
    expert_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down kinds
    kv_cache: str = "gqa"  # "gqa" (per-head K and V) or "mla" (llama.cpp caches the MLA latent; stages.budget)
    fused: tuple[FusedSplit, ...] = ()  # stacked expert tensors the reader splits per expert (gpt-oss, Llama 4)
    extra: dict[str, Any] = field(default_factory=dict)

    def match(self, name: str) -> MatchedName | None:
        for rule in self.rules:
            m = rule.pattern.match(name)
            if m:
                gd = m.groupdict()
                bid = int(gd["bid"]) if gd.get("bid") is not None else None
                xid = int(gd["xid"]) if gd.get("xid") is not None else None
                return MatchedName(rule, bid, xid)
        return None


# Every supported checkpoint names one routed expert's matrices `....experts.<id>.<proj>.weight` (TensorRule
# templates with {xid}, see _common.experts); the stacked form of a layer's experts drops the id.
_EXPERT_RX = re.compile(r"\.experts\.(\d+)\.")
_EXPERTS = ".experts."


def expert_id(name: str) -> int | None:
    """The routed expert a checkpoint tensor belongs to: `...experts.7.down_proj.weight` → 7; None otherwise."""
    m = _EXPERT_RX.search(name)
    return int(m.group(1)) if m else None


def expert_key(name: str) -> str:
    """One expert's matrix → the name of the layer's stacked entry: `.experts.7.` → `.experts.`."""
    return _EXPERT_RX.sub(_EXPERTS, name, count=1)


def renumber_expert(name: str, new: int) -> str:
    """The name of one expert's matrix after its expert is renumbered to `new`."""
    return _EXPERT_RX.sub(f"{_EXPERTS}{new}.", name, count=1)


def is_expert_key(key: str) -> bool:
    """Whether a (per-expert or stacked) checkpoint name is a routed expert's."""
    return _EXPERTS in key


# Every decoder-layer template starts with this prefix (_common.L); the MTP layer's own tensors do too.
_LAYER_RX = re.compile(r"model\.layers\.(\d+)\.")
# Buffers some checkpoints save that are recomputed from config.json (rotary frequencies); never weights.
DERIVED_BUFFERS = (".rotary_emb.inv_freq",)
# Weight kinds llama.cpp never quantizes although they are matrices: the linear-attention short convolution
# (llama-quant.cpp skips "ssm_conv1d"; Qwen3-Next conv1d, (channels, 1, kernel)).
F32_KINDS = ("conv1d",)


def layer_index(name: str) -> int | None:
    """The decoder layer a checkpoint tensor name belongs to (`model.layers.3.` → 3); None for the rest."""
    m = _LAYER_RX.match(name)
    return int(m.group(1)) if m else None


def beyond_decoder(layer: int | None, n_layers: int) -> bool:
    """Whether a tensor of `layer` sits past the decoder stack: DeepSeek-V3's multi-token-prediction layer (index
    num_hidden_layers) has a router and experts too, but it is not part of the served forward, not calibrated and
    not written."""
    return layer is not None and layer >= n_layers


class UnsupportedArchitecture(MoepackError, ValueError):
    pass


_REGISTRY: dict[str, ArchSpec] = {}


def register(fn: Callable[[], ArchSpec]) -> Callable[[], ArchSpec]:
    spec = fn()
    _REGISTRY[spec.model_type] = spec
    return fn


def supported() -> list[str]:
    return sorted(_REGISTRY)


def spec_for(model_type: str | None) -> ArchSpec:
    if model_type not in _REGISTRY:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; moepack supports: {', '.join(supported())}"
        )
    return _REGISTRY[model_type]
