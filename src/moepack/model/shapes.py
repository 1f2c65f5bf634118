"""Every tensor of a checkpoint, derived from its config.json alone: plan a model before downloading its weights.

The tables below give each architecture's tensor shapes as expressions over named config dimensions, keyed by
(role, kind) of the name templates in `moepack.model.arch`, and say which layers are MoE layers. `config_view(dir)`
builds a `CheckpointView` of the tensors the served model has (the multi-token-prediction layers that llama.cpp
does not run are left out), with no weight file behind it: sizes, budgets and estimates work on it; loading data
does not. tests/test_shapes.py checks every table against the headers of real checkpoints of each architecture.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

from moepack.model.arch import EXPERT_COUNT_KEYS, ArchSpec, Role, TensorRule, spec_for
from moepack.model.checkpoint import (CheckpointError, CheckpointView, TensorRef, config_get, facts_from_config,
                                      open_checkpoint, read_config, text_config)
from moepack.model.stored import RawTensor, Stored

__all__ = ["config_dims", "derive_tensors", "config_view", "open_for_planning", "moe_layer_ids", "ShapeError"]

log = logging.getLogger(__name__)

Shape = tuple[str, ...]  # each entry a product of dimension names, e.g. "NH*QK"


class ShapeError(CheckpointError):
    pass


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def config_dims(spec: ArchSpec, cfg: dict[str, Any]) -> dict[str, int]:
    """The named dimensions the shape tables use. A key the architecture needs and the config lacks is an error."""
    def need(*keys: str) -> int:
        v = config_get(cfg, *keys)
        if v is None:
            raise ShapeError(f"config.json has no {' / '.join(keys)}; cannot derive the {spec.model_type} tensor shapes")
        return int(v)

    d = {"H": need("hidden_size"), "V": need("vocab_size"), "NH": need("num_attention_heads"),
         "FE": need(spec.expert_ffn_key), "E": need(spec.n_experts_key, *EXPERT_COUNT_KEYS), "ONE": 1}
    d["NKV"] = int(config_get(cfg, "num_key_value_heads") or d["NH"])  # absent: multi-head attention
    if spec.kv_cache == "mla":
        d |= {"QL": int(cfg.get("q_lora_rank") or 0), "KVL": need("kv_lora_rank"), "QN": need("qk_nope_head_dim"),
              "QR": need("qk_rope_head_dim"), "VH": need("v_head_dim")}
    else:
        d["HD"] = _head_dim(cfg)
    if spec.model_type not in ("mixtral", "olmoe", "qwen3_5_moe_text"):  # (Qwen3.5: every layer MoE)
        d["F"] = need(spec.extra.get("dense_ffn_key", "intermediate_size"))  # the dense FFN of non-MoE layers
    if spec.model_type in ("qwen2_moe", "qwen3_next", "qwen3_5_moe_text"):
        d["FS"] = need("shared_expert_intermediate_size")
    elif spec.n_shared_key:
        d["FS"] = d["FE"] * int(config_get(cfg, spec.n_shared_key) or 0)
    elif spec.n_shared_default:  # Llama 4: one shared expert of the routed experts' width
        d["FS"] = d["FE"] * spec.n_shared_default
    elif spec.n_shared_default:  # Hunyuan: one shared MLP as wide as an expert
        d["FS"] = d["FE"] * spec.n_shared_default
    if spec.model_type == "glm_moe_dsa":  # the DSA indexer's heads and their width
        d |= {"IH": need("index_n_heads"), "ID": need("index_head_dim")}
    if "layer_types" in spec.extra:  # hybrid models: the linear-attention (gated DeltaNet) widths
        d |= {"LK": need("linear_num_key_heads"), "LV": need("linear_num_value_heads"),
              "DK": need("linear_key_head_dim"), "DV": need("linear_value_head_dim"),
              "KC": need("linear_conv_kernel_dim")}
    return d


_SKELETON: dict[tuple[Role, str], Shape] = {
    (Role.EMBEDDING, "token_embd"): ("V", "H"), (Role.OUTPUT, "output"): ("V", "H"),
    (Role.NORM, "output_norm"): ("H",), (Role.NORM, "attn_norm"): ("H",), (Role.NORM, "ffn_norm"): ("H",),
    (Role.ROUTER, "router"): ("E", "H"),
    (Role.DENSE_FFN, "gate_proj"): ("F", "H"), (Role.DENSE_FFN, "up_proj"): ("F", "H"),
    (Role.DENSE_FFN, "down_proj"): ("H", "F"),
}
_EXPERTS = {(Role.ROUTED_EXPERTS, "gate_proj"): ("FE", "H"), (Role.ROUTED_EXPERTS, "up_proj"): ("FE", "H"),
            (Role.ROUTED_EXPERTS, "down_proj"): ("H", "FE")}
_GQA = {(Role.ATTENTION, "q_proj"): ("NH*HD", "H"), (Role.ATTENTION, "k_proj"): ("NKV*HD", "H"),
        (Role.ATTENTION, "v_proj"): ("NKV*HD", "H"), (Role.ATTENTION, "o_proj"): ("H", "NH*HD")}
_SHARED = {(Role.SHARED_EXPERTS, "shexp_gate_proj"): ("FS", "H"), (Role.SHARED_EXPERTS, "shexp_up_proj"): ("FS", "H"),
           (Role.SHARED_EXPERTS, "shexp_down_proj"): ("H", "FS")}
_MLA = {  # DeepSeek-V2/V3 multi-head latent attention
    (Role.ATTENTION, "q_proj"): ("NH*QN+NH*QR", "H"),  # without a q LoRA (V2-Lite)
    (Role.ATTENTION, "q_a_proj"): ("QL", "H"), (Role.NORM, "q_a_norm"): ("QL",),
    (Role.ATTENTION, "q_b_proj"): ("NH*QN+NH*QR", "QL"),
    (Role.ATTENTION, "kv_a_proj"): ("KVL+QR", "H"), (Role.NORM, "kv_a_norm"): ("KVL",),
    (Role.ATTENTION, "kv_b_proj"): ("NH*QN+NH*VH", "KVL"), (Role.ATTENTION, "o_proj"): ("H", "NH*VH"),
    (Role.ROUTER, "router_bias"): ("E",),
}
_GATED_DELTA_NET = {  # Qwen3-Next's linear attention; q, k: LK heads of DK, v, z: LV heads of DV
    (Role.ATTENTION, "in_proj_qkvz"): ("LK*DK+LK*DK+LV*DV+LV*DV", "H"), (Role.ATTENTION, "in_proj_ba"): ("LV+LV", "H"),
    (Role.ATTENTION, "conv1d"): ("LK*DK+LK*DK+LV*DV", "ONE", "KC"), (Role.ATTENTION, "dt_bias"): ("LV",),
    (Role.ATTENTION, "A_log"): ("LV",), (Role.NORM, "ssm_norm"): ("DV",), (Role.ATTENTION, "out_proj"): ("H", "LV*DV"),
}
_GPT_OSS = {  # attention biases and per-head sinks; per-expert biases split from the fused gate_up/down biases
    (Role.ATTENTION, "q_proj.bias"): ("NH*HD",), (Role.ATTENTION, "k_proj.bias"): ("NKV*HD",),
    (Role.ATTENTION, "v_proj.bias"): ("NKV*HD",), (Role.ATTENTION, "o_proj.bias"): ("H",),
    (Role.ATTENTION, "sinks"): ("NH",), (Role.ROUTER, "router.bias"): ("E",),
    (Role.ROUTED_EXPERTS, "gate_proj.bias"): ("FE",), (Role.ROUTED_EXPERTS, "up_proj.bias"): ("FE",),
    (Role.ROUTED_EXPERTS, "down_proj.bias"): ("H",),
}
_HUNYUAN = _SKELETON | _EXPERTS | _GQA | _SHARED | {(Role.NORM, "q_norm"): ("HD",), (Role.NORM, "k_norm"): ("HD",)}
SHAPES: dict[str, dict[tuple[Role, str], Shape]] = {
    "llama4_text": _SKELETON | _EXPERTS | _GQA | _SHARED,
    "gpt_oss": _SKELETON | _EXPERTS | _GQA | _GPT_OSS,
    "qwen3_moe": _SKELETON | _EXPERTS | _GQA | {(Role.NORM, "q_norm"): ("HD",), (Role.NORM, "k_norm"): ("HD",)},
    "qwen2_moe": _SKELETON | _EXPERTS | _GQA | _SHARED | {
        (Role.ATTENTION, "q_proj.bias"): ("NH*HD",), (Role.ATTENTION, "k_proj.bias"): ("NKV*HD",),
        (Role.ATTENTION, "v_proj.bias"): ("NKV*HD",), (Role.SHARED_EXPERTS, "shexp_gate"): ("ONE", "H")},
    "mixtral": _SKELETON | _GQA | {(Role.ROUTED_EXPERTS, "w1"): ("FE", "H"), (Role.ROUTED_EXPERTS, "w3"): ("FE", "H"),
                                   (Role.ROUTED_EXPERTS, "w2"): ("H", "FE")},
    "olmoe": _SKELETON | _EXPERTS | _GQA | {(Role.NORM, "q_norm"): ("NH*HD",), (Role.NORM, "k_norm"): ("NKV*HD",)},
    "deepseek_v3": _SKELETON | _EXPERTS | _SHARED | _MLA,
    "deepseek_v2": _SKELETON | _EXPERTS | _SHARED | _MLA,
    "qwen3_next": _SKELETON | _EXPERTS | _GQA | _SHARED | _GATED_DELTA_NET | {
        (Role.ATTENTION, "q_proj"): ("NH*HD+NH*HD", "H"),  # per head [query, output gate]
        (Role.NORM, "q_norm"): ("HD",), (Role.NORM, "k_norm"): ("HD",),
        (Role.SHARED_EXPERTS, "shexp_gate"): ("ONE", "H")},
    "qwen3_5_moe_text": _SKELETON | _EXPERTS | _GQA | _SHARED | {  # Qwen3-Next's, with separate DeltaNet inputs
        (Role.ATTENTION, "in_proj_qkv"): ("LK*DK+LK*DK+LV*DV", "H"), (Role.ATTENTION, "in_proj_z"): ("LV*DV", "H"),
        (Role.ATTENTION, "in_proj_a"): ("LV", "H"), (Role.ATTENTION, "in_proj_b"): ("LV", "H"),
        (Role.ATTENTION, "conv1d"): ("LK*DK+LK*DK+LV*DV", "ONE", "KC"), (Role.ATTENTION, "dt_bias"): ("LV",),
        (Role.ATTENTION, "A_log"): ("LV",), (Role.NORM, "ssm_norm"): ("DV",),
        (Role.ATTENTION, "out_proj"): ("H", "LV*DV"), (Role.ATTENTION, "q_proj"): ("NH*HD+NH*HD", "H"),
        (Role.NORM, "q_norm"): ("HD",), (Role.NORM, "k_norm"): ("HD",), (Role.SHARED_EXPERTS, "shexp_gate"): ("ONE", "H")},
    "minimax_m2": _SKELETON | _GQA | {  # Mixtral-style expert names, full-width q/k norms, router bias
        (Role.ROUTED_EXPERTS, "w1"): ("FE", "H"), (Role.ROUTED_EXPERTS, "w3"): ("FE", "H"),
        (Role.ROUTED_EXPERTS, "w2"): ("H", "FE"), (Role.NORM, "q_norm"): ("NH*HD",), (Role.NORM, "k_norm"): ("NKV*HD",),
        (Role.ROUTER, "router_bias"): ("E",)},
    "dots1": _SKELETON | _EXPERTS | _GQA | _SHARED | {  # DeepSeek-V3's MoE, Qwen3's attention
        (Role.NORM, "q_norm"): ("HD",), (Role.NORM, "k_norm"): ("HD",), (Role.ROUTER, "router_bias"): ("E",)},
    "hunyuan_v1_moe": _HUNYUAN, "hunyuan": _HUNYUAN,  # Hunyuan-A13B's released config says "hunyuan"
    "kimi_k2": _SKELETON | _EXPERTS | _SHARED | _MLA,
    "ernie4_5_moe": _SKELETON | _EXPERTS | _GQA | _SHARED | {(Role.ROUTER, "router_bias"): ("ONE", "E")},
    "glm_moe_dsa": _SKELETON | _EXPERTS | _SHARED | _MLA | {  # + the DSA indexer (IH heads of width ID)
        (Role.ATTENTION, "indexer_wq_b"): ("IH*ID", "QL"), (Role.ATTENTION, "indexer_wk"): ("ID", "H"),
        (Role.NORM, "indexer_k_norm"): ("ID",), (Role.NORM, "indexer_k_norm.bias"): ("ID",),
        (Role.ATTENTION, "indexer_proj"): ("IH", "H")},
    "glm4_moe": _SKELETON | _EXPERTS | _GQA | _SHARED | {
        (Role.ATTENTION, "q_proj.bias"): ("NH*HD",), (Role.ATTENTION, "k_proj.bias"): ("NKV*HD",),
        (Role.ATTENTION, "v_proj.bias"): ("NKV*HD",), (Role.NORM, "q_norm"): ("HD",), (Role.NORM, "k_norm"): ("HD",),
        (Role.ROUTER, "router_bias"): ("E",)},
}


def _deepseek_moe(cfg: dict[str, Any], i: int) -> bool:
    return i >= int(cfg.get("first_k_dense_replace") or 0) and i % int(cfg.get("moe_layer_freq") or 1) == 0


def _ernie_moe(cfg: dict[str, Any], i: int) -> bool:
    def get(key: str, default: int) -> int:  # transformers' Ernie4_5_MoeConfig defaults; end -1: the last layer
        return default if cfg.get(key) is None else int(cfg[key])

    end = get("moe_layer_end_index", -1)
    step, start = get("moe_layer_interval", 1), get("moe_layer_start_index", 1)
    return (i + 1) % step == 0 and start <= i and (end < 0 or i <= end)


def _qwen_moe(cfg: dict[str, Any], i: int) -> bool:
    step = int(cfg.get("decoder_sparse_step") or 1)
    return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0


def _llama4_moe(cfg: dict[str, Any], i: int) -> bool:
    step = int(cfg.get("interleave_moe_layer_step") or 1)
    return i in cfg["moe_layers"] if cfg.get("moe_layers") is not None else (i + 1) % step == 0


# Which layers route to experts (transformers' own rule for each architecture).
MOE_LAYER: dict[str, Callable[[dict[str, Any], int], bool]] = {
    "qwen3_moe": _qwen_moe, "qwen2_moe": _qwen_moe, "qwen3_next": _qwen_moe, "qwen3_5_moe_text": _qwen_moe, "deepseek_v3": _deepseek_moe, "deepseek_v2": _deepseek_moe,
    "mixtral": lambda cfg, i: True, "olmoe": lambda cfg, i: True, "gpt_oss": lambda cfg, i: True,
    "llama4_text": _llama4_moe,
    "minimax_m2": lambda cfg, i: True, "dots1": _deepseek_moe, "hunyuan_v1_moe": lambda cfg, i: True,
    "hunyuan": lambda cfg, i: True,
    "kimi_k2": _deepseek_moe, "glm4_moe": _deepseek_moe, "ernie4_5_moe": _ernie_moe, "glm_moe_dsa": _deepseek_moe,
}


def moe_layer_ids(spec: ArchSpec, cfg: dict[str, Any]) -> list[int]:
    return [i for i in range(int(cfg["num_hidden_layers"])) if MOE_LAYER[spec.model_type](cfg, i)]


def _eval(expr: str, dims: dict[str, int]) -> int:
    """A sum of products of dimension names: 'NH*QN+NH*QR'."""
    return sum(math.prod(dims[f] for f in term.split("*")) for term in expr.split("+"))


def _present(spec: ArchSpec, cfg: dict[str, Any], dims: dict[str, int], rule: TensorRule) -> bool:
    """Whether the served model has this tensor at all (per layer kind is decided by the caller)."""
    if rule.kind == "output":
        return not cfg.get("tie_word_embeddings", False)
    if spec.kv_cache == "mla" and rule.kind in ("q_a_proj", "q_a_norm", "q_b_proj", "q_proj"):
        return (rule.kind == "q_proj") == (dims["QL"] == 0)
    if rule.role is Role.SHARED_EXPERTS:
        return dims.get("FS", 0) > 0
    if (flag := spec.extra.get("present_if", {}).get(rule.kind)) is not None:  # GLM: use_qk_norm, attention_bias
        return bool(cfg.get(flag))
    return True


def _layers_for(rule: TensorRule, moe: set[int], n_layers: int) -> list[int | None]:
    if "{bid}" not in rule.template:
        return [None]
    if rule.role in (Role.ROUTED_EXPERTS, Role.ROUTER, Role.SHARED_EXPERTS):
        return sorted(moe)
    if rule.role is Role.DENSE_FFN:
        return [i for i in range(n_layers) if i not in moe]
    return list(range(n_layers))


def _mixer_layers(spec: ArchSpec, cfg: dict[str, Any], rule: TensorRule,
                  layers: list[int | None]) -> list[int | None]:
    """Hybrid models: a token mixer's tensors (linear_attn / self_attn) only in the layers of its type."""
    types_of = spec.extra.get("layer_types")
    mixer = next((t for part, t in spec.extra.get("mixer_of", {}).items() if part in rule.template), None)
    if types_of is None or mixer is None:
        return layers
    types = types_of(cfg)
    return [i for i in layers if i is not None and types[i] == mixer]


def derive_tensors(spec: ArchSpec, cfg: dict[str, Any], dtype: str = "BF16") -> dict[str, TensorRef]:
    """name → TensorRef (no file: offset 0) of every tensor the served model has, from the config alone."""
    table = SHAPES[spec.model_type]
    dims = config_dims(spec, cfg)
    moe, n_layers = set(moe_layer_ids(spec, cfg)), int(cfg["num_hidden_layers"])
    width = {"BF16": 2, "F16": 2, "F32": 4}
    out: dict[str, TensorRef] = {}
    for rule in spec.rules:
        if not _present(spec, cfg, dims, rule) or (rule.role, rule.kind) not in table:
            continue
        if rule.kind == "router_bias" and spec.router_bias_kind is None:
            continue
        shape = tuple(_eval(e, dims) for e in table[(rule.role, rule.kind)])
        for layer in _mixer_layers(spec, cfg, rule, _layers_for(rule, moe, n_layers)):
            for xid in range(dims["E"]) if "{xid}" in rule.template else [None]:
                name = rule.template.replace("{bid}", str(layer)).replace("{xid}", str(xid))
                dt = "F32" if rule.kind == "router_bias" else dtype  # DeepSeek-V3 keeps its correction bias in f32
                out[name] = TensorRef(name, shape, dt, None, 0, math.prod(shape) * width[dt], rule.role, rule.kind,
                                      layer, xid)
    return out


def config_stored(tensors: dict[str, TensorRef], cfg: dict[str, Any]) -> dict[str, TensorRef]:
    """Tensors derived from config.json alone, with how the release stores them where its quantization_config
    says (fp8: every weight matrix but the embeddings, the output and the routers, as DeepSeek-V3's release)."""
    import dataclasses

    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8" or not q.get("weight_block_size"):
        return tensors
    b0, b1 = q["weight_block_size"]
    out = dict(tensors)
    for n, r in tensors.items():
        if r.quantizable and r.role.value not in ("embedding", "output") and len(r.shape) == 2:
            grid = (math.ceil(r.shape[0] / b0), math.ceil(r.shape[1] / b1))
            parts = (RawTensor(n, r.shape, "F8_E4M3", None, 0, r.numel),  # type: ignore[arg-type]  # no file
                     RawTensor(n + "_scale_inv", grid, "F32", None, 0, 4 * grid[0] * grid[1]))  # type: ignore[arg-type]
            out[n] = dataclasses.replace(r, stored=Stored("fp8_block", parts, params=(("block", (b0, b1)),)))
    return out


def config_view(model_dir: str | Path) -> CheckpointView:
    """A view of a model from its config.json alone (a directory without weights)."""
    root = Path(model_dir)
    cfg, _ = text_config(read_config(root))  # Llama 4: the text model of a multimodal checkpoint
    spec = spec_for(cfg.get("model_type"))
    dtype = {"float32": "F32", "float16": "F16"}.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), "BF16")
    tensors = config_stored(derive_tensors(spec, cfg, dtype), cfg)  # the release's stored format (FP8 blocks)
    return CheckpointView(root, cfg, spec, facts_from_config(spec, cfg, tensors), tensors)


def open_for_planning(model_dir: str | Path) -> CheckpointView:
    """The checkpoint's own headers when its weights are there, else the tensors its config.json implies (a
    directory with a shard index but missing shards is a broken download: open_checkpoint says so). A
    pre-quantized release (DeepSeek-V3's FP8) is planned as the bf16 model moepack would read after conversion."""
    root = Path(model_dir)
    if root.is_dir() and not any(root.glob("*.safetensors")) and not any(root.glob("*.safetensors.index.json")):
        read_config(root)  # no config.json either: say that, before claiming shapes are derived from it
        log.info("%s: no weights; tensor shapes derived from config.json", root)
        return config_view(root)
    return open_checkpoint(root)
