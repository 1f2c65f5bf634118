"""`make demo`: compress the bundled DeepSeek-V3-style fixture to a fifth of its bf16 size (`--keep auto`: the
expert retention is chosen by measured KLD), build llama.cpp's largest uniform mixture that fits the same size,
and evaluate both against the original."""
from __future__ import annotations

import sys
from pathlib import Path

from moepack.model.checkpoint import open_checkpoint
from moepack.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-deepseek-v3"
OUT = ROOT / "out" / "demo"
TRAIN = ROOT / "data" / "tinystories-train.txt"  # the fixture's domain: calibrate on it
VALID = ROOT / "data" / "tinystories-valid.txt"  # held out: evaluate on it
# llama.cpp's standard mixtures, largest first: the baseline is the first that fits the target.
BASELINES = ("Q4_K_M", "Q3_K_M", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def step(argv: list[str]) -> None:
    print(f"\n$ moepack {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc:
        sys.exit(rc)


def main_demo() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    step(["inspect", str(ROOT / "models" / "tiny-qwen3-moe"), str(MODEL)])
    target = 2 * sum(open_checkpoint(MODEL).param_counts().values()) // 5
    ours = OUT / "tiny-deepseek-v3.moepack.gguf"
    run_dir = OUT / "tiny-deepseek-v3.run"
    step(["compress", str(MODEL), "--target-size", str(target), "--keep", "auto", "--calib-text", str(TRAIN),
          "-o", str(ours),
          "--run-dir", str(run_dir)])
    baseline = None
    for ftype in BASELINES:
        path = OUT / f"tiny-deepseek-v3.{ftype}.gguf"
        if not path.is_file():
            step(["quantize", str(MODEL), "--ftype", ftype, "--calib-dir", str(run_dir), "-o", str(path)])
        if path.stat().st_size <= target:
            baseline = path
            break
        print(f"  {ftype}: {path.stat().st_size:,} bytes > target {target:,}; trying a smaller mixture")
    models = [str(ours)] + ([str(baseline)] if baseline else [])
    step(["eval", *models, "--reference", str(MODEL), "--text", str(VALID), "--mc", "cloze", "--cloze-text", str(VALID),
          "--mc-items", "300",
          "--tokens", "4096", "--json-out", str(OUT / "eval.json"), "--md-out", str(OUT / "eval.md")])


if __name__ == "__main__":
    main_demo()
