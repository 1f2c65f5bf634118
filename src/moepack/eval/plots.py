"""matplotlib, headless, and figures written atomically: the one way moepack's pages and reports draw."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moepack.atomic import atomic_path

__all__ = ["pyplot", "save_figure"]


def pyplot():  # -> matplotlib.pyplot
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Write `fig` to `path` (format from its extension) atomically, then free it."""
    with atomic_path(path, suffix=".tmp" + Path(path).suffix) as tmp:  # matplotlib picks the format by the extension
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
