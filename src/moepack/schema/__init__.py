"""The typed contracts between stages, each with one reader and one writer of its on-disk layout.

    calibrate   → CalibStats (calib/manifest.json = CalibManifest, calib/stats.safetensors)   schema.calib
    prune       → PrunePlan (prune_plan.json, "moepack.prune_plan/1")                           schema.prune
    sensitivity → SensitivityTable (sensitivity.json, "moepack.sensitivity/1")                  schema.tables
    allocate    → QuantPlan (quant_plan.json)                                                    schema.tables
    compress    → RunSummary (summary.json, "moepack.run_summary/1")                           schema.summary

`to_dict` writes exactly the JSON layout (keys and their order) these files have always had, so files written
through the contracts are byte-identical to the hand-built dicts they replace. Validation messages say what to
change. Every stage imports its contracts from here; this package imports no layer of moepack.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from moepack.schema.base import CALIB_FORMAT, PRUNE_PLAN_FORMAT, SENSITIVITY_FORMAT, SchemaError

# Each contract's module is imported when one of its names is first used: allocate reads its tables without the
# calibration artifact's numpy.
_HOME = {
    **dict.fromkeys(("CalibInputs", "CalibManifest", "RouterStats", "ImatrixEntry", "CalibStats", "calib_dir"),
                    "moepack.schema.calib"),
    **dict.fromkeys(("PruneGroups", "PruneLayer", "TopKRow", "PrunePlan"), "moepack.schema.prune"),
    **dict.fromkeys(("Option", "Group", "SensitivityTable", "QuantPlan"), "moepack.schema.tables"),
    **dict.fromkeys(("RunSummary", "RUN_SUMMARY_FORMAT"), "moepack.schema.summary"),
}

__all__ = ["SchemaError", "CALIB_FORMAT", "PRUNE_PLAN_FORMAT", "SENSITIVITY_FORMAT", *_HOME]

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'moepack.schema' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value
