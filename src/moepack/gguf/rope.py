"""GGUF tensors made from config.json rather than from a checkpoint tensor: llama.cpp's `rope_freqs`.

Llama 3-style RoPE scaling (rope_type "llama3": Llama 4 Scout / Maverick) divides the low RoPE frequencies by
`factor`, the high ones not at all, and blends in between. llama.cpp applies it through a per-dimension factor
tensor, `rope_freqs.weight` (n_rot / 2 values, F32), which the converter generates (LlamaModel's
generate_extra_tensors); `generated_outputs(view)` names it, `generated_f32(view, o)` computes it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from moepack.model.arch import Role

if TYPE_CHECKING:
    from moepack.gguf.tensors import OutTensor
    from moepack.model.checkpoint import CheckpointView

__all__ = ["ROPE_FREQS", "generated_outputs", "generated_f32", "llama3_rope_factors"]

ROPE_FREQS = "rope_freqs"  # OutTensor.transform of the generated tensor


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = dict(cfg.get("rope_scaling") or {})
    rope.update(cfg.get("rope_parameters") or {})
    if rope.get("rope_theta") is None and cfg.get("rope_theta") is not None:
        rope["rope_theta"] = cfg["rope_theta"]
    return rope


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray:
    """The divisor of each RoPE frequency (head_dim / 2,), with the converter's defaults for absent keys."""
    rope = _rope(cfg)
    dim = _head_dim(cfg)
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)  # 2π / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:  # between the two wavelengths (none when low == high, as in Llama 4)
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _llama3(cfg: dict[str, Any]) -> bool:
    rope = _rope(cfg)
    return str(rope.get("rope_type", rope.get("type", ""))).lower() == "llama3"


def generated_outputs(view: CheckpointView, out_tensor: type[OutTensor]) -> list[OutTensor]:
    """The generated tensors of `view`'s GGUF, as `out_tensor` (names.OutTensor) entries without sources."""
    if not view.spec.extra.get("rope_freqs") or not _llama3(view.config):
        return []
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    shape = (_head_dim(view.config) // 2,)
    return [out_tensor(name, shape, (), ROPE_FREQS, name, False, Role.NORM, None)]


def generated_f32(view: CheckpointView, o: OutTensor) -> np.ndarray:
    if o.transform != ROPE_FREQS:
        raise ValueError(f"{o.name}: no generator for {o.transform!r}")
    return llama3_rope_factors(view.config)
