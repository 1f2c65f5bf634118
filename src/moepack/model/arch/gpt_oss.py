"""gpt-oss 20b / 120b (GptOssForCausalLM); llama.cpp runs it as `gpt-oss`.

Checkpoints keep each layer's experts fused (transformers' GptOssExperts layout, which save_pretrained writes):
`mlp.experts.gate_up_proj` (E, H, 2I) with gate and up interleaved along the last axis, `gate_up_proj_bias`
(E, 2I), `down_proj` (E, I, H), `down_proj_bias` (E, H). The reader splits them into one (out, in) matrix and one
bias per expert; the router (`mlp.router`) has a bias too, and attention has biases and per-head sinks.
"""
from __future__ import annotations

from moepack.model.arch._common import L, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register
from moepack.model.stored import FusedSplit

__all__: list[str] = []

_X = f"{L}.mlp.experts"
_E = f"{_X}.{{xid}}"

# Stacked checkpoint tensor → per-expert tensors, each with the layout ops that cut it from one expert's slice.
FUSED = (
    FusedSplit(f"{_X}.gate_up_proj", ((f"{_E}.gate_proj.weight", ("even", "T")),  # (H, 2I) → (I, H)
                                      (f"{_E}.up_proj.weight", ("odd", "T")))),
    FusedSplit(f"{_X}.gate_up_proj_bias", ((f"{_E}.gate_proj.bias", ("even",)),  # (2I,) → (I,)
                                           (f"{_E}.up_proj.bias", ("odd",)))),
    FusedSplit(f"{_X}.down_proj", ((f"{_E}.down_proj.weight", ("T",)),)),  # (I, H) → (H, I)
    FusedSplit(f"{_X}.down_proj_bias", ((f"{_E}.down_proj.bias", ()),)),  # (H,)
)


def _rules() -> tuple[TensorRule, ...]:
    experts = tuple(TensorRule(f"{_E}.{p}.{w}", Role.ROUTED_EXPERTS, p if w == "weight" else f"{p}.bias")
                    for p in ("gate_proj", "up_proj", "down_proj") for w in ("weight", "bias"))
    return (
        skeleton()
        + gqa_attention(bias=True)
        + (TensorRule(f"{L}.self_attn.o_proj.bias", Role.ATTENTION, "o_proj.bias"),
           TensorRule(f"{L}.self_attn.sinks", Role.ATTENTION, "sinks"))
        + experts
        + (TensorRule(f"{L}.mlp.router.weight", Role.ROUTER, "router"),
           TensorRule(f"{L}.mlp.router.bias", Role.ROUTER, "router.bias"))
    )


@register
def gpt_oss() -> ArchSpec:
    # Softmax over the top-k router logits (router bias included), clamped SwiGLU experts with biases.
    return ArchSpec(
        model_type="gpt_oss",
        hf_class="GptOssForCausalLM",
        gguf_arch="gpt-oss",
        n_experts_key="num_local_experts",
        expert_ffn_key="intermediate_size",
        rules=_rules(),
        norm_topk_default=True,  # the softmax runs over the chosen k: weights sum to one
        fused=FUSED,
        extra={"attn_implementation": "eager"},  # attention sinks: transformers has no sdpa path for them
    )
