"""`make demo`: the whole method on the bundled multi-domain fixture (DeepSeek-V3 layout, 64 fine-grained experts per
MoE layer that specialise by domain). A deployment that needs code: show which experts code uses, compress to 2.5
bits per weight calibrated on code (`--keep auto`: the retention is chosen by measured KLD, so experts code does not
need are dropped when that beats quantizing them), build llama.cpp's largest standard mixture that fits the same
size with the same importance matrix (or, when none reaches that size, its smallest), and evaluate both against the
original on held-out code."""
from __future__ import annotations

import sys
from pathlib import Path

from moepack.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-deepseek-v3-multi"
OUT = ROOT / "out" / "demo"
CALIB = ROOT / "data" / "calib"  # each domain's calibration part
EVAL = ROOT / "data" / "eval" / "code.txt"  # held out from training and calibration: evaluate on it
TARGET_BPW = "2.5"
# llama.cpp's standard mixtures, largest first: the baseline is the first that fits the file moepack wrote.
BASELINES = ("Q4_K_M", "Q3_K_M", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def step(argv: list[str]) -> None:
    print(f"\n$ moepack {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc:
        sys.exit(rc)


def main_demo() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    step(["inspect", str(MODEL)])
    step(["usage", str(MODEL), *(a for d in ("stories", "code", "web") for a in ("--calib-text", f"{d}={CALIB / d}.txt")),
          "--calib-tokens", "4096", "-o", str(OUT / "usage")])
    ours = OUT / "multi-code.moepack.gguf"
    run_dir = OUT / "multi-code.run"
    step(["compress", str(MODEL), "--target-bpw", TARGET_BPW, "--keep", "auto", "--calib-text", str(CALIB / "code.txt"),
          "--calib-tokens", "8192", "--sens-tokens", "512", "-o", str(ours), "--run-dir", str(run_dir)])
    size = ours.stat().st_size
    baseline = None
    for ftype in BASELINES:
        path = OUT / f"multi-code.{ftype}.gguf"
        if not path.is_file():
            step(["quantize", str(MODEL), "--ftype", ftype, "--calib-dir", str(run_dir), "-o", str(path)])
        if path.stat().st_size <= size:
            baseline = path
            break
        print(f"  {ftype}: {path.stat().st_size:,} bytes > moepack's {size:,}; trying a smaller mixture")
    if baseline is None:  # llama.cpp cannot make a file this small: compare with the smallest it can make
        baseline = OUT / f"multi-code.{BASELINES[-1]}.gguf"
        extra = baseline.stat().st_size / size - 1
        print(f"  no llama.cpp mixture reaches {size:,} bytes; its smallest, {BASELINES[-1]}, is "
              f"{baseline.stat().st_size:,} bytes ({extra:.0%} larger): evaluated beside moepack's file")
    models = [str(ours), str(baseline)]
    step(["eval", *models, "--reference", str(MODEL), "--text", str(EVAL), "--window", "256",
          "--json-out", str(OUT / "eval.json"), "--md-out", str(OUT / "eval.md")])


if __name__ == "__main__":
    main_demo()
