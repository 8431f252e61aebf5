"""The trace viewer: ``GET /ui`` (a static page) and the listing it reads.

    GET /ui                        the page (gateway/ui/static/index.html)
    GET /ui/static/{file}          its script and style sheet
    GET /v1/stepchain/responses    a page of response summaries, newest first

The page itself holds no data and no secret: it asks for an API key (the admin key, or a tenant
key) once, keeps it in the browser's ``sessionStorage`` and reads the JSON API with it —
this listing, ``GET /v1/responses/{id}`` (and its ``?stream=true`` event stream for the text
as it forms) and ``GET /v1/responses/{id}/steps``. A tenant key sees only that tenant's
responses; the admin key sees everyone's, with their tenant.

Listing query parameters: ``status`` (a response status), ``model`` (exact), ``q`` (part of a
response id), ``after`` (the last id of the previous page), ``limit`` (1–100, default 20).
Answer: ``{"object": "list", "data": [summary], "first_id", "last_id", "has_more", "admin"}``
where each summary is :func:`gateway.observe.chain.response_summary` (steps, tokens, cost,
duration; ``tenant`` for the admin only).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from gateway.errors import InvalidRequestError
from gateway.observe.chain import response_summary
from gateway.ui import STATIC_DIR
from store.types import RESPONSE_STATUSES
from store.types import StoreNotFoundError

from .auth import caller_is_admin
from .bodies import json_response, tenant_of
from .state import gateway_state

__all__ = ["ui_routes"]

# The page loads only its own files and talks only to this gateway.
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


async def ui_page(request: Request) -> Response:
    """The viewer's single page (its views are chosen by the URL fragment)."""
    return FileResponse(STATIC_DIR / "index.html", headers=_SECURITY_HEADERS)


class _Static:
    """StaticFiles with the same security headers on every file."""

    def __init__(self) -> None:
        self.files = StaticFiles(directory=STATIC_DIR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.files(scope, receive, with_headers)


async def list_responses(request: Request) -> Response:
    """``GET /v1/stepchain/responses``: see the module docstring."""
    query = request.query_params
    status = query.get("status") or None
    if status is not None and status not in RESPONSE_STATUSES:
        raise InvalidRequestError(
            f"status must be one of {', '.join(RESPONSE_STATUSES)}.", param="status"
        )
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidRequestError("limit must be an integer from 1 to 100.", param="limit")
    admin = caller_is_admin(request)
    store = gateway_state(request).service.store
    try:
        records, has_more = await store.list_responses_page(
            tenant=tenant_of(request),
            all_tenants=admin,
            status=status,
            model=query.get("model") or None,
            search=(query.get("q") or "").strip() or None,
            after=query.get("after") or None,
            limit=int(raw_limit),
        )
    except StoreNotFoundError:
        raise InvalidRequestError(f"No response with id '{query.get('after')}'.", param="after") from None
    records = [r for r in records if r.store]
    chains = await asyncio.gather(*(store.list_steps(r.id) for r in records))
    data = [response_summary(r, steps, with_tenant=admin) for r, steps in zip(records, chains)]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": records[-1].id if records else None,
            "has_more": has_more,
            "admin": admin,
        }
    )


def ui_routes() -> list[BaseRoute]:
    return [
        Route("/ui", ui_page, methods=["GET"]),
        Route("/ui/", ui_page, methods=["GET"]),
        Mount("/ui/static", app=_Static(), name="ui-static"),
        Route("/v1/stepchain/responses", list_responses, methods=["GET"]),
    ]
