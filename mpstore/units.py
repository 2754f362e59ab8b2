"""Sizes as people write them: chunk sizes, memory limits and I/O budgets."""

from __future__ import annotations

import re
from decimal import Decimal

from .errors import MpError


def parse_size(text: str) -> int:
    """'1MiB', '512k', '2GB', '4096' -> bytes (binary multiples, as chunk sizes are)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise MpError(f"invalid size {text!r}: use a number of bytes, e.g. 1048576 or 1MiB")
    n = Decimal(m.group(1)) * (1 << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2)])  # exact
    if n != n.to_integral_value():
        raise MpError(f"invalid size {text!r}: not a whole number of bytes ({n})")
    return int(n)
