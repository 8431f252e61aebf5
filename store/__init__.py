"""The step-chain store: one async interface (:class:`Store`), SQLite and PostgreSQL backends."""

from .base import Store
from .types import (
    MODEL_CALL,
    TOOL_CALL,
    ConflictError,
    NotFoundError,
    ResponseRecord,
    Step,
    StepDescriptor,
    StepStateError,
    StoreError,
    new_id,
)

__all__ = [
    "ConflictError",
    "MODEL_CALL",
    "NotFoundError",
    "ResponseRecord",
    "Step",
    "StepDescriptor",
    "StepStateError",
    "Store",
    "StoreError",
    "TOOL_CALL",
    "new_id",
]
