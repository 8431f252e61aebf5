"""The Starlette application: lifespan-owned resources, routes and the one error renderer.

``create_app(settings)`` builds the app. Its lifespan opens the store, the shared
``httpx.AsyncClient``, the tool registry and the upstream client, and on shutdown lets in-flight
responses finish within a grace period before closing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_aiohttp import AiohttpTransport
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from executors.egress import EgressPolicy
from executors.http_tool import HTTPToolExecutor, no_cookie_jar
from executors.mcp_tool import MCPToolExecutor
from executors.registry import ToolRegistry
from executors.resilience import ResilientUpstream, UpstreamTarget
from gateway.config import Settings, database_error, load_settings
from gateway.engine.keys import load_or_create_key
from gateway.engine.live import LiveStreams
from gateway.engine.loop import LoopDeps
from gateway.engine.recovery import Recovery, new_owner_id
from gateway.engine.retention import purge_periodically
from gateway.engine.service import ResponsesService
from gateway.engine.tasks import TaskSet
from gateway.engine.tokens import TokenCounter
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    UpstreamError,
    to_gateway_error,
    translated_types,
)
from store.base import Store
from store import open_store
from store.types import StoreError

from gateway.observe.cost import PriceTable
from gateway.observe.hooks import Observer
from gateway.observe.metrics import MetricsMiddleware, TimedStore, mark_process_dead
from gateway.observe.metrics import metrics as get_metrics
from gateway.observe.tracing import PropagatingTransport, get_tracing

from .auth import AuthMiddleware, hash_key, load_api_keys
from .chat import chat_routes
from .context import context_routes
from .conversations import conversation_routes
from .hot import GatewayApp
from .models import model_routes
from .responses import response_routes
from .state import GatewayState
from .tools import tool_routes
from .ui import ui_routes
from .websocket import websocket_routes

logger = logging.getLogger("stepchain")

__all__ = ["app_from_environment", "create_app", "error_handlers", "tune_gc_for_serving"]


class _ShutdownClock:
    """When SIGTERM/SIGINT arrived (uvicorn's handler is chained, not replaced), so the
    shutdown grace period counts from the signal, not from the end of uvicorn's own wait."""

    def __init__(self) -> None:
        self.started: float | None = None
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous = signal.getsignal(sig)
                if callable(previous):
                    self._previous[sig] = previous
                    signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (an embedding app, tests): no clock
                pass

    def _handler(self, sig: int, frame: Any) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self._previous[sig](sig, frame)

    def remaining(self, grace_s: float) -> float:
        if self.started is None:
            return grace_s
        return max(0.0, grace_s - (time.monotonic() - self.started))

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            try:
                if signal.getsignal(sig) == self._handler:
                    signal.signal(sig, previous)
            except ValueError:
                pass


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


def _upstream_targets(settings: Settings) -> list[UpstreamTarget]:
    """The primary upstream, then the configured fallbacks, in order."""
    primary = UpstreamTarget(
        settings.upstream_base_url or "http://127.0.0.1:9/v1", _secret(settings.upstream_api_key)
    )
    fallbacks = [
        UpstreamTarget(
            f.base_url, _secret(f.api_key), f.model, f.label or f.base_url,
            pass_client_key=f.pass_client_key,
        )
        for f in settings.upstream_fallbacks
    ]
    return [primary, *fallbacks]


def _error_response(exc: GatewayError) -> Response:
    return Response(exc.to_json(), status_code=exc.status_code, media_type="application/json")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    """The one error renderer: a GatewayError as it is, a lower layer's error translated at
    the boundary (:func:`gateway.errors.to_gateway_error`)."""
    error = to_gateway_error(exc)
    if error is not exc and error.status_code >= 500 and not isinstance(error, UpstreamError):
        logger.error("%s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return _error_response(error)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Starlette's own 404/405s: a client error in the OpenAI shape.
    return _error_response(InvalidRequestError(str(exc.detail), status_code=exc.status_code))


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error_response(to_gateway_error(exc))


def error_handlers() -> dict[Any, Any]:
    """Starlette ``exception_handlers``: every error rendered once, as an OpenAI error body."""
    return {
        GatewayError: _gateway_error,
        **{cls: _gateway_error for cls in translated_types()},
        HTTPException: _http_exception,
        Exception: _unexpected,
    }


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
) -> GatewayApp:
    """The gateway app for ``settings``. ``store`` overrides the SQLite store built from
    ``settings.db`` (e.g. a PostgreSQL store); ``upstream_transport`` replaces the HTTP
    transport to the upstream (the demo's in-process scripted model). When the database fails
    the lifespan's start-up, ``app.startup_failure`` is the one-line ConfigError naming it (no
    password); otherwise None."""

    @contextlib.asynccontextmanager
    async def lifespan(app: GatewayApp) -> AsyncIterator[None]:
        app.startup_failure = None
        the_store = store or open_store(settings.db, synchronous=settings.sqlite_synchronous)
        started = False
        try:
            async with serving(app, the_store):
                started = True
                yield
        except StoreError as exc:
            # The database failed the start-up (gone since the command checked it, or failing
            # the first reads): ``stepchain serve`` tells it in one line (gateway.cli.serve).
            if not started:
                app.startup_failure = database_error(settings.db, exc)
            raise
        finally:
            # Closed already after a clean shutdown (close is idempotent); after a start-up
            # that failed once the store was open (the database went away meanwhile), this
            # stops its pool, whose tasks would otherwise keep the process from exiting.
            await the_store.close()

    @contextlib.asynccontextmanager
    async def serving(app: Starlette, the_store: Store) -> AsyncIterator[None]:
        await the_store.open()
        # httpx clients on aiohttp's transport (as openai-python's DefaultAioHttpClient): the
        # same httpx API and httpx-sse parsing, at about half the CPU per request of httpcore.
        upstream_limits = httpx.Limits(max_connections=2000, max_keepalive_connections=500)
        transport = upstream_transport or AiohttpTransport(limits=upstream_limits)
        tracing = get_tracing()
        if tracing is not None:  # the current span's traceparent goes upstream
            transport = PropagatingTransport(transport)
        client = httpx.AsyncClient(
            transport=transport,
            limits=upstream_limits,
            timeout=httpx.Timeout(
                settings.upstream_read_timeout, connect=settings.upstream_connect_timeout
            ),
        )
        tool_limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        tool_transport: httpx.AsyncBaseTransport = AiohttpTransport(limits=tool_limits)
        if tracing is not None:  # ... and to the tools
            tool_transport = PropagatingTransport(tool_transport)
        tool_client = httpx.AsyncClient(
            transport=tool_transport, limits=tool_limits, cookies=no_cookie_jar()
        )  # tool calls are stateless: no tenant's cookies reach another's calls
        upstream = ResilientUpstream(
            _upstream_targets(settings),
            client=client,
            transport=transport,
            max_retries=settings.upstream_max_retries,
            retry_max_s=settings.upstream_retry_max_s,
            connect_timeout=settings.upstream_connect_timeout,
            first_byte_timeout=settings.upstream_first_byte_timeout,
            idle_timeout=settings.upstream_idle_timeout,
            total_timeout=settings.upstream_total_timeout,
            read_timeout=settings.upstream_read_timeout,
        )
        registry = ToolRegistry(the_store, env_prefix=settings.tool_env_prefix)
        if settings.tools or settings.mcp_servers:
            await registry.upsert_many(
                [tool.definition() for tool in (*settings.tools, *settings.mcp_servers)]
            )
        await registry.load()
        http_tools = HTTPToolExecutor(
            tool_client,
            transport=tool_transport,
            max_response_bytes=settings.tool_max_response_bytes,
            egress=egress,
            env_prefix=settings.tool_env_prefix,
        )
        metrics = get_metrics()
        metrics.tool_names = lambda name: registry.lookup(name) is not None
        observer = Observer(
            metrics=metrics,
            prices=PriceTable({m: p.model_dump(exclude_none=True) for m, p in settings.prices.items()}),
            tracing=tracing,
        )
        deps = LoopDeps(
            store=TimedStore(the_store, metrics),
            observer=observer,
            upstream=upstream,
            registry=registry,
            http_tools=http_tools,
            mcp_tools=MCPToolExecutor(egress, max_response_bytes=settings.tool_max_response_bytes),
            mcp_timeout_s=settings.mcp_timeout_s,
            max_steps=settings.max_response_steps,
            max_iterations=settings.max_response_iterations,
            max_depth=settings.max_response_step_depth,
            tool_output_max_bytes=settings.tool_output_max_bytes,
            tool_output_max_lines=settings.tool_output_max_lines,
        )
        tasks = TaskSet()
        live = LiveStreams(
            max_bytes=settings.live_logs_max_bytes,
            max_bytes_per_response=settings.live_log_max_bytes,
            stored_first=settings.stream_events_stored_first,
        )
        service = ResponsesService(
            deps, owner=new_owner_id(), lease_s=settings.lease_s, live=live,
            flush_s=settings.stream_flush_s,
            hosted_tool_map=settings.hosted_tool_map,
            encrypted_content_key=load_or_create_key(settings),
            reasoning_to_upstream=settings.reasoning_to_upstream,
            context_windows=settings.model_context_windows,
            history_max_bytes=settings.history_cache_max_bytes,
            tasks=tasks,
        )
        recovery = Recovery(service, lease_s=settings.lease_s)
        app.state.gateway = GatewayState(
            settings=settings,
            service=service,
            registry=registry,
            upstream=upstream,
            live=live,
            token_counter=TokenCounter(upstream),
            recovery=recovery,
            egress=egress,
            # What tenants see instead of upstream URLs (GET /v1/responses/{id}/steps).
            upstream_names={
                target.base_url: (
                    target.label if target.label and target.label != target.base_url
                    else ("primary" if i == 0 else f"fallback-{i}")
                )
                for i, target in reversed(list(enumerate(_upstream_targets(settings))))
            },
        )
        await recovery.start()
        purging = (
            asyncio.create_task(purge_periodically(the_store, settings.retention_days))
            if settings.retention_days
            else None
        )
        shutdown = _ShutdownClock()
        try:
            yield
        finally:
            # Every response still running (with a client or not) may finish within the grace
            # period, counted from the signal; the rest are handed over: leases and liveness
            # released, so another replica resumes them at once.
            await tasks.drain(grace_s=shutdown.remaining(settings.shutdown_grace_s))
            shutdown.restore()
            if purging is not None:
                purging.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purging
            await recovery.stop()
            await client.aclose()
            await tool_client.aclose()
            await the_store.close()
            # A worker leaving (multiprocess metrics) takes its live gauges out of the sum.
            mark_process_dead(os.getpid())

    # The gateway's own sockets are added as requests arrive (``scope["server"]``: the real port,
    # also when ``port`` is 0).
    egress = EgressPolicy.from_settings(
        settings.tool_allowed_hosts,
        settings.tool_allowed_networks,
        own_ports=(settings.port,),
        own_addresses=(settings.host,),
    )
    key_hashes = load_api_keys(_secret(settings.api_keys), settings.api_keys_file)
    middleware = [Middleware(MetricsMiddleware)]
    auth: AuthMiddleware | None = None
    if key_hashes or settings.pass_client_key:  # an open gateway skips the layer altogether
        admin = _secret(settings.admin_key)
        auth_options: dict[str, Any] = {
            "key_hashes": key_hashes,
            "pass_client_key": settings.pass_client_key,
            "admin_key_hash": hash_key(admin) if admin else None,
        }
        middleware.append(Middleware(AuthMiddleware, **auth_options))
        auth = AuthMiddleware(None, **auth_options)  # the same check for the hot route
    app = GatewayApp(
        routes=[
            *model_routes(),
            *context_routes(),
            *response_routes(),
            *conversation_routes(),
            *websocket_routes(),
            *chat_routes(),
            *tool_routes(),
            *ui_routes(),
        ],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=error_handlers(),
    )
    app.hot = {"metrics": get_metrics(), "auth": auth}
    app.router.redirect_slashes = False  # a bodiless 307 is no OpenAI error: 404 instead
    return app


def app_from_environment() -> Starlette:
    """App factory for ``uvicorn --factory``: settings from ``STEPCHAIN_*`` and the config file."""
    tune_gc_for_serving()
    return create_app(load_settings())


#: Python's cyclic GC thresholds in a serving process (defaults: 700, 10, 10).
SERVING_GC_THRESHOLDS = (20_000, 20, 50)


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector run less often in a gateway process.

    Every request allocates thousands of short-lived objects, so at the default gen-0 threshold
    (700) collections run many times a second and the older generations, which hold the whole
    app, are walked often: the pauses land on whichever requests are in flight. Bench scenario 1
    at c=16: p99 ~34 ms at the defaults, ~17 ms with these, same p50. Called by ``stepchain
    serve`` (and each of its workers), never on import: tests and embedding apps keep theirs.
    """
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
