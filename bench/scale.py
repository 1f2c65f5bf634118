"""Out-of-core scale benchmark: calibrate, prune and quantize a DeepSeek-V3-shaped checkpoint under a memory cap.

    .venv/bin/python bench/scale.py [--layers 3 5] [--experts 16] [--cap-gib 6] [--work out/bench-scale]

For each layer count it writes a synthetic checkpoint with DeepSeek-V3's real tensor shapes (hidden 7168, MLA with
q_lora 1536 / kv_lora 512 / 128 heads, dense FFN 18432 in layer 0, routed experts of 2048, one shared expert,
vocab 129280, random bf16 weights) but `--experts` routed experts per layer instead of 256 (one real V3 MoE layer
is 22.5 GB of routed experts alone), in shards with an index file like the hub's. Then it runs
`moepack calibrate`, `moepack prune` and `moepack quantize` as separate processes inside a cgroup whose memory limit
is `--cap-gib` (smaller than the checkpoint), each under `/usr/bin/time -v`, and reports peak RSS against the goal
2 x largest layer + 2 GiB, throughput per stage, the speedup of the quantizer from 1 to 2 threads, and the
extrapolated wall time for the full DeepSeek-V3 (671B parameters, 1.3 TB in bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from common import ROOT, V3_CONFIG, SyntheticView, disk_shapes, v3_config
from moepack.gguf import kernels as ggml
from moepack.stages.prune import write_checkpoint

TEXT = ROOT / "data" / "tinystories-valid.txt"
GiB = 2**30


# ---- synthetic checkpoint (the bf16 one: common.SyntheticView) ----------------------------------------------------
FP8_BLOCK = 128
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}  # DeepSeek-V3's release


def _fp8_stored(name: str, shape: tuple[int, ...]) -> bool:
    """Whether DeepSeek-V3's FP8 release stores this tensor in e4m3: every weight matrix but the embeddings,
    lm_head and the routers."""
    return len(shape) == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight"))


class Fp8SyntheticView(SyntheticView):
    """The same synthetic model stored as DeepSeek-V3's FP8 release is: e4m3 weight matrices, each with an f32
    `weight_scale_inv` per 128 x 128 block (partial blocks at the edges), and the quantization_config."""

    def __init__(self, cfg: dict[str, Any], seed: int = 0) -> None:
        super().__init__(dict(cfg, quantization_config=FP8_CONFIG), seed)
        for n, t in list(self.tensors.items()):
            if _fp8_stored(n, t.shape):
                grid = tuple(-(-d // FP8_BLOCK) for d in t.shape)
                self.tensors[n] = SimpleNamespace(shape=t.shape, dtype="F8_E4M3", nbytes=int(np.prod(t.shape)))
                self.tensors[n + "_scale_inv"] = SimpleNamespace(shape=grid, dtype="F32", nbytes=4 * int(np.prod(grid)))

    def load(self, name: str) -> torch.Tensor:
        t = self.tensors[name]
        if name.endswith("_scale_inv"):  # e4m3 values of spread 16 times these give the bf16 model's std
            return torch.full(t.shape, self.tensors[name[:-len("_scale_inv")]].shape[-1] ** -0.5 / 16)
        if t.dtype != "F8_E4M3":
            return super().load(name)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
        return (torch.randn(t.shape, generator=g) * 16).clamp(-448, 448).to(torch.float8_e4m3fn)


def make_checkpoint(out: Path, n_layers: int, n_experts: int, shard_gib: float, fp8: bool = False) -> int:
    """Write the synthetic checkpoint (skipped when a complete one is there); returns its tensor bytes."""
    view = (Fp8SyntheticView if fp8 else SyntheticView)(v3_config(n_layers, n_experts))
    total = sum(t.nbytes for t in view.tensors.values())
    index = out / "model.safetensors.index.json"
    same_cfg = (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == view.config
    if same_cfg and index.is_file() and json.loads(index.read_text())["metadata"]["total_size"] == total:
        print(f"  reusing {out} ({total / GiB:.2f} GiB)", flush=True)
        return total
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    write_checkpoint(view, out, max_shard_bytes=int(shard_gib * GiB))
    print(f"  wrote {out}: {total / GiB:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
    return total


def layer_bytes(model_dir: Path) -> tuple[int, int]:
    """(bytes of the largest decoder layer, bytes of the largest tensor outside the layers) of a checkpoint, in
    bf16 for a compressed one (FP8): the goal stays the bf16 route's."""
    from moepack.model.checkpoint import open_checkpoint

    view = open_checkpoint(model_dir)
    per_layer: dict[int, int] = {}
    top = 0
    for t in view.tensors.values():
        nbytes = 2 * t.numel if t.stored is not None else t.nbytes
        if t.layer is None:
            top = max(top, nbytes)
        else:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + nbytes
    return max(per_layer.values()), top


# ---- running a stage under the cap -------------------------------------------------------------------------------
@dataclass
class StageResult:
    stage: str
    wall_s: float
    peak_rss: int  # bytes (ru_maxrss of the stage's process)
    cgroup_peak: int | None  # bytes charged to the cgroup at most (page cache included)
    written_bytes: int
    rc: int
    read_bytes: int = 0  # tensor bytes the stage reads (stage_reads, once the pruned checkpoint exists)


class MemoryCap:
    """A cgroup (v1 or v2) with a hard memory limit and no swap; stages are started inside it."""

    def __init__(self, limit: int, name: str = "moepack-scale") -> None:
        self.limit = limit
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.is_file() and "memory" in v2.read_text():
            self.path, self.v2 = Path("/sys/fs/cgroup") / name, True
        else:
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / name, False
        self.path.mkdir(exist_ok=True)
        if self.v2:
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def reset_peak(self) -> None:
        if not self.v2:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.is_file() else None

    def prefix(self) -> list[str]:
        """Command prefix that moves the shell into the cgroup before exec'ing the stage."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]


def drop_page_cache() -> bool:
    """So that every stage reads from disk, not from what the previous stage left in the page cache."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def run_stage(stage: str, args: list[str], cap: MemoryCap | None, out: Path, log_dir: Path) -> StageResult:
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "moepack"), *args]
    if cap is not None:
        cap.reset_peak()
        cmd = cap.prefix() + cmd
    drop_page_cache()
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    (log_dir / f"{stage}.log").write_text(p.stdout + p.stderr)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else (
        out.stat().st_size if out.exists() else 0)
    res = StageResult(stage, wall, int(m.group(1)) * 1024 if m else -1, cap.peak() if cap else None, written,
                      p.returncode)
    status = "ok" if p.returncode == 0 else f"FAILED rc={p.returncode} (log: {log_dir / stage}.log)"
    print(f"  {stage:9s} {wall:7.1f} s  peak RSS {res.peak_rss / GiB:5.2f} GiB  {status}", flush=True)
    if p.returncode != 0:
        print("\n".join((p.stdout + p.stderr).splitlines()[-15:]), flush=True)
    return res


def stage_reads(model_dir: Path, pruned: Path) -> dict[str, int]:
    """Tensor bytes each stage reads: calibrate all but lm_head, prune every kept tensor, quantize the pruned model."""
    from moepack.model.checkpoint import open_checkpoint

    full = open_checkpoint(model_dir)
    calib = sum(t.stored_nbytes for n, t in full.tensors.items() if n != "lm_head.weight")  # FP8: e4m3 + scales
    kept = sum(t.stored_nbytes for t in open_checkpoint(pruned).tensors.values()) if pruned.is_dir() else 0
    return {"calibrate": calib, "prune": kept, "quantize": kept}


def run_pipeline(model_dir: Path, work: Path, cap: MemoryCap | None, qtype: str, keep: float,
                 tokens: int) -> list[StageResult]:
    run_dir, pruned, gguf = work / "run", work / "pruned", work / "model.gguf"
    for p in (run_dir, pruned):
        shutil.rmtree(p, ignore_errors=True)
    gguf.unlink(missing_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = [run_stage("calibrate", ["calibrate", str(model_dir), "--calib-text", str(TEXT),
                                       "--calib-tokens", str(tokens), "--seq-len", "128", "--sens-tokens", "0",
                                       "--batch-size", "2", "-o", str(run_dir)], cap, run_dir, logs)]
    if results[-1].rc == 0:
        results.append(run_stage("prune", ["prune", str(model_dir), "--calib-dir", str(run_dir), "--keep", str(keep),
                                           "-o", str(pruned)], cap, pruned, logs))
    if results[-1].rc == 0:
        results.append(run_stage("quantize", ["quantize", str(pruned), "--type", qtype, "--calib-dir", str(run_dir),
                                              "--threads", "2", "-o", str(gguf)], cap, gguf, logs))
    reads = stage_reads(model_dir, pruned)
    for r in results:
        r.read_bytes = reads[r.stage]
    return results


# ---- thread speedup ----------------------------------------------------------------------------------------------
def thread_speedup(qtype: str, n_experts: int = 8) -> dict[str, float]:
    """Quantize one MoE layer's stacked gate projections (n_experts x 2048 x 7168, with an importance matrix) on
    1 and 2 threads: MB/s of float32 input."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n_experts, 2048, 7168, generator=g) * 7168 ** -0.5).numpy()  # (E, I, H)
    im = torch.rand(n_experts, 7168, generator=g).numpy() + 0.1  # (E, H)
    out: dict[str, float] = {}
    for threads in (1, 2):
        t0 = time.time()
        ggml.quantize(x, qtype, imatrix=im, threads=threads)
        out[f"mb_s_{threads}"] = x.nbytes / 1e6 / (time.time() - t0)
    out["speedup"] = out["mb_s_2"] / out["mb_s_1"]
    return out


# ---- report ------------------------------------------------------------------------------------------------------
def v3_bytes(keep: float, fp8: bool = False) -> dict[str, int]:
    """Bytes the full DeepSeek-V3 (61 layers, 256 routed experts; bf16, or its FP8 release) gives each stage to
    read, from its config through transformers' module shapes: calibrate reads everything but lm_head, prune and
    quantize the kept part."""
    def nbytes(name: str, shape: tuple[int, ...]) -> int:
        if fp8 and _fp8_stored(name, shape):  # e4m3 values + one f32 scale per block
            return int(np.prod(shape)) + 4 * int(np.prod([-(-d // FP8_BLOCK) for d in shape]))
        return 2 * int(np.prod(shape))

    shapes = disk_shapes(V3_CONFIG)
    total = sum(nbytes(n, s) for n, s in shapes.items())
    routed = sum(nbytes(n, s) for n, s in shapes.items() if ".experts." in n)
    head = nbytes("lm_head.weight", shapes["lm_head.weight"])
    kept = total - round((1 - keep) * routed)
    return {"total": total, "calibrate": total - head, "prune": kept, "quantize": kept}


def extrapolate(results: list[StageResult], speedup: float, keep: float,
                fp8: bool = False) -> dict[str, dict[str, float]]:
    """Hours for the full DeepSeek-V3 at each stage's measured throughput (tensor bytes read per second), here and
    on a 16-core machine: quantize is compute-bound and scales as 1 + (n - 1)(s - 1) with the measured 2-thread
    speedup s; calibrate and prune are taken as bound by disk and memory bandwidth, i.e. no faster."""
    full = v3_bytes(keep, fp8)
    out: dict[str, dict[str, float]] = {}
    for r in results:
        if r.rc != 0 or r.read_bytes == 0:
            continue
        hours = full[r.stage] / (r.read_bytes / r.wall_s) / 3600
        scale16 = (1 + 15 * (speedup - 1)) / speedup if r.stage == "quantize" and speedup > 1 else 1.0
        out[r.stage] = {"v3_read_bytes": full[r.stage], "hours_here": hours, "hours_16_cores": hours / scale16}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 5], help="decoder layer counts (layer 0 dense)")
    ap.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (V3: 256)")
    ap.add_argument("--cap-gib", type=float, default=6.0, help="cgroup memory limit for each stage")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench-scale", help="scratch directory (GBs)")
    ap.add_argument("--type", default="Q4_K", help="quantization type (default Q4_K)")
    ap.add_argument("--keep", type=float, default=0.5, help="prune retention (default 0.5: one expert per group)")
    ap.add_argument("--tokens", type=int, default=256, help="calibration tokens (default 256)")
    ap.add_argument("--no-cap", action="store_true", help="run without the cgroup (when not permitted)")
    ap.add_argument("--fp8", action="store_true", help="store the checkpoint as DeepSeek-V3's FP8 release (e4m3 "
                    "weights, 128 x 128 block scales) and read it as it is")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--threads-only", action="store_true", help="only measure the quantizer's 1 -> 2 thread speedup")
    args = ap.parse_args()
    if args.threads_only:
        t = thread_speedup(args.type)
        print(f"quantizer ({args.type}): {t['mb_s_1']:.1f} MB/s on 1 thread, {t['mb_s_2']:.1f} MB/s on 2 "
              f"(x{t['speedup']:.2f})")
        return 0

    cap = None if args.no_cap else MemoryCap(int(args.cap_gib * GiB))
    print(f"cap: {'none' if cap is None else f'{args.cap_gib} GiB ({cap.path})'}; page cache dropped before "
          f"each stage: {drop_page_cache()}", flush=True)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "cap_bytes": None if cap is None else cap.limit,
                              "runs": []}
    for n_layers in args.layers:
        work = args.work / f"v3-{n_layers}L-{args.experts}E{'-fp8' if args.fp8 else ''}"
        model_dir = work / "checkpoint"
        print(f"\n== {n_layers} layers, {args.experts} routed experts per MoE layer{', FP8' if args.fp8 else ''}",
              flush=True)
        size = make_checkpoint(model_dir, n_layers, args.experts, shard_gib=2.0, fp8=args.fp8)
        largest_layer, largest_top = layer_bytes(model_dir)
        results = run_pipeline(model_dir, work, cap, args.type, args.keep, args.tokens)
        report["runs"].append({"layers": n_layers, "experts": args.experts, "fp8": args.fp8, "checkpoint_bytes": size,
                               "largest_layer_bytes": largest_layer, "largest_other_tensor_bytes": largest_top,
                               "goal_bytes": 2 * max(largest_layer, largest_top) + 2 * GiB,
                               "stages": [r.__dict__ for r in results]})
    print("\n== quantizer threads (one MoE layer's stacked gate projections)", flush=True)
    report["threads"] = thread_speedup(args.type)
    print(f"  {report['threads']}", flush=True)
    last = [StageResult(**s) for s in report["runs"][-1]["stages"]]
    report["extrapolation"] = extrapolate(last, report["threads"]["speedup"], args.keep, args.fp8)
    print_tables(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(s["rc"] == 0 for r in report["runs"] for s in r["stages"]) else 1


def print_tables(report: dict[str, Any]) -> None:
    print(f"\ncommand: {report['command']}")
    print("\n| layers | checkpoint | largest layer | goal (2x layer + 2 GiB) | stage | wall | peak RSS | cgroup peak "
          "| read | written | read GB/s | written GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in report["runs"]:
        for s in run["stages"]:
            cg = "-" if s["cgroup_peak"] is None else f"{s['cgroup_peak'] / GiB:.2f} GiB"
            ok = "" if s["rc"] == 0 else " (failed)"
            print(f"| {run['layers']} | {run['checkpoint_bytes'] / GiB:.2f} GiB | "
                  f"{run['largest_layer_bytes'] / GiB:.2f} GiB | {run['goal_bytes'] / GiB:.2f} GiB | {s['stage']}{ok} "
                  f"| {s['wall_s']:.0f} s | {s['peak_rss'] / GiB:.2f} GiB | {cg} | {s['read_bytes'] / 1e9:.2f} GB "
                  f"| {s['written_bytes'] / 1e9:.2f} GB | {s['read_bytes'] / 1e9 / s['wall_s']:.3f} "
                  f"| {s['written_bytes'] / 1e9 / s['wall_s']:.3f} |")
    t = report["threads"]
    print(f"\nquantizer: {t['mb_s_1']:.1f} MB/s on 1 thread, {t['mb_s_2']:.1f} MB/s on 2 (x{t['speedup']:.2f})")
    print("\n| stage | DeepSeek-V3 bytes read | here (h) | on 16 cores (h) |\n|---|---|---|---|")
    for stage, e in report["extrapolation"].items():
        print(f"| {stage} | {e['v3_read_bytes'] / 1e12:.3f} TB | {e['hours_here']:.1f} | {e['hours_16_cores']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
