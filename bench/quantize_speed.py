"""Throughput of moepack's GGUF writer vs llama.cpp's own `llama_model_quantize` on the same model and type.

    .venv/bin/python bench/quantize_speed.py [--types Q4_K IQ2_XXS] [--threads 2]
    .venv/bin/python bench/quantize_speed.py --v3-layer [--experts 2] [--repeats 3]

Both quantize every weight matrix of the fixture to one type with the same importance matrix: moepack reads the
bf16 safetensors checkpoint and writes the GGUF; llama.cpp reads a BF16 GGUF of the same model (written before the
clock starts) and writes its GGUF, with `--tensor-type` overrides forcing the same uniform type. MB/s are of bf16
input bytes. Prints a Markdown table and the ratio (ours / llama.cpp time).

`--v3-layer` runs the same comparison on one DeepSeek-V3-shaped MoE layer (bench/scale.py's synthetic checkpoint:
hidden 7168, MLA attention, `--experts` routed experts of 2048 plus the shared one, the fixture's 4096-token vocab),
where tensors are large and fixed costs vanish; the two timings alternate, `--repeats` times each, and the table
reports their medians and the output bytes compared tensor by tensor.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gguf

from common import ROOT, v3_layer_checkpoint
from moepack.gguf.llama_quantize import quantize_gguf_ftype
from moepack.stages.calibrate import run_calibrate
from moepack.model.checkpoint import open_checkpoint
from moepack.gguf.imatrix import ImatrixFile, imatrix_by_output, load_imatrix, write_imatrix_gguf
from moepack.gguf.writer import write_gguf
from moepack.schema import QuantPlan

TEXT = ROOT / "data" / "tinystories-train.txt"
FTYPE_FOR = {"Q4_K": "Q4_K_M", "IQ2_XXS": "IQ2_XXS", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "IQ3_XXS": "IQ3_XXS"}


def bench(model: Path, qtype: str, threads: int, work: Path) -> dict:
    view = open_checkpoint(model)
    run_calibrate(model, TEXT, work, tokens=8192, seq_len=512, selection_tokens=0, progress=False)
    im = load_imatrix(work, view)
    im_file = work / "imatrix.gguf"
    write_imatrix_gguf(ImatrixFile.of_means(imatrix_by_output(view, im)), im_file)
    src = work / "bf16.gguf"
    write_gguf(view, src, default_type="BF16", progress=False)
    in_bytes = sum(t.nbytes for t in view.tensors.values())

    t0 = time.perf_counter()
    # token_embd at Q4_K in both: llama.cpp aborts on IQ types for it (no imatrix entry for an embedding).
    ours = write_gguf(view, work / "ours.gguf", QuantPlan.by_hand({"token_embd.weight": "Q4_K"}), default_type=qtype,
                      imatrix=im, threads=threads, progress=False)
    t_ours = time.perf_counter() - t0

    # Force llama.cpp to the same uniform type wherever it may quantize (its rules keep norms etc. as they are).
    overrides = {r"^token_embd\.weight$": "Q4_K", r"^(blk\..*|output)\.weight$": qtype}
    t0 = time.perf_counter()
    quantize_gguf_ftype(src, work / "llama.gguf", FTYPE_FOR[qtype], imatrix=im_file, threads=threads,
                        tensor_types=overrides)
    t_llama = time.perf_counter() - t0
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(work / "llama.gguf").tensors}
    same = sum(theirs.get(n) == t for n, t in ours.tensor_types.items())
    return {"model": model.name, "type": qtype, "in_mb": in_bytes / 1e6, "ours_s": t_ours, "llama_s": t_llama,
            "same_types": f"{same}/{len(ours.tensor_types)}"}


def same_bytes(a: Path, b: Path) -> str:
    """Tensors whose data bytes are identical in both GGUFs, of those both hold."""
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    both = sorted(set(ta) & set(tb))
    return f"{sum(bytes(ta[n].data) == bytes(tb[n].data) for n in both)}/{len(both)}"


def bench_v3(qtype: str, threads: int, repeats: int, n_experts: int, work: Path) -> dict:
    model = v3_layer_checkpoint(work, n_experts)
    view = open_checkpoint(model)
    run_calibrate(model, TEXT, work, tokens=256, seq_len=128, selection_tokens=0, progress=False)
    im = load_imatrix(work, view)
    im_file = work / "imatrix.gguf"
    write_imatrix_gguf(ImatrixFile.of_means(imatrix_by_output(view, im)), im_file)
    src = work / "bf16.gguf"
    write_gguf(view, src, default_type="BF16", progress=False)
    overrides = {r"^token_embd\.weight$": "Q4_K", r"^(blk\..*|output)\.weight$": qtype}
    ours_s, llama_s = [], []
    for _ in range(repeats):  # alternated: a load change on the shared machine hits both
        t0 = time.perf_counter()
        write_gguf(view, work / "ours.gguf", QuantPlan.by_hand({"token_embd.weight": "Q4_K"}),
                   default_type=qtype, imatrix=im, threads=threads, progress=False)
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        quantize_gguf_ftype(src, work / "llama.gguf", FTYPE_FOR[qtype], imatrix=im_file, threads=threads,
                            tensor_types=overrides)
        llama_s.append(time.perf_counter() - t0)
        print(f"  {qtype}: moepack {ours_s[-1]:.1f} s, llama.cpp {llama_s[-1]:.1f} s", flush=True)
    in_bytes = sum(t.nbytes for t in view.tensors.values())
    pairs = [o / ll for o, ll in zip(ours_s, llama_s)]
    print(f"  {qtype}: median of the paired ratios (ours/llama.cpp) {statistics.median(pairs):.2f} "
          f"({', '.join(f'{r:.2f}' for r in pairs)})", flush=True)
    return {"model": f"V3 layer ({n_experts}+1 experts)", "type": qtype, "in_mb": in_bytes / 1e6,
            "ours_s": statistics.median(ours_s), "llama_s": statistics.median(llama_s),
            "same_types": same_bytes(work / "ours.gguf", work / "llama.gguf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-qwen3-moe", "tiny-deepseek-v3"])
    ap.add_argument("--types", nargs="+", default=["Q4_K", "IQ2_XXS"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--v3-layer", action="store_true", help="one DeepSeek-V3-shaped MoE layer instead of fixtures")
    ap.add_argument("--experts", type=int, default=2, help="routed experts of the V3 layer")
    ap.add_argument("--repeats", type=int, default=3, help="alternated timings of each side (V3 layer)")
    a = ap.parse_args()
    print(f"$ .venv/bin/python bench/quantize_speed.py {' '.join(sys.argv[1:])}", flush=True)
    last = "same tensor bytes" if a.v3_layer else "same types"
    rows = []
    for m in ["v3"] if a.v3_layer else a.models:
        for t in a.types:
            with tempfile.TemporaryDirectory(dir=ROOT / "out" if a.v3_layer else None) as d:
                r = (bench_v3(t, a.threads, a.repeats, a.experts, Path(d)) if a.v3_layer
                     else bench(ROOT / "models" / m, t, a.threads, Path(d)))
            rows.append(r)
    print(f"| model | type | bf16 MB | moepack s | MB/s | llama.cpp s | MB/s | ratio (ours/llama.cpp) | {last} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['type']} | {r['in_mb']:.1f} | {r['ours_s']:.2f} | {r['in_mb'] / r['ours_s']:.1f} "
              f"| {r['llama_s']:.2f} | {r['in_mb'] / r['llama_s']:.1f} | {r['ours_s'] / r['llama_s']:.2f} "
              f"| {r['same_types']} |", flush=True)


if __name__ == "__main__":
    main()
