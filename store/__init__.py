"""The step-chain store: one async interface (:class:`Store`), SQLite and PostgreSQL backends."""

from .base import Store
from .types import (
    MODEL_CALL,
    TOOL_CALL,
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreConflictError,
    StoreError,
    StoreNotFoundError,
    new_id,
)

__all__ = [
    "MODEL_CALL",
    "ResponseRecord",
    "Step",
    "StepDescriptor",
    "StepStateError",
    "Store",
    "StoreConflictError",
    "StoreError",
    "StoreNotFoundError",
    "TOOL_CALL",
    "new_id",
]
