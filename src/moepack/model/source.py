"""Where a model argument points: a directory, or a Hugging Face repo id already in the local cache.

moepack never downloads: a repo id is looked up with `huggingface_hub.snapshot_download(local_files_only=True)`,
which reads the cache (HF_HUB_CACHE / HF_HOME, or `cache_dir`) and fails when the snapshot is not there. Every
command's model argument goes through `resolve_model` (`moepack.cli.options.add_command`).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from moepack.errors import MoepackError

__all__ = ["resolve_model", "ModelNotFound"]

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFound(MoepackError, FileNotFoundError):
    pass


def resolve_model(arg: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """The directory of `arg`: itself when it exists, else the cached snapshot of the repo id `arg`."""
    path = Path(arg)
    if path.exists():
        if not path.is_dir():
            raise ModelNotFound(f"{path}: not a directory; pass a Hugging Face checkpoint directory or repo id")
        return path
    if not _REPO_ID.fullmatch(str(arg)):
        raise ModelNotFound(f"{arg}: not a directory (nothing is there), nor a Hugging Face repo id such as "
                            "deepseek-ai/DeepSeek-V3")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    try:
        snap = Path(snapshot_download(str(arg), revision=revision, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        raise ModelNotFound(
            f"{arg}: not a directory, and no snapshot of that repo is in the local Hugging Face cache; moepack does "
            f"not download: fetch it first with `hf download {arg}` (or only its config, `hf download {arg} "
            f"config.json`, to plan with `moepack inspect`), or pass the checkpoint directory. Looked in {cache} "
            "(HF_HUB_CACHE, else HF_HOME/hub: set either to look elsewhere)"
        ) from None
    log.info("%s: the cached snapshot %s", arg, snap)
    return snap
