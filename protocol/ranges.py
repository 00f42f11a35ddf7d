"""Sets of half-open byte ranges: what a receiver holds, what a sender still owes.

Ranges are kept sorted, disjoint and coalesced, so the wire form of an ack is canonical and short
even after thousands of segments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True)
class RangeSet:
    """Sorted, disjoint, coalesced half-open ranges ``[start, end)``."""

    _ranges: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def of(cls, ranges: Iterable[tuple[int, int]]) -> RangeSet:
        result = cls()
        for start, end in ranges:
            result.add(start, end)
        return result

    def add(self, start: int, end: int) -> None:
        if start < 0 or end < start:
            raise ValueError(f"invalid range [{start}, {end})")
        if start == end:
            return
        if not self._ranges or self._ranges[-1][1] < start:
            # Segments mostly arrive in order: appending keeps rebuilding from a log linear.
            self._ranges.append((start, end))
            return
        merged: list[tuple[int, int]] = []
        placed = False
        for s, e in self._ranges:
            if e < start:
                merged.append((s, e))
            elif s > end:
                if not placed:
                    merged.append((start, end))
                    placed = True
                merged.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            merged.append((start, end))
        self._ranges = merged

    def covers(self, start: int, end: int) -> bool:
        """True if ``[start, end)`` lies entirely within one held range."""
        if start == end:
            return True
        return any(s <= start and end <= e for s, e in self._ranges)

    def overlaps(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._ranges)

    def missing(self, size: int) -> list[tuple[int, int]]:
        """The gaps in ``[0, size)``."""
        gaps: list[tuple[int, int]] = []
        cursor = 0
        for s, e in self._ranges:
            if s >= size:
                break
            if s > cursor:
                gaps.append((cursor, s))
            cursor = max(cursor, e)
        if cursor < size:
            gaps.append((cursor, size))
        return gaps

    def total(self) -> int:
        return sum(e - s for s, e in self._ranges)

    def as_list(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._ranges))

    def __len__(self) -> int:
        return len(self._ranges)
