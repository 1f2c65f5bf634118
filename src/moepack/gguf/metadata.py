"""The GGUF metadata of a checkpoint view, key by key as llama.cpp's converter (convert_hf_to_gguf.py) writes it
for the llama.cpp that llama-cpp-python bundles: qwen3moe, qwen2moe, llama (Mixtral), olmoe, deepseek2
(DeepSeek-V2/V3: MLA with key_length_mla / value_length_mla, sigmoid gating + exp_probs_b for V3).

Values come from config.json; a key llama.cpp needs that the config lacks is an error, never an invented default.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import gguf
from gguf import GGMLQuantizationType

import moepack
from moepack.errors import MoepackError
from moepack.gguf.keys import Keys
from moepack.gguf.vocab import add_vocab

if TYPE_CHECKING:
    from moepack.gguf.tensors import TypedTensor
    from moepack.model.checkpoint import CheckpointView

__all__ = ["WriteError", "write_metadata", "has_metadata_writer", "moepack_value", "WRITER_ID", "QUANTIZED_BY"]

log = logging.getLogger(__name__)

T = GGMLQuantizationType
WRITER_ID = "moepack.gguf_out/2"  # bump when the bytes written for the same input change on purpose
QUANTIZED_BY = "moepack"  # general.quantized_by


class WriteError(MoepackError, ValueError):
    """The GGUF cannot be written as asked; the message says what to change."""


def _need(cfg: dict[str, Any], key: str) -> Any:
    """A config value llama.cpp needs; refused when absent instead of writing an invented default."""
    if cfg.get(key) is None:
        raise WriteError(f"config.json has no {key}, which llama.cpp needs in the GGUF; add the value the model "
                         "was trained with")
    return cfg[key]


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and scaling from transformers 5's rope_parameters or the older rope_theta/rope_scaling keys."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    if rope.get("rope_theta") is None:
        rope["rope_theta"] = _need(cfg, "rope_theta")
    return rope


def _rope_base(cfg: dict[str, Any], rope: dict[str, Any]) -> float:
    """rope_theta; Hunyuan's "dynamic" rope with a fixed alpha (NTK-alpha) only stretches the base, to
    theta * alpha^(d / (d - 2)), as transformers computes it and the converter writes it."""
    base = float(rope["rope_theta"])
    if rope.get("rope_type", rope.get("type")) == "dynamic" and rope.get("alpha"):
        d = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        base *= float(rope["alpha"]) ** (d / (d - 2))
    return base


def _kv_heads(cfg: dict[str, Any]) -> int:
    # transformers' configs read an absent (or null) num_key_value_heads as multi-head attention.
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def _meta_common(w: gguf.GGUFWriter, view: CheckpointView, n_expert: int) -> None:
    cfg, f = view.config, view.facts
    w.add_context_length(int(_need(cfg, "max_position_embeddings")))
    w.add_embedding_length(f.hidden)
    w.add_block_count(f.n_layers)
    # The converter writes intermediate_size; an all-MoE config without it has only the expert width.
    dense_key = view.spec.extra.get("dense_ffn_key", "intermediate_size")  # Llama 4: intermediate_size_mlp
    w.add_feed_forward_length(int(cfg.get(dense_key) or f.expert_ffn))
    w.add_head_count(int(cfg["num_attention_heads"]))
    if view.spec.kv_cache == "mla":  # MLA runs as MQA over the compressed KV (the converter's note)
        w.add_head_count_kv(1)
    else:
        w.add_head_count_kv(_kv_heads(cfg))
    w.add_layer_norm_rms_eps(float(_need(cfg, "rms_norm_eps")))
    rope = _rope(cfg)
    w.add_rope_freq_base(_rope_base(cfg, rope))
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if kind == "linear" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:  # as the converter's TextModel.set_gguf_parameters writes them
                add(float(rope[key]))
    w.add_vocab_size(f.vocab)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(f.top_k)
        w.add_expert_weights_norm(bool(f.norm_topk_prob))
    if cfg.get("head_dim") and view.spec.kv_cache != "mla":
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))


def _meta_qwen3moe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_qwen2moe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    w.add_expert_feed_forward_length(view.facts.expert_ffn)
    if (n := view.config.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(int(n))


def _meta_llama(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    cfg = view.config
    # transformers' LlamaConfig reads an absent head_dim as hidden_size / num_attention_heads.
    w.add_rope_dimension_count(int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_olmoe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    cfg = view.config
    if _kv_heads(cfg) != int(cfg["num_attention_heads"]):
        raise WriteError("llama.cpp's olmoe runs multi-head attention only (its k_norm is full width); this model "
                         "has num_key_value_heads != num_attention_heads")
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_deepseek2(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    cfg, f = view.config, view.facts
    kv_lora, rope_dim = int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
    w.add_leading_dense_block_count(_leading_dense(view))
    w.add_q_lora_rank(int(cfg.get("q_lora_rank") or 0))  # 0: plain attn_q (V2-Lite style)
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(int(cfg["qk_nope_head_dim"]) + rope_dim)
    w.add_value_length_mla(int(cfg["v_head_dim"]))
    w.add_rope_dimension_count(rope_dim)
    w.add_expert_feed_forward_length(f.expert_ffn)
    w.add_expert_shared_count(f.n_shared_experts)
    w.add_expert_weights_scale(float(f.routed_scaling_factor))
    gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
    if f.scoring not in gating:
        raise WriteError(f"llama.cpp's deepseek2 has no {f.scoring!r} expert scoring; supported: sigmoid, softmax")
    w.add_expert_gating_func(gating[f.scoring])
    if f.n_group and f.topk_group and 1 < f.n_group and f.topk_group < f.n_group:
        if cfg.get("topk_method") == "group_limited_greedy":
            log.warning("llama.cpp ranks expert groups by the sum of their top-2 scores (DeepSeek-V3); this "
                        "model's group_limited_greedy ranks by the max, so routing may differ slightly")
        w.add_expert_group_count(f.n_group)
        w.add_expert_group_used_count(f.topk_group)
    rope = _rope(cfg)
    if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))  # as the converter writes it


def _add_gating(w: gguf.GGUFWriter, scoring: str, arch: str) -> None:
    """expert_gating_func: llama.cpp's build_moe_ffn aborts without it for the archs that read it optionally."""
    gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
    if scoring not in gating:
        raise WriteError(f"llama.cpp's {arch} has no {scoring!r} expert scoring; supported: sigmoid, softmax")
    w.add_expert_gating_func(gating[scoring])


def _rotary_dim(cfg: dict[str, Any]) -> int:
    """Rotated dimensions per head: MiniMax-M2's rotary_dim, else head_dim x partial_rotary_factor (transformers 5
    saves it in rope_parameters)."""
    if cfg.get("rotary_dim"):
        return int(cfg["rotary_dim"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    factor = _rope(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    return int(head_dim * float(factor))


def _meta_minimax_m2(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    # The converter's MiniMaxM2Model: expert width from intermediate_size, rotary_dim, sigmoid gating.
    w.add_expert_feed_forward_length(view.facts.expert_ffn)
    w.add_rope_dimension_count(_rotary_dim(view.config))
    _add_gating(w, view.facts.scoring, "minimax-m2")


def _meta_gpt_oss(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """gpt-oss, as the converter's GptOssModel writes it: sliding window and expert width. llama.cpp hard-codes the
    rest (softmax over the chosen k, SwiGLU alpha 1.702 / limit 7, sliding layers 0, 2, 4, ...)."""
    cfg = view.config
    for key, want in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
        if cfg.get(key) is not None and abs(float(cfg[key]) - want) > 1e-6:
            raise WriteError(f"llama.cpp's gpt-oss computes its SwiGLU with {key} = {want}; this model has {cfg[key]}")
    w.add_sliding_window(int(_need(cfg, "sliding_window")))
    w.add_expert_feed_forward_length(view.facts.expert_ffn)
    types = cfg.get("layer_types")
    if types and any((t == "sliding_attention") != (i % 2 == 0) for i, t in enumerate(types)):
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])  # llama.cpp reads the array


def _meta_dots1(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    # The converter's Dots1Model: leading dense layers, shared experts, routed scale; sigmoid gating (the model's
    # router; llama.cpp aborts without a gating function).
    cfg, f = view.config, view.facts
    if _kv_heads(cfg) != int(cfg["num_attention_heads"]):
        raise WriteError("llama.cpp's dots1 runs multi-head attention only (its K and V are num_attention_heads "
                         "wide); this model has num_key_value_heads != num_attention_heads")
    w.add_expert_feed_forward_length(f.expert_ffn)
    w.add_leading_dense_block_count(_leading_dense(view))
    w.add_expert_shared_count(f.n_shared_experts)
    w.add_expert_weights_scale(float(f.routed_scaling_factor))
    _add_gating(w, f.scoring, "dots1")
    if f.n_group and f.topk_group and 1 < f.n_group and f.topk_group < f.n_group:  # else: not group-limited
        w.add_expert_group_count(f.n_group)
        w.add_expert_group_used_count(f.topk_group)


def _meta_hunyuan_moe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    # The converter's HunYuanMoEModel: the shared MLP's width (intermediate_size), the experts' width and count of
    # shared experts. llama.cpp sizes the routed experts by feed_forward_length and always routes with a softmax.
    f = view.facts
    w.add_expert_shared_feed_forward_length(int(_need(view.config, "intermediate_size")))
    w.add_expert_feed_forward_length(f.expert_ffn)
    w.add_expert_shared_count(f.n_shared_experts)


def _check_llama4(view: CheckpointView) -> None:
    """llama.cpp's llama4 hard-codes what transformers reads from config.json; refuse configs that differ."""
    cfg, f = view.config, view.facts
    n = f.n_layers
    fixed = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1,
             "use_qk_norm": f.n_experts != 128 if "use_qk_norm" in cfg else None}
    for key, want in fixed.items():
        if want is not None and cfg.get(key) is not None and cfg[key] != want:
            raise WriteError(f"llama.cpp's llama4 runs with {key} = {want}; this model has {cfg[key]}")
    if cfg.get("no_rope_layers") and list(cfg["no_rope_layers"]) != [int((i + 1) % 4 != 0) for i in range(n)]:
        raise WriteError("llama.cpp's llama4 skips RoPE in every 4th layer; this model's no_rope_layers differ")
    chunked = [t == "chunked_attention" for t in cfg.get("layer_types") or []]
    if chunked and chunked != [i % 4 < 3 for i in range(n)]:
        raise WriteError("llama.cpp's llama4 runs 3 chunked-attention layers, then one global; this model's "
                         "layer_types differ")


def _meta_llama4(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """Llama 4 text, as the converter's Llama4Model writes it: MoE every interleave_moe_layer_step-th layer."""
    cfg = view.config
    _check_llama4(view)
    w.add_rope_dimension_count(int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
    w.add_interleave_moe_layer_step(int(_need(cfg, "interleave_moe_layer_step")))
    w.add_expert_feed_forward_length(view.facts.expert_ffn)
    moe = [i for i in range(view.facts.n_layers) if (i + 1) % int(cfg["interleave_moe_layer_step"]) == 0]
    if list(view.facts.moe_layers) != moe:
        raise WriteError(f"llama.cpp's llama4 puts experts in layers {moe}; this model has them in "
                         f"{list(view.facts.moe_layers)}")


def _leading_dense(view: CheckpointView) -> int:
    dense = list(view.facts.dense_layers)
    if dense != list(range(len(dense))):
        raise WriteError(f"llama.cpp's {view.spec.gguf_arch} needs the dense layers first; this model has dense "
                         f"layers {dense}")
    return len(dense)


def _meta_glm4moe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """GLM-4.5 family, as the converter's Glm4MoeModel writes it (the MTP layer left out: no nextn_predict_layers)."""
    cfg, f = view.config, view.facts
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    partial = _rope(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))  # converter default
    w.add_rope_dimension_count(int(head_dim * float(partial)))  # rotary on the first part of each head only
    w.add_expert_feed_forward_length(f.expert_ffn)
    w.add_expert_shared_count(f.n_shared_experts)
    w.add_leading_dense_block_count(_leading_dense(view))
    if f.scoring != "sigmoid":
        raise WriteError(f"llama.cpp's glm4moe routes with sigmoid scores; this model's scoring is {f.scoring!r}")
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(float(f.routed_scaling_factor))
    if f.n_group and f.topk_group and 1 < f.n_group and f.topk_group < f.n_group:  # else: not group-limited
        w.add_expert_group_count(f.n_group)
        w.add_expert_group_used_count(f.topk_group)


def _meta_qwen3next(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """Qwen3-Next, as the converter's Qwen3NextModel writes it (the MTP head left out: no nextn_predict_layers)."""
    from moepack.model.arch.qwen_next import full_attention_interval

    cfg, f = view.config, view.facts
    if f.dense_layers:  # llama.cpp's qwen3next loads a router and experts in every layer
        raise WriteError(f"llama.cpp's {view.spec.gguf_arch} needs every layer to be MoE; this model has dense layers "
                         f"{list(f.dense_layers)} (mlp_only_layers / decoder_sparse_step)")
    k_dim, v_dim = int(_need(cfg, "linear_key_head_dim")), int(_need(cfg, "linear_value_head_dim"))
    if k_dim != v_dim:  # llama.cpp sizes both head widths by ssm.state_size
        raise WriteError(f"llama.cpp's {view.spec.gguf_arch} needs linear_key_head_dim == linear_value_head_dim "
                         f"({k_dim} != {v_dim})")
    w.add_expert_feed_forward_length(f.expert_ffn)
    w.add_expert_shared_feed_forward_length(int(_need(cfg, "shared_expert_intermediate_size")))
    w.add_ssm_conv_kernel(int(_need(cfg, "linear_conv_kernel_dim")))
    w.add_ssm_state_size(k_dim)
    w.add_ssm_group_count(int(_need(cfg, "linear_num_key_heads")))
    w.add_ssm_time_step_rank(int(_need(cfg, "linear_num_value_heads")))
    w.add_ssm_inner_size(v_dim * int(cfg["linear_num_value_heads"]))
    try:
        w.add_full_attention_interval(full_attention_interval(cfg))  # llama.cpp rebuilds the layer types from it
    except MoepackError as e:
        raise WriteError(str(e)) from None
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    partial = _rope(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))  # converter default
    w.add_rope_dimension_count(int(head_dim * float(partial)))  # rotary on the first quarter of each head


def _meta_qwen35moe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """Qwen3.5-MoE, as the converter's Qwen3_5MoeTextModel writes it: Qwen3-Next's keys plus the M-RoPE sections
    llama.cpp requires (rope_parameters' mrope_section, padded to four; the converter's default without one)."""
    _meta_qwen3next(w, view)
    cfg = view.config
    sections = [int(x) for x in _rope(cfg).get("mrope_section") or (11, 11, 10)]
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    rot = int(head_dim * float(_rope(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))))
    if sum(sections) > rot:  # ggml's M-RoPE asserts this at the first decode
        raise WriteError(f"llama.cpp's qwen35moe needs the M-RoPE sections {sections} (rope_parameters' "
                         f"mrope_section) to sum to at most the {rot} rotary dimensions of a head")
    w.add_rope_dimension_sections((sections + [0] * 4)[:4])


def _meta_glm_dsa(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """GLM-5 as the converter's GlmMoeDsaModel writes it: DeepSeek-V3's keys plus the DSA indexer's."""
    cfg = view.config
    _meta_deepseek2(w, view)
    partial = float(_rope(cfg).get("partial_rotary_factor", 1.0))
    if partial != 1.0:  # the converter rewrites the rope width with the partial factor
        w.add_rope_dimension_count(int(int(cfg["qk_rope_head_dim"]) * partial))
    w.add_indexer_head_count(int(_need(cfg, "index_n_heads")))
    w.add_indexer_key_length(int(_need(cfg, "index_head_dim")))
    w.add_indexer_top_k(int(_need(cfg, "index_topk")))
    if cfg.get("indexer_types") is not None:  # per layer: its own indexer ("full") or the previous one's top-k
        # gguf 0.19 has no constant for this key yet: llama-arch.cpp's LLM_KV_ATTENTION_INDEXER_TYPES
        key = gguf.Keys.Attention.Indexer.TOP_K.format(arch=w.arch).replace(".top_k", ".types")
        w.add_array(key, [t == "full" for t in cfg["indexer_types"]])


def _meta_ernie4_5_moe(w: gguf.GGUFWriter, view: CheckpointView) -> None:
    """ERNIE-4.5-MoE as the converter's Ernie4_5MoeModel writes it; softmax gating and the renormalised top-k are
    llama.cpp's fixed choices for this architecture (no keys)."""
    f, cfg = view.facts, view.config
    start, step = (f.moe_layers or (f.n_layers,))[0], int(cfg.get("moe_layer_interval") or 1)
    # llama.cpp's loader gives every layer from leading_dense_block_count on experts; its graph routes in those
    # with (i + 1) % step == 0: only a contiguous MoE tail is representable
    if list(f.moe_layers) != list(range(start, f.n_layers)) or f.scoring != "softmax":
        raise WriteError(f"llama.cpp's ernie4_5-moe runs softmax-routed MoE layers {start}..{f.n_layers - 1}; this "
                         f"model has {f.scoring} routing in layers {list(f.moe_layers)}")
    w.add_expert_feed_forward_length(f.expert_ffn)
    w.add_interleave_moe_layer_step(step)
    w.add_leading_dense_block_count(start)
    w.add_expert_shared_count(f.n_shared_experts)
    if f.n_shared_experts:  # the shared experts run as one FFN this wide
        w.add_expert_shared_feed_forward_length(f.expert_ffn * f.n_shared_experts)


# llama.cpp hard-codes top-k weight renormalisation for these architectures (deepseek2 reads expert_weights_norm).
_FIXED_NORM_TOPK = {"ernie4_5-moe": True, "hunyuan-moe": True, "qwen3next": True, "qwen35moe": True, "gpt-oss": True, "llama4": False,
                    "minimax-m2": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False, "llama": True}
_ARCH_META: dict[str, Callable[[gguf.GGUFWriter, Any], None]] = {
    "dots1": _meta_dots1, "hunyuan-moe": _meta_hunyuan_moe,
    "minimax-m2": _meta_minimax_m2, "gpt-oss": _meta_gpt_oss, "llama4": _meta_llama4,
    "qwen3moe": _meta_qwen3moe, "qwen2moe": _meta_qwen2moe, "llama": _meta_llama, "olmoe": _meta_olmoe,
    "deepseek2": _meta_deepseek2, "glm4moe": _meta_glm4moe, "qwen3next": _meta_qwen3next, "qwen35moe": _meta_qwen35moe,
    "ernie4_5-moe": _meta_ernie4_5_moe, "glm-dsa": _meta_glm_dsa,
}


def _file_type(typed: list[TypedTensor]) -> int:
    """general.file_type: the type holding most quantizable weights, as llama.cpp's LlamaFileType."""
    counts: dict[GGMLQuantizationType, int] = {}
    for t in typed:
        if t.out.quantizable:
            counts[t.qtype] = counts.get(t.qtype, 0) + t.out.numel
    if not counts:
        return gguf.LlamaFileType.ALL_F32
    top = max(sorted(counts, key=lambda q: q.name), key=lambda q: counts[q])
    if top == T.F32:
        return gguf.LlamaFileType.ALL_F32
    for name in (f"MOSTLY_{top.name}", f"MOSTLY_{top.name}_M"):
        if name in gguf.LlamaFileType.__members__:
            return gguf.LlamaFileType[name]
    return gguf.LlamaFileType.GUESSED


def write_metadata(w: gguf.GGUFWriter, view: CheckpointView, typed: list[TypedTensor], n_expert: int,
                    extra: Mapping[str, Any]) -> None:
    arch = view.spec.gguf_arch
    w.add_type("model")
    w.add_name(Path(view.root).name)
    _meta_common(w, view, n_expert)
    _ARCH_META[arch](w, view)
    fixed = _FIXED_NORM_TOPK.get(arch)
    if fixed is not None and n_expert and fixed != bool(view.facts.norm_topk_prob):
        log.warning("llama.cpp's %s always %s the top-k weights; this model's norm_topk_prob=%s differs", arch,
                    "renormalises" if fixed else "keeps", view.facts.norm_topk_prob)
    w.add_file_type(_file_type(typed))
    if any(t.qtype not in (T.F32, T.F16, T.BF16) for t in typed):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, view.root, view.facts.vocab)
    w.add_quantized_by(QUANTIZED_BY)
    w.add_string(Keys.WRITER, WRITER_ID)
    w.add_string(Keys.VERSION, moepack.__version__)  # read at call time: the golden test pins it
    w.add_string(Keys.SOURCE_FINGERPRINT, view.fingerprint())
    for key in sorted(extra):  # Keys.PRUNE_PLAN, QUANT_PLAN, RECIPE: JSON values
        w.add_string(key, moepack_value(extra[key]))


def moepack_value(value: Any) -> str:
    """The string a moepack.* metadata key holds: compact JSON, keys sorted (deterministic bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def has_metadata_writer(gguf_arch: str) -> bool:
    return gguf_arch in _ARCH_META
