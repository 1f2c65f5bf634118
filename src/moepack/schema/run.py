"""RunLayout: the name of every artifact in a `moepack compress` run directory (and the `moepack calibrate` output
directory it shares its calibration with), spelled once. It names files only: the contracts that read and write
them are their schema classes, the records that make them resumable are moepack.rundir's.

    calib/                          CalibStats (manifest.json, stats.safetensors): statistics and importance matrix
    prune_plan-rKEEP.json           PrunePlan of retention KEEP (candidates are pruned lazily: no checkpoint)
    sensitivity-rKEEP.json          SensitivityTable from the budget's own reference type (or the only one)
    sensitivity-rKEEP-TYPE.json     ... from the ladder's smallest type TYPE, when a second reference was measured
    quant_plan-rKEEP.json           QuantPlan: the final plan of retention KEEP (refined, or a llama.cpp mixture)
    summary.json                    RunSummary of the run
    stages/NAME.json                one record per finished stage: its inputs' hash and its artifact's sha256
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout", "retention_name"]

log = logging.getLogger(__name__)


def retention_name(keep: float | str) -> str:
    """'0.75', '1': a retention as the file names spell it (a float or its string)."""
    return f"{float(keep):g}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def calib(self) -> Path:
        return self.root / "calib"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_record(self, name: str) -> Path:
        return self.stages / f"{name}.json"

    def prune_plan(self, keep: float | str) -> Path:
        return self.root / f"prune_plan-r{retention_name(keep)}.json"

    def sensitivity(self, keep: float | str, reference: str | None = None) -> Path:
        """The table of retention `keep`; `reference` names a table measured from a second reference type."""
        tag = f"-{reference}" if reference else ""
        return self.root / f"sensitivity-r{retention_name(keep)}{tag}.json"

    def quant_plan(self, keep: float | str) -> Path:
        return self.root / f"quant_plan-r{retention_name(keep)}.json"

    def table_of(self, keep: float | str, reference: str | None) -> Path:
        """The sensitivity table a plan of retention `keep` with reference (default) type `reference` was allocated
        from: the tagged table where compress measured one for it, else the retention's untagged table."""
        tagged = self.sensitivity(keep, reference) if reference else None
        return tagged if tagged is not None and tagged.is_file() else self.sensitivity(keep)

    def quant_plans(self) -> list[Path]:
        """Every retention's quant plan in the run, oldest first (the last written is the run's latest choice)."""
        return sorted(self.root.glob("quant_plan-r*.json"), key=lambda p: p.stat().st_mtime)

    @staticmethod
    def retention_of(path: Path) -> str:
        """'0.75' from 'quant_plan-r0.75.json' / 'sensitivity-r0.75.json' / 'prune_plan-r0.75.json'."""
        stem = path.name[:-5] if path.name.endswith(".json") else path.name
        return stem.rsplit("-r", 1)[-1]
