"""Byte sizes as people type and read them: `parse_size` ('20MB', '1.5GiB', '8G'), `format_size`, `size_flag`, and
`BudgetError`, the error of every budget setting that cannot give a weight budget."""
from __future__ import annotations

import re
from decimal import ROUND_FLOOR, Decimal, InvalidOperation

from moepack.errors import MoepackError

__all__ = ["BudgetError", "parse_size", "format_size", "size_flag"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RX = re.compile(r"\s*(\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*")


class BudgetError(MoepackError, ValueError):
    """A size, memory or context setting that cannot give a weight budget; the message says what to change."""


def parse_size(text: str | int) -> int:
    """'20MB' → 20_000_000, '1.5GiB' → 1_610_612_736, '123456' → 123456, '8G' → 8 GiB.

    Units (case-insensitive): none or B = bytes; kB MB GB TB = powers of 1000; KiB MiB GiB TiB = powers of 1024;
    a bare K M G T means the binary unit (as memory sizes are usually meant: an "8G" board has 8 GiB).
    Fractions of a byte are dropped (floor); a plain byte count must be whole.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise BudgetError(f"size {text} is negative")
        return text
    m = _SIZE_RX.fullmatch(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(f"cannot read size {text!r}; write e.g. 20MB, 1.5GiB, 8G or 123456B "
                          "(units: B, kB/MB/GB/TB = 1000^n, KiB/MiB/GiB/TiB or K/M/G/T = 1024^n)")
    try:
        value = Decimal(m.group(1).replace("_", "")) * _UNITS[unit]
    except InvalidOperation:
        raise BudgetError(f"cannot read size {text!r}: {m.group(1)!r} is not a number") from None
    if _UNITS[unit] == 1 and value != value.to_integral_value():
        raise BudgetError(f"size {text!r} is not a whole number of bytes")
    return int(value.to_integral_value(rounding=ROUND_FLOOR))


def format_size(n: int | float) -> str:
    """'5.50 MiB (5,767,168 bytes)' — binary units for reading, exact bytes for checking."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{int(n):,} B" if unit == "B" else f"{x:.2f} {unit} ({int(n):,} bytes)"
        x /= 1024
    raise AssertionError("unreachable")


def size_flag(n: int) -> str:
    """A size to type that is at least n bytes: GiB (or MiB below 1 GiB) rounded up to two decimals."""
    unit, scale = ("GiB", 2**30) if n >= 2**30 else ("MiB", 2**20)
    return f"{Decimal(-(-n * 100 // scale)) / 100}{unit}"
