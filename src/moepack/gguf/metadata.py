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
from moepack.gguf.vocab import add_vocab

if TYPE_CHECKING:
    from moepack.gguf.writer import TypedTensor

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


def _kv_heads(cfg: dict[str, Any]) -> int:
    # transformers' configs read an absent (or null) num_key_value_heads as multi-head attention.
    return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])


def _meta_common(w: gguf.GGUFWriter, view: Any, n_expert: int) -> None:
    cfg, f = view.config, view.facts
    w.add_context_length(int(_need(cfg, "max_position_embeddings")))
    w.add_embedding_length(f.hidden)
    w.add_block_count(f.n_layers)
    # The converter writes intermediate_size; an all-MoE config without it has only the expert width.
    w.add_feed_forward_length(int(cfg.get("intermediate_size") or f.expert_ffn))
    w.add_head_count(int(cfg["num_attention_heads"]))
    if view.spec.gguf_arch == "deepseek2":  # MLA runs as MQA over the compressed KV (the converter's note)
        w.add_head_count_kv(1)
    else:
        w.add_head_count_kv(_kv_heads(cfg))
    w.add_layer_norm_rms_eps(float(_need(cfg, "rms_norm_eps")))
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
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
    if cfg.get("head_dim") and view.spec.gguf_arch != "deepseek2":
        w.add_key_length(int(cfg["head_dim"]))
        w.add_value_length(int(cfg["head_dim"]))


def _meta_qwen3moe(w: gguf.GGUFWriter, view: Any) -> None:
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_qwen2moe(w: gguf.GGUFWriter, view: Any) -> None:
    w.add_expert_feed_forward_length(view.facts.expert_ffn)
    if (n := view.config.get("shared_expert_intermediate_size")) is not None:
        w.add_expert_shared_feed_forward_length(int(n))


def _meta_llama(w: gguf.GGUFWriter, view: Any) -> None:
    cfg = view.config
    # transformers' LlamaConfig reads an absent head_dim as hidden_size / num_attention_heads.
    w.add_rope_dimension_count(int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_olmoe(w: gguf.GGUFWriter, view: Any) -> None:
    cfg = view.config
    if _kv_heads(cfg) != int(cfg["num_attention_heads"]):
        raise WriteError("llama.cpp's olmoe runs multi-head attention only (its k_norm is full width); this model "
                         "has num_key_value_heads != num_attention_heads")
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_deepseek2(w: gguf.GGUFWriter, view: Any) -> None:
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


def _leading_dense(view: Any) -> int:
    dense = list(view.facts.dense_layers)
    if dense != list(range(len(dense))):
        raise WriteError(f"llama.cpp's deepseek2 needs the dense layers first; this model has dense layers {dense}")
    return len(dense)


# llama.cpp hard-codes top-k weight renormalisation for these architectures (deepseek2 reads expert_weights_norm).
_FIXED_NORM_TOPK = {"qwen3moe": True, "qwen2moe": False, "olmoe": False, "llama": True}
_ARCH_META: dict[str, Callable[[gguf.GGUFWriter, Any], None]] = {
    "qwen3moe": _meta_qwen3moe, "qwen2moe": _meta_qwen2moe, "llama": _meta_llama, "olmoe": _meta_olmoe,
    "deepseek2": _meta_deepseek2,
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


def write_metadata(w: gguf.GGUFWriter, view: Any, typed: list[TypedTensor], n_expert: int,
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
    w.add_string("moepack.writer", WRITER_ID)
    w.add_string("moepack.version", moepack.__version__)  # read at call time: the golden test pins it
    w.add_string("moepack.source_fingerprint", view.fingerprint())
    for key in sorted(extra):
        w.add_string(f"moepack.{key}", moepack_value(extra[key]))


def moepack_value(value: Any) -> str:
    """The string a moepack.* metadata key holds: compact JSON, keys sorted (deterministic bytes)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def has_metadata_writer(gguf_arch: str) -> bool:
    return gguf_arch in _ARCH_META
