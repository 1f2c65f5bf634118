"""What `moepack compress` is asked to do (CompressOptions) and the error it raises; shared by the pipeline's
modules."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

from moepack.errors import MoepackError
from moepack.gguf.types import LADDER
from moepack.model.textdata import CalibSource
from moepack.stages.fit import RETENTIONS
from moepack.stages.merge import MergeOptions

__all__ = ["CompressError", "CompressOptions", "KEEP_AUTO_CANDIDATES", "MIXTURE_RIVALS", "REFINE_PASSES",
           "SPEED_FLOOR"]

log = logging.getLogger(__name__)

KEEP_AUTO_CANDIDATES = RETENTIONS  # the one list; `moepack inspect` reports each of them
# llama.cpp's largest fitting mixtures measured against each plan (moepack.pipeline.dominance): the smaller ones
# are coarser and rarely better.
MIXTURE_RIVALS = 3
# Interaction refinement passes after allocation (moepack.pipeline.refine), each measuring up to 3 plans: on
# tiny-deepseek-v3 at --target-bpw 2.5 --keep 1.0 they add at most about a quarter to compress's time.
REFINE_PASSES = 4
# Share of the same-size llama.cpp mixture's predicted decode tokens/s a plan should reach: on a CPU the IQ types
# cost 2-3x the time per byte of the K-quants (docs/performance.md), and KLD per byte alone leans on them.
SPEED_FLOOR = 0.95


class CompressError(MoepackError, ValueError):
    pass


@dataclass
class CompressOptions:
    keep: float | str = "auto"  # retention R, or "auto": the best of KEEP_AUTO_CANDIDATES (keep 1.0 among them)
    top_k: int | str | None = None  # None: max(1, round(R·k)); an int; or "auto"
    # one text, named domains (moepack.model.textdata.CalibSource), or None: the bundled set
    calib_text: Path | Sequence[CalibSource] | None = None
    calib_tokens: int = 50_000
    seq_len: int = 512
    selection_tokens: int = 4096  # selection tokens: held out from the statistics, every choice is measured on them
    probe_tokens: int | None = None  # the sensitivity table's probes on the first this many of them (None: all)
    report_tokens: int | None = None  # held out after them for the reported KLD no choice saw (None: selection_tokens)
    solver: str = "greedy"
    reference: str | None = None  # --base: per-role reference types; None: pipeline.reference.reference_types
    ladder: tuple[str, ...] = LADDER
    criterion: str = "auto"  # or a fixed one of stages.prune.CRITERIA (moepack.pipeline.criterion)
    # --merge: every pruned candidate folds its dropped experts into kept ones (stages.merge); None: with criterion
    # auto merging is measured like the criteria, with a fixed criterion dropped experts are discarded
    merge: MergeOptions | None = None
    alpha: float = 0.5
    verify_ctx: int = 512
    repack: bool = False  # verify with llama.cpp's CPU extra buffer types (repacking) on
    threads: int = 2
    progress: bool = True
    shards: int | None = None  # calibration tasks (None: 1 in-process, one per task slot on Ray)
    cache_dir: Path | None = None  # sensitivity: quantized tensors on disk (shared storage on a cluster)
    mixtures: int = MIXTURE_RIVALS  # llama.cpp mixtures measured against each plan (0: none)
    sensitivity: str = "auto"  # full | fast | auto (moepack.stages.sensitivity.fast)
    refine: int = REFINE_PASSES  # measured refinement passes after allocation (0: none; moepack.pipeline.refine)
    speed_tiebreak: bool = True  # among retentions tied with the best (paired CI), take the fastest predicted decode
    min_decode_tps: float | None = None  # --min-decode-tps: predicted decode tokens/s every plan must reach
    # --speed-floor: every plan should predict at least this share of the same-size llama.cpp mixture's decode
    # tokens/s (moved to faster types where it does not; kept where no plan within the budget can); 0: no floor
    speed_floor: float = SPEED_FLOOR
    speed_table: Path | None = None  # --speed-table: kernel times of the target device (None: measured here)
    save_pruned: Path | None = None  # also write the chosen retention's pruned HF checkpoint here
