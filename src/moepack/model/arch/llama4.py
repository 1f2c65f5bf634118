"""Llama 4 text (Llama4ForCausalLM, `llama4_text` checkpoints); llama.cpp runs it as `llama4`.

MoE layers (every `interleave_moe_layer_step`-th) keep their experts fused, in transformers' Llama4TextExperts
layout, which save_pretrained writes: `feed_forward.experts.gate_up_proj` (E, H, 2I) with gate | up concatenated
along the last axis and `down_proj` (E, I, H); beside them a router (sigmoid of the top-k logits, which scales the
expert's *input*) and one shared expert. The other layers have a dense FFN under `feed_forward`.
"""
from __future__ import annotations

from moepack.model.arch._common import L, dense_ffn, gqa_attention, skeleton
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register
from moepack.model.stored import FusedSplit

__all__: list[str] = []

_X = f"{L}.feed_forward.experts"
_E = f"{_X}.{{xid}}"

FUSED = (
    FusedSplit(f"{_X}.gate_up_proj", ((f"{_E}.gate_proj.weight", ("half0", "T")),  # (H, 2I) → (I, H)
                                      (f"{_E}.up_proj.weight", ("half1", "T")))),
    FusedSplit(f"{_X}.down_proj", ((f"{_E}.down_proj.weight", ("T",)),)),  # (I, H) → (H, I)
)


def _rules() -> tuple[TensorRule, ...]:
    return (
        skeleton()
        + gqa_attention()
        + tuple(TensorRule(f"{_E}.{p}.weight", Role.ROUTED_EXPERTS, p) for p in ("gate_proj", "up_proj", "down_proj"))
        + (TensorRule(f"{L}.feed_forward.router.weight", Role.ROUTER, "router"),)
        + dense_ffn("feed_forward.shared_expert", Role.SHARED_EXPERTS, "shexp_")
        + dense_ffn("feed_forward")
    )


@register
def llama4_text() -> ArchSpec:
    # Llama 4 Scout (16 experts, every layer MoE) / Maverick (128 experts, MoE every other layer): top-1 sigmoid
    # router beside a shared expert, chunked attention with every 4th layer global and without RoPE.
    return ArchSpec(
        model_type="llama4_text",
        hf_class="Llama4ForCausalLM",
        gguf_arch="llama4",
        n_experts_key="num_local_experts",
        expert_ffn_key="intermediate_size",
        rules=_rules(),
        n_shared_default=1,
        scoring_default="sigmoid",
        norm_topk_default=False,
        fused=FUSED,
        extra={"dense_ffn_key": "intermediate_size_mlp", "rope_freqs": True},  # llama3 RoPE: rope_freqs tensor
    )


@register
def llama4() -> ArchSpec:
    # Llama 4 as released (Llama4ForConditionalGeneration): the text model's config under text_config and its
    # weights under language_model.; moepack packs the text model (llama.cpp keeps vision in a separate mmproj).
    import dataclasses

    return dataclasses.replace(llama4_text(), model_type="llama4", hf_class="Llama4ForConditionalGeneration",
                               extra={"multimodal": ("text_config", "language_model.", "llama4_text")})
