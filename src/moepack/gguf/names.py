"""The one mapping from checkpoint tensors to llama.cpp's GGUF tensor names.

Names come from gguf-py's own tables (`gguf.get_tensor_name_map`, `gguf.MODEL_TENSOR`, `gguf.TENSOR_NAMES`),
never typed by hand. Per-expert checkpoint tensors of a layer map to one stacked 3-D GGUF tensor
(`blk.{L}.ffn_{gate,up,down}_exps.weight`, numpy shape (E, rows, cols)).

DeepSeek MLA: llama.cpp (since the MLA absorption change, which the bundled version uses) stores `kv_b_proj` as two
tensors, `attn_k_b` (n_head, kv_lora, qk_nope) and `attn_v_b` (n_head, v_head, kv_lora). `gguf_tensor_name` of a
kv_b_proj tensor is `blk.{L}.attn_kv_b.weight` — the key under which plans, sensitivity groups and importance
matrices refer to it — and `gguf_outputs` lists the tensors actually written.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import TYPE_CHECKING

import gguf

from moepack.errors import MoepackError
from moepack.gguf.rope import generated_outputs
from moepack.gguf.linear_attn import QKVZ_SPLIT, qkvz_shapes
from moepack.gguf.tensors import OutTensor
from moepack.model.arch import Role, beyond_decoder, expert_key

if TYPE_CHECKING:
    from moepack.model.checkpoint import CheckpointView, TensorRef

__all__ = [
    "GGUFNameError",
    "model_arch",
    "gguf_tensor_name",
    "gguf_model_tensor",
    "gguf_group_name",
    "gguf_outputs",
    "source_key",
    "MLA_SPLIT",
]

log = logging.getLogger(__name__)

# DeepSeek's kv_b_proj is written as these two tensors (convert_hf_to_gguf.py, DeepseekV2Model.modify_tensors):
# (checkpoint-style name gguf's tensor map knows, transform).
MLA_SPLIT = (("k_b_proj", "k_b"), ("v_b_proj", "v_b"))


class GGUFNameError(MoepackError, ValueError):
    """A checkpoint tensor that llama.cpp has no GGUF name for."""


def model_arch(view: CheckpointView) -> gguf.MODEL_ARCH:
    """gguf's MODEL_ARCH for a view (its spec's `gguf_arch`, a `gguf.MODEL_ARCH_NAMES` value)."""
    name = view.spec.gguf_arch
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise GGUFNameError(f"the installed gguf package knows no architecture {name!r}; upgrade it")


@lru_cache(maxsize=32)
def _name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def _n_blocks(view: CheckpointView) -> int:
    return int(view.facts.n_layers)


def source_key(name: str) -> str:
    """The checkpoint-side key gguf's tensor map knows: experts unnumbered (the converter's stacked name), the
    DeepSeek-V3 router bias written as `e_score_correction.bias`, Qwen3-Next's `dt_bias` as `dt_proj.bias` (as
    the converter renames them)."""
    key = expert_key(name)
    if key.endswith("e_score_correction_bias"):
        key = key[: -len("_bias")] + ".bias"
    elif key.endswith(".linear_attn.dt_bias"):
        key = key[: -len("dt_bias")] + "dt_proj.bias"
    elif key.endswith(".self_attn.sinks"):  # gpt-oss's attention sinks: the converter appends `.weight`
        key += ".weight"
    return key


def _lookup(view: CheckpointView, key: str) -> tuple[gguf.MODEL_TENSOR, str]:
    tmap = _name_map(model_arch(view), _n_blocks(view))
    hit = tmap.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
    if hit is None:
        raise GGUFNameError(f"no llama.cpp ({view.spec.gguf_arch}) tensor name for checkpoint tensor {key!r}")
    return hit


def gguf_tensor_name(view: CheckpointView, ref: TensorRef | str) -> str:
    """GGUF name of a checkpoint tensor: every expert of layer 3's down_proj → "blk.3.ffn_down_exps.weight"."""
    name = ref if isinstance(ref, str) else ref.name
    return _lookup(view, source_key(name))[1]


def gguf_model_tensor(view: CheckpointView, ref: TensorRef | str) -> gguf.MODEL_TENSOR:
    name = ref if isinstance(ref, str) else ref.name
    return _lookup(view, source_key(name))[0]


def gguf_group_name(view: CheckpointView, ref: TensorRef | str) -> str:
    """The tensor's kind without its block: "ffn_down_exps", "attn_kv_b", "token_embd" (gguf.TENSOR_NAMES)."""
    mt = gguf_model_tensor(view, ref)
    return gguf.TENSOR_NAMES[mt].replace("blk.{bid}.", "")


def _mla_split(view: CheckpointView) -> bool:
    """Whether kv_b_proj is written as attn_k_b + attn_v_b (the layout the bundled llama.cpp converter writes)."""
    return view.spec.kv_cache == "mla"  # deepseek2 (DeepSeek-V2/V3, Kimi-K2), glm-dsa (GLM-5)


def _mla_outputs(view: CheckpointView, ref: TensorRef, key: str) -> list[OutTensor]:
    """kv_b_proj → attn_k_b, attn_v_b, as convert_hf_to_gguf.py's DeepseekV2Model.modify_tensors splits it."""
    cfg = view.config
    n_head = int(cfg["num_attention_heads"])
    nope, v_dim, kv_lora = int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"])
    if ref.shape != (n_head * (nope + v_dim), kv_lora):
        raise GGUFNameError(f"{ref.name}: shape {ref.shape} does not match config "
                            f"(n_head {n_head} x (qk_nope {nope} + v_head {v_dim}), kv_lora_rank {kv_lora})")
    shapes = {"k_b": (n_head, kv_lora, nope), "v_b": (n_head, v_dim, kv_lora)}
    return [OutTensor(_lookup(view, ref.name.replace("kv_b_proj", hf))[1], shapes[part], (ref.name,), part, key,
                      ref.quantizable, ref.role, ref.layer) for hf, part in MLA_SPLIT]


def _qkvz_outputs(view: CheckpointView, ref: TensorRef, key: str) -> list[OutTensor]:
    """Qwen3-Next's in_proj_qkvz → attn_qkv, attn_gate, as the converter's Qwen3NextModel.modify_tensors splits it."""
    shapes = qkvz_shapes(view.config)
    if ref.shape != (shapes["qkvz_qkv"][0] + shapes["qkvz_z"][0], shapes["qkvz_z"][1]):
        raise GGUFNameError(f"{ref.name}: shape {ref.shape} does not match the config's linear-attention heads")
    return [OutTensor(_lookup(view, ref.name.replace("in_proj_qkvz", hf))[1], shapes[part], (ref.name,), part, key,
                      ref.quantizable, ref.role, ref.layer) for hf, part in QKVZ_SPLIT]


def _plain_output(view: CheckpointView, ref: TensorRef, key: str, quantizable: bool) -> OutTensor:
    """One tensor written from one: as stored, or changed as the architecture's converter changes it."""
    transform = view.spec.extra.get("gguf_transforms", {}).get(ref.kind, "")
    if view.spec.gguf_arch == "llama" and ref.kind in ("q_proj", "k_proj"):
        transform = "permute_" + ref.kind[0]
    squeeze = transform.startswith("squeeze")  # conv1d (C, 1, K) → (C, K)
    shape = (ref.shape[0], ref.shape[-1]) if squeeze else ref.shape
    return OutTensor(key, shape, (ref.name,), transform, key, quantizable, ref.role, ref.layer)


_KEEP_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.FFN_EXP_PROBS_B,
             gguf.MODEL_TENSOR.INDEXER_PROJ)  # the DSA indexer's head weights (GLM-5): F32 as the converter writes


def gguf_outputs(view: CheckpointView) -> list[OutTensor]:
    """Every tensor of the GGUF file for `view`, in file order: token_embd, blocks by layer, output_norm, output."""
    groups: dict[str, list[TensorRef]] = {}
    n_blocks = _n_blocks(view)
    for ref in view.tensors.values():
        if beyond_decoder(ref.layer, n_blocks):
            log.debug("skipping %s: layer %d is not part of the %d-layer model", ref.name, ref.layer, n_blocks)
            continue
        groups.setdefault(gguf_tensor_name(view, ref), []).append(ref)
    outs: list[OutTensor] = []
    for key, refs in groups.items():
        ref = refs[0]
        mt = gguf_model_tensor(view, ref)
        quantizable = ref.quantizable and mt not in _KEEP_F32
        if ref.role is Role.ROUTED_EXPERTS:
            refs = sorted(refs, key=lambda r: r.expert)
            experts = [r.expert for r in refs]
            if experts != list(range(len(refs))) or len({r.shape for r in refs}) != 1:
                raise GGUFNameError(f"{key}: experts {experts[:8]}... are not numbered 0..E-1 with one shape")
            outs.append(OutTensor(key, (len(refs),) + ref.shape, tuple(r.name for r in refs), "stack", key,
                                  quantizable, ref.role, ref.layer))
        elif ref.kind == "kv_b_proj" and _mla_split(view):
            outs.extend(_mla_outputs(view, ref, key))
        elif ref.kind == "in_proj_qkvz":
            outs.extend(_qkvz_outputs(view, ref, key))
        else:
            outs.append(_plain_output(view, ref, key, quantizable))
    outs += generated_outputs(view, OutTensor)  # Llama 4's rope_freqs, made from config.json
    return sorted(outs, key=_file_order)


def _file_order(t: OutTensor) -> tuple[int, int, str]:
    if t.layer is not None:
        return (1, t.layer, t.name)
    return (0 if t.name.startswith("token_embd") else 2, 0, t.name)
