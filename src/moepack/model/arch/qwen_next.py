"""Qwen3-Next (Qwen3NextForCausalLM): hybrid layers of gated DeltaNet linear attention and gated full attention,
every FFN a softmax top-k MoE beside one shared expert behind a sigmoid gate.

Facts from llama.cpp's converter (conversion/qwen.py, Qwen3NextModel) and runtime (src/models/qwen3next.cpp):
- a linear-attention layer holds `linear_attn.{in_proj_qkvz, in_proj_ba, conv1d, dt_bias, A_log, norm, out_proj}`;
  the converter splits in_proj_qkvz (rows per key head [q, k, v, z]) into attn_qkv (all q, all k, all v) and
  attn_gate (z), writes A_log as -exp(A_log), dt_bias as ssm_dt.bias, conv1d squeezed to (channels, kernel);
- a full-attention layer's q_proj is twice as wide: per head [query, output gate]; rotary on the first
  partial_rotary_factor (default 0.25) of each head;
- RMSNorm weights are stored zero-centred (transformers computes x·(1 + w)): the converter adds 1 to every
  `*norm.weight` except the gated linear_attn.norm;
- llama.cpp keeps ssm_conv1d, ssm_a, ssm_dt and the norms in F32;
- the multi-token-prediction head (`mtp.*`) is not part of the served forward.
"""
from __future__ import annotations

from typing import Any

from moepack.errors import MoepackError
from moepack.model.arch._common import L, dense_ffn, experts, gated_shared_expert, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__ = ["layer_types", "full_attention_interval", "attention_layers", "recurrent_state_bytes", "LINEAR", "FULL"]

LINEAR, FULL = "linear_attention", "full_attention"


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each decoder layer's token mixer, as transformers decides it: config's layer_types, else every
    full_attention_interval-th layer (default 4) is full attention."""
    n = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types:
        if len(types) != n or set(types) - {LINEAR, FULL}:
            raise MoepackError(f"config.json layer_types must list {LINEAR!r} or {FULL!r} for each of the {n} "
                               f"layers; got {types}")
        return list(types)
    step = int(cfg.get("full_attention_interval") or 4)
    return [FULL if (i + 1) % step == 0 else LINEAR for i in range(n)]


def full_attention_interval(cfg: dict[str, Any]) -> int:
    """The interval llama.cpp rebuilds the layer types from ((i + 1) % interval == 0: full attention); an
    error when the model's layer types follow no such interval (llama.cpp's GGUF would run other layers)."""
    types = layer_types(cfg)
    step = types.index(FULL) + 1 if FULL in types else len(types) + 1
    want = [FULL if (i + 1) % step == 0 else LINEAR for i in range(len(types))]
    if types != want:
        raise MoepackError(f"llama.cpp's qwen3next places a full-attention layer every full_attention_interval "
                           f"layers; this model's layer_types {types} follow no interval")
    return step


def attention_layers(cfg: dict[str, Any]) -> int:
    """Layers with a KV cache: llama.cpp's hybrid memory caches K and V of the full-attention layers only."""
    return layer_types(cfg).count(FULL)


def recurrent_state_bytes(cfg: dict[str, Any]) -> int:
    """llama.cpp's recurrent memory for one sequence (llama_memory_recurrent, F32), whatever the context: per
    linear-attention layer the short convolution's last kernel − 1 inputs, (K − 1)·(2·n_k·dk + n_v·dv) values
    (hparams.n_embd_r), and the DeltaNet state, dk·n_v·dv values (n_embd_s; llama.cpp's state_size is dk)."""
    conv = 2 * int(cfg["linear_num_key_heads"]) * int(cfg["linear_key_head_dim"])
    inner = int(cfg["linear_num_value_heads"]) * int(cfg["linear_value_head_dim"])
    per_layer = (int(cfg["linear_conv_kernel_dim"]) - 1) * (conv + inner) + int(cfg["linear_key_head_dim"]) * inner
    return 4 * per_layer * layer_types(cfg).count(LINEAR)


def _linear_attention() -> tuple[TensorRule, ...]:
    a = f"{L}.linear_attn"
    return (
        TensorRule(f"{a}.in_proj_qkvz.weight", Role.ATTENTION, "in_proj_qkvz"),  # (2·Kd + 2·Vd, H), per key head
        TensorRule(f"{a}.in_proj_ba.weight", Role.ATTENTION, "in_proj_ba"),  # (2·n_v_heads, H)
        TensorRule(f"{a}.conv1d.weight", Role.ATTENTION, "conv1d"),  # (2·Kd + Vd, 1, kernel), F32 in llama.cpp
        TensorRule(f"{a}.dt_bias", Role.ATTENTION, "dt_bias"),
        TensorRule(f"{a}.A_log", Role.ATTENTION, "A_log"),
        TensorRule(f"{a}.norm.weight", Role.NORM, "ssm_norm"),  # the gated RMSNorm: stored as is (no +1)
        TensorRule(f"{a}.out_proj.weight", Role.ATTENTION, "out_proj"),
    )


# GGUF transforms by tensor kind (moepack.gguf.names); in_proj_qkvz is split into two tensors there.
_TRANSFORMS = {"A_log": "neg_exp", "conv1d": "squeeze", "attn_norm": "plus_one", "ffn_norm": "plus_one",
               "output_norm": "plus_one", "q_norm": "plus_one", "k_norm": "plus_one"}


@register
def qwen3_next() -> ArchSpec:
    # Qwen3-Next-80B-A3B: 512 experts, top-10, one gated shared expert, 3 linear-attention layers per full one.
    return ArchSpec(
        model_type="qwen3_next",
        hf_class="Qwen3NextForCausalLM",
        gguf_arch="qwen3next",
        n_experts_key="num_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=skeleton()
        + gqa_attention(qk_norm=True)
        + _linear_attention()
        + experts()
        + gated_shared_expert()
        + dense_ffn(),
        n_shared_default=1,
        norm_topk_default=True,
        extra={"gguf_transforms": _TRANSFORMS, "layer_types": layer_types, "kv_layers": attention_layers,
               "recurrent_bytes": recurrent_state_bytes,
               "mixer_of": {".linear_attn.": LINEAR, ".self_attn.": FULL}, "unserved_prefixes": ("mtp.",)},
    )
