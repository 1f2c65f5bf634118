"""Tokens per second at real matrix widths: llama.cpp's measured decode and prompt speed of each file beside what
moepack's speed model (moepack.stages.speed) predicts for it from this machine's kernel times.

Run: .venv/bin/python bench/speed.py [--layers 2] [--experts 128] [--ftypes IQ1_S IQ2_XXS Q2_K Q3_K_S Q4_K_M]
       [--plans FILE.gguf ...] [--threads 2] [--runs 5] [--work out/bench-speed] [--out bench/results/speed.json]
       [--md docs/performance.md]

1. A Qwen3-30B-A3B-shaped checkpoint: its config.json (data/configs/qwen3-30b-a3b: hidden 2048, 128 experts × 768,
   top-8, 32 query and 4 KV heads of 128) with `--layers` layers and `--experts` routed experts, and the fixture
   tokenizer's 4,096-token vocabulary (so that the layers' matrices dominate a token's work, as in the 48-layer model
   where the output head is a small part); random weights; an importance matrix from a short calibration on it (the
   IQ types need one).
2. Each llama.cpp mixture of --ftypes, written by llama.cpp's own quantizer rules (moepack.gguf.quantize), and each
   file of --plans (a moepack compress output of this checkpoint): decode and prompt tokens/s through llama.cpp
   (moepack.eval.speed: a fresh process per file, warm-up, median of --runs, --threads threads, a 512-token prompt
   then 64 decoded tokens), and the prediction from the file's own types.
The Markdown section replaces the one between its markers in --md; every number in it comes from the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from common import CONFIGS, DATA, ROOT, SyntheticView, rel, write_json, write_section

BEGIN, END = "<!-- bench/speed.py: begin -->", "<!-- bench/speed.py: end -->"
TOKENIZER = ROOT / "models" / "tiny-qwen3-moe"  # its 4,096-token tokenizer (BOS / EOS id 0)
PROMPT, GEN = 512, 64

log = logging.getLogger("speed")


def checkpoint(work: Path, layers: int, experts: int) -> Path:
    """The Qwen3-30B-A3B-shaped random checkpoint (built once per shape)."""
    from moepack.stages.prune import write_checkpoint

    out = work / f"qwen3-30b-a3b-shaped-{layers}L-{experts}E"
    if (out / "config.json").is_file():
        return out
    cfg = json.loads((CONFIGS / "qwen3-30b-a3b" / "config.json").read_text())
    tok = json.loads((TOKENIZER / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, max_window_layers=layers, num_experts=experts, vocab_size=tok["vocab_size"],
               bos_token_id=tok.get("bos_token_id"), eos_token_id=tok.get("eos_token_id"))
    view = SyntheticView(cfg)
    view.root = TOKENIZER
    write_checkpoint(view, out, progress=True)
    return out


def imatrix(model: Path, work: Path, threads: int) -> Path:
    """A calibration run directory on 1,024 tokens of the bundled stories text: the IQ mixtures' importance matrix."""
    from moepack.cli import main

    run = work / f"calib-{model.name}"
    if not (run / "calib" / "stats.safetensors").is_file():
        main(["calibrate", str(model), "--calib-text", str(DATA / "calib" / "stories.txt"), "--calib-tokens", "1024",
              "--seq-len", "256", "-t", str(threads), "-o", str(run)])
    return run


def mixture_file(model: Path, work: Path, ftype: str, run: Path, threads: int) -> Path:
    from moepack.gguf.quantize import quantize_model

    out = work / f"{model.name}-{ftype}.gguf"
    if not out.is_file():
        quantize_model(model, out, ftype=ftype, imatrix=run, threads=threads, progress=False)
    return out


def predicted(gguf_path: Path, threads: int) -> dict[str, Any]:
    """The speed model's tokens/s for the file's own tensors, from this machine's kernel times (measured on first use
    and cached)."""
    from moepack.stages.speed import KernelClock, gguf_matmuls, predict

    return predict(gguf_matmuls(gguf_path), KernelClock.here(threads)).to_dict()


def measured(gguf_path: Path, threads: int, runs: int) -> dict[str, Any]:
    """llama.cpp's decode and prompt tokens/s (median of `runs`), in a fresh process."""
    from moepack.gguf.runtime import run_isolated

    prompt = [int(i) % 4000 + 10 for i in range(PROMPT)]  # token ids; the speed does not depend on which
    res = run_isolated("moepack.eval.speed:speed_probe", {"path": str(gguf_path), "ctx": PROMPT + GEN,
                                                          "threads": threads, "prompt": prompt, "gen": GEN,
                                                          "runs": runs}, what=f"speed of {gguf_path.name}")
    return {k: res[k] for k in ("decode_tps", "prompt_tps", "speed_each_run")}


def row(name: str, model: Path, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    log.info("%s: timing %s", name, path.name)
    m, p = measured(path, args.threads, args.runs), predicted(path, args.threads)
    return {"file": name, "path": rel(path), "size_bytes": path.stat().st_size, "measured": m, "predicted": p,
            "decode_ratio": p["decode_tps"] / m["decode_tps"], "prompt_ratio": p["prompt_tps"] / m["prompt_tps"]}


def layer_overhead(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Decode seconds per token and layer that llama.cpp spends beyond the weights' products, measured on a
    different model of the same architecture: the 4-layer tiny-qwen3-moe fixture (widths 256), whose products are a
    small part of a step. (measured − predicted decode time) / layers, the mean over its Q8_0 and Q4_K_M files."""
    import gguf

    from moepack.gguf.quantize import quantize_model

    per_layer = []
    files = {}
    for f in ("Q8_0", "Q4_K_M"):
        path = work / f"tiny-qwen3-moe-{f}.gguf"
        if not path.is_file():
            quantize_model(TOKENIZER, path, ftype=f, threads=args.threads, progress=False)
        r = row(f"tiny-qwen3-moe {f}", TOKENIZER, path, args)
        layers = int(gguf.GGUFReader(path).fields["qwen3moe.block_count"].parts[-1][0])
        gap = 1 / r["measured"]["decode_tps"] - 1 / r["predicted"]["decode_tps"]
        per_layer.append(gap / layers)
        files[f] = {"measured_decode_tps": r["measured"]["decode_tps"],
                    "predicted_decode_tps": r["predicted"]["decode_tps"], "layers": layers}
    return {"model": rel(TOKENIZER), "files": files, "seconds_per_layer": sum(per_layer) / len(per_layer)}


def with_overhead(r: dict[str, Any], overhead: dict[str, Any], layers: int) -> None:
    """The row's decode prediction with the tiny model's per-layer overhead added."""
    seconds = 1 / r["predicted"]["decode_tps"] + layers * overhead["seconds_per_layer"]
    r["predicted_with_overhead"] = 1 / seconds
    r["overhead_ratio"] = r["predicted_with_overhead"] / r["measured"]["decode_tps"]


def kernel_rows(model: Path, threads: int, types: list[str]) -> list[dict[str, Any]]:
    """Per type and row width of the checkpoint: decode GB/s (batch 1) and prompt GFLOP/s at an expert's share of a
    ubatch (512 · 8 / 128 = 32 columns) and at a whole ubatch (512), from this machine's kernel times."""
    from moepack.gguf.types import row_bytes
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.speed import KernelClock, measure_for

    clock = KernelClock.here(threads)
    view = open_checkpoint(model)
    times = measure_for(view, tuple(types), clock, batches=(1, 32, 512), progress=True)
    rows = []
    for t in types:
        for n, by in sorted(times.seconds_per_row.get(t, {}).items()):
            if {1, 32, 512} <= set(by):
                rows.append({"type": t, "n": n, "decode_gbs": row_bytes(t, n) / by[1] / 1e9,
                             "ns_per_weight": by[1] / n * 1e9, "gflops_32": 2 * n * 32 / by[32] / 1e9,
                             "gflops_512": 2 * n * 512 / by[512] / 1e9})
    return rows


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [BEGIN, "", "## Predicted vs measured tokens per second at real widths (bench/speed.py)", "",
             f"`{res['command']}` on {res['device']}, {s['threads']} threads, {res['runtime']}: "
             f"`{res['model']}` (Qwen3-30B-A3B's widths: hidden 2048, {s['experts']} experts × 768, top-8; "
             f"{s['layers']} layers; 4,096-token vocabulary; random weights). Measured: llama.cpp, a fresh process "
             f"per file, median of {s['runs']} runs of a {PROMPT}-token prompt then {GEN} decoded tokens. "
             "Predicted: moepack.stages.speed from this machine's kernel times (the weights' matrix products "
             "only). Ratio = predicted / measured.", "",
             "| file | MiB | decode tok/s measured | predicted | ratio | + layer overhead | ratio | prompt tok/s "
             "measured | predicted | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        m, p = r["measured"], r["predicted"]
        oh = (f"{r['predicted_with_overhead']:.1f} | {r['overhead_ratio']:.2f}" if "overhead_ratio" in r
              else "— | —")
        lines.append(f"| {r['file']} | {r['size_bytes'] / 2**20:.1f} | {m['decode_tps']:.1f} | {p['decode_tps']:.1f} "
                     f"| {r['decode_ratio']:.2f} | {oh} | {m['prompt_tps']:.1f} | {p['prompt_tps']:.1f} | "
                     f"{r['prompt_ratio']:.2f} |")
    if (o := res.get("overhead")) is not None:
        lines += ["", f"Layer overhead: {o['seconds_per_layer'] * 1e3:.3f} ms per decoded token and layer, measured on "
                  f"`{o['model']}` (a different model of the same architecture: " + ", ".join(
                      f"{k} {v['measured_decode_tps']:.0f} tok/s measured vs {v['predicted_decode_tps']:.0f} from its "
                      f"products, {v['layers']} layers" for k, v in o["files"].items()) + ")."]
    lines += ["", f"Kernel times of this machine ({s['threads']} threads; moepack.gguf.matmul, weights out of cache), "
              "the table every prediction above is made from:", "",
              "| type | row width | decode GB/s | decode ns per weight | GFLOP/s, 32 columns | GFLOP/s, 512 columns |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k['type']} | {k['n']} | {k['decode_gbs']:.2f} | {k['ns_per_weight']:.3f} | {k['gflops_32']:.1f} | "
              f"{k['gflops_512']:.1f} |" for k in res.get("kernels", [])]
    worst = max(res["rows"], key=lambda r: abs(r["decode_ratio"] - 1), default=None)
    if worst is not None:
        within = sum(abs(r.get("overhead_ratio", r["decode_ratio"]) - 1) <= 0.15 for r in res["rows"])
        prompt = sum(abs(r["prompt_ratio"] - 1) <= 0.15 for r in res["rows"])
        far = max(res["rows"], key=lambda r: abs(r["prompt_ratio"] - 1))
        worst = max(res["rows"], key=lambda r: abs(r.get("overhead_ratio", r["decode_ratio"]) - 1))
        lines += ["", f"Decode predicted (with the layer overhead) within 15 % of measured for {within} of "
                  f"{len(res['rows'])} files (furthest: {worst['file']}, ratio "
                  f"{worst.get('overhead_ratio', worst['decode_ratio']):.2f}); prompt for {prompt} (furthest: "
                  f"{far['file']}, ratio {far['prompt_ratio']:.2f})."]
    return "\n".join(lines + ["", END]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--ftypes", nargs="+", default=["IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K_S", "Q4_K_M"])
    p.add_argument("--plans", nargs="*", type=Path, default=[], help="moepack files of the same checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-speed")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.json")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--from-json", action="store_true", help="only rewrite the page's section from --out's results")
    p.add_argument("--prepare", action="store_true", help="only build the checkpoint and the files (timings need a "
                   "quiet machine; this part does not)")
    args = p.parse_args(argv)
    if args.from_json:
        write_section(args.md, markdown(json.loads(args.out.read_text())), BEGIN, END)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from moepack.gguf.matmul import cpu_name
    from moepack.stages.speed import runtime_name

    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.work, args.layers, args.experts)
    run = imatrix(model, args.work, args.threads)
    files = [mixture_file(model, args.work, f, run, args.threads) for f in args.ftypes]
    if args.prepare:
        return 0
    from moepack.gguf.types import LADDER

    kernels = kernel_rows(model, args.threads, list(dict.fromkeys((*LADDER, "Q4_0", "IQ4_NL", "Q5_0", "F16"))))
    rows = [row(f"llama.cpp {f}", model, path, args) for f, path in zip(args.ftypes, files)]
    rows += [row(f"moepack {plan.name}", model, plan, args) for plan in args.plans]
    overhead = layer_overhead(args.work, args)
    for r in rows:
        with_overhead(r, overhead, args.layers)
    command = "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": command.strip(), "device": cpu_name(), "runtime": runtime_name(), "model": rel(model),
           "settings": {"layers": args.layers, "experts": args.experts, "threads": args.threads, "runs": args.runs},
           "rows": rows, "kernels": kernels, "overhead": overhead, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(args.out, res)
    write_section(args.md, markdown(res), BEGIN, END)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
