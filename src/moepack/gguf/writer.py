"""Streaming GGUF writer: a checkpoint view + per-tensor GGML types (+ importance matrix) → a GGUF llama.cpp runs.

Order of work: resolve every tensor's type (fallbacks for row widths a type cannot take) and validate everything
before any data is read; write header, metadata (moepack.gguf.metadata) and tensor infos; then load, stack,
transform and quantize one GGUF tensor at a time (peak memory ≈ one stacked expert tensor in its output type plus
one expert in f32), append it; reopen the file with gguf's reader and check every tensor's type, shape and byte
size; rename into place.

Tensor layouts follow llama.cpp's own converter (convert_hf_to_gguf.py): experts stacked, DeepSeek's kv_b_proj
split into attn_k_b / attn_v_b, the llama architecture's rotary permutation of q/k.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from moepack.atomic import atomic_path
from moepack.gguf import kernels as ggml
from moepack.gguf import mxfp4
from moepack.gguf.imatrix import importance_rows
from moepack.gguf.keys import Keys
from moepack.gguf.linear_attn import ELEMENTWISE, V_TILED, split_qkvz, tile_v_heads
from moepack.gguf.metadata import WriteError, has_metadata_writer, write_metadata
from moepack.gguf.names import gguf_outputs
from moepack.gguf.rope import generated_f32
from moepack.gguf.recipe import file_recipe, recipe_json, recipe_placeholder
from moepack.gguf.tensors import OutTensor, TypedTensor
from moepack.gguf.types import fallback_type, parse_type
from moepack.model.checkpoint import CheckpointView, import_reader
from moepack.schema import PrunePlan, QuantPlan

__all__ = [
    "WriteReport",
    "resolve_types",
    "write_gguf",
    "overhead_bytes",
    "SHORT_RECORD",
    "short_record",
    "plan_record",
    "ALIGNMENT",
    "source_f32",
    "tensor_data",
    "verify_gguf",
    "WriteError",
]

log = logging.getLogger(__name__)

T = GGMLQuantizationType
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
BLOCK_BYTES = 256 * 2**20  # float32 bytes converted at a time for large plain tensors (row blocks)
# A llama.cpp mixture's plan whose base has this flag is recorded as short as llama.cpp's own mixture file records it
# (moepack.pipeline.dominance sets it only when the full records would push the mixture over the budget).
SHORT_RECORD = "short_record"


@dataclass
class WriteReport:
    path: Path
    n_bytes: int
    tensor_types: dict[str, str]  # GGUF tensor name → GGML type written
    fallbacks: dict[str, str] = field(default_factory=dict)  # name → type requested where another was written


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
        req = parse_type(name)
        typed.append(TypedTensor(o, req, fallback_type(req, o.n_per_row)))
    if missing:
        raise WriteError(f"the quant plan gives no type for {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}; "
                         "add them or pass a default type")
    return typed


def _check_imatrix_needs(typed: list[TypedTensor], imatrix: Mapping[str, np.ndarray] | None) -> None:
    need = [t.out.name for t in typed if t.qtype != T.F32 and ggml.requires_imatrix(t.qtype)
            and importance_rows(t, imatrix) is None]
    if need:
        raise WriteError(f"{len(need)} tensor(s) get types that need an importance matrix but have none, e.g. "
                         f"{', '.join(need[:3])}; pass --calib-dir RUN_DIR or --imatrix FILE, or choose other types")


# ---------------------------------------------------------------------------------------------------- data

def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary layout → llama's interleaved pairs (rows only)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])  # (n_head, 2, hd/2, H)
            .swapaxes(1, 2)  # (n_head, hd/2, 2, H)
            .reshape(w.shape))  # (n_head*hd, H)


def source_f32(view: CheckpointView, o: OutTensor) -> np.ndarray:
    """Float32 data of a non-stacked output tensor, transformed into llama.cpp's layout."""
    if not o.sources:  # made from config.json (rope_freqs)
        return generated_f32(view, o)
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
    elif o.transform in ("qkvz_qkv", "qkvz_z"):
        x = split_qkvz(x, cfg, o.transform)
    elif o.transform in V_TILED:  # Qwen3.5: value heads tiled
        x = tile_v_heads(x, cfg, o.transform)
    elif o.transform in ELEMENTWISE:
        x = ELEMENTWISE[o.transform](x)
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


def _encode_blocks(view: CheckpointView, o: OutTensor, qtype: GGMLQuantizationType, im: np.ndarray | None,
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


def tensor_data(view: CheckpointView, t: TypedTensor, im: np.ndarray | None, threads: int | None) -> np.ndarray:
    """The GGUF bytes of one tensor. Stacked experts are gathered into one (E, rows, n) array and quantized in one
    call, so the thread pool spans every expert (peak memory: one stacked tensor in f32 plus its bytes)."""
    o = t.out
    if t.qtype == T.MXFP4 and mxfp4.is_source(view, o):  # the release's own MXFP4 bytes: lossless, no quantizing
        return mxfp4.source_bytes(view, o)
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


def verify_gguf(path: Path, typed: list[TypedTensor]) -> None:
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


def short_record(plan: QuantPlan | None) -> str | None:
    """The llama.cpp mixture `plan` is, when it is to be recorded short (SHORT_RECORD); else None."""
    if plan is None or not plan.base.get(SHORT_RECORD):
        return None
    return str(plan.base["mixture"])


def plan_record(typed: list[TypedTensor], plan: QuantPlan | None, ftype: str | None,
                default_type: GGMLQuantizationType | str | None) -> dict[str, Any]:
    """moepack.quant_plan: the types written, the fallbacks taken and how the plan was made (its `source`); a file
    llama.cpp's quantizer re-types afterwards records that mixture and the type it starts from instead, and a
    mixture recorded short only its name (its types follow from it: moepack.stages.mixtures) and any fallback."""
    if ftype is not None:
        return {"ftype": ftype, "source_type": parse_type(default_type or "F32").name}
    if (mixture := short_record(plan)) is not None:
        fallbacks = {t.out.name: t.requested.name for t in typed if t.requested != t.qtype}
        return {"mixture": mixture} | ({"fallbacks": fallbacks} if fallbacks else {})
    rec: dict[str, Any] = {"tensors": {t.out.name: t.qtype.name for t in typed if t.out.quantizable},
                           "fallbacks": {t.out.name: t.requested.name for t in typed if t.requested != t.qtype}}
    if plan is not None:
        rec["source"] = plan.source
    return rec


def _recipe(view: CheckpointView, typed: list[TypedTensor], n_expert: int, prune_plan: PrunePlan | None,
            ftype: str | None, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """moepack.recipe: what is written, plus the caller's `given` fields; a file llama.cpp's quantizer re-types
    afterwards (moepack quantize --ftype) names that mixture instead of the types."""
    types = ftype if ftype else {t.out.name: t.qtype.name for t in typed if t.out.quantizable}
    n_layers = len({t.out.layer for t in typed if t.out.transform == "stack"})
    return recipe_json(file_recipe(types, n_expert, n_layers, view.facts.top_k, prune_plan, given))


def _prepare(view: CheckpointView, plan: QuantPlan | None, default_type: GGMLQuantizationType | str | None,
             prune_plan: PrunePlan | None, imatrix: Mapping[str, np.ndarray] | None = None, ftype: str | None = None,
             recipe: Mapping[str, Any] | None = None, sizing: bool = False
             ) -> tuple[list[TypedTensor], int, dict[str, Any]]:
    """Everything decided and validated before a byte is written: types, expert count, moepack.* metadata
    (`sizing`: only the header's bytes are wanted, so the types' need of an importance matrix is not checked)."""
    if ftype is not None and plan is not None:
        raise WriteError("a file llama.cpp's quantizer re-types (an ftype) is written at one type: pass no quant plan")
    typed = resolve_types(gguf_outputs(view), default_type, plan.tensors if plan is not None else None)
    if not sizing:
        _check_imatrix_needs(typed, imatrix)
    n_expert = _expert_count(typed)
    if not has_metadata_writer(view.spec.gguf_arch):
        raise WriteError(f"no GGUF metadata writer for llama.cpp architecture {view.spec.gguf_arch!r}")
    extra: dict[str, Any] = {Keys.QUANT_PLAN: plan_record(typed, plan, ftype, default_type)}
    if prune_plan is not None:
        extra[Keys.PRUNE_PLAN] = prune_plan.to_dict()
    if (mixture := short_record(plan)) is not None:  # the recipe llama.cpp's file of the mixture has: no caller fields
        extra[Keys.RECIPE] = _recipe(view, typed, n_expert, prune_plan, mixture, None)
    else:
        extra[Keys.RECIPE] = _recipe(view, typed, n_expert, prune_plan, ftype, recipe)
    return typed, n_expert, extra


def _start_file(path: Path, view: CheckpointView, typed: list[TypedTensor], n_expert: int,
                extra: Mapping[str, Any]) -> gguf.GGUFWriter:
    """A GGUFWriter on `path` with header, metadata and tensor infos written, ready for tensor data."""
    w = gguf.GGUFWriter(path, view.spec.gguf_arch)
    try:
        write_metadata(w, view, typed, n_expert, extra)
        for t in typed:
            w.add_tensor_info(t.out.name, t.out.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    except BaseException:
        w.close()
        raise
    return w


def overhead_bytes(view: CheckpointView, plan: QuantPlan | None = None, *, prune_plan: PrunePlan | None = None,
                   default_type: GGMLQuantizationType | str | None = "F32") -> int:
    """Bytes of the GGUF before its tensor data (header, metadata with vocab and plans, tensor infos, padding):
    the file is at most this plus each tensor's bytes padded to the alignment (the recipe, not known yet, is counted
    at its longest: RECIPE_MAX_BYTES; a mixture recorded short has its recipe already). Reads no weights."""
    import tempfile

    typed, n_expert, extra = _prepare(view, plan, default_type, prune_plan, sizing=True)
    if short_record(plan) is None:
        extra[Keys.RECIPE] = recipe_placeholder()
    with tempfile.TemporaryDirectory() as d:
        w = _start_file(Path(d) / "header.gguf", view, typed, n_expert, extra)
        end = w.fout[0].tell()
        w.close()
    return gguf.GGUFWriter.ggml_pad(end, ALIGNMENT)


def write_gguf(view: CheckpointView, out_path: str | Path, plan: QuantPlan | None = None, *,
               imatrix: Mapping[str, np.ndarray] | None = None, prune_plan: PrunePlan | None = None,
               threads: int | None = None, progress: bool = True, recipe: Mapping[str, Any] | None = None,
               default_type: GGMLQuantizationType | str | None = "F32", ftype: str | None = None) -> WriteReport:
    """Write `view` as GGUF to `out_path` (via `out_path`.tmp, checked, renamed). Returns what was written.

    `plan.tensors` maps GGUF tensor names (or a kv_b source key) to GGML type names; tensors it does not name get
    `default_type` (None: every quantizable tensor must be named). `imatrix` maps GGUF names to (E or 1, n).
    The types written (after fallbacks) and how the plan was made (`plan.source`) go to metadata moepack.quant_plan,
    `prune_plan` to moepack.prune_plan; `recipe` adds the caller's fields (e.g. the budget) to moepack.recipe
    (moepack.gguf.recipe). `ftype`: llama.cpp's mixture that re-types this file afterwards (moepack quantize
    --ftype), recorded in both instead of the types written at `default_type`.
    """
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise WriteError(f"{out_path.parent}: output directory does not exist")
    typed, n_expert, extra = _prepare(view, plan, default_type, prune_plan, imatrix, ftype, recipe)
    import_reader()  # before the output exists: an interrupt inside torch's import would abort, not clean up
    try:
        with atomic_path(out_path) as tmp:
            w = _start_file(tmp, view, typed, n_expert, extra)
            try:
                _write_tensors(w, view, typed, imatrix, threads, progress)
            finally:
                w.close()
            verify_gguf(tmp, typed)
    except OSError as e:  # disk full, file-size limit, permissions: say which file, no traceback
        raise WriteError(f"{out_path}: cannot write the GGUF ({e.strerror or e}); check free disk space and "
                         "permissions. Nothing was left at the output path") from e
    size = out_path.stat().st_size
    log.info("wrote %s: %d tensors, %.1f MiB", out_path, len(typed), size / 2**20)
    fallbacks = {t.out.name: t.requested.name for t in typed if t.requested != t.qtype}
    return WriteReport(out_path, size, {t.out.name: t.qtype.name for t in typed}, fallbacks)


def _write_tensors(w: gguf.GGUFWriter, view: CheckpointView, typed: list[TypedTensor],
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
