"""``python -m bench.ids``: what unguessable ids cost, per id, against the earlier scheme.

Compares, in this process, with ``timeit`` (best of 5 runs of 200 000 ids each):

* ``store.types.new_id`` — 48-bit milliseconds + 16-bit counter + 96 random bits from
  ``secrets.token_hex(12)`` per id (the current scheme);
* the same randomness drawn from a pool of ``secrets.token_bytes`` blocks (one system call per
  341 ids), the alternative that was measured and not taken;
* the earlier scheme — milliseconds + counter + a per-process random part + a serial (no
  randomness per id: one id revealed the next).

Prints nanoseconds per id. A response makes a handful of ids (the response, its steps), so the
difference is a rounding error next to one model call; the numbers are here to show it.
"""

from __future__ import annotations

import os
import secrets
import time
import timeit

from store.types import new_id

_state = {"last_ms": 0, "counter": 0, "serial": 0}
_PROCESS_RANDOM = os.urandom(5).hex()


def _earlier_new_id(prefix: str) -> str:
    ms = int(time.time() * 1000)
    if ms <= _state["last_ms"]:
        _state["counter"] += 1
        ms = _state["last_ms"]
    else:
        _state["counter"] = 0
        _state["last_ms"] = ms
    _state["serial"] += 1
    return (
        f"{prefix}_{ms:012x}{_state['counter'] & 0xFFFF:04x}{_PROCESS_RANDOM}"
        f"{_state['serial'] & 0xFFFFFF:06x}"
    )


_pool = {"bytes": b"", "offset": 0}


def _pooled(prefix: str) -> str:
    if _pool["offset"] >= len(_pool["bytes"]):
        _pool["bytes"], _pool["offset"] = secrets.token_bytes(12 * 341), 0
    offset = _pool["offset"]
    _pool["offset"] = offset + 12
    random = _pool["bytes"][offset : offset + 12].hex()
    return f"{prefix}_{int(time.time() * 1000):012x}0000{random}"


def measure(number: int = 200_000, repeat: int = 5) -> dict[str, float]:
    """Nanoseconds per id for each scheme (best run)."""
    out = {}
    for name, fn in (
        ("new_id (96 random bits, secrets.token_hex per id)", new_id),
        ("96 random bits from a pool of secrets.token_bytes", _pooled),
        ("earlier new_id (predictable)", _earlier_new_id),
    ):
        best = min(timeit.repeat(lambda fn=fn: fn("resp"), number=number, repeat=repeat))
        out[name] = best / number * 1e9
    return out


def main() -> None:
    for name, ns in measure().items():
        print(f"{ns:8.0f} ns/id  {name}")


if __name__ == "__main__":
    main()
