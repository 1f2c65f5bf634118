"""RunSummary: what one `moepack compress` run chose and measured (RUN_DIR/summary.json); the report, the model card
and the benches read it through here.

The result KLD is `report_kld` (on tokens no choice saw) when the text left report tokens, else `selection_kld`
(the tokens every choice was made on); `result_kld` says which one a reader shows.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moepack.atomic import atomic_write_text
from moepack.schema.base import SchemaError, read_json

__all__ = ["RUN_SUMMARY_FORMAT", "RunSummary"]

log = logging.getLogger(__name__)

RUN_SUMMARY_FORMAT = "moepack.run_summary/1"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_numbers(d: dict[str, Any], where: str) -> None:
    """The fields readers compute and format with: numbers where numbers are meant (report_kld may be null)."""
    bad = [k for k in ("keep", "top_k", "file_bytes", "predicted_bytes", "bpw", "selection_kld")
           if not _is_number(d[k])]
    if d["report_kld"] is not None and not _is_number(d["report_kld"]):
        bad.append("report_kld")
    n = d["n_experts"]
    if not (isinstance(n, list) and len(n) == 2 and all(isinstance(x, int) for x in n)):
        bad.append("n_experts")
    if bad:
        raise SchemaError(f"{where}: {', '.join(bad)} of the run summary are not the numbers compress writes; rerun "
                          "`moepack compress`")


@dataclass(frozen=True)
class RunSummary:
    out: str  # the GGUF written
    run_dir: str
    keep: float  # retention of the chosen candidate
    top_k: int  # k' of the chosen candidate
    n_experts: list[int]  # [kept, original] routed experts per MoE layer
    budget: dict[str, Any]  # Budget.to_dict()
    file_bytes: int
    predicted_bytes: int  # predicted tensor + metadata bytes
    bpw: float  # bits per weight of the original checkpoint
    types: dict[str, dict[str, int]]  # tensor class → GGML type → count
    selection_kld: float  # KLD vs the original on the selection tokens (every choice saw them), fake-quantized
    report_kld: float | None  # the same on the report tokens no choice saw (None: the text was too short)
    candidates: list[dict[str, Any]] = field(default_factory=list)  # one record per retention tried
    mixtures: dict[str, Any] | None = None  # llama.cpp's fitting mixtures measured against the plan (dominance)
    refinement: dict[str, Any] | None = None  # the allocated plan's predicted vs measured KLD and the moves taken
    criterion: str = "score"  # the pruning criterion (and α) of the chosen candidate
    alpha: float = 0.5
    merge: dict[str, Any] | None = None  # the chosen candidate's merge options (stages.merge); None: experts dropped
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds
    report_tokens: int = 0
    sample: str = ""  # what llama.cpp generated from the written file
    verify_error: str | None = None  # why llama.cpp could not run the written file here, if it could not
    llama_command: str = ""  # the llama.cpp command line that runs the file as it was placed and verified
    placement: dict[str, Any] | None = None  # GPU + RAM budgets: each side's tensor bytes and budget
    runtime: str = ""  # the llama.cpp build the file was verified with (the model card names it)
    # per calibration domain, [mean KLD, 95 % CI half-width] of the chosen plan and of the unpruned model's best
    # llama.cpp mixture: {"names", "selection": {"chosen", "best_mixture": {"name", "kld"}}, "report": {...}};
    # None when the calibration text was one domain (moepack.pipeline.robust)
    domains: dict[str, Any] | None = None
    # predicted decode / prompt tokens per second of the written plan and of the largest llama.cpp mixture of the
    # unpruned model within the budget (moepack.stages.speed); None where the kernels could not be timed
    speed: dict[str, Any] | None = None

    @property
    def result_kld(self) -> float:
        """The KLD to show as the result: on the report tokens, else (text too short) on the selection tokens."""
        return self.report_kld if self.report_kld is not None else self.selection_kld

    def chosen_candidate(self) -> dict[str, Any] | None:
        """The record of the chosen retention in `candidates`."""
        return next((c for c in self.candidates if c.get("keep") == self.keep and not c.get("screened")), None)

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_SUMMARY_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "summary.json") -> RunSummary:
        if not isinstance(d, dict):
            raise SchemaError(f"{where}: a run summary is a JSON object; rerun `moepack compress`")
        fmt = d.get("format", RUN_SUMMARY_FORMAT)  # summaries written before the format was named have none
        if fmt != RUN_SUMMARY_FORMAT:
            raise SchemaError(f"{where}: format {fmt!r}, expected {RUN_SUMMARY_FORMAT!r}; rerun `moepack compress` "
                              "with this moepack")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if missing := sorted(required - d.keys()):
            raise SchemaError(f"{where}: a run summary needs {', '.join(missing)}; rerun `moepack compress`")
        _check_numbers(d, where)
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, path: Path) -> Path:
        """summary.json, atomically."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: Path) -> RunSummary:
        return cls.from_dict(read_json(path, "run summary"), str(path))
