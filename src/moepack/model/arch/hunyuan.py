"""Hunyuan-A13B (HunYuanMoEV1ForCausalLM); llama.cpp runs it as `hunyuan-moe`."""
from __future__ import annotations

from typing import Any

from moepack.model.arch._common import L, dense_ffn, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register

__all__: list[str] = []


def _attention() -> tuple[TensorRule, ...]:
    a = f"{L}.self_attn"
    rules = [TensorRule(f"{a}.{p}_proj.weight", Role.ATTENTION, f"{p}_proj") for p in "qkvo"]
    # per-head q/k RMS norms, applied after the rotary embedding (as llama.cpp's hunyuan-moe graph does too)
    rules += [TensorRule(f"{a}.query_layernorm.weight", Role.NORM, "q_norm"),
              TensorRule(f"{a}.key_layernorm.weight", Role.NORM, "k_norm")]
    return tuple(rules)


def _moe() -> tuple[TensorRule, ...]:
    e = f"{L}.mlp.experts.{{xid}}"
    return tuple(TensorRule(f"{e}.{p}.weight", Role.ROUTED_EXPERTS, p) for p in ("gate_proj", "up_proj", "down_proj")) \
        + (TensorRule(f"{L}.mlp.gate.wg.weight", Role.ROUTER, "router"),)  # softmax router, float32 in transformers


def _spec(model_type: str, extra: dict[str, Any]) -> ArchSpec:
    # Hunyuan-A13B (80B-A13B): every layer MoE with one always-on shared MLP (mlp.shared_mlp) beside 64 routed
    # experts, softmax top-k renormalised. transformers sizes both the experts and the shared MLP by
    # intermediate_size (the hub config's per-layer moe_intermediate_size / moe_topk / num_shared_expert lists
    # hold one value each).
    return ArchSpec(
        model_type=model_type,
        hf_class="HunYuanMoEV1ForCausalLM",
        gguf_arch="hunyuan-moe",
        n_experts_key="num_experts",
        expert_ffn_key="intermediate_size",
        top_k_key="moe_topk",
        rules=skeleton() + _attention() + _moe() + dense_ffn("mlp.shared_mlp", Role.SHARED_EXPERTS, "shexp_"),
        n_shared_default=1,
        norm_topk_default=True,  # transformers and llama.cpp renormalise the top-k softmax weights
        extra=extra,
    )


@register
def hunyuan_v1_moe() -> ArchSpec:
    return _spec("hunyuan_v1_moe", {})


@register
def hunyuan() -> ArchSpec:
    # Tencent's released config.json says model_type "hunyuan" (its remote code); transformers runs the same
    # weights and config keys as hunyuan_v1_moe.
    return _spec("hunyuan", {"hf_model_type": "hunyuan_v1_moe", "hf_config_keys": {"attention_head_dim": "head_dim"}})
