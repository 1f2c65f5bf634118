"""Streaming GGUF writer: a checkpoint view + per-tensor GGML types (+ importance matrix) → a GGUF llama.cpp runs.

Order of work: resolve every tensor's type (fallbacks for row widths a type cannot take) and validate everything
before any data is read; write header, metadata and tensor infos; then load, stack, transform and quantize one
GGUF tensor at a time (peak memory ≈ one stacked expert tensor in its output type plus one expert in f32), append
it; reopen the file with gguf's reader and check every tensor's type, shape and byte size; rename into place.

Metadata keys and tensor layouts follow llama.cpp's own converter (convert_hf_to_gguf.py) for the llama.cpp that
llama-cpp-python bundles: qwen3moe, qwen2moe, llama (Mixtral), olmoe, deepseek2 (DeepSeek-V2/V3, MLA with kv_b_proj
split into attn_k_b / attn_v_b, key_length_mla / value_length_mla, sigmoid gating + exp_probs_b for V3).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from moepack.gguf import kernels as ggml
from moepack.errors import MoepackError
from moepack.gguf.names import OutTensor, gguf_outputs
from moepack.gguf.vocab import add_vocab

__all__ = [
    "WriteError",
    "TypedTensor",
    "WriteReport",
    "resolve_types",
    "tensor_nbytes",
    "load_imatrix",
    "prune_imatrix",
    "imatrix_by_output",
    "write_gguf",
    "overhead_bytes",
    "WRITER_ID",
    "ALIGNMENT",
    "source_f32",
    "tensor_data",
    "importance_rows",
    "imatrix_rows",
]

log = logging.getLogger(__name__)

T = GGMLQuantizationType
WRITER_ID = "moepack.gguf_out/1"  # bump when the bytes written for the same input change on purpose
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
BLOCK_BYTES = 256 * 2**20  # float32 bytes converted at a time for large plain tensors (row blocks)


class WriteError(MoepackError, ValueError):
    """The GGUF cannot be written as asked; the message says what to change."""


@dataclass(frozen=True)
class TypedTensor:
    out: OutTensor
    requested: GGMLQuantizationType
    qtype: GGMLQuantizationType  # what is written (after llama.cpp's row-width fallback)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.out.shape, self.qtype)


@dataclass
class WriteReport:
    path: Path
    n_bytes: int
    tensor_types: dict[str, str]  # GGUF tensor name → GGML type written
    fallbacks: dict[str, str] = field(default_factory=dict)  # name → type requested where another was written


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (numpy order) in `qtype`, from gguf's type table."""
    block, size = GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape, dtype=np.int64))
    if shape[-1] % block:
        raise WriteError(f"{qtype.name} rows must be multiples of {block}; got shape {shape}")
    return numel // block * size


# ---------------------------------------------------------------------------------------------------- types

def resolve_types(outs: list[OutTensor], default: GGMLQuantizationType | str | None = None,
                  tensor_types: Mapping[str, str] | None = None) -> list[TypedTensor]:
    """Type of every GGUF tensor: F32 for norms/routers/biases; else `tensor_types[name]` (or its source key,
    e.g. attn_kv_b for DeepSeek's attn_k_b/attn_v_b), else `default`; then llama.cpp's row-width fallback."""
    tensor_types = dict(tensor_types or {})
    known = {o.name for o in outs} | {o.key for o in outs}
    unknown = sorted(set(tensor_types) - known)
    if unknown:
        raise WriteError(f"the quant plan names {len(unknown)} tensor(s) this model does not have, e.g. "
                         f"{', '.join(unknown[:3])}; was it made for another (or differently pruned) model?")
    missing: list[str] = []
    typed: list[TypedTensor] = []
    for o in outs:
        if not o.quantizable:
            typed.append(TypedTensor(o, T.F32, T.F32))
            continue
        name = tensor_types.get(o.name, tensor_types.get(o.key, default))
        if name is None:
            missing.append(o.name)
            continue
        req = ggml.parse_type(name)
        typed.append(TypedTensor(o, req, ggml.fallback_type(req, o.n_per_row)))
    if missing:
        raise WriteError(f"the quant plan gives no type for {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}; "
                         "add them or pass a default type")
    return typed


# ---------------------------------------------------------------------------------------------------- imatrix

def load_imatrix(path: str | Path, view: Any) -> dict[str, np.ndarray]:
    """Importance matrix → {GGUF tensor name: (M, n) float32 mean squared input}. `path` is a run directory
    (or its calib/) from `moepack calibrate`, or llama.cpp's imatrix GGUF (from llama-imatrix or moepack)."""
    from moepack.gguf.imatrix import load_imatrix as load_imatrix_gguf

    p = Path(path)
    if p.is_dir():
        from moepack.stages.calibrate import CalibStats, calib_dir
        from moepack.gguf.imatrix import imatrix_entries

        stats = CalibStats.load(calib_dir(p))
        return {name: e.mean() for name, e in imatrix_entries(stats, view).items()}
    if not p.is_file():
        raise WriteError(f"{p}: no such imatrix file or run directory")
    return load_imatrix_gguf(p)


def prune_imatrix(imatrix: Mapping[str, np.ndarray], prune_plan: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keep the rows of the experts a prune plan kept (an imatrix of the original model for the pruned one)."""
    out = dict(imatrix)
    n_orig = int(prune_plan.get("n_experts", 0))
    for name, im in imatrix.items():
        m = re.match(r"blk\.(\d+)\.ffn_\w+_exps\.", name)
        layer = (prune_plan.get("layers") or {}).get(m.group(1)) if m else None
        rows = np.asarray(im).reshape(-1, np.shape(im)[-1])  # (E, n)
        if layer is not None and rows.shape[0] == n_orig:
            out[name] = rows[np.asarray(layer["kept"], dtype=np.int64)]  # (E_kept, n)
    return out


def imatrix_rows(o: OutTensor, imatrix: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """The tensor's importance rows: (S, n) for 3-D tensors (one row per expert or head slice, as llama-quantize
    slices it), (n,) for 2-D; None if there are none."""
    if not imatrix:
        return None
    im = imatrix.get(o.name)
    if im is None and o.transform != "k_b":  # k_b's inputs are q_nope, not kv_b's inputs
        im = imatrix.get(o.key)
    if im is None:
        return None
    flat = np.asarray(im, dtype=np.float32).reshape(-1)
    n, lead = o.n_per_row, (o.shape[0] if len(o.shape) == 3 else 1)
    if flat.size == lead * n:
        rows = flat.reshape(lead, n)  # (S, n)
    elif flat.size == n:
        rows = np.broadcast_to(flat, (lead, n))  # (S, n)
    elif o.transform == "stack" and flat.size % n == 0:
        raise WriteError(f"{o.name}: imatrix has {flat.size // n} expert rows but the tensor has {lead} experts; "
                         "calibrate the model you quantize (or keep prune_plan.json next to a pruned checkpoint)")
    else:
        log.warning("%s: imatrix of %d values does not fit rows of %d; quantizing without it", o.name, flat.size, n)
        return None
    return np.ascontiguousarray(rows) if len(o.shape) == 3 else rows[0]


def imatrix_by_output(view: Any, imatrix: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The importance rows of every tensor the GGUF of `view` holds, under its own name ((S, n) or (1, n)):
    e.g. DeepSeek's attn_v_b gets attn_kv_b's rows. For handing to llama_model_quantize."""
    out: dict[str, np.ndarray] = {}
    for o in gguf_outputs(view):
        if o.quantizable and (rows := imatrix_rows(o, imatrix)) is not None:
            out[o.name] = rows.reshape(-1, o.n_per_row)  # (S, n)
    return out


def importance_rows(t: TypedTensor, imatrix: Mapping[str, np.ndarray] | None) -> np.ndarray | None:
    """Importance rows for quantizing `t`. The token embedding is looked up, not multiplied, so no imatrix (ours
    or llama-imatrix's) has it; when its type needs one, every column weighs the same."""
    rows = imatrix_rows(t.out, imatrix)
    if rows is None and imatrix and t.out.name == "token_embd.weight" and ggml.requires_imatrix(t.qtype):
        rows = np.ones(t.out.n_per_row, dtype=np.float32)  # (n,)
    return rows


def _check_imatrix_needs(typed: list[TypedTensor], imatrix: Mapping[str, np.ndarray] | None) -> None:
    need = [t.out.name for t in typed if t.qtype != T.F32 and ggml.requires_imatrix(t.qtype)
            and importance_rows(t, imatrix) is None]
    if need:
        raise WriteError(f"{len(need)} tensor(s) get types that need an importance matrix but have none, e.g. "
                         f"{', '.join(need[:3])}; pass --calib-dir RUN_DIR or --imatrix FILE, or choose other types")


# ---------------------------------------------------------------------------------------------------- metadata

def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and scaling from transformers 5's rope_parameters or the older rope_theta/rope_scaling keys."""
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rope


def _meta_common(w: gguf.GGUFWriter, view: Any, n_expert: int) -> None:
    cfg, f = view.config, view.facts
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(f.hidden)
    w.add_block_count(f.n_layers)
    w.add_feed_forward_length(int(cfg.get("intermediate_size") or f.expert_ffn))
    w.add_head_count(int(cfg["num_attention_heads"]))
    if view.spec.gguf_arch == "deepseek2":  # MLA runs as MQA over the compressed KV (the converter's note)
        w.add_head_count_kv(1)
    else:
        w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
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
    w.add_rope_dimension_count(int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
    w.add_expert_feed_forward_length(view.facts.expert_ffn)


def _meta_olmoe(w: gguf.GGUFWriter, view: Any) -> None:
    cfg = view.config
    if int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]) != int(cfg["num_attention_heads"]):
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


def _write_metadata(w: gguf.GGUFWriter, view: Any, typed: list[TypedTensor], n_expert: int,
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
    w.add_string("moepack.writer", WRITER_ID)
    w.add_string("moepack.source_fingerprint", view.fingerprint())
    for key in sorted(extra):
        w.add_string(f"moepack.{key}", json.dumps(extra[key], sort_keys=True, separators=(",", ":")))


# ---------------------------------------------------------------------------------------------------- data

def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary layout → llama's interleaved pairs (rows only)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])  # (n_head, 2, hd/2, H)
            .swapaxes(1, 2)  # (n_head, hd/2, 2, H)
            .reshape(w.shape))  # (n_head*hd, H)


def source_f32(view: Any, o: OutTensor) -> np.ndarray:
    """Float32 data of a non-stacked output tensor, transformed into llama.cpp's layout."""
    x = view.load_numpy_f32(o.sources[0])
    cfg = view.config
    if o.transform == "permute_q":
        x = _permute_rope(x, int(cfg["num_attention_heads"]))
    elif o.transform == "permute_k":
        x = _permute_rope(x, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    elif o.transform in ("k_b", "v_b"):
        n_head, nope = int(cfg["num_attention_heads"]), int(cfg["qk_nope_head_dim"])
        kv = x.reshape(n_head, -1, x.shape[-1])  # (n_head, nope + v, kv_lora)
        x = kv[:, :nope, :].transpose(0, 2, 1) if o.transform == "k_b" else kv[:, nope:, :]
        # k_b: (n_head, kv_lora, nope); v_b: (n_head, v, kv_lora)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape != o.shape:
        raise WriteError(f"{o.name}: built shape {x.shape}, expected {o.shape}")
    return x


def _encode(x: np.ndarray, qtype: GGMLQuantizationType, im: np.ndarray | None, threads: int | None) -> np.ndarray:
    if qtype == T.F32:
        return x
    if x.ndim == 1:
        x = x.reshape(1, -1)  # (1, n)
    return ggml.quantize(x, qtype, imatrix=im, threads=threads)


def _encode_blocks(view: Any, o: OutTensor, qtype: GGMLQuantizationType, im: np.ndarray | None,
                   threads: int | None) -> np.ndarray:
    """A large plain 2-D tensor (token_embd, output) converted and quantized in row blocks: peak memory is the
    stored tensor plus one float32 block and the output, not a float32 copy of the whole (V, H) matrix."""
    w = view.load(o.sources[0])  # (rows, n) as stored, e.g. bf16
    if tuple(w.shape) != o.shape:
        raise WriteError(f"{o.name}: stored shape {tuple(w.shape)}, expected {o.shape}")
    rows, n = o.shape
    step = max(1, BLOCK_BYTES // (4 * n))
    out: np.ndarray | None = None
    for r0 in range(0, rows, step):
        q = _encode(w[r0:r0 + step].float().numpy(), qtype, im, threads)  # (rows_b, row bytes) or f32 (rows_b, n)
        if out is None:
            out = np.empty((rows, q.shape[1]), dtype=q.dtype)  # (rows, row bytes)
        out[r0:r0 + q.shape[0]] = q
    return out


def tensor_data(view: Any, t: TypedTensor, im: np.ndarray | None, threads: int | None) -> np.ndarray:
    """The GGUF bytes of one tensor. Stacked experts are gathered into one (E, rows, n) array and quantized in one
    call, so the thread pool spans every expert (peak memory: one stacked tensor in f32 plus its bytes)."""
    o = t.out
    if o.transform == "" and len(o.shape) == 2 and 4 * o.shape[0] * o.shape[1] > BLOCK_BYTES:
        return _encode_blocks(view, o, t.qtype, im, threads)
    if o.transform != "stack":
        return _encode(source_f32(view, o), t.qtype, im, threads)
    x = np.empty(o.shape, dtype=np.float32)  # (E, rows, n)
    for e, src in enumerate(o.sources):
        w = view.load_numpy_f32(src)  # (rows, n)
        if w.shape != o.shape[1:]:
            raise WriteError(f"{src}: shape {w.shape}, expected {o.shape[1:]} like the other experts")
        x[e] = w
    q = np.ascontiguousarray(_encode(x, t.qtype, im, threads))
    return q.view(np.uint8).reshape(o.shape[0], -1)  # (E, bytes per expert)


# ---------------------------------------------------------------------------------------------------- file

def _expert_count(typed: list[TypedTensor]) -> int:
    counts = {t.out.shape[0] for t in typed if t.out.transform == "stack"}
    if len(counts) > 1:
        raise WriteError(f"llama.cpp needs the same expert count in every layer; this model has {sorted(counts)}")
    return counts.pop() if counts else 0


def _verify(path: Path, typed: list[TypedTensor]) -> None:
    """Reopen with gguf's reader: every tensor present once with its type, shape and byte size; size adds up."""
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    if len(got) != len(typed) or len(reader.tensors) != len(typed):
        raise WriteError(f"{path}: wrote {len(reader.tensors)} tensors, expected {len(typed)}")
    end = reader.data_offset
    for t in typed:
        r = got.get(t.out.name)
        if r is None:
            raise WriteError(f"{path}: tensor {t.out.name} missing")
        shape = tuple(int(s) for s in reversed(r.shape.tolist()))
        if r.tensor_type != t.qtype or shape != t.out.shape or int(r.n_bytes) != t.nbytes:
            raise WriteError(f"{path}: {t.out.name} reads back as {r.tensor_type.name} {shape} {r.n_bytes} B, "
                             f"expected {t.qtype.name} {t.out.shape} {t.nbytes} B")
        end = max(end, int(r.data_offset) + int(r.n_bytes))
    if path.stat().st_size != gguf.GGUFWriter.ggml_pad(end, ALIGNMENT):
        raise WriteError(f"{path}: size {path.stat().st_size} does not match its tensors (end {end})")


def _plan_record(typed: list[TypedTensor], source_plan: Mapping[str, Any] | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"tensors": {t.out.name: t.qtype.name for t in typed if t.out.quantizable},
                           "fallbacks": {t.out.name: t.requested.name for t in typed if t.requested != t.qtype}}
    if source_plan:
        rec["source"] = {k: v for k, v in source_plan.items() if k != "tensors"}
    return rec


def _prepare(view: Any, default_type: GGMLQuantizationType | str | None, tensor_types: Mapping[str, str] | None,
             imatrix: Mapping[str, np.ndarray] | None, quant_plan: Mapping[str, Any] | None,
             prune_plan: Mapping[str, Any] | None, plan_record: Mapping[str, Any] | None,
             ) -> tuple[list[TypedTensor], int, dict[str, Any]]:
    """Everything decided and validated before a byte is written: types, expert count, moepack.* metadata."""
    typed = resolve_types(gguf_outputs(view), default_type, tensor_types)
    _check_imatrix_needs(typed, imatrix)
    n_expert = _expert_count(typed)
    if view.spec.gguf_arch not in _ARCH_META:
        raise WriteError(f"no GGUF metadata writer for llama.cpp architecture {view.spec.gguf_arch!r}")
    extra: dict[str, Any] = {"quant_plan": dict(plan_record) if plan_record is not None
                             else _plan_record(typed, quant_plan)}
    if prune_plan:
        extra["prune_plan"] = dict(prune_plan)
    return typed, n_expert, extra


def _start_file(path: Path, view: Any, typed: list[TypedTensor], n_expert: int,
                extra: Mapping[str, Any]) -> gguf.GGUFWriter:
    """A GGUFWriter on `path` with header, metadata and tensor infos written, ready for tensor data."""
    w = gguf.GGUFWriter(path, view.spec.gguf_arch)
    try:
        _write_metadata(w, view, typed, n_expert, extra)
        for t in typed:
            w.add_tensor_info(t.out.name, t.out.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    except BaseException:
        w.close()
        raise
    return w


def overhead_bytes(view: Any, *, default_type: GGMLQuantizationType | str | None = "F32",
                   tensor_types: Mapping[str, str] | None = None, quant_plan: Mapping[str, Any] | None = None,
                   prune_plan: Mapping[str, Any] | None = None) -> int:
    """Bytes of the GGUF before its tensor data (header, metadata with vocab and plans, tensor infos, padding):
    the file is exactly this plus each tensor's bytes padded to the alignment. Reads no weights."""
    import tempfile

    typed, n_expert, extra = _prepare(view, default_type, tensor_types, None, quant_plan, prune_plan, None)
    with tempfile.TemporaryDirectory() as d:
        w = _start_file(Path(d) / "header.gguf", view, typed, n_expert, extra)
        end = w.fout[0].tell()
        w.close()
    return gguf.GGUFWriter.ggml_pad(end, ALIGNMENT)


def write_gguf(view: Any, out_path: str | Path, *, default_type: GGMLQuantizationType | str | None = "F32",
               tensor_types: Mapping[str, str] | None = None, imatrix: Mapping[str, np.ndarray] | None = None,
               quant_plan: Mapping[str, Any] | None = None, prune_plan: Mapping[str, Any] | None = None,
               threads: int | None = None, progress: bool = True,
               plan_record: Mapping[str, Any] | None = None) -> WriteReport:
    """Write `view` as GGUF to `out_path` (via `out_path`.tmp, checked, renamed). Returns what was written.

    `tensor_types` maps GGUF tensor names (or a kv_b source key) to GGML type names; tensors it does not name get
    `default_type` (None: every quantizable tensor must be named). `imatrix` maps GGUF names to (E or 1, n).
    The types written (after fallbacks) and `quant_plan`'s other fields go to metadata `moepack.quant_plan`
    (`plan_record` replaces that record), `prune_plan` to `moepack.prune_plan`.
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise WriteError(f"{out_path.parent}: output directory does not exist")
    typed, n_expert, extra = _prepare(view, default_type, tensor_types, imatrix, quant_plan, prune_plan,
                                      plan_record)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        w = _start_file(tmp, view, typed, n_expert, extra)
        try:
            _write_tensors(w, view, typed, imatrix, threads, progress)
        finally:
            w.close()
        _verify(tmp, typed)
        os.replace(tmp, out_path)
    except OSError as e:  # disk full, file-size limit, permissions: say which file, no traceback
        raise WriteError(f"{out_path}: cannot write the GGUF ({e.strerror or e}); check free disk space and "
                         "permissions. Nothing was left at the output path") from e
    finally:
        tmp.unlink(missing_ok=True)
    size = out_path.stat().st_size
    log.info("wrote %s: %d tensors, %.1f MiB", out_path, len(typed), size / 2**20)
    fallbacks = {t.out.name: t.requested.name for t in typed if t.requested != t.qtype}
    return WriteReport(out_path, size, {t.out.name: t.qtype.name for t in typed}, fallbacks)


def _write_tensors(w: gguf.GGUFWriter, view: Any, typed: list[TypedTensor],
                   imatrix: Mapping[str, np.ndarray] | None, threads: int | None, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=sum(t.nbytes for t in typed), unit="B", unit_scale=True, desc="gguf",
              disable=not progress) as bar:
        for t in typed:
            data = tensor_data(view, t, importance_rows(t, imatrix), threads)
            if data.nbytes != t.nbytes:
                raise WriteError(f"{t.out.name}: encoded {data.nbytes} bytes, expected {t.nbytes}")
            w.write_tensor_data(data)
            del data  # before the next tensor is built: one tensor's data in memory at a time
            bar.update(t.nbytes)
