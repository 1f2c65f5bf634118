"""ggml-exact fake quantization: the weights llama.cpp will compute with, as checkpoint tensors for a torch forward.

Each GGUF tensor is built, typed and quantized by the GGUF writer's own code (gguf_out: expert stacking, the MLA
split of kv_b_proj into attn_k_b / attn_v_b, the rotary permutation, llama.cpp's row-width fallbacks, the
importance rows each tensor gets), dequantized with ggml's `to_float`, and mapped back to the checkpoint tensors it
came from (`to_checkpoint`, the inverse of those layouts). `QuantStore` quantizes each (tensor, type) once and keeps
the bytes in memory or on disk; `FakeQuantWeights` is a `LayerRunner` loader serving one type per GGUF tensor.

    store = QuantStore(view, imatrix)
    typed = resolve_types(gguf_outputs(view), None, plan_types)
    store.quantize([(t.out, [t]) for t in typed if t.out.quantizable])
    runner = LayerRunner(view, loader=FakeQuantWeights(view, store, {t.out.name: t.qtype for t in typed}))
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moepack.atomic import atomic_path
from moepack.errors import MoepackError
from moepack.gguf import kernels as ggml
from moepack.gguf import writer as go
from moepack.gguf.imatrix import imatrix_rows, importance_rows
from moepack.gguf.metadata import WRITER_ID
from moepack.gguf.names import OutTensor, gguf_outputs

__all__ = ["FakeQuantError", "QuantStore", "FakeQuantWeights", "gguf_f32", "to_checkpoint"]

log = logging.getLogger(__name__)


class FakeQuantError(MoepackError, ValueError):
    pass


class _MemoView:
    """The view, with each tensor read from the checkpoint once while one GGUF tensor is quantized to many types."""

    def __init__(self, view: Any) -> None:
        self._view, self._memo = view, {}

    def __getattr__(self, key: str) -> Any:
        return getattr(self._view, key)

    def load_numpy_f32(self, name: str) -> np.ndarray:
        if name not in self._memo:
            self._memo[name] = self._view.load_numpy_f32(name)
        return self._memo[name]


def gguf_f32(view: Any, o: OutTensor) -> np.ndarray:
    """The float32 data of a GGUF tensor in its GGUF layout (numpy shape o.shape), built by the writer's code."""
    if o.transform == "stack":
        return np.stack([view.load_numpy_f32(s) for s in o.sources])  # (E, rows, n)
    return go.source_f32(view, o)


def _inverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the writer's rotary permutation (llama.cpp's interleaved pairs → HF's half split), rows only."""
    return np.ascontiguousarray(w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])  # (n_head, hd/2, 2, H)
                                .swapaxes(1, 2)  # (n_head, 2, hd/2, H)
                                .reshape(w.shape))  # (n_head*hd, H)


def to_checkpoint(view: Any, name: str, outs: Sequence[OutTensor], arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Checkpoint tensor `name` from the GGUF tensors `outs` (GGUF-layout float32 `arrays`) built from it."""
    o, x = outs[0], arrays[0]
    cfg = view.config
    if o.transform == "stack":
        return x[o.sources.index(name)]  # (rows, n) of one expert
    if o.transform == "permute_q":
        return _inverse_permute(x, int(cfg["num_attention_heads"]))
    if o.transform == "permute_k":
        return _inverse_permute(x, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    if o.transform in ("k_b", "v_b"):
        parts = {t.transform: a for t, a in zip(outs, arrays)}
        k_b, v_b = parts["k_b"], parts["v_b"]  # (n_head, kv_lora, nope), (n_head, v, kv_lora)
        n_head, kv_lora, nope = k_b.shape
        kv = np.empty((n_head, nope + v_b.shape[1], kv_lora), dtype=np.float32)  # (n_head, nope + v, kv_lora)
        kv[:, :nope] = k_b.transpose(0, 2, 1)
        kv[:, nope:] = v_b
        return kv.reshape(-1, kv_lora)  # (n_head*(nope + v), kv_lora)
    if o.transform:
        raise FakeQuantError(f"{o.name}: no inverse for the writer's transform {o.transform!r}")
    return x


class QuantStore:
    """Each (GGUF tensor, written type) quantized once by the writer's own `tensor_data`; dequantized on demand.

    Bytes live in memory, or under `cache_dir/<digest of model files, imatrix, writer>/` when given (large models).
    Dequantized tensors are kept in an LRU of `deq_cache_bytes`. With each quantization the store records the
    proxy error Σ_col w[col] · Σ_row (x − q)² per slice (`err`): w = `proxy_weights` rows (squared inputs per
    token), token_embd's rows weighted by `token_freq`, else unweighted.
    """

    def __init__(self, view: Any, imatrix: Mapping[str, np.ndarray] | None = None, *,
                 proxy_weights: Mapping[str, np.ndarray] | None = None, token_freq: np.ndarray | None = None,
                 threads: int | None = None, cache_dir: str | Path | None = None,
                 deq_cache_bytes: int = 1 << 30) -> None:
        self.view, self.imatrix, self.threads = view, imatrix, threads
        self.proxy_weights = proxy_weights if proxy_weights is not None else imatrix
        self.token_freq = token_freq
        self._raw: dict[tuple[str, str], np.ndarray] = {}
        self._err: dict[tuple[str, str], float] = {}
        self._deq: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._deq_bytes, self._deq_limit = 0, deq_cache_bytes
        self.dir = Path(cache_dir) / self._digest() if cache_dir is not None else None

    def _digest(self) -> str:
        h = hashlib.sha256(f"{WRITER_ID}|{self.view.fingerprint()}".encode())
        for f in sorted({str(t.file) for t in self.view.tensors.values()}):
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        for name in sorted(self.imatrix or {}):
            h.update(name.encode() + np.ascontiguousarray(self.imatrix[name], dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    def _path(self, name: str, qtype: GGMLQuantizationType) -> Path:
        assert self.dir is not None
        return self.dir / f"{name}.{qtype.name}.safetensors"

    def quantize(self, work: Sequence[tuple[OutTensor, Sequence[go.TypedTensor]]], progress: bool = False) -> None:
        """Quantize each GGUF tensor to each of its types (reading its checkpoint tensors once)."""
        from tqdm.auto import tqdm

        total = sum(o.numel * len(ts) for o, ts in work)
        with tqdm(total=total, unit="w", unit_scale=True, desc="quantize", disable=not progress) as bar:
            for o, ts in work:
                self._ensure(o, ts, _MemoView(self.view))
                bar.update(o.numel * len(ts))

    def _ensure(self, o: OutTensor, types: Sequence[go.TypedTensor], source: _MemoView) -> None:
        from safetensors.numpy import load_file, save_file

        x: np.ndarray | None = None
        for t in types:
            key = (o.name, t.qtype.name)
            if key in self._err:
                continue
            if self.dir is not None and self._path(o.name, t.qtype).is_file():
                self._err[key] = float(load_file(str(self._path(o.name, t.qtype)))["err"][0])
                continue
            raw = np.ascontiguousarray(go.tensor_data(source, t, importance_rows(t, self.imatrix), self.threads))
            raw = raw.view(np.uint8).reshape(-1)  # (bytes,)
            if raw.size != t.nbytes:
                raise FakeQuantError(f"{o.name}: {raw.size} bytes quantized, the writer counts {t.nbytes}")
            x = gguf_f32(source, o) if x is None else x
            err = self._proxy_err(o, x, ggml.dequantize(raw, t.qtype, o.shape, self.threads))
            self._err[key] = err
            if self.dir is None:
                self._raw[key] = raw
                continue
            with atomic_path(self._path(o.name, t.qtype)) as tmp:
                save_file({"raw": raw, "err": np.array([err], dtype=np.float64)}, str(tmp))

    def _proxy_err(self, o: OutTensor, x: np.ndarray, q: np.ndarray) -> float:
        d2 = np.square(x - q, dtype=np.float64)  # o.shape
        if o.name == "token_embd.weight" and self.token_freq is not None and len(self.token_freq) == o.shape[0]:
            return float(d2.sum(axis=-1) @ self.token_freq)  # rows weigh by token frequency
        w = imatrix_rows(o, self.proxy_weights)  # (S, n) | (n,) | None
        col = d2.sum(axis=-2)  # (S, n) | (n,)
        return float((col * w).sum() if w is not None else col.sum())

    def raw(self, name: str, qtype: GGMLQuantizationType) -> np.ndarray:
        """The tensor's GGUF bytes at `qtype` (quantized before by `quantize`)."""
        key = (name, qtype.name)
        if key in self._raw:
            return self._raw[key]
        if self.dir is not None and self._path(name, qtype).is_file():
            from safetensors.numpy import load_file

            return load_file(str(self._path(name, qtype)))["raw"]
        raise FakeQuantError(f"{name} was not quantized to {qtype.name}")

    def err(self, name: str, qtype: GGMLQuantizationType) -> float:
        return self._err[(name, qtype.name)]

    def entries(self, keys: Iterable[tuple[str, str]] | None = None) -> dict[tuple[str, str], tuple[Any, float]]:
        """{(GGUF name, type name): (bytes, or None when they live under cache_dir, proxy error)} as plain data
        for another store's `absorb` (another process's: quantized once, computed with many times)."""
        return {k: (self._raw.get(k), self._err[k]) for k in (self._err if keys is None else keys)}

    def absorb(self, entries: Mapping[tuple[str, str], tuple[Any, float]]) -> None:
        """Take `entries` of another store of the same model, imatrix and cache_dir."""
        for k, (raw, err) in entries.items():
            self._err[k] = float(err)
            if raw is not None:
                self._raw[k] = raw

    def forget(self, keys: Iterable[tuple[str, str]]) -> None:
        """Drop the bytes and dequantized copies of `keys` held in memory (their proxy errors stay)."""
        for k in keys:
            self._raw.pop(k, None)
            if k in self._deq:
                self._deq_bytes -= self._deq.pop(k).nbytes

    def dequantized(self, o: OutTensor, qtype: GGMLQuantizationType) -> np.ndarray:
        """float32 in the GGUF layout (o.shape): exactly what llama.cpp computes with."""
        key = (o.name, qtype.name)
        if key in self._deq:
            self._deq.move_to_end(key)
            return self._deq[key]
        arr = ggml.dequantize(self.raw(o.name, qtype), qtype, o.shape, self.threads)
        self._deq[key] = arr
        self._deq_bytes += arr.nbytes
        while self._deq_bytes > self._deq_limit and len(self._deq) > 1:
            self._deq_bytes -= self._deq.popitem(last=False)[1].nbytes
        return arr


class FakeQuantWeights:
    """A `LayerRunner` loader: checkpoint name → float32 tensor with every GGUF tensor at its type in `types`
    (GGUF tensor name → written type; `override` on top, e.g. one probed group). Tensors the GGUF keeps in F32
    (norms, routers, biases) and quantizable tensors missing from `types` are served as stored."""

    def __init__(self, view: Any, store: QuantStore, types: Mapping[str, GGMLQuantizationType]) -> None:
        self.view, self.store, self.types = view, store, dict(types)
        self.outs: dict[str, list[OutTensor]] = {}
        for o in gguf_outputs(view):
            if o.name in self.types:
                for s in o.sources:
                    self.outs.setdefault(s, []).append(o)
        self.override: dict[str, GGMLQuantizationType] = {}
        self._plain: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        outs = self.outs.get(name)
        if outs is None:
            if name not in self._plain:
                self._plain[name] = self.view.load(name).float()
            return self._plain[name]
        arrays = [self.store.dequantized(o, self.override.get(o.name, self.types[o.name])) for o in outs]
        return torch.from_numpy(to_checkpoint(self.view, name, outs, arrays))
