"""Model arguments: a directory, or a repo id found in the local Hugging Face cache (never downloaded)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from moepack.model.shapes import open_for_planning
from moepack.model.source import ModelNotFound, resolve_model


def _cache_with(tmp_path: Path, repo: str) -> Path:
    """A cache laid out as huggingface_hub writes it: refs/main names the snapshot holding the files."""
    cache = tmp_path / "hub"
    d = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(commit)
    (d / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(ROOT / "data" / "configs" / "deepseek-v3" / "config.json", d / "snapshots" / commit / "config.json")
    return cache


def test_directory_is_itself(tmp_path: Path) -> None:
    assert resolve_model(tmp_path) == tmp_path


def test_cached_repo_id_resolves_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = _cache_with(tmp_path, "deepseek-ai/DeepSeek-V3")
    snap = resolve_model("deepseek-ai/DeepSeek-V3", cache_dir=cache)
    assert (snap / "config.json").is_file() and snap.parent.name == "snapshots"
    assert open_for_planning(snap).facts.n_experts == 256  # a config-only snapshot is planned from its config


def test_uncached_repo_id_is_a_clear_error(tmp_path: Path) -> None:
    cache = _cache_with(tmp_path, "deepseek-ai/DeepSeek-V3")
    with pytest.raises(ModelNotFound, match="no snapshot of that repo is in the local Hugging Face cache; moepack does not download"):
        resolve_model("Qwen/Qwen3-30B-A3B", cache_dir=cache)
    with pytest.raises(ModelNotFound, match=r"not a directory \(nothing is there\)"):
        resolve_model(tmp_path / "absent" / "x" / "y")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelNotFound, match="not a directory"):
        resolve_model(tmp_path / "f")
