"""Ids: sortable by their time prefix, and otherwise nothing but fresh randomness."""

from __future__ import annotations

import collections
import re

from store.types import new_id

ID = re.compile(r"resp_([0-9a-f]{12})([0-9a-f]{4})([0-9a-f]{24})")


def test_ids_share_nothing_beyond_their_time_prefix() -> None:
    ids = [new_id("resp") for _ in range(4000)]
    parts = [ID.fullmatch(i) for i in ids]
    assert all(parts), ids[:3]
    assert ids == sorted(ids)  # creation order (milliseconds, then the tie-breaking counter)
    randoms = [bytes.fromhex(p.group(3)) for p in parts if p]
    assert len(set(randoms)) == len(randoms)
    # Every one of the 12 random bytes varies freely: no per-process constant, no serial.
    for position in range(12):
        seen = collections.Counter(r[position] for r in randoms)
        assert len(seen) > 200, position
        assert max(seen.values()) < 60, position
    # Neighbours are unrelated: their difference is not a constant (a serial would give 1).
    deltas = {
        int.from_bytes(b, "big") - int.from_bytes(a, "big") for a, b in zip(randoms, randoms[1:])
    }
    assert len(deltas) == len(randoms) - 1
    # Each random bit is set about half the time.
    for bit in range(96):
        ones = sum((int.from_bytes(r, "big") >> bit) & 1 for r in randoms)
        assert 1600 < ones < 2400, bit


def test_at_least_96_random_bits() -> None:
    assert len(ID.fullmatch(new_id("resp")).group(3)) * 4 >= 96  # type: ignore[union-attr]
