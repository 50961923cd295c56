"""Durations and sizes as gate.yaml and policies write them."""
from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.I)
_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|k|m|g|kib|mib|gib)?\s*$", re.I)
_SIZE_FACTORS = {None: 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
                 "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_duration(value: object) -> float:
    """``30`` / ``"30s"`` / ``"5m"`` / ``"2h"`` / ``"35d"`` -> seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "5m", got {value!r}')
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a duration of zero or more, got {value!r}")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return float(m.group(1)) * _DURATION_FACTORS[unit]
    raise ValueError(f'expected a duration like "5m", got {value!r}')


def parse_size(value: object) -> int:
    """``1024`` / ``"10KB"`` / ``"25MB"`` -> bytes (decimal units, as mail admins write them)."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "25MB", got {value!r}')
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"expected a size of zero or more, got {value!r}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_FACTORS[unit])
    raise ValueError(f'expected a size like "25MB", got {value!r}')


def format_duration(seconds: float) -> str:
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"
