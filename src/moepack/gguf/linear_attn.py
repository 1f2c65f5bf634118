"""Qwen3-Next's gated DeltaNet tensors in llama.cpp's layout, as the converter (conversion/qwen.py,
Qwen3NextModel.modify_tensors) writes them, and back.

`in_proj_qkvz` holds, for each of the n_k key heads, the rows [q (dk), k (dk), v (r·dv), z (r·dv)] (r = value heads
per key head); llama.cpp reads two tensors instead: attn_qkv = [all q, all k, all v] (the order the short
convolution runs on) and attn_gate = all z. The per-element transforms of the other tensors are in `ELEMENTWISE`.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["QKVZ_SPLIT", "ELEMENTWISE", "V_TILED", "qkvz_shapes", "split_qkvz", "join_qkvz", "tile_v_heads"]

# in_proj_qkvz is written as these two tensors: (checkpoint-style name gguf's tensor map knows, transform).
QKVZ_SPLIT = (("in_proj_qkv", "qkvz_qkv"), ("in_proj_z", "qkvz_z"))

# transform → float32 function, for tensors whose values llama.cpp stores changed (names.py assigns them by kind).
ELEMENTWISE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neg_exp": lambda x: -np.exp(x),  # A_log → A = -exp(A_log), which llama.cpp multiplies the decay by
    "squeeze": lambda x: x.reshape(x.shape[0], x.shape[-1]),  # conv1d (C, 1, K) → (C, K)
    "plus_one": lambda x: x + 1.0,  # zero-centred RMSNorm weight w → the factor 1 + w it applies
}


def _dims(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(key heads, key head dim, value heads per key head, value head dim)."""
    n_k, n_v = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    return n_k, int(cfg["linear_key_head_dim"]), n_v // n_k, int(cfg["linear_value_head_dim"])


def qkvz_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Row counts of attn_qkv and attn_gate (× hidden columns)."""
    n_k, dk, r, dv = _dims(cfg)
    h = int(cfg["hidden_size"])
    return {"qkvz_qkv": (n_k * (2 * dk + r * dv), h), "qkvz_z": (n_k * r * dv, h)}


def split_qkvz(x: np.ndarray, cfg: dict[str, Any], part: str) -> np.ndarray:
    """in_proj_qkvz (n_k·(2dk + 2r·dv), H) → attn_qkv (n_k·(2dk + r·dv), H) or attn_gate (n_k·r·dv, H)."""
    n_k, dk, r, dv = _dims(cfg)
    heads = x.reshape(n_k, 2 * dk + 2 * r * dv, x.shape[-1])  # (n_k, [q|k|v|z], H)
    q, k, v, z = np.split(heads, np.cumsum([dk, dk, r * dv]), axis=1)  # (n_k, dk | dk | r·dv | r·dv, H)
    if part == "qkvz_z":
        return z.reshape(-1, x.shape[-1])  # (n_k·r·dv, H)
    return np.concatenate([t.reshape(-1, x.shape[-1]) for t in (q, k, v)])  # (n_k·dk + n_k·dk + n_k·r·dv, H)


def join_qkvz(qkv: np.ndarray, z: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Inverse of split_qkvz: attn_qkv and attn_gate → in_proj_qkvz."""
    n_k, dk, r, dv = _dims(cfg)
    h = qkv.shape[-1]
    q, k, v = np.split(qkv, np.cumsum([n_k * dk, n_k * dk]), axis=0)  # (n_k·dk | n_k·dk | n_k·r·dv, H)
    parts = [q.reshape(n_k, dk, h), k.reshape(n_k, dk, h), v.reshape(n_k, r * dv, h), z.reshape(n_k, r * dv, h)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1).reshape(-1, h))  # (n_k·(2dk + 2r·dv), H)


# Qwen3.5's transforms (conversion/qwen.py, _LinearAttentionVReorderBase): value heads grouped by key head
# [k0: v0..v(r-1), k1: ...] → tiled [v0 of k0, v0 of k1, ..., v1 of k0, ...], the order ggml's broadcast repeats
# the key heads in. transform → (axis, part, head width key or None for one entry per head).
V_TILED: dict[str, tuple[int, str, str | None]] = {
    "vtile_qkv": (0, "v", "linear_value_head_dim"),  # in_proj_qkv: only the v rows after all q and k
    "vtile_rows": (0, "all", "linear_value_head_dim"),  # in_proj_z
    "vtile_heads": (0, "all", None),  # in_proj_a, in_proj_b, dt_bias: one row / entry per value head
    "neg_exp_vtile": (0, "all", None),  # A_log: -exp, then tiled
    "squeeze_vtile": (0, "v", "linear_value_head_dim"),  # conv1d: squeezed, then its v channels tiled
    "vtile_cols": (-1, "all", "linear_value_head_dim"),  # out_proj: its input columns
}


def _tile(x: np.ndarray, axis: int, n_k: int, r: int, d: int, inverse: bool) -> np.ndarray:
    x = np.moveaxis(x, axis, 0)
    rest = x.shape[1:]
    groups = (r, n_k) if inverse else (n_k, r)
    y = x.reshape(*groups, d, *rest).swapaxes(0, 1).reshape(n_k * r * d, *rest)  # (n_k, r, d, …) ↔ (r, n_k, d, …)
    return np.ascontiguousarray(np.moveaxis(y, 0, axis))


def tile_v_heads(x: np.ndarray, cfg: dict[str, Any], transform: str, inverse: bool = False) -> np.ndarray:
    """A Qwen3.5 linear-attention tensor with its value heads tiled as llama.cpp reads them (or back, `inverse`);
    the elementwise part of the transform (-exp, squeeze) is applied first (only forward: those tensors stay F32)."""
    axis, part, width = V_TILED[transform]
    if transform == "neg_exp_vtile":
        x = ELEMENTWISE["neg_exp"](x)
    elif transform == "squeeze_vtile":
        x = ELEMENTWISE["squeeze"](x)  # (C, 1, K) → (C, K)
    n_k, n_v = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    d = int(cfg[width]) if width else 1
    if part == "all":
        return _tile(x, axis, n_k, n_v // n_k, d, inverse)
    qk = 2 * n_k * int(cfg["linear_key_head_dim"])  # rows of all q and all k, in front of v
    return np.concatenate([x[:qk], _tile(x[qk:], 0, n_k, n_v // n_k, d, inverse)])
