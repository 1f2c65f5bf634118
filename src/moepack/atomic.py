"""Atomic file writes: every artifact appears complete at its path or not at all.

The one pattern, used for every file moepack writes: a temporary file in the destination's directory (so the rename
never crosses a file system), written, then renamed into place; removed on any failure. Large artifacts use the
fixed name `PATH.tmp` (a rerun after a kill overwrites the leftover); small text files a unique name with the
permissions a plain open() would give (two writers never share a temporary).

    with atomic_path(out) as tmp:      # for writers that take a file name (GGUF, safetensors, matplotlib)
        writer(tmp)
    atomic_write_text(path, text)
    save_json(obj, path)               # JSON plus a final newline
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "atomic_copy", "save_json", "publish_dir"]

log = logging.getLogger(__name__)


def _plain_permissions(path: str | Path) -> None:
    """mkstemp creates files 0600; give the file what open() would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp", unique: bool = False) -> Iterator[Path]:
    """A temporary path beside `path`; renamed onto `path` when the block ends without an exception, removed
    otherwise. The temporary is `path` + `suffix` (writers that choose a format by extension need theirs), so a
    rerun after a kill overwrites what the killed write left; `unique` gives a fresh name instead, for files that
    several processes may write at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        if unique:
            _plain_permissions(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes, unique: bool = True) -> Path:
    with atomic_path(path, unique=unique) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, unique: bool = True) -> Path:
    """Small text files (JSON records, reports) get unique temporaries: concurrent writers never collide."""
    with atomic_path(path, unique=unique) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return Path(path)


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the bytes of `src` to `dst` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def save_json(obj: Any, path: str | Path, indent: int = 2) -> Path:
    """`obj` as JSON (plus a final newline), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def publish_dir(tmp: str | Path, dest: str | Path, marker: str) -> bool:
    """Rename a finished directory `tmp` onto `dest` (replacing an older `dest`). False, with `tmp` removed, when
    another process published a complete `dest` (holding `marker`) first; the caller then uses theirs."""
    tmp, dest = Path(tmp), Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # `dest` reappeared between the rmtree and the rename: another writer finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / marker).is_file():
            raise
        return False
    return True
