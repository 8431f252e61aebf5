"""Run an ASGI app under a real uvicorn server in a background thread, on loopback.

Used by ``stepchain demo``, the benchmarks and the tests: each needs a scripted upstream, tool
servers and the gateway itself listening on 127.0.0.1 ports chosen by the OS.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

__all__ = ["serve_app"]


@contextlib.contextmanager
def serve_app(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **config: Any
) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields its base URL ``http://127.0.0.1:<port>``.

    The app's lifespan runs (start-up before the URL is yielded, shutdown on exit). Raises
    RuntimeError if the server does not start within 30 seconds.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", **config)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the server stopped during start-up (see its log)")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()
            raise RuntimeError("the server did not start within 30 s")
        time.sleep(0.005)
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
