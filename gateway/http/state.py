"""What the HTTP and WebSocket handlers share: one typed object, ``app.state.gateway``.

The app's lifespan builds it (:func:`gateway.http.app.create_app`); handlers read it with
:func:`gateway_state`. Everything a handler does with a response goes through ``service``
(:class:`gateway.engine.service.ResponsesService`): handlers parse, call one service method,
render.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from executors.egress import EgressPolicy
    from executors.registry import ToolRegistry
    from executors.resilience import ResilientUpstream
    from gateway.config import Settings
    from gateway.engine.live import LiveStreams
    from gateway.engine.recovery import Recovery
    from gateway.engine.service import ResponsesService
    from gateway.engine.tokens import TokenCounter

__all__ = ["GatewayState", "gateway_state"]


@dataclass(slots=True, eq=False)
class GatewayState:
    """The process's shared objects, alive from start-up to shutdown."""

    settings: Settings
    service: ResponsesService
    registry: ToolRegistry
    upstream: ResilientUpstream
    live: LiveStreams
    token_counter: TokenCounter
    recovery: Recovery
    egress: EgressPolicy
    # Upstream base URL -> the name tenants see instead (GET /v1/responses/{id}/steps).
    upstream_names: dict[str, str] = field(default_factory=dict)


def gateway_state(connection: HTTPConnection) -> GatewayState:
    """The state of the app serving ``connection`` (a Request or a WebSocket)."""
    return connection.app.state.gateway
