"""`moepack speed MODEL [-o FILE] [-t N] [--types T1,T2,...]`: how fast this device's llama.cpp multiplies by weights
of each GGML type at MODEL's row widths — decode (one token) and prompt (a 512-token ubatch) — the kernel times
compress predicts tokens per second from (moepack.stages.speed).

Run it on the target device (a different CPU) and bring the file to the machine that compresses:
`moepack speed MODEL -o device.json` there, then `moepack compress ... --speed-table device.json` here. MODEL may be
a directory holding only config.json. Measured tables are also cached for this machine (see `--speed-table`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from moepack.cli import options as o

if TYPE_CHECKING:
    from moepack.schema.speed import KernelTimes

__all__ = ["add_cli", "run"]


def add_cli(sub: o.Subparsers) -> None:
    p = o.add_command(sub, "speed", "time llama.cpp's matrix products per GGML type on this device (for "
                      "compress --speed-table)", __doc__, run)
    o.add_model(p)
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                   help="write the kernel time table here (default: only this machine's cache)")
    p.add_argument("--types", type=o.ladder_arg, default=None, metavar="T1,T2,...",
                   help="GGML types to time (default: compress's ladder and every type llama.cpp's mixtures use)")
    p.add_argument("--fresh", action="store_true",
                   help="measure every time again, replacing this machine's cached table (e.g. one timed while other "
                        "jobs shared the cores)")
    o.add_threads(p, "threads of the timed products (as llama.cpp will run: -t)")


def _types(args: argparse.Namespace) -> tuple[str, ...]:
    if args.types:
        return tuple(args.types)
    from moepack.gguf.types import LADDER
    from moepack.stages.mixtures import BASE, RULES

    used = [*BASE.values(), *(ty for rules in RULES.values() for *_, ty in rules)]
    return tuple(dict.fromkeys((*LADDER, *sorted(set(used) - set(LADDER)), "F32")))


def run(args: argparse.Namespace) -> int:
    from moepack.model.shapes import open_for_planning
    from moepack.model.source import resolve_model
    from moepack.stages.speed import KernelClock, measure_for

    o.check_positive(args, "threads")
    view = open_for_planning(resolve_model(args.model_dir))
    clock = KernelClock.here(o.threads(args), fresh=args.fresh)
    times = measure_for(view, _types(args), clock, progress=True)
    print(render(times))
    if args.output is not None:
        print(f"-> {times.write(args.output)}")
    return 0


def render(times: KernelTimes) -> str:
    """Per type and width: decode GB/s and ns per weight, prompt GFLOP/s at a 512-token ubatch (per row: each call's
    fixed part apart, shown in µs at batch 1 and 512); routed experts ("TYPE@ExK": mul_mat_id over E experts, K per
    token) per row and expert use."""
    from moepack.gguf.types import row_bytes

    lines = [f"{times.device}, {times.threads} threads, {times.runtime}",
             f"{'type':<16} {'width':>6} {'decode GB/s':>12} {'ns/weight':>10} {'prompt GFLOP/s':>15} "
             f"{'call µs (1/512)':>16}"]
    for key, widths in sorted(times.seconds_per_row.items()):
        t = key.split("@")[0]
        if t in ("ATTN", "OPS"):  # a layer's attention (per cached token) or element-wise ops, per query tokens
            what, unit, scale = (("attention", "ns per cached token", 1e9) if t == "ATTN" else
                                 ("layer ops", "µs per layer", 1e6))
            lines += [f"{key} (width {n}) {what}: " + ", ".join(
                f"{b} tokens {s * scale:,.1f} {unit}" for b, s in sorted(by.items())) for n, by in widths.items()]
            continue
        for n, by_batch in sorted(widths.items()):
            dec, pr = by_batch.get(1), by_batch.get(512)
            per_col = 1 if "@" in key else 512  # experts: seconds per row, use and token already
            gbs = f"{row_bytes(t, n) / dec / 1e9:12.2f}" if dec else f"{'—':>12}"
            ns = f"{dec / n * 1e9:10.4f}" if dec else f"{'—':>10}"
            gf = f"{2 * n * per_col / pr / 1e9:15.1f}" if pr else f"{'—':>15}"
            calls = [times.get(key, n, b) for b in (1, 512)]
            call = "/".join(f"{c[0] * 1e6:.0f}" if c else "—" for c in calls)
            lines.append(f"{key:<16} {n:>6} {gbs} {ns} {gf} {call:>16}")
    return "\n".join(lines)
