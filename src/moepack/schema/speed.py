"""The kernel time table (`moepack.speed/2`): how long one device's llama.cpp takes per call and per weight row of each
GGML type, row width and batch — what the speed model (moepack.stages.speed) predicts tokens per second from.

JSON: {"format": "moepack.speed/2", "device": "AMD EPYC ...", "threads": 2, "runtime": "llama-cpp-python 0.3.36",
       "seconds_per_row": {"Q4_K": {"2048": {"1": 1.1e-07, "512": 9.3e-08}}, ...},
       "seconds_per_call": {"Q4_K": {"2048": {"1": 2e-06, "512": 6e-04}}, ...}}
`seconds_per_row[type][n][batch]`: seconds one mul_mat spends per (n,)-wide weight row against `batch` input columns,
weights out of cache (moepack.gguf.matmul); `seconds_per_call` the same product's fixed part (a product of R rows
takes call + R · row); a key "TYPE@ExK" holds routed experts' `mul_mat_id` over E experts, K per token: seconds per
(row × expert use × token) with `batch` tokens. A `moepack.speed/1` table (per row only) is read with no fixed part.
A table measured on another device (`moepack speed MODEL -o FILE` run there) can be brought with
`--speed-table FILE`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moepack.schema.base import SchemaError, read_json

__all__ = ["SPEED_FORMAT", "KernelTimes"]

SPEED_FORMAT = "moepack.speed/2"
_READABLE = ("moepack.speed/1", SPEED_FORMAT)


@dataclass
class KernelTimes:
    """seconds per call and per weight row by (type, row width, batch), for one device and thread count."""

    device: str
    threads: int
    runtime: str
    seconds_per_row: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    seconds_per_call: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)

    def get(self, qtype: str, n: int, batch: int) -> tuple[float, float] | None:
        """(seconds per call, seconds per row), or None where the table has no such cell."""
        row = self.seconds_per_row.get(qtype, {}).get(n, {}).get(batch)
        return None if row is None else (self.seconds_per_call.get(qtype, {}).get(n, {}).get(batch, 0.0), row)

    def put(self, qtype: str, n: int, batch: int, call: float, row: float) -> None:
        self.seconds_per_row.setdefault(qtype, {}).setdefault(n, {})[batch] = float(row)
        self.seconds_per_call.setdefault(qtype, {}).setdefault(n, {})[batch] = float(call)

    @classmethod
    def median(cls, tables: list[KernelTimes]) -> KernelTimes:
        """The cell-wise median (per call and per row apart) of several tables of one device, over the cells all of
        them hold: on a machine whose speed drifts, tables measured over the same minutes as what they predict."""
        import statistics

        first = tables[0]
        out = cls(first.device, first.threads, first.runtime)
        for key, widths in first.seconds_per_row.items():
            for n, batches in widths.items():
                for b in batches:
                    cells = [t.get(key, n, b) for t in tables]
                    if all(c is not None for c in cells):
                        out.put(key, n, b, statistics.median(c[0] for c in cells),
                                statistics.median(c[1] for c in cells))
        return out

    def to_dict(self) -> dict[str, Any]:
        def cells(table: dict[str, dict[int, dict[int, float]]]) -> dict[str, Any]:
            return {t: {str(n): {str(b): s for b, s in sorted(bs.items())} for n, bs in sorted(ns.items())}
                    for t, ns in sorted(table.items())}

        return {"format": SPEED_FORMAT, "device": self.device, "threads": self.threads, "runtime": self.runtime,
                "seconds_per_row": cells(self.seconds_per_row), "seconds_per_call": cells(self.seconds_per_call)}

    @classmethod
    def from_dict(cls, d: Any, where: str | Path) -> KernelTimes:
        if not isinstance(d, dict) or d.get("format") not in _READABLE:
            raise SchemaError(f"{where}: not a kernel time table (want \"format\": \"{SPEED_FORMAT}\"; make one "
                              "with `moepack speed MODEL -o FILE` on the device)")
        try:
            times = cls(str(d["device"]), int(d["threads"]), str(d.get("runtime", "")))
            calls = d.get("seconds_per_call", {})
            for t, ns in d["seconds_per_row"].items():
                for n, bs in ns.items():
                    for b, s in bs.items():
                        call = float(calls.get(t, {}).get(n, {}).get(b, 0.0))
                        if not (float(s) > 0 and call >= 0):
                            raise ValueError(f"{t}/{n}/{b}: {s} per row, {call} per call is not a positive time")
                        times.put(str(t), int(n), int(b), call, float(s))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SchemaError(f"{where}: malformed kernel time table ({e}); measure it again with "
                              "`moepack speed MODEL -o FILE`") from None
        return times

    @classmethod
    def read(cls, path: str | Path) -> KernelTimes:
        return cls.from_dict(read_json(Path(path), "kernel time table"), path)

    def write(self, path: str | Path) -> Path:
        """Written whole to a temporary name, then renamed into place."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(p)
        return p
