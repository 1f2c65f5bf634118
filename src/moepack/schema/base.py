"""What every stage contract shares: the error, the format names, the JSON reader."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moepack.errors import MoepackError

__all__ = ["SchemaError", "CALIB_FORMAT", "PRUNE_PLAN_FORMAT", "SENSITIVITY_FORMAT", "read_json"]

log = logging.getLogger(__name__)

CALIB_FORMAT = "moepack.calib/1"
PRUNE_PLAN_FORMAT = "moepack.prune_plan/1"
SENSITIVITY_FORMAT = "moepack.sensitivity/1"


class SchemaError(MoepackError, ValueError):
    """A stage artifact that does not follow its contract; the message says what to redo."""


def read_json(path: Path, what: str) -> Any:
    """The JSON document at `path`; a SchemaError naming `what` when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise SchemaError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemaError(f"{path}: the {what} is not valid JSON ({e})") from None
