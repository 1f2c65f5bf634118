"""moepack's own GGUF metadata keys, each spelled once (as gguf-py's `Keys` spells llama.cpp's).

    moepack.writer              WRITER_ID of the writer that made the file (moepack.gguf.metadata)
    moepack.version             the moepack version that wrote it
    moepack.source_fingerprint  the source checkpoint's fingerprint (CheckpointView.fingerprint)
    moepack.quant_plan          the types written, their row-width fallbacks and the plan's other fields (JSON)
    moepack.prune_plan          the prune plan of a pruned checkpoint (JSON, PrunePlan.to_dict)
    moepack.recipe              how the file was made, short enough for a hub's viewer (JSON, moepack.gguf.recipe)

llama.cpp's quantizer copies every key it does not know, so a file it re-types keeps them.
"""
from __future__ import annotations

import logging

__all__ = ["Keys"]

log = logging.getLogger(__name__)


class Keys:
    """moepack.* metadata keys; the JSON-valued ones are compact JSON with sorted keys (metadata.moepack_value)."""

    WRITER = "moepack.writer"
    VERSION = "moepack.version"
    SOURCE_FINGERPRINT = "moepack.source_fingerprint"
    QUANT_PLAN = "moepack.quant_plan"
    PRUNE_PLAN = "moepack.prune_plan"
    RECIPE = "moepack.recipe"
