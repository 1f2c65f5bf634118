"""Which reference (base) type the sensitivity table should be measured from, now that the allocator moves groups
both ways over the whole ladder: the smallest ladder type, or the type of the old fixed rule (the highest type at
which the all-at-type model fits in 0.7 of the budget).

Per target bpw, `moepack.pipeline.compress` runs at keep 1.0 with --sensitivity fast and no llama.cpp mixtures as
rivals (they would hide the allocator's plan), once per reference; the calibration is shared (one run directory),
each reference measures its own table. Reports each plan's KLD on the report tokens no choice saw (summary.json
report_kld) and on the selection tokens. Writes bench/results/reference.json.

    nice .venv/bin/python bench/reference.py --model models/tiny-deepseek-v3 --bpw 2.5 3.5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_json

FLAGS = "--calib-text data/calib/stories.txt --calib-tokens 4096 --sens-tokens 512 --seq-len 256 -t 2"


def old_rule(model: Path, bpw: float, ladder: tuple[str, ...]) -> str:
    """compress's reference before the measurement below: the highest ladder type whose all-at-type model fits in
    0.7 of the weight budget (the lowest when none does)."""
    from moepack.model.checkpoint import open_checkpoint
    from moepack.stages.budget import BudgetRequest, budget_for
    from moepack.stages.fit import uniform_bytes

    view = open_checkpoint(model)
    limit = 0.7 * budget_for(BudgetRequest(target_bpw=bpw), view).weights
    return ([t for t in ladder if uniform_bytes(view, t) <= limit] or [ladder[0]])[-1]


def run_one(model: Path, bpw: float, base: str | None, work: Path) -> dict[str, Any]:
    from moepack.gguf.types import LADDER
    from moepack.pipeline.compress import compress
    from moepack.pipeline.options import CompressOptions
    from moepack.schema import SensitivityTable
    from moepack.schema.run import RunLayout
    from moepack.stages.budget import BudgetRequest

    name, base = base or "rule", base or old_rule(model, bpw, LADDER)
    opts = CompressOptions(keep=1.0, calib_text=ROOT / "data/calib/stories.txt", calib_tokens=4096, selection_tokens=512,
                           seq_len=256, threads=2, sensitivity="fast", mixtures=0, reference=base, progress=False)
    run_dir = work / f"{model.name}-{base}.run"  # one per reference: its table is reused across bpw
    t0 = time.perf_counter()
    res = compress(model, work / f"{model.name}-{bpw:g}-{base}.gguf", BudgetRequest(target_bpw=bpw), opts,
                   run_dir)
    table = SensitivityTable.read(RunLayout(run_dir).sensitivity(1.0))
    return {"bpw": bpw, "base": name, "reference_type": table.base.get("default_type"),
            "report_kld": res.report_kld, "selection_kld": res.selection_kld,
            "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models/tiny-deepseek-v3")
    p.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.5])
    p.add_argument("--bases", nargs="+", default=["IQ1_S", "rule"],
                   help="reference types; 'rule': the old 0.7-share rule")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-reference")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/reference.json")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for bpw in args.bpw:
        for base in args.bases:
            rows.append(run_one(args.model, bpw, None if base == "rule" else base, args.work))
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"command": "bench/reference.py " + " ".join(argv or sys.argv[1:]), "flags": FLAGS,
                          "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
