"""Lazy reader of Hugging Face MoE checkpoints: config.json + safetensors headers → `CheckpointView`.

Nothing here reads weight data until `CheckpointView.load(name)` is called for one tensor, so a 1.3 TB checkpoint
is inspected in milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moepack.errors import MoepackError
from moepack.model.arch import (DERIVED_BUFFERS, EXPERT_COUNT_KEYS, F32_KINDS, ArchSpec, Role, beyond_decoder,
                                layer_index, spec_for)
from moepack.model.stored import (DTYPE_BYTES, FORMAT_ADAPTERS, Logical, RawTensor, Stored, decode, split_fused,
                                  torch_dtype)
from moepack.model import formats  # noqa: F401  (registers the compressed formats' adapters and decoders)

__all__ = [
    "CheckpointError",
    "TensorRef",
    "MoEFacts",
    "CheckpointView",
    "open_checkpoint",
    "read_safetensors_header",
    "raw_tensors",
    "import_reader",
    "read_tensor",
    "config_get",
    "facts_from_config",
    "read_config",
    "text_config",
]

log = logging.getLogger(__name__)

_DTYPE_BYTES = DTYPE_BYTES
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors reference implementation's own limit
_FINITE_CHUNK = 64 * 2**20  # elements per finiteness check: bounds the temporary bool mask


class CheckpointError(MoepackError, ValueError):
    """A checkpoint that moepack cannot read; the message says what to change."""


@dataclass(frozen=True)
class TensorRef:
    """Where one checkpoint tensor lives and what it is; no data."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"
    file: Path | None  # None: derived from config.json alone (moepack.model.shapes), no data to read
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int
    role: Role
    kind: str  # e.g. "gate_proj", "q_a_proj", "router"
    layer: int | None = None
    expert: int | None = None
    stored: Stored | None = None  # how the values are made (fused experts, compressed formats); None: plain

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_nbytes(self) -> int:
        """Bytes the checkpoint spends on this tensor (its compressed values and scales, where it has them)."""
        return self.stored.stored_nbytes if self.stored is not None else self.nbytes

    @property
    def quantizable(self) -> bool:
        """Weight matrices get a GGML type; norms, routers and biases stay F32, as llama.cpp keeps them."""
        return len(self.shape) >= 2 and self.role not in (Role.NORM, Role.ROUTER) and self.kind not in F32_KINDS


@dataclass(frozen=True)
class MoEFacts:
    """The MoE structure of a model, from config.json and the tensors present."""

    arch: str  # HF model_type
    gguf_arch: str
    n_layers: int
    moe_layers: tuple[int, ...]
    dense_layers: tuple[int, ...]
    n_experts: int
    top_k: int
    n_shared_experts: int
    expert_ffn: int
    hidden: int
    vocab: int
    scoring: str  # "softmax" | "sigmoid"
    router_bias: bool
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int | None
    topk_group: int | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def config_get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """First present key; transformers 5 sometimes renames keys when it saves (num_experts → num_local_experts)."""
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    return default


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header dict, data start offset). Validates the header against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} does not fit the file ({size} bytes)")
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        _check_entry(path, name, info, size - data_start)
    return header, data_start


def _check_entry(path: Path, name: str, info: Any, data_len: int) -> None:
    try:
        dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        numel = math.prod(int(s) for s in shape)
        ok = dtype in _DTYPE_BYTES and 0 <= a <= b <= data_len and b - a == numel * _DTYPE_BYTES[dtype]
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid header entry (dtype, shape or offsets)")


def _check_finite(ref: TensorRef, t) -> None:
    import torch

    flat = t.reshape(-1)  # (numel,)
    for a in range(0, flat.numel(), _FINITE_CHUNK):
        if not bool(torch.isfinite(flat[a:a + _FINITE_CHUNK]).all()):
            raise CheckpointError(f"{ref.file}: tensor {ref.name!r} holds NaN or inf values; fix or re-export the "
                                  "checkpoint (moepack cannot calibrate or quantize non-finite weights)")


def import_reader() -> None:
    """Import torch, which reads every tensor, now. A Ctrl-C that lands inside torch's import aborts the process
    (its pybind11 init cannot hand the KeyboardInterrupt back), so writers call this before opening their output."""
    import torch  # noqa: F401


def read_tensor(ref: TensorRef):  # -> torch.Tensor
    """The data of `ref` from its shard(s), decoded where it is stored compressed or fused, checked to be complete
    and (for floats) finite."""
    if ref.file is None:
        raise CheckpointError(f"{ref.name}: this model was read from config.json alone; download its weights "
                              "(*.safetensors) into the directory to calibrate, prune or quantize it")
    if ref.stored is not None:
        t = decode(ref.stored)
        if tuple(t.shape) != ref.shape:
            raise CheckpointError(f"{ref.file}: {ref.name} decodes to shape {tuple(t.shape)}, expected {ref.shape}")
        t = t.to(torch_dtype(ref.dtype))
    else:
        t = RawTensor(ref.name, ref.shape, ref.dtype, ref.file, ref.offset, ref.nbytes).read()
    if t.is_floating_point():
        _check_finite(ref, t)
    return t


def _shard_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{root}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return [root / f for f in files]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors weights found (moepack reads safetensors checkpoints)")
    return files


def raw_tensors(files: list[Path]) -> dict[str, RawTensor]:
    """Every tensor of every shard as stored (validated headers, no data)."""
    raw: dict[str, RawTensor] = {}
    for path in files:
        header, start = read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            raw[name] = RawTensor(name, tuple(int(s) for s in info["shape"]), info["dtype"], path, start + a, b - a)
    return raw


def _logical_tensors(root: Path, cfg: dict[str, Any], raw: dict[str, RawTensor]) -> dict[str, Logical]:
    """The float tensors the stored ones stand for: a quantization_config's format decoded (its scale tensors
    consumed), plain tensors as they are."""
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and q:
        adapter = FORMAT_ADAPTERS.get(str(q.get("quant_method")))
        if adapter is None:
            raise CheckpointError(f"{root}: quantization_config.quant_method {q.get('quant_method')!r} is not a "
                                  f"format moepack reads; it reads bf16/f16/f32, {', '.join(formats.SUPPORTED)}")
        return adapter(raw, q)
    return {n: Logical(n, r.shape, r.dtype, r) for n, r in raw.items()}


def _collect_tensors(spec: ArchSpec, cfg: dict[str, Any], files: list[Path], prefix: str = "") -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    unserved: list[str] = []
    unknown: list[str] = []
    n_layers = _need(cfg, "num_hidden_layers", "n_layer")
    raw = raw_tensors(files)
    logical = _logical_tensors(files[0].parent, cfg, _text_weights(raw, prefix) if prefix else raw)
    for name, lt in split_fused(logical, spec.fused, n_layers).items():
        m = spec.match(name)
        if m is None:
            # The multi-token-prediction layer's own tensors (DeepSeek-V3's eh_proj, enorm, ...) and derived
            # buffers are not part of the served model; any other name would silently go missing.
            served = not beyond_decoder(layer_index(name), n_layers) and not name.endswith(DERIVED_BUFFERS) \
                and not name.startswith(spec.extra.get("unserved_prefixes", ()))  # Qwen3-Next's mtp.*
            (unknown if served else unserved).append(name)
            continue
        r = lt.raw
        nbytes = math.prod(lt.shape) * DTYPE_BYTES[lt.dtype] if lt.stored is not None else r.nbytes
        tensors[name] = TensorRef(name, lt.shape, lt.dtype, r.file, r.offset, nbytes, m.rule.role, m.rule.kind,
                                  m.layer, m.expert, lt.stored)
    if unknown:
        raise CheckpointError(f"{files[0].parent}: {len(unknown)} tensor(s) are not part of any {spec.model_type} "
                              f"layout moepack knows, e.g. {', '.join(unknown[:3])}; they would be missing from the "
                              "GGUF. Save the checkpoint with transformers' save_pretrained (the hub layout), or "
                              "report the variant")
    if unserved:
        log.info("ignoring %d tensor(s) not used by %s inference (multi-token prediction, derived buffers), e.g. %s",
                 len(unserved), spec.model_type, unserved[0])
    return tensors


def _need(cfg: dict[str, Any], *keys: str) -> int:
    v = config_get(cfg, *keys)
    if v is None:
        raise CheckpointError(f"config.json has no {' / '.join(keys)}; add it (the value the model was trained with)")
    if isinstance(v, list):  # Hunyuan's per-layer lists (moe_topk): llama.cpp runs one value for every layer
        if not v or len(set(v)) != 1:
            raise CheckpointError(f"config.json's {' / '.join(keys)} is {v}: moepack and llama.cpp need one value "
                                  "for every layer")
        v = v[0]
    return int(v)


def _zero_if_absent(cfg: dict[str, Any], *keys: str) -> int:
    # Only for checkpoints without MoE layers: they have no expert counts, and every stage refuses them.
    return int(config_get(cfg, *keys, default=0))


def facts_from_config(spec: ArchSpec, cfg: dict[str, Any], tensors: dict[str, TensorRef]) -> MoEFacts:
    n_layers = _need(cfg, "num_hidden_layers", "n_layer")
    moe = sorted({t.layer for t in tensors.values() if t.role is Role.ROUTER and t.layer is not None})
    groups = [config_get(cfg, k) for k in spec.group_keys] if spec.group_keys else [None, None]
    need = _need if moe else _zero_if_absent
    # dots1: the router's own score function, whatever config.json's scoring_func says ("noaux_tc")
    scoring = spec.extra.get("scoring") or str(config_get(cfg, "scoring_func", default=spec.scoring_default))
    n_shared = int(config_get(cfg, spec.n_shared_key, default=spec.n_shared_default) if spec.n_shared_key
                   else spec.n_shared_default)
    return MoEFacts(
        arch=spec.model_type,
        gguf_arch=spec.gguf_arch,
        n_layers=n_layers,
        moe_layers=tuple(moe),
        dense_layers=tuple(i for i in range(n_layers) if i not in moe),
        n_experts=need(cfg, spec.n_experts_key, *EXPERT_COUNT_KEYS),
        top_k=need(cfg, spec.top_k_key),
        n_shared_experts=n_shared if moe else 0,
        expert_ffn=need(cfg, spec.expert_ffn_key),
        hidden=_need(cfg, "hidden_size"),
        vocab=_need(cfg, "vocab_size"),
        scoring=scoring,
        router_bias=any(t.kind == spec.router_bias_kind for t in tensors.values()) if spec.router_bias_kind else False,
        norm_topk_prob=bool(config_get(cfg, "norm_topk_prob", default=spec.norm_topk_default)),
        routed_scaling_factor=float(config_get(cfg, "routed_scaling_factor", default=1.0)),  # absent: unscaled
        n_group=int(groups[0]) if groups[0] else None,
        topk_group=int(groups[1]) if groups[1] else None,
    )


@dataclass
class CheckpointView:
    """A checkpoint as a table of tensor references plus its MoE facts. Loads no data until asked."""

    root: Path
    config: dict[str, Any]
    spec: ArchSpec
    facts: MoEFacts
    tensors: dict[str, TensorRef]

    def names(self, role: Role | None = None, layer: int | None = None) -> list[str]:
        return [n for n, t in self.tensors.items()
                if (role is None or t.role is role) and (layer is None or t.layer == layer)]

    def expert_ref(self, layer: int, expert: int, proj: str) -> TensorRef:
        for t in self.tensors.values():
            if t.role is Role.ROUTED_EXPERTS and t.layer == layer and t.expert == expert and t.kind == proj:
                return t
        raise CheckpointError(f"{self.root}: no tensor for layer {layer} expert {expert} {proj}")

    def load(self, name: str):  # -> torch.Tensor
        """One tensor's data, read with plain file reads into a fresh tensor: no memory map stays behind, so RSS
        holds only the tensors still referenced (the OS page cache is not charged to the process)."""
        return read_tensor(self.tensors[name])

    def load_numpy_f32(self, name: str) -> np.ndarray:
        return self.load(name).float().numpy()

    def param_counts(self) -> dict[str, int]:
        counts = {r.value: 0 for r in Role}
        for t in self.tensors.values():
            counts[t.role.value] += t.numel
        return counts

    def fingerprint(self) -> str:
        """Identifies the model by its config and tensor table (names, shapes, dtypes), not its data. How the
        checkpoint stores the values (quantization_config) is left out: an FP8 release and its dequantized copy
        are one model, with one cache and one GGUF."""
        cfg = {k: v for k, v in self.config.items() if k != "quantization_config"}
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        for n in sorted(self.tensors):
            t = self.tensors[n]
            h.update(f"{n}|{t.shape}|{t.dtype}|{t.nbytes}\n".encode())
        return h.hexdigest()[:16]


_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_TO_BF16 = ("config.json has no quantization_config saying how to decode them: restore the release's own (FP8 with "
            "weight_scale_inv: quant_method fp8, weight_block_size [128, 128]), or convert it to bf16")


def _check_float_weights(root: Path, tensors: dict[str, TensorRef]) -> None:
    bad = [t for t in tensors.values() if t.quantizable and t.dtype not in _FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{root}: {len(bad)} weight matrices are stored as {bad[0].dtype} (e.g. {bad[0].name}); "
                              f"moepack reads bf16/f16/f32 weights: {_TO_BF16}")


def read_config(root: Path) -> dict[str, Any]:
    """config.json of a model directory, with a clear error when it is absent or not JSON."""
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory; pass a Hugging Face checkpoint directory")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root}: no config.json; this does not look like a Hugging Face checkpoint")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None


def text_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(config, weight-name prefix) of the text model moepack packs: a multimodal checkpoint (Llama 4's
    Llama4ForConditionalGeneration) gives its text_config and the prefix of the text weights (`language_model.`);
    any other checkpoint itself and ""."""
    wrap = spec_for(cfg.get("model_type")).extra.get("multimodal")  # (text config key, prefix, text model_type)
    if not wrap:
        return cfg, ""
    key, prefix, model_type = wrap
    if not isinstance(cfg.get(key), dict):
        raise CheckpointError(f"config.json of a {cfg.get('model_type')} model has no {key}; moepack packs its text "
                              "model and reads that model's settings there")
    # architectures: the text model's class, so that a pruned text-only checkpoint names what it is
    return {"model_type": model_type, "architectures": [spec_for(model_type).hf_class], **cfg[key]}, prefix


def _text_weights(raw: dict[str, RawTensor], prefix: str) -> dict[str, RawTensor]:
    """The text model's tensors of a multimodal checkpoint, named as the text model's own checkpoint names them
    (`language_model.model.layers.0...` → `model.layers.0...`; Qwen3.5's `model.language_model.layers.0...` →
    `model.layers.0...` beside its top-level `lm_head.weight`); the vision tower and projector are not packed."""
    base = prefix.replace("language_model.", "", 1)  # what the text model's own checkpoint puts there
    text = {base + n[len(prefix):]: r for n, r in raw.items() if n.startswith(prefix)}
    if base:  # the output head sits outside the text model's prefix
        text.update({n: r for n, r in raw.items() if n.startswith("lm_head.")})
    if len(text) < len(raw):
        log.info("packing the text model: %d tensor(s) outside %s* (vision tower, projector) are left out",
                 len(raw) - len(text), prefix)
    return text


def open_checkpoint(model_dir: str | Path) -> CheckpointView:
    """Read config.json and the safetensors headers; raise `CheckpointError`/`UnsupportedArchitecture` clearly."""
    root = Path(model_dir)
    cfg, prefix = text_config(read_config(root))
    spec = spec_for(cfg.get("model_type"))
    tensors = _collect_tensors(spec, cfg, _shard_files(root), prefix)
    _check_float_weights(root, tensors)
    facts = facts_from_config(spec, cfg, tensors)
    if not facts.moe_layers:
        log.warning("%s: no MoE layers found", root)
    return CheckpointView(root, cfg, spec, facts, tensors)
