"""What a GGUF tensor is before it gets a type (`OutTensor`: its name, shape and how it is made from the checkpoint)
and after (`TypedTensor`: the type asked for and the type written). Every gguf module below the writer uses them,
so they live apart from the name tables and the writer that make them."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from moepack.gguf.types import tensor_bytes
from moepack.model.arch import Role

__all__ = ["OutTensor", "TypedTensor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the GGUF file and how to make it from the checkpoint.

    `transform` is "" (copy), "stack" (per-expert tensors stacked in expert order), "k_b"/"v_b" (DeepSeek MLA
    split of kv_b_proj), "permute_q"/"permute_k" (llama-arch rotary layout: llama.cpp's LlamaModel.permute).
    `key` is the name plans and importance matrices use (`gguf_tensor_name` of the source).
    """

    name: str
    shape: tuple[int, ...]  # numpy order; rows are the last axis
    sources: tuple[str, ...]
    transform: str
    key: str
    quantizable: bool
    role: Role
    layer: int | None

    @property
    def n_per_row(self) -> int:
        return self.shape[-1]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class TypedTensor:
    out: OutTensor
    requested: GGMLQuantizationType
    qtype: GGMLQuantizationType  # what is written (after llama.cpp's row-width fallback)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.out.shape, self.qtype)
