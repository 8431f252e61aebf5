"""Background work never fails silently: a failed task is logged with its traceback, and the
recovery loop outlives any exception a sweep raises. SQLite only: the failures are injected
through a subclass of the SQLite store, and the loop under test is the same on either backend."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import httpx

from gateway.config import Settings
from gateway.engine.tasks import TaskSet
from gateway.errors import InvalidRequestError
from gateway.http.app import create_app
from gateway.testing.scripted_upstream import Reply, ScriptedModel
from gateway.testing.serving import serve_app
from store.sqlite import SQLiteStore
from store.types import MODEL_CALL, ResponseRecord, StepDescriptor, new_id
from tests.servers import serve_scripted_upstream


async def _fails_deep_down() -> None:
    await asyncio.sleep(0)
    raise ValueError("broken on purpose")


def test_a_failed_background_task_is_logged_with_its_traceback(caplog):
    async def main() -> None:
        tasks = TaskSet()
        tasks.spawn(_fails_deep_down())
        tasks.spawn(_client_error())  # a GatewayError is the client's business: not logged
        await tasks.drain(grace_s=5)

    async def _client_error() -> None:
        raise InvalidRequestError("bad input")

    with caplog.at_level(logging.ERROR, logger="stepchain"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if r.name == "stepchain"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "_fails_deep_down" in caplog.text  # the traceback, not just the repr
    assert "bad input" not in caplog.text


class FlakySQLiteStore(SQLiteStore):
    """A real SQLite store whose second recovery sweep fails with an unexpected error."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sweeps = 0
        self.failed = threading.Event()

    async def claim_responses(self, owner, lease_s, *, limit=100):
        self.sweeps += 1
        if self.sweeps == 2:
            self.failed.set()
            raise RuntimeError("an unexpected failure in a sweep")
        return await super().claim_responses(owner, lease_s, limit=limit)


async def _leave_a_stale_response(db) -> str:
    """A response whose process died: in progress, lease run out, first model call pending."""
    store = SQLiteStore(str(db))
    await store.open()
    body = {"model": "m", "input": "hello after the failure"}
    record = ResponseRecord(id=new_id("resp"), model="m", request=body, created_at=time.time())
    await store.create_response(
        record, owner="a-dead-process", lease_s=0.01,
        first_steps=[StepDescriptor(MODEL_CALL, {"model": "m", "messages": [{"role": "user", "content": "hello"}]})],
    )
    await store.close()
    return record.id


def test_the_recovery_loop_survives_any_exception(tmp_path, caplog):
    db = tmp_path / "stepchain.db"
    model = ScriptedModel(default=lambda body: Reply(content="resumed"))
    store = FlakySQLiteStore(str(db))
    with caplog.at_level(logging.ERROR, logger="stepchain.recovery"), serve_scripted_upstream(model) as upstream:
        settings = Settings(upstream_base_url=upstream.base_url, db=str(db), lease_s=0.3)
        with serve_app(create_app(settings, store=store)) as url:
            assert store.failed.wait(30), "the second sweep never ran"
            response_id = asyncio.run(_leave_a_stale_response(db))
            deadline = time.monotonic() + 30
            while True:  # a later sweep claims and resumes it
                status = httpx.get(f"{url}/v1/responses/{response_id}", timeout=10).json()["status"]
                if status == "completed" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    assert status == "completed"
    assert store.sweeps > 2
    failures = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert failures and "claim_responses" in caplog.text  # logged with its traceback
