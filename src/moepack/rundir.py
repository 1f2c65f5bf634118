"""Resumable stages, the one mechanism for every stage of a run: a stage whose artifact is present, intact and made
from the same inputs is skipped.

Each finished stage leaves a record (`RunLayout.stage_record`: RUN_DIR/stages/NAME.json) with the hash of its inputs
(the key) and the sha256 of every file of its artifact. A rerun recomputes a stage when its key changed, its artifact
is missing or corrupted, or the caller's `accept` says the artifact does not answer this request. The record is
written last and removed before a stage reruns, so a stage interrupted mid-way is never mistaken for a finished one.
Compress's stages, `moepack calibrate` (RUN_DIR/calib) and `moepack prune` (its output checkpoint) all resume here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moepack.atomic import atomic_write_text
from moepack.schema.run import RunLayout

__all__ = ["RunDir", "key_hash", "file_sha256"]

log = logging.getLogger(__name__)


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _artifact_files(artifact: Path) -> list[Path]:
    if artifact.is_file():
        return [artifact]
    if artifact.is_dir():
        return sorted(p for p in artifact.rglob("*") if p.is_file())
    return []


def _digest(artifact: Path) -> dict[str, str]:
    base = artifact if artifact.is_dir() else artifact.parent
    return {str(p.relative_to(base)): file_sha256(p) for p in _artifact_files(artifact)}


@dataclass
class RunDir:
    """The directory holding every stage artifact of one run (named by `layout`), and the stages' timings. Nothing
    is created until a stage writes."""

    root: Path
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.layout = RunLayout(self.root)

    def is_done(self, name: str, key: dict[str, Any], artifact: Path) -> bool:
        rec = self.layout.stage_record(name)
        if not rec.is_file():
            return False
        try:
            saved = json.loads(rec.read_text())
        except json.JSONDecodeError:
            return False
        if saved.get("key") != key_hash(key):
            return False
        if saved.get("files") != _digest(artifact):
            log.warning("stage %s: cached artifact %s is missing or corrupted; recomputing", name, artifact)
            return False
        return True

    def stage(self, name: str, key: dict[str, Any], artifact: Path, fn: Callable[[], Any],
              accept: Callable[[], bool] | None = None) -> bool:
        """Run `fn` unless the stage is done with this key (and, given `accept`, it accepts the finished artifact:
        an input that matches more than one value, as calibrate's shard count does); returns True when it ran."""
        if self.is_done(name, key, artifact) and (accept is None or accept()):
            log.info("stage %s: reusing %s", name, artifact)
            self.timings[name] = 0.0
            return False
        self.layout.stage_record(name).unlink(missing_ok=True)
        if artifact.is_dir():
            shutil.rmtree(artifact)
        t0 = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t0
        if not _artifact_files(artifact):
            raise RuntimeError(f"stage {name} finished without writing {artifact}")
        record = {"key": key_hash(key), "files": _digest(artifact), "seconds": round(self.timings[name], 2)}
        atomic_write_text(self.layout.stage_record(name), json.dumps(record, indent=2) + "\n")
        return True
