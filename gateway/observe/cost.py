"""What a model call cost: a per-model price table in USD per million tokens.

A price is ``{"input", "cached_input", "output", "reasoning"}`` (USD per 1,000,000 tokens;
``cached_input`` defaults to ``input``, ``reasoning`` to ``output``). Configured as the
``prices`` setting — TOML ``[prices."gpt-4o-mini"]`` tables, or a JSON object in the flag or
``STEPCHAIN_PRICES``. A model without a price has an **unknown** cost (None), never 0: a bill
that silently reads 0 is worse than one that says it does not know.

The cost of a model call is stored with its step, inside the step's usage JSON under
:data:`COST_KEY` (``{"stepchain": {"cost_usd": …}}``), so a later price change does not rewrite
history; a response's cost is the sum of its model calls' (None if any of them is unknown).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["COST_KEY", "PriceTable", "price_error", "step_cost", "sum_costs"]

COST_KEY = "stepchain"
_FIELDS = ("input", "cached_input", "output", "reasoning")
_MILLION = 1_000_000.0


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def price_error(model: str, price: Any) -> str | None:
    """Why ``price`` is not a valid price for ``model`` (one line), or None if it is."""
    if not isinstance(price, Mapping):
        return f"prices.{model}: expected a table of input/cached_input/output/reasoning, got {price!r}"
    for key, value in price.items():
        if key not in _FIELDS:
            return f"prices.{model}: unknown key {key!r} (expected {', '.join(_FIELDS)})"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return f"prices.{model}.{key}: expected a number >= 0 (USD per million tokens), got {value!r}"
    if "input" not in price or "output" not in price:
        return f"prices.{model}: input and output are required"
    return None


class PriceTable:
    """Prices by model name (exact match, then the longest configured prefix ending in ``*``)."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, prices: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self._exact: dict[str, tuple[float, float, float, float]] = {}
        self._prefixes: list[tuple[str, tuple[float, float, float, float]]] = []
        for model, price in (prices or {}).items():
            error = price_error(model, price)
            if error:
                raise ValueError(error)
            row = (
                float(price["input"]),
                float(price.get("cached_input", price["input"])),
                float(price["output"]),
                float(price.get("reasoning", price["output"])),
            )
            if model.endswith("*"):
                self._prefixes.append((model[:-1], row))
            else:
                self._exact[model] = row
        self._prefixes.sort(key=lambda p: -len(p[0]))

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def _row(self, model: str | None) -> tuple[float, float, float, float] | None:
        if not model:
            return None
        row = self._exact.get(model)
        if row is None:
            for prefix, candidate in self._prefixes:
                if model.startswith(prefix):
                    return candidate
        return row

    def cost(self, model: str | None, usage: Mapping[str, Any] | None) -> float | None:
        """USD for one Chat Completions ``usage`` of ``model``; None if the model has no price
        or there is no usage. Cached prompt tokens are billed at ``cached_input``, reasoning
        tokens (a part of completion tokens) at ``reasoning``."""
        row = self._row(model)
        if row is None or not isinstance(usage, Mapping):
            return None
        input_price, cached_price, output_price, reasoning_price = row
        if "prompt_tokens" in usage or "input_tokens" not in usage:
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
            in_details = usage.get("prompt_tokens_details") or {}
            out_details = usage.get("completion_tokens_details") or {}
        else:
            prompt = _count(usage.get("input_tokens"))
            completion = _count(usage.get("output_tokens"))
            in_details = usage.get("input_tokens_details") or {}
            out_details = usage.get("output_tokens_details") or {}
        cached = min(_count(in_details.get("cached_tokens")) if isinstance(in_details, Mapping) else 0, prompt)
        reasoning = min(
            _count(out_details.get("reasoning_tokens")) if isinstance(out_details, Mapping) else 0,
            completion,
        )
        total = (
            (prompt - cached) * input_price
            + cached * cached_price
            + (completion - reasoning) * output_price
            + reasoning * reasoning_price
        )
        return round(total / _MILLION, 10)

    def annotate(self, model: str | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        """``usage`` with its cost under :data:`COST_KEY` (a new dict; None stays None)."""
        if usage is None:
            return None
        return {**usage, COST_KEY: {"cost_usd": self.cost(model, usage), "model": model}}


def step_cost(usage: Mapping[str, Any] | None) -> float | None:
    """The cost stored in a model-call step's usage (None: unknown or none recorded)."""
    if not isinstance(usage, dict) and not isinstance(usage, Mapping):  # dict: no ABC check
        return None
    extra = usage.get(COST_KEY)
    if extra is None:
        return None
    if isinstance(extra, dict) or isinstance(extra, Mapping):
        value = extra.get("cost_usd")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def sum_costs(usages: Iterable[Mapping[str, Any] | None]) -> float | None:
    """The total of the model calls' stored costs; None if any call with usage has no known
    cost (calls without usage — failed before an answer — cost nothing we know of)."""
    total = 0.0
    for usage in usages:
        if usage is None:
            continue
        cost = step_cost(usage)
        if cost is None:
            return None
        total += cost
    return round(total, 10)
