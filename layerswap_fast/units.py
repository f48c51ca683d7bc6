"""Byte counts as people write them: ``5GB`` in, ``1.23 GB`` out."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``5GB`` → 5·10⁹ (decimal, as Hugging Face counts shard sizes), ``512MiB`` → 512·2²⁰."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise ConfigError(f"cannot read size {text!r}: use a number with a unit, like 5GB or 500MB")
        number = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
        if not number < 2**63:  # overflows to inf for a long enough string of digits
            raise ConfigError(f"size {text!r} is too large")
        value = int(number)
    if value <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
