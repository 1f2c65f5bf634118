"""Qwen3.5-MoE (Qwen3_5MoeForCausalLM, `qwen3_5_moe_text`; the hub's multimodal Qwen3_5MoeForConditionalGeneration,
`qwen3_5_moe`); llama.cpp runs it as `qwen35moe`. Qwen3-Next's hybrid (gated DeltaNet + gated full attention, MoE
beside a sigmoid-gated shared expert) with these differences, from llama.cpp's converter (conversion/qwen.py,
Qwen3_5MoeTextModel and its bases) and runtime (src/models/qwen35moe.cpp):
- the DeltaNet input projections are separate: in_proj_qkv (already [all q, all k, all v]), in_proj_z, in_proj_a,
  in_proj_b → attn_qkv, attn_gate, ssm_alpha, ssm_beta;
- when value heads outnumber key heads the converter reorders the value heads from grouped by key head to tiled
  (gguf.linear_attn.tile_v_heads), in every tensor indexed by value head;
- interleaved M-RoPE: rope.dimension_sections is required (the converter's default [11, 11, 10, 0]); text tokens
  carry one position in every section, so the text model rotates as plain partial RoPE;
- save_pretrained of the causal LM writes one tensor per expert; the hub checkpoints store each layer's experts
  fused as transformers holds them: `mlp.experts.gate_up_proj` (E, 2I, H), gate rows first, and `down_proj`
  (E, H, I), under `model.language_model.` beside a vision tower and an `mtp.*` head (neither is packed).
"""
from __future__ import annotations

import dataclasses

from moepack.model.arch._common import L, experts, gated_shared_expert, gqa_attention, skeleton
from moepack.model.arch.qwen_next import FULL, LINEAR, attention_layers, layer_types, recurrent_state_bytes
from moepack.model.arch.spec import ArchSpec, Role, TensorRule, register
from moepack.model.stored import FusedSplit

__all__: list[str] = []

_X = f"{L}.mlp.experts"
_E = f"{_X}.{{xid}}"

# Hub layout: stacked experts → per-expert (out, in) matrices (the layout ops cut one expert's slice).
FUSED = (
    FusedSplit(f"{_X}.gate_up_proj", ((f"{_E}.gate_proj.weight", ("T", "half0", "T")),  # (2I, H) → (I, H)
                                      (f"{_E}.up_proj.weight", ("T", "half1", "T")))),
    FusedSplit(f"{_X}.down_proj", ((f"{_E}.down_proj.weight", ()),)),  # (H, I)
)


def _linear_attention() -> tuple[TensorRule, ...]:
    a = f"{L}.linear_attn"
    return (
        TensorRule(f"{a}.in_proj_qkv.weight", Role.ATTENTION, "in_proj_qkv"),  # (2·n_k·dk + n_v·dv, H)
        TensorRule(f"{a}.in_proj_z.weight", Role.ATTENTION, "in_proj_z"),  # (n_v·dv, H)
        TensorRule(f"{a}.in_proj_a.weight", Role.ATTENTION, "in_proj_a"),  # (n_v, H)
        TensorRule(f"{a}.in_proj_b.weight", Role.ATTENTION, "in_proj_b"),  # (n_v, H)
        TensorRule(f"{a}.conv1d.weight", Role.ATTENTION, "conv1d"),  # (2·n_k·dk + n_v·dv, 1, kernel)
        TensorRule(f"{a}.dt_bias", Role.ATTENTION, "dt_bias"),  # (n_v,)
        TensorRule(f"{a}.A_log", Role.ATTENTION, "A_log"),  # (n_v,)
        TensorRule(f"{a}.norm.weight", Role.NORM, "ssm_norm"),  # the gated RMSNorm: stored as is (no +1)
        TensorRule(f"{a}.out_proj.weight", Role.ATTENTION, "out_proj"),  # (H, n_v·dv)
    )


# GGUF transforms by tensor kind (moepack.gguf.linear_attn): value heads tiled, zero-centred norms + 1.
_TRANSFORMS = {"in_proj_qkv": "vtile_qkv", "in_proj_z": "vtile_rows", "in_proj_a": "vtile_heads",
               "in_proj_b": "vtile_heads", "dt_bias": "vtile_heads", "A_log": "neg_exp_vtile",
               "conv1d": "squeeze_vtile", "out_proj": "vtile_cols",
               "attn_norm": "plus_one", "ffn_norm": "plus_one", "output_norm": "plus_one", "q_norm": "plus_one",
               "k_norm": "plus_one"}


@register
def qwen3_5_moe_text() -> ArchSpec:
    # Qwen3.5-35B-A3B: 256 experts, top-8, one gated shared expert, 3 linear-attention layers per full one.
    return ArchSpec(
        model_type="qwen3_5_moe_text",
        hf_class="Qwen3_5MoeForCausalLM",
        gguf_arch="qwen35moe",
        n_experts_key="num_experts",
        expert_ffn_key="moe_intermediate_size",
        rules=skeleton()
        + gqa_attention(qk_norm=True)
        + _linear_attention()
        + experts()
        + gated_shared_expert(),
        n_shared_default=1,
        norm_topk_default=True,  # the router always renormalises its top-k
        fused=FUSED,
        extra={"gguf_transforms": _TRANSFORMS, "layer_types": layer_types, "kv_layers": attention_layers,
               "recurrent_bytes": recurrent_state_bytes,
               "mixer_of": {".linear_attn.": LINEAR, ".self_attn.": FULL}, "unserved_prefixes": ("mtp.",)},
    )


@register
def qwen3_5_moe() -> ArchSpec:
    # As released (Qwen3_5MoeForConditionalGeneration): the text model's config under text_config, its weights
    # under model.language_model. (lm_head.weight at the top); the vision tower stays out (llama.cpp's mmproj).
    return dataclasses.replace(qwen3_5_moe_text(), model_type="qwen3_5_moe",
                               hf_class="Qwen3_5MoeForConditionalGeneration",
                               extra={"multimodal": ("text_config", "model.language_model.", "qwen3_5_moe_text")})
