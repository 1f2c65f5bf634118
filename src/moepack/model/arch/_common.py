"""Name templates shared by several architectures (the Llama-style decoder skeleton)."""
from __future__ import annotations

from moepack.model.arch.spec import Role, TensorRule

__all__ = ["skeleton", "gqa_attention", "experts", "dense_ffn", "gated_shared_expert"]

L = "model.layers.{bid}"


def skeleton() -> tuple[TensorRule, ...]:
    """Embedding, output head, final and per-layer norms: every supported architecture has these."""
    return (
        TensorRule("model.embed_tokens.weight", Role.EMBEDDING, "token_embd"),
        TensorRule("lm_head.weight", Role.OUTPUT, "output"),
        TensorRule("model.norm.weight", Role.NORM, "output_norm"),
        TensorRule(f"{L}.input_layernorm.weight", Role.NORM, "attn_norm"),
        TensorRule(f"{L}.post_attention_layernorm.weight", Role.NORM, "ffn_norm"),
    )


def gqa_attention(bias: bool = False, qk_norm: bool = False) -> tuple[TensorRule, ...]:
    rules = [TensorRule(f"{L}.self_attn.{p}_proj.weight", Role.ATTENTION, f"{p}_proj") for p in "qkvo"]
    if bias:  # qwen2_moe
        rules += [TensorRule(f"{L}.self_attn.{p}_proj.bias", Role.ATTENTION, f"{p}_proj.bias") for p in "qkv"]
    if qk_norm:  # qwen3_moe (per head), olmoe (full width)
        rules += [TensorRule(f"{L}.self_attn.{p}_norm.weight", Role.NORM, f"{p}_norm") for p in "qk"]
    return tuple(rules)


def experts(prefix: str = "mlp",
            projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> tuple[TensorRule, ...]:
    """Routed experts, one tensor per expert as checkpoints store them, plus the router."""
    rules = [TensorRule(f"{L}.{prefix}.experts.{{xid}}.{p}.weight", Role.ROUTED_EXPERTS, p) for p in projs]
    rules.append(TensorRule(f"{L}.{prefix}.gate.weight", Role.ROUTER, "router"))
    return tuple(rules)


def dense_ffn(name: str = "mlp", role: Role = Role.DENSE_FFN, kind_prefix: str = "") -> tuple[TensorRule, ...]:
    return tuple(
        TensorRule(f"{L}.{name}.{p}.weight", role, f"{kind_prefix}{p}") for p in ("gate_proj", "up_proj", "down_proj")
    )


def gated_shared_expert() -> tuple[TensorRule, ...]:
    """Qwen's shared expert (Qwen2-MoE, Qwen3-Next, Qwen3.5): a dense FFN whose output a sigmoid gate scales."""
    return dense_ffn("mlp.shared_expert", Role.SHARED_EXPERTS, "shexp_") + (
        TensorRule(f"{L}.mlp.shared_expert_gate.weight", Role.SHARED_EXPERTS, "shexp_gate"),)
