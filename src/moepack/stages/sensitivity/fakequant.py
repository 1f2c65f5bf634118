"""ggml-exact fake quantization: the weights llama.cpp will compute with, as checkpoint tensors for a torch forward.

Each GGUF tensor is built, typed and quantized by the GGUF writer's own code (gguf_out: expert stacking, the MLA
split of kv_b_proj into attn_k_b / attn_v_b, the rotary permutation, llama.cpp's row-width fallbacks, the
importance rows each tensor gets), dequantized with ggml's `to_float`, and mapped back to the checkpoint tensors it
came from (`to_checkpoint`, the inverse of those layouts). `QuantStore` quantizes each (tensor, type) once and keeps
the bytes in memory or on disk; `FakeQuantWeights` is a `LayerRunner` loader serving one type per GGUF tensor.
`QuantStore.sample_errors` measures a type's proxy error alone on a row sample (no bytes kept), for types whose
weights no forward needs.

    store = QuantStore(view, imatrix)
    typed = resolve_types(gguf_outputs(view), None, plan_types)
    store.quantize([(t.out, [t]) for t in typed if t.out.quantizable])
    runner = LayerRunner(view, loader=FakeQuantWeights(view, store, {t.out.name: t.qtype for t in typed}))
"""
from __future__ import annotations

import hashlib
import logging
import math
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
from moepack.gguf import mxfp4
from moepack.gguf import writer as go
from moepack.gguf.imatrix import imatrix_rows, importance_rows
from moepack.gguf.linear_attn import V_TILED, join_qkvz, tile_v_heads
from moepack.gguf.metadata import WRITER_ID
from moepack.gguf.names import gguf_outputs
from moepack.gguf.tensors import OutTensor
from moepack.model.checkpoint import CheckpointView

__all__ = ["FakeQuantError", "QuantStore", "FakeQuantWeights", "gguf_f32", "to_checkpoint", "row_sample",
           "MIN_SAMPLE_ROWS"]

log = logging.getLogger(__name__)


MIN_SAMPLE_ROWS = 16  # fewer sampled rows per slice than this: the tensor's error is measured whole (too few rows
# for a scaled estimate, and such a tensor is cheap to quantize anyway)


class FakeQuantError(MoepackError, ValueError):
    pass


class _MemoView:
    """The view, with each tensor read from the checkpoint once while one GGUF tensor is quantized to many types."""

    def __init__(self, view: CheckpointView) -> None:
        self._view, self._memo = view, {}

    def __getattr__(self, key: str) -> Any:
        return getattr(self._view, key)

    def load_numpy_f32(self, name: str) -> np.ndarray:
        if name not in self._memo:
            self._memo[name] = self._view.load_numpy_f32(name)
        return self._memo[name]


def gguf_f32(view: CheckpointView | _MemoView, o: OutTensor) -> np.ndarray:
    """The float32 data of a GGUF tensor in its GGUF layout (numpy shape o.shape), built by the writer's code."""
    if o.transform == "stack":
        return np.stack([view.load_numpy_f32(s) for s in o.sources])  # (E, rows, n)
    return go.source_f32(view, o)


def row_sample(o: OutTensor, fraction: float) -> np.ndarray | None:
    """Row indices (S, m) of a `fraction` sample of each slice's rows (S = experts or heads of a 3-D tensor, else
    1), seeded by the tensor's name so every process draws the same; None where the tensor is measured whole
    (fraction 1, a 1-D tensor, or fewer than MIN_SAMPLE_ROWS rows sampled). Each slice draws its own rows, so a
    stacked tensor's sample spans every expert. Random rather than every k-th row: rows have structure (rotary
    pairs, heads stacked in k_b/v_b) that a stride could alias."""
    if fraction >= 1.0 or len(o.shape) < 2:
        return None
    rows, lead = o.shape[-2], (o.shape[0] if len(o.shape) == 3 else 1)
    m = math.ceil(rows * fraction)
    if m >= rows or m < MIN_SAMPLE_ROWS:
        return None
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(o.name.encode()).digest()[:8], "little"))
    return np.sort(np.stack([rng.choice(rows, m, replace=False) for _ in range(lead)]), axis=-1)  # (S, m)


def _take_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x (rows, n) or (S, rows, n) at row indices idx (S, m): (m, n) or (S, m, n)."""
    if x.ndim == 2:
        return np.ascontiguousarray(x[idx[0]])  # (m, n)
    return np.ascontiguousarray(np.take_along_axis(x, idx[:, :, None], axis=1))  # (S, m, n)


def _inverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the writer's rotary permutation (llama.cpp's interleaved pairs → HF's half split), rows only."""
    return np.ascontiguousarray(w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])  # (n_head, hd/2, 2, H)
                                .swapaxes(1, 2)  # (n_head, 2, hd/2, H)
                                .reshape(w.shape))  # (n_head*hd, H)


def to_checkpoint(view: CheckpointView, name: str, outs: Sequence[OutTensor], arrays: Sequence[np.ndarray]) -> np.ndarray:
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
    if o.transform in ("qkvz_qkv", "qkvz_z"):
        parts = {t.transform: a for t, a in zip(outs, arrays)}
        return join_qkvz(parts["qkvz_qkv"], parts["qkvz_z"], cfg)
    if o.transform in V_TILED and not o.transform.startswith(("neg_exp", "squeeze")):  # Qwen3.5's tiled v heads
        return tile_v_heads(x, cfg, o.transform, inverse=True)
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

    def __init__(self, view: CheckpointView, imatrix: Mapping[str, np.ndarray] | None = None, *,
                 proxy_weights: Mapping[str, np.ndarray] | None = None, token_freq: np.ndarray | None = None,
                 threads: int | None = None, cache_dir: str | Path | None = None,
                 deq_cache_bytes: int = 1 << 30) -> None:
        self.view, self.imatrix, self.threads = view, imatrix, threads
        self.proxy_weights = proxy_weights if proxy_weights is not None else imatrix
        self.token_freq = token_freq
        self._raw: dict[tuple[str, str], np.ndarray] = {}
        self._err: dict[tuple[str, str], float] = {}
        self._sampled: dict[tuple[str, str], float] = {}  # errors measured on a row sample (no bytes)
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

    def _by_freq(self, o: OutTensor) -> bool:
        return o.name == "token_embd.weight" and self.token_freq is not None and len(self.token_freq) == o.shape[0]

    def _proxy_err(self, o: OutTensor, x: np.ndarray, q: np.ndarray, rows: np.ndarray | None = None) -> float:
        """The proxy error of x (o.shape, or its rows `rows` (1, m) of a sample) quantized to q."""
        d2 = np.square(x - q, dtype=np.float64)  # o.shape | sampled rows
        if self._by_freq(o):
            assert self.token_freq is not None
            freq = self.token_freq if rows is None else self.token_freq[rows[0]]
            return float(d2.sum(axis=-1) @ freq)  # rows weigh by token frequency
        w = imatrix_rows(o, self.proxy_weights)  # (S, n) | (n,) | None
        col = d2.sum(axis=-2)  # (S, n) | (n,)
        return float((col * w).sum() if w is not None else col.sum())

    def sample_errors(self, work: Sequence[tuple[OutTensor, Sequence[go.TypedTensor], go.TypedTensor]],
                      fraction: float) -> None:
        """The proxy error of each (GGUF tensor, type) in `work` (tensor, types, reference) estimated from the rows
        `row_sample` draws, no bytes kept: err(ref) over the whole tensor + (rows / sampled rows) · Σ_sampled rows
        (err_t − err_ref). Pairing each row with the reference's error on the same row cancels most of the
        sampling noise: rows that quantize badly at t do so at the reference too, and Δerr = err(t) − err(ref) is
        what the predictions use. ggml quantizes each row on its own, so a sampled row's bytes are the whole
        tensor's. The token embedding weighs rows by token frequency: its error is exact from the rows of tokens
        seen. A tensor `row_sample` keeps whole is quantized whole (`quantize`), as is a reference not quantized
        yet; a (tensor, type) measured whole already keeps that measurement."""
        whole: list[tuple[OutTensor, list[go.TypedTensor]]] = []
        source = _MemoView(self.view)
        self.quantize([(o, [ref]) for o, _, ref in work])  # the references' whole errors (normally there already)
        for o, ts, ref in work:
            todo = [t for t in ts if (o.name, t.qtype.name) not in self._err
                    and (o.name, t.qtype.name) not in self._sampled]
            kept = [t for t in todo if t.qtype == GGMLQuantizationType.MXFP4 and mxfp4.is_source(self.view, o)]
            if kept:  # the source's own MXFP4 bytes: written whole (a repack, no quantizing), their error exactly 0
                whole.append((o, kept))
                todo = [t for t in todo if t not in kept]
            idx, scale = self._sample_of(o, fraction) if todo else (None, 1.0)
            if todo and idx is None:
                whole.append((o, todo))
            if not todo or idx is None:
                continue
            x = _take_rows(gguf_f32(source, o), idx)  # (m, n) | (S, m, n)
            at_ref = self._sample_err(o, x, ref, idx)
            for t in todo:
                sample = at_ref if t.qtype == ref.qtype else self._sample_err(o, x, t, idx)
                self._sampled[(o.name, t.qtype.name)] = self.err(o.name, ref.qtype) + scale * (sample - at_ref)
        self.quantize(whole)

    def _sample_err(self, o: OutTensor, x: np.ndarray, t: go.TypedTensor, idx: np.ndarray) -> float:
        """The proxy error of the sampled rows x ((m, n) | (S, m, n), rows idx of `o`) quantized to t."""
        raw = ggml.quantize(x, t.qtype, importance_rows(t, self.imatrix), self.threads)
        return self._proxy_err(o, x, ggml.dequantize(raw, t.qtype, x.shape, self.threads), idx)

    def _sample_of(self, o: OutTensor, fraction: float) -> tuple[np.ndarray | None, float]:
        """(the rows (S, m) measured for `o`, None for all; the factor from their error to the whole tensor's)."""
        if fraction < 1.0 and self._by_freq(o):
            assert self.token_freq is not None
            seen = np.flatnonzero(self.token_freq)[None]  # (1, m): rows of unseen tokens add no error
            return (seen if seen.shape[1] < o.shape[0] else None), 1.0
        idx = row_sample(o, fraction)
        return idx, (1.0 if idx is None else o.shape[-2] / idx.shape[1])

    def sampled_errors(self) -> dict[tuple[str, str], float]:
        """{(GGUF name, type name): proxy error} measured on a row sample (`sample_errors`): plain data."""
        return dict(self._sampled)

    def absorb_sampled(self, errs: Mapping[tuple[str, str], float]) -> None:
        """Take another store's `sampled_errors` (a whole measurement of the same key stays first in `err`)."""
        self._sampled.update({k: float(e) for k, e in errs.items()})

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
        """The proxy error: measured on the whole tensor where it was quantized whole, else on its row sample."""
        key = (name, qtype.name)
        return self._err[key] if key in self._err else self._sampled[key]

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

    def __init__(self, view: CheckpointView, store: QuantStore, types: Mapping[str, GGMLQuantizationType]) -> None:
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
