"""Numbers for people: parameter counts (530K, 1.2B, 456B), bytes (MiB, GiB) and sequence
lengths (1K, 64K, 1M), to three significant digits."""

from __future__ import annotations

from decimal import Decimal

_DECIMAL = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
_BYTES = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_LENGTHS = (("M", 2**20), ("K", 2**10))


def _plain(x: float) -> str:
    """x to three significant digits, never in exponent notation (0.00001, not 1e-05)."""
    text = f"{x:.3g}"
    return format(Decimal(text), "f") if "e" in text else text


def _scaled(x: float, units: tuple[tuple[str, float], ...], sep: str, last: str) -> str:
    for unit, scale in units:
        # the largest unit that keeps x / scale >= 1 after rounding (999.9K is 1M)
        if float(f"{abs(x) / scale:.3g}") >= 1:
            return f"{_plain(x / scale)}{sep}{unit}"
    return f"{_plain(x)}{sep}{last}".rstrip()


def count(n: float) -> str:
    """Decimal units: 530_000 -> '530K', 1.2e9 -> '1.2B', 456_090_000_000 -> '456B',
    0.001 -> '0.001'."""
    return _scaled(n, _DECIMAL, "", "")


def size(nbytes: float) -> str:
    """Binary units: 512 -> '512 B', 3 * 2**20 -> '3 MiB', 1.5 * 2**30 -> '1.5 GiB'."""
    return _scaled(nbytes, _BYTES, " ", "B")


def length(n: float) -> str:
    """Token counts in binary units, as the benchmarks name them: 1024 -> '1K',
    65536 -> '64K', 2**20 -> '1M', 96 -> '96'."""
    return _scaled(n, _LENGTHS, "", "")
