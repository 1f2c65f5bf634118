"""`moepack quantize`: a checkpoint (original or pruned) → one GGUF, at one type, a quant plan, or a llama.cpp ftype.

    moepack quantize MODEL_DIR (--type T | --plan quant_plan.json | --ftype F) [--calib-dir RUN_DIR | --imatrix FILE]
                     -o OUT.gguf

--type T      every quantizable tensor at T (norms, routers, biases stay F32), llama.cpp's fallbacks where a row
              width does not suit T.
--plan FILE   per-tensor types from a quant plan: {"tensors": {"<GGUF tensor name>": "<GGML type>", ...}, ...}.
--ftype F     llama.cpp's own standard mixture (Q4_K_M, Q2_K, IQ2_XXS, ...) through llama_model_quantize, from a
              lossless BF16 (or F32) GGUF written first: the uniform baselines.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from moepack.errors import MoepackError
from moepack.gguf import kernels as ggml
from moepack.gguf.imatrix import ImatrixFile, imatrix_by_output, load_imatrix, prune_imatrix, write_imatrix_gguf
from moepack.gguf.types import parse_type
from moepack.gguf.writer import WriteReport, write_gguf
from moepack.model.checkpoint import open_checkpoint
from moepack.schema import PrunePlan

__all__ = ["quantize_model", "read_quant_plan"]

log = logging.getLogger(__name__)


# llama-quantize refuses these mixtures without an importance matrix (tools/quantize/quantize.cpp).
_FTYPES_NEED_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S")


def read_quant_plan(path: str | Path) -> tuple[dict[str, str], dict[str, Any]]:
    """({GGUF tensor name: GGML type name}, whole plan) from a quant plan JSON (allocate's `quant_plan.json`).

    A tensor's entry is a type name, or an object with a "type" key."""
    p = Path(path)
    try:
        plan = json.loads(p.read_text())
    except FileNotFoundError:
        raise MoepackError(f"{p}: no such quant plan") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoepackError(f"{p}: invalid JSON ({e})") from None
    tensors = plan.get("tensors") if isinstance(plan, dict) else None
    if not isinstance(tensors, dict) or not tensors:
        raise MoepackError(f"{p}: a quant plan needs a non-empty \"tensors\" object (GGUF tensor name → type)")
    types: dict[str, str] = {}
    for name, v in tensors.items():
        t = v.get("type") if isinstance(v, dict) else v
        if not isinstance(t, str):
            raise MoepackError(f"{p}: tensor {name!r} has no type name")
        types[name] = parse_type(t).name
    return types, plan


def _intermediate_type(view: Any) -> str:
    """BF16 when every weight matrix is stored in BF16 (lossless and half of F32's size), else F32."""
    return "BF16" if all(t.dtype == "BF16" for t in view.tensors.values() if t.quantizable) else "F32"


def _quantize_ftype(view: Any, out: Path, ftype: str, imatrix: Mapping[str, np.ndarray] | None,
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
        write_gguf(view, src, default_type=src_type, prune_plan=prune_plan, threads=threads,
                   plan_record={"ftype": ftype.upper(), "source_type": src_type})
        ggml.quantize_gguf_ftype(src, out, ftype, imatrix=im_path, threads=threads or 2)
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
    types, whole = read_quant_plan(plan) if plan is not None else (None, None)
    view = open_checkpoint(model_dir)
    prune = PrunePlan.beside(model_dir)
    im = load_imatrix(imatrix, view) if imatrix is not None else None
    if im is not None and prune is not None:
        im = prune_imatrix(im, prune)
    if ftype is not None:
        return _quantize_ftype(view, out, ftype, im, threads, prune)
    if plan is not None:
        return write_gguf(view, out, default_type=None, tensor_types=types, imatrix=im, quant_plan=whole,
                          prune_plan=prune, threads=threads, progress=progress)
    return write_gguf(view, out, default_type=qtype, imatrix=im, prune_plan=prune,
                      threads=threads, progress=progress)
