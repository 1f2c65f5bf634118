"""Throughput of moepack's GGUF writer vs llama.cpp's own `llama_model_quantize` on the same model and type.

    .venv/bin/python bench/quantize_speed.py [--types Q4_K IQ2_XXS] [--threads 2]

Both quantize every weight matrix of the fixture to one type with the same importance matrix: moepack reads the
bf16 safetensors checkpoint and writes the GGUF; llama.cpp reads a BF16 GGUF of the same model (written before the
clock starts) and writes its GGUF, with `--tensor-type` overrides forcing the same uniform type. MB/s are of bf16
input bytes. Prints a Markdown table and the ratio (ours / llama.cpp time).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf

from moepack.gguf import kernels as ggml
from moepack.stages.calibrate import run_calibrate
from moepack.model.checkpoint import open_checkpoint
from moepack.gguf.imatrix import ImatrixFile, imatrix_by_output, load_imatrix, write_imatrix_gguf
from moepack.gguf.writer import write_gguf

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "tinystories-train.txt"
FTYPE_FOR = {"Q4_K": "Q4_K_M", "IQ2_XXS": "IQ2_XXS", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "IQ3_XXS": "IQ3_XXS"}


def bench(model: Path, qtype: str, threads: int, work: Path) -> dict:
    view = open_checkpoint(model)
    run_calibrate(model, TEXT, work, tokens=8192, seq_len=512, heldout_tokens=0, progress=False)
    im = load_imatrix(work, view)
    im_file = work / "imatrix.gguf"
    write_imatrix_gguf(ImatrixFile.of_means(imatrix_by_output(view, im)), im_file)
    src = work / "bf16.gguf"
    write_gguf(view, src, default_type="BF16", progress=False)
    in_bytes = sum(t.nbytes for t in view.tensors.values())

    t0 = time.perf_counter()
    # token_embd at Q4_K in both: llama.cpp aborts on IQ types for it (no imatrix entry for an embedding).
    ours = write_gguf(view, work / "ours.gguf", default_type=qtype, tensor_types={"token_embd.weight": "Q4_K"},
                      imatrix=im, threads=threads, progress=False)
    t_ours = time.perf_counter() - t0

    # Force llama.cpp to the same uniform type wherever it may quantize (its rules keep norms etc. as they are).
    overrides = {r"^token_embd\.weight$": "Q4_K", r"^(blk\..*|output)\.weight$": qtype}
    t0 = time.perf_counter()
    ggml.quantize_gguf_ftype(src, work / "llama.gguf", FTYPE_FOR[qtype], imatrix=im_file, threads=threads,
                             tensor_types=overrides)
    t_llama = time.perf_counter() - t0
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(work / "llama.gguf").tensors}
    same = sum(theirs.get(n) == t for n, t in ours.tensor_types.items())
    return {"model": model.name, "type": qtype, "in_mb": in_bytes / 1e6, "ours_s": t_ours, "llama_s": t_llama,
            "same_types": f"{same}/{len(ours.tensor_types)}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-qwen3-moe", "tiny-deepseek-v3"])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "IQ2_XXS"])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print("| model | type | bf16 MB | moepack s | MB/s | llama.cpp s | MB/s | ratio (ours/llama.cpp) | same types |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in a.models:
        for t in a.types:
            with tempfile.TemporaryDirectory() as d:
                r = bench(ROOT / "models" / m, t, a.threads, Path(d))
            print(f"| {r['model']} | {r['type']} | {r['in_mb']:.1f} | {r['ours_s']:.2f} | {r['in_mb'] / r['ours_s']:.1f} "
                  f"| {r['llama_s']:.2f} | {r['in_mb'] / r['llama_s']:.1f} | {r['ours_s'] / r['llama_s']:.2f} "
                  f"| {r['same_types']} |", flush=True)


if __name__ == "__main__":
    main()
