"""`moepack quantize`: a checkpoint (original or pruned) → one GGUF, at one type, a quant plan, or a llama.cpp ftype.

    moepack quantize MODEL_DIR (--type T | --plan quant_plan.json | --ftype F) [--calib-dir RUN_DIR | --imatrix FILE]
                     -o OUT.gguf

--type T      every quantizable tensor at T (norms, routers, biases stay F32), llama.cpp's fallbacks where a row
              width does not suit T.
--plan FILE   per-tensor types from a quant plan (read by moepack.schema.QuantPlan: allocate's, or one written by
              hand): {"tensors": {"<GGUF tensor name>": "<GGML type>" or {"type": ...}, ...}, ...}.
--ftype F     llama.cpp's own standard mixture (Q4_K_M, Q2_K, IQ2_XXS, ...) through llama_model_quantize, from a
              lossless BF16 (or F32) GGUF written first: the uniform baselines.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import numpy as np

from moepack.errors import MoepackError
from moepack.gguf import kernels as ggml
from moepack.gguf.imatrix import ImatrixFile, imatrix_by_output, load_imatrix, prune_imatrix, write_imatrix_gguf
from moepack.gguf.llama_quantize import quantize_gguf_ftype
from moepack.gguf.types import parse_type
from moepack.gguf.writer import WriteReport, write_gguf
from moepack.model.checkpoint import CheckpointView, open_checkpoint
from moepack.schema import PrunePlan, QuantPlan

__all__ = ["quantize_model"]

log = logging.getLogger(__name__)


# llama-quantize refuses these mixtures without an importance matrix (tools/quantize/quantize.cpp).
_FTYPES_NEED_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")


def _plan(path: str | Path) -> QuantPlan:
    """The quant plan at `path` (allocate's, or one written by hand), its type names checked and spelled as GGML's."""
    plan = QuantPlan.read(path)
    types: dict[str, str] = {}
    for name, t in plan.tensors.items():
        try:
            types[name] = parse_type(t).name
        except MoepackError as e:
            raise MoepackError(f"{path}: tensor {name!r}: {e}") from None
    return replace(plan, tensors=types)


def _intermediate_type(view: CheckpointView) -> str:
    """BF16 when every weight matrix is stored in BF16 (lossless and half of F32's size), else F32."""
    return "BF16" if all(t.dtype == "BF16" for t in view.tensors.values() if t.quantizable) else "F32"


def _quantize_ftype(view: CheckpointView, out: Path, ftype: str, imatrix: Mapping[str, np.ndarray] | None,
                    threads: int | None, prune_plan: PrunePlan | None) -> WriteReport:
    ggml.parse_ftype(ftype)  # validate before writing anything
    if imatrix is None and ftype.strip().upper() in _FTYPES_NEED_IMATRIX:
        raise MoepackError(f"llama.cpp's {ftype} mixture needs an importance matrix; pass --calib-dir RUN_DIR or --imatrix FILE")
    src_type = _intermediate_type(view)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmpdir:
        src = Path(tmpdir) / f"source-{src_type.lower()}.gguf"
        im_path = None
        if imatrix is not None:  # llama_model_quantize reads llama.cpp's imatrix GGUF
            im_path = Path(tmpdir) / "imatrix.gguf"
            write_imatrix_gguf(ImatrixFile.of_means(imatrix_by_output(view, imatrix)), im_path)
        write_gguf(view, src, None, prune_plan=prune_plan, threads=threads, default_type=src_type,
                   ftype=ftype.upper())
        quantize_gguf_ftype(src, out, ftype, imatrix=im_path, threads=threads or 2)
    return _report_from_file(out)


def _report_from_file(path: Path) -> WriteReport:
    import gguf

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return WriteReport(path, path.stat().st_size, types)


def quantize_model(model_dir: str | Path, out: str | Path, *, qtype: str | None = None,
                   plan: str | Path | None = None, ftype: str | None = None, imatrix: str | Path | None = None,
                   threads: int | None = None, progress: bool = True) -> WriteReport:
    """Write `model_dir` as GGUF `out` with exactly one of `qtype`, `plan` (a quant plan JSON) or `ftype`."""
    if sum(x is not None for x in (qtype, plan, ftype)) != 1:
        raise MoepackError("give exactly one of --type, --plan, --ftype")
    model_dir, out = Path(model_dir), Path(out)
    if not out.parent.is_dir():
        raise MoepackError(f"{out.parent}: output directory does not exist")
    if not os.access(out.parent, os.W_OK):
        raise MoepackError(f"{out.parent}: output directory is not writable")
    if qtype is not None:
        qtype = parse_type(qtype).name  # validate before reading anything
    if ftype is not None:
        ggml.parse_ftype(ftype)
    quant_plan = _plan(plan) if plan is not None else None
    view = open_checkpoint(model_dir)
    prune = PrunePlan.beside(model_dir)
    im = load_imatrix(imatrix, view) if imatrix is not None else None
    if im is not None and prune is not None:
        im = prune_imatrix(im, prune)
    if ftype is not None:
        return _quantize_ftype(view, out, ftype, im, threads, prune)
    return write_gguf(view, out, quant_plan, imatrix=im, prune_plan=prune, threads=threads, progress=progress,
                      default_type=qtype if quant_plan is None else None)
