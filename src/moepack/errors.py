"""The one base class for errors the user can fix; the CLI prints their message without a traceback."""
from __future__ import annotations

__all__ = ["MoepackError"]


class MoepackError(Exception):
    """Bad input or an impossible request. The message says what to change."""
