"""Tokens per second at real matrix widths: llama.cpp's measured decode and prompt speed of each file beside what
moepack's speed model (moepack.stages.speed) predicts for it from this machine's kernel times.

Run: .venv/bin/python bench/speed.py [--shape qwen3-30b-a3b|deepseek-v3] [--layers 2] [--experts 128]
       [--ftypes IQ1_S IQ2_XXS Q2_K Q3_K_S Q4_K_M] [--plans FILE.gguf ...] [--compress] [--threads 2] [--runs 5]
       [--rounds 3] [--work out/bench-speed] [--out bench/results/speed.json] [--md docs/performance.md]
     DeepSeek-V3's layer: --shape deepseek-v3 --layers 1 --experts 32 (256 experts do not fit 24 GB in bf16)

1. A Qwen3-30B-A3B-shaped checkpoint: its config.json (data/configs/qwen3-30b-a3b: hidden 2048, 128 experts × 768,
   top-8, 32 query and 4 KV heads of 128) with `--layers` layers and `--experts` routed experts, and the fixture
   tokenizer's 4,096-token vocabulary (so that the layers' matrices dominate a token's work, as in the 48-layer model
   where the output head is a small part); random weights; an importance matrix from a short calibration on it (the
   IQ types need one). --shape deepseek-v3: V3's config (data/configs/deepseek-v3: MLA, hidden 7168, experts ×
   2048, top-8, a shared expert), every layer a MoE layer, --experts routed experts in at most 8 groups.
2. Each llama.cpp mixture of --ftypes, written by llama.cpp's own quantizer rules (moepack.gguf.quantize), and each
   file of --plans (a moepack compress output of this checkpoint): decode and prompt tokens/s through llama.cpp
   (moepack.eval.speed: a fresh process per file, warm-up, median of --runs, --threads threads, a 512-token prompt
   then 64 decoded tokens; all files once per round, --rounds rounds, the median round and the lowest and highest
   shown, so that the machine's drift over the run reaches every file alike), and the prediction from the file's
   own types: each round starts with a fresh table of the machine's kernel times (out/bench-speed/kernels-roundR.json),
   and the predictions read the cell-wise median of the rounds' tables, so that both sides see the same minutes.
3. With --compress, moepack's default plan at each mixture's exact file size (`moepack compress --target-size`, the
   same importance-matrix calibration text, keep 1 since random weights leave nothing to prune, fast sensitivity and
   one pruning criterion to keep each run within an hour on 2 cores; every run shares one cache of quantized
   tensors), measured in the same rounds: its decode speed against the mixture's is the ≥ 0.95× goal.
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

TOKENIZER = ROOT / "models" / "tiny-qwen3-moe"  # its 4,096-token tokenizer (BOS / EOS id 0)
# --shape: what the page says of each, and the fixture whose 4,096-token tokenizer the checkpoint takes
SHAPES = {"qwen3-30b-a3b": ("Qwen3-30B-A3B's widths: hidden 2048, {experts} experts × 768, top-8", TOKENIZER),
          "deepseek-v3": ("DeepSeek-V3's widths: hidden 7168, MLA attention (128 heads, latent 512), {experts} of its "
                          "256 experts × 2048 in 8 groups (4 searched), top-8, one shared expert",
                          ROOT / "models" / "tiny-deepseek-v3")}


def markers(shape: str) -> tuple[str, str]:
    """The page section's markers (the Qwen shape's are the first section's)."""
    tag = "" if shape == "qwen3-30b-a3b" else f" {shape}"
    return f"<!-- bench/speed.py{tag}: begin -->", f"<!-- bench/speed.py{tag}: end -->"
PROMPT, GEN = 512, 64

log = logging.getLogger("speed")


def checkpoint(work: Path, shape: str, layers: int, experts: int) -> Path:
    """The random checkpoint of `shape` (--shape), built once: every layer a MoE layer."""
    from common import v3_config

    from moepack.stages.prune import write_checkpoint

    out = work / f"{shape}-shaped-{layers}L-{experts}E"
    if (out / "config.json").is_file():
        return out
    tokenizer = SHAPES[shape][1]
    tok = json.loads((tokenizer / "config.json").read_text())
    if shape == "deepseek-v3":
        cfg = dict(v3_config(layers, experts), first_k_dense_replace=0, num_nextn_predict_layers=0,
                   n_group=min(8, experts // 4), topk_group=max(1, min(8, experts // 4) // 2))
    else:
        cfg = json.loads((CONFIGS / shape / "config.json").read_text())
        cfg.update(max_window_layers=layers, num_experts=experts)
    cfg.update(num_hidden_layers=layers, vocab_size=tok["vocab_size"], bos_token_id=tok.get("bos_token_id"),
               eos_token_id=tok.get("eos_token_id"))
    view = SyntheticView(cfg)
    view.root = tokenizer
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


# compress's flags for the --compress plans besides the budget (see the docstring, 3.)
COMPRESS_FLAGS = ["--keep", "1", "--criterion", "score", "--sensitivity", "fast", "--calib-tokens", "4096",
                  "--seq-len", "256"]


def moepack_file(model: Path, work: Path, ftype: str, mixture: Path, threads: int) -> Path:
    """moepack compress's default plan of `model` at the exact size of llama.cpp's `ftype` file `mixture`."""
    from moepack.cli import main

    out = work / f"{model.name}-moepack-at-{ftype}.gguf"
    if not out.is_file():
        code = main(["compress", str(model), "--target-size", f"{mixture.stat().st_size}B", "-o", str(out),
                     "--calib-text", str(DATA / "calib" / "stories.txt"), *COMPRESS_FLAGS, "-t", str(threads),
                     "--run-dir", str(work / f"run-{model.name}-{ftype}"), "--quant-cache", str(work / "quant-cache")])
        if code != 0:
            raise SystemExit(f"moepack compress at {ftype}'s size failed ({code})")
    return out


def predicted(gguf_path: Path, clock: Any) -> dict[str, Any]:
    """The speed model's tokens/s for the file's own tensors, from `clock`'s kernel times (a KernelClock)."""
    from moepack.stages.footprint import DEFAULT_UBATCH
    from moepack.stages.speed import gguf_matmuls, predict

    work = gguf_matmuls(gguf_path)
    # what fusing each layer's gate and up experts into one mul_mat_id would save: one call's fixed part (the
    # input's conversion and routing), decode and prompt alike, as a share of the predicted time per token
    gates = [m for m in work if ".ffn_gate_exps." in m.name and not m.last]
    calls = [sum(clock.expert_cost(m.qtype, m.n, m.experts, m.uses, b)[0] for m in gates) for b in (1, DEFAULT_UBATCH)]
    sp = predict(work, clock)
    return sp.to_dict() | {"fused_gate_up_saves": {"decode": calls[0] * sp.decode_tps,
                                                   "prompt": calls[1] / DEFAULT_UBATCH * sp.prompt_tps}}


def measured(gguf_path: Path, threads: int, runs: int) -> dict[str, Any]:
    """llama.cpp's decode and prompt tokens/s (median of `runs`), in a fresh process."""
    from moepack.gguf.runtime import run_isolated

    prompt = [int(i) % 4000 + 10 for i in range(PROMPT)]  # token ids; the speed does not depend on which
    res = run_isolated("moepack.eval.speed:speed_probe", {"path": str(gguf_path), "ctx": PROMPT + GEN,
                                                          "threads": threads, "prompt": prompt, "gen": GEN,
                                                          "runs": runs}, what=f"speed of {gguf_path.name}")
    return {k: res[k] for k in ("decode_tps", "prompt_tps", "speed_each_run")}


def rows_of(files: dict[str, Path], model: Path, types: list[str], args: argparse.Namespace
            ) -> tuple[list[dict[str, Any]], Any]:
    """Each file measured once per round (rounds interleaved across files), each round after a fresh table of this
    machine's kernel times; every file predicted from the median table (its cells the median over the rounds), so
    that prediction and measurement see the machine over the same minutes (on this VM a cell moves 10-20 % between
    tables measured an hour apart). Returns the rows and the median KernelClock."""
    from moepack.schema.speed import KernelTimes
    from moepack.stages.speed import KernelClock

    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in files}
    tables = []
    for r in range(args.rounds):
        log.info("round %d/%d: timing the kernels", r + 1, args.rounds)
        tables.append(round_table(model, files.values(), types, args.work / f"kernels-round{r + 1}.json",
                                  args.threads))
        for name, path in files.items():
            log.info("round %d/%d, %s: timing %s", r + 1, args.rounds, name, path.name)
            rounds[name].append(measured(path, args.threads, args.runs))
    clock = KernelClock(KernelTimes.median(tables), None, measure=False)
    return [row(name, path, rounds[name], clock) for name, path in files.items()], clock


def round_table(model: Path, files: Any, types: list[str], path: Path, threads: int) -> Any:
    """A fresh kernel time table (KernelTimes) of every cell the page and the files' predictions read."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.speed import KernelClock, measure_for

    clock = KernelClock.here(threads, path=path, fresh=True)
    measure_for(open_checkpoint(model), tuple(types), clock, batches=(1, 32, 512), progress=True)
    for f in files:
        predicted(f, clock)  # the cells of the files' own shapes and types not in the page's table
    clock.save()
    return clock.times


def row(name: str, path: Path, rounds: list[dict[str, Any]], clock: Any) -> dict[str, Any]:
    import statistics

    m = {k: statistics.median(r[k] for r in rounds) for k in ("decode_tps", "prompt_tps")}
    m |= {f"{k}_range": [min(r[k] for r in rounds), max(r[k] for r in rounds)] for k in ("decode_tps", "prompt_tps")}
    m["rounds"] = rounds
    p = predicted(path, clock)
    return {"file": name, "path": rel(path), "size_bytes": path.stat().st_size, "measured": m, "predicted": p,
            "decode_ratio": p["decode_tps"] / m["decode_tps"], "prompt_ratio": p["prompt_tps"] / m["prompt_tps"]}


def kernel_rows(times: Any, types: list[str]) -> list[dict[str, Any]]:
    """Per type and row width of the checkpoint: decode GB/s (batch 1) and prompt GFLOP/s at an expert's share of a
    ubatch (512 · 8 / 128 = 32 columns) and at a whole ubatch (512), from the median kernel time table."""
    from moepack.gguf.types import row_bytes

    rows = []
    for t in types:
        for n, by in sorted(times.seconds_per_row.get(t, {}).items()):
            if {1, 32, 512} <= set(by):
                rows.append({"type": t, "n": n, "decode_gbs": row_bytes(t, n) / by[1] / 1e9,
                             "ns_per_weight": by[1] / n * 1e9, "gflops_32": 2 * n * 32 / by[32] / 1e9,
                             "gflops_512": 2 * n * 512 / by[512] / 1e9,
                             "call_us_512": (times.get(t, n, 512) or (0.0, 0.0))[0] * 1e6})
    return rows


def _spread(m: dict[str, Any], key: str) -> str:
    """The median round, and the lowest and highest rounds where there were several."""
    lo, hi = m.get(f"{key}_range", (None, None))
    return f"{m[key]:.1f}" + (f" ({lo:.0f}–{hi:.0f})" if lo is not None and lo != hi else "")


def goal_lines(res: dict[str, Any]) -> list[str]:
    """moepack's plan at each mixture's size against that mixture: measured decode and prompt speed ratios (median
    rounds; the lowest and highest of the per-round ratios), predicted ones, and the ≥ 0.95× decode goal."""
    by = {r["file"]: r for r in res["rows"]}
    ours = {f: r for f in res.get("ftypes", []) for r in res["rows"] if r["path"].endswith(f"-moepack-at-{f}.gguf")}
    pairs = [(f, by[f"llama.cpp {f}"], ours[f]) for f in res.get("ftypes", []) if f in ours and f"llama.cpp {f}" in by]
    if not pairs:
        return []

    def ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> str:
        each = [a[key] / b[key] for a, b in zip(ours["measured"]["rounds"], theirs["measured"]["rounds"])]
        return f"{ours['measured'][key] / theirs['measured'][key]:.2f} ({min(each):.2f}–{max(each):.2f})"

    lines = ["", "moepack's default plan at each mixture's exact file size against that mixture (measured ratios: "
             "median rounds, per-round lowest–highest; goal: decode ≥ 0.95×):", "",
             "| size of | moepack MiB | decode ratio measured | predicted | prompt ratio measured | predicted | "
             "decode ≥ 0.95× |", "|---|---|---|---|---|---|---|"]
    for f, mix, ours in pairs:
        dec = ours["measured"]["decode_tps"] / mix["measured"]["decode_tps"]
        lines.append(f"| {f} | {ours['size_bytes'] / 2**20:.1f} | {ratio(ours, mix, 'decode_tps')} | "
                     f"{ours['predicted']['decode_tps'] / mix['predicted']['decode_tps']:.2f} | "
                     f"{ratio(ours, mix, 'prompt_tps')} | "
                     f"{ours['predicted']['prompt_tps'] / mix['predicted']['prompt_tps']:.2f} | "
                     f"{'yes' if dec >= 0.95 else 'no'} |")
    return lines


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    shape = s.get("shape", "qwen3-30b-a3b")
    lines = [markers(shape)[0], "", f"## Predicted vs measured tokens per second at real widths: {shape} "
             "(bench/speed.py)", "",
             f"`{res['command']}` on {res['device']}, {s['threads']} threads, {res['runtime']}: "
             f"`{res['model']}` ({SHAPES[shape][0].format(experts=s['experts'])}; "
             f"{s['layers']} layers; 4,096-token vocabulary; random weights). Measured: llama.cpp, a fresh process "
             f"per file, median of {s['runs']} runs of a {PROMPT}-token prompt then {GEN} decoded tokens"
             + (f"; every file once per round, {s['rounds']} rounds interleaved, the median round (lowest–highest)"
                if s.get("rounds", 1) > 1 else "") + ". "
             "Predicted: moepack.stages.speed from this machine's kernel times (the weights' products, each layer's "
             "attention over 512 cached tokens and its element-wise and routing ops), each cell the median of the "
             "tables measured at the start of each round. Ratio = predicted / measured.",
             "", "| file | MiB | decode tok/s measured | predicted | ratio | prompt tok/s measured | predicted | "
             "ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        m, p = r["measured"], r["predicted"]
        lines.append(f"| {r['file']} | {r['size_bytes'] / 2**20:.1f} | {_spread(m, 'decode_tps')} | "
                     f"{p['decode_tps']:.1f} | {r['decode_ratio']:.2f} | {_spread(m, 'prompt_tps')} | "
                     f"{p['prompt_tps']:.1f} | {r['prompt_ratio']:.2f} |")
    classes = sorted({c for r in res["rows"] for c in r["predicted"]["decode_ms_by_class"]})
    lines += ["", "Predicted decode ms per token by part (the same prediction, summed per tensor class; `attn_kq`: "
              "attention over the cache, `layer_ops`: element-wise and routing ops):", "",
              "| file | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    lines += [f"| {r['file']} | " + " | ".join(f"{r['predicted']['decode_ms_by_class'].get(c, 0):.3f}" for c in classes)
              + " |" for r in res["rows"]]
    lines += ["", f"Kernel times of this machine ({s['threads']} threads; moepack.gguf.matmul, weights out of cache; "
              "the median of the rounds' tables), the table every prediction above is made from (rates per row, each "
              "call's fixed part apart):", "",
              "| type | row width | decode GB/s | decode ns per weight | GFLOP/s, 32 columns | GFLOP/s, 512 columns | "
              "µs per call, 512 columns |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k['type']} | {k['n']} | {k['decode_gbs']:.2f} | {k['ns_per_weight']:.3f} | {k['gflops_32']:.1f} | "
              f"{k['gflops_512']:.1f} | {k['call_us_512']:.0f} |" if "call_us_512" in k else
              f"| {k['type']} | {k['n']} | {k['decode_gbs']:.2f} | {k['ns_per_weight']:.3f} | {k['gflops_32']:.1f} | "
              f"{k['gflops_512']:.1f} | — |" for k in res.get("kernels", [])]
    saves = [r["predicted"]["fused_gate_up_saves"] for r in res["rows"] if "fused_gate_up_saves" in r["predicted"]]
    if saves:
        lines += ["", "Fusing each layer's gate and up experts into one `mul_mat_id` (`ffn_gate_up_exps`, which this "
                  "llama.cpp loads for qwen3next / qwen35moe, not for qwen3moe) saves one call's fixed part per layer: "
                  f"{100 * max(x['prompt'] for x in saves):.1f} % of the predicted prompt time at most and "
                  f"{100 * max(x['decode'] for x in saves):.1f} % of the decode time, across these files."]
    lines += goal_lines(res)
    worst = max(res["rows"], key=lambda r: abs(r["decode_ratio"] - 1), default=None)
    if worst is not None:
        within = sum(abs(r["decode_ratio"] - 1) <= 0.15 for r in res["rows"])
        prompt = sum(abs(r["prompt_ratio"] - 1) <= 0.15 for r in res["rows"])
        far = max(res["rows"], key=lambda r: abs(r["prompt_ratio"] - 1))
        lines += ["", f"Decode predicted within 15 % of measured for {within} of {len(res['rows'])} files (furthest: "
                  f"{worst['file']}, ratio {worst['decode_ratio']:.2f}); prompt for {prompt} (furthest: "
                  f"{far['file']}, ratio {far['prompt_ratio']:.2f})."]
    return "\n".join(lines + ["", markers(shape)[1]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--ftypes", nargs="+", default=["IQ1_S", "IQ2_XXS", "Q2_K", "Q3_K_S", "Q4_K_M"])
    p.add_argument("--plans", nargs="*", type=Path, default=[], help="moepack files of the same checkpoint")
    p.add_argument("--compress", action="store_true", help="also compress the checkpoint at each mixture's size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="measurements of every file, interleaved")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-speed")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/speed.json (speed-SHAPE.json "
                   "for another --shape)")
    p.add_argument("--md", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--from-json", action="store_true", help="only rewrite the page's section from --out's results")
    p.add_argument("--prepare", action="store_true", help="only build the checkpoint and the files (timings need a "
                   "quiet machine; this part does not)")
    args = p.parse_args(argv)
    args.out = args.out or ROOT / "bench" / "results" / (
        "speed.json" if args.shape == "qwen3-30b-a3b" else f"speed-{args.shape}.json")
    if args.from_json:
        write_section(args.md, markdown(json.loads(args.out.read_text())), *markers(args.shape))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from moepack.gguf.matmul import cpu_name
    from moepack.stages.speed import runtime_name

    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.work, args.shape, args.layers, args.experts)
    run = imatrix(model, args.work, args.threads)
    files = [mixture_file(model, args.work, f, run, args.threads) for f in args.ftypes]
    plans = [moepack_file(model, args.work, f, path, args.threads) for f, path in zip(args.ftypes, files)
             ] if args.compress else []
    if args.prepare:
        return 0
    from moepack.gguf.types import LADDER

    types = list(dict.fromkeys((*LADDER, "Q4_0", "IQ4_NL", "Q5_0", "F16")))
    named = {f"llama.cpp {f}": path for f, path in zip(args.ftypes, files)}
    named |= {f"moepack at {f}'s size": path for f, path in zip(args.ftypes, plans)}
    rows, clock = rows_of(named | {f"moepack {plan.name}": plan for plan in args.plans}, model, types, args)
    kernels = kernel_rows(clock.times, types)
    command = "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res = {"command": command.strip(), "device": cpu_name(), "runtime": runtime_name(), "model": rel(model),
           "settings": {"shape": args.shape, "layers": args.layers, "experts": args.experts, "threads": args.threads,
                        "runs": args.runs,
                        "rounds": args.rounds}, "ftypes": args.ftypes,
           "compress_flags": COMPRESS_FLAGS if args.compress else None,
           "rows": rows, "kernels": kernels, "seconds": round(time.perf_counter() - t0, 1)}
    write_json(args.out, res)
    write_section(args.md, markdown(res), *markers(args.shape))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
