"""Sizes as people write them: chunk sizes, memory limits and I/O budgets."""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import MpError, quoted

MAX_SIZE = (1 << 63) - 1  # the largest size a plan (msgpack) or the store holds: 8 EiB
_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class SizeTooLarge(MpError):
    """A size past MAX_SIZE."""


def parse_size(text: str) -> int:
    """'1MiB', '512k', '2GB', '4096' -> bytes (binary multiples, as chunk sizes are).

    Computed exactly (no float rounding), and refused beyond MAX_SIZE: a size no plan can
    store is an error before anything runs, not an overflow after."""
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise MpError(f"invalid size {quoted(text)}: use a number of bytes, e.g. 1048576 or 1MiB")
    whole, frac = m.group(1).lstrip("0"), (m.group(2) or "").rstrip("0")
    if len(whole) > 20:  # more than 10**20 of any unit is past MAX_SIZE; and int() has a digit limit
        raise SizeTooLarge(f"size {quoted(text)} is too large (at most {MAX_SIZE} bytes)")
    # bytes are whole: 4096.7 is refused, not cut to 4096 (1.5k = 1536 is fine). A fraction of
    # more than 40 significant decimals is never whole after multiplying by at most 2**40.
    value = Fraction(int(whole or "0")) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
    exact = value * (1 << _UNITS[m.group(3)])
    if len(frac) > 40 or exact.denominator != 1:
        raise MpError(f"invalid size {quoted(text)}: not a whole number of bytes")
    size = int(exact)
    if size > MAX_SIZE:
        raise SizeTooLarge(f"size {quoted(text)} is too large (at most {MAX_SIZE} bytes)")
    return size


