"""The ``stepchain`` command: ``serve`` (the gateway), ``demo`` (everything, offline), ``bench``.

Every ``serve`` option is also the environment variable ``STEPCHAIN_<NAME>`` and a key of the
``--config`` TOML file; a bad value stops start-up with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import orjson

from .config import ConfigError, Settings, load_settings

_SERVE_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("host", str, "interface to listen on (default 127.0.0.1)"),
    ("port", int, "port to listen on (default 8080)"),
    ("upstream-base-url", str, "Chat Completions base URL, e.g. http://127.0.0.1:9000/v1"),
    ("upstream-api-key", str, "API key sent to the upstream as a Bearer token"),
    ("db", str, "database: an SQLite path or sqlite:///path (default ./stepchain.db), or postgresql://…"),
    ("config", str, "TOML file with the same settings and [[tools]]"),
    ("max-response-iterations", int, "cap on transitions per loop level (default 10)"),
    ("max-response-step-depth", int, "cap on agent-tool recursion (default 8)"),
    ("workers", int, "worker processes (default 1)"),
    ("admin-key", str, "Bearer key required by the /v1/tools admin API"),
    ("log-level", str, "uvicorn log level (default info)"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepchain",
        description="An OpenAI Responses API gateway over any Chat Completions upstream.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    for name, kind, text in _SERVE_OPTIONS:
        serve.add_argument(f"--{name}", type=str, default=None, help=f"{text} [{kind.__name__}]")
    commands.add_parser("demo", help="run the gateway against a built-in scripted model, offline")
    commands.add_parser("bench", help="run the benchmarks (same as python -m bench; see bench/README.md)")
    return parser


def serve(settings: Settings) -> None:
    """Run the gateway under uvicorn (uvloop and httptools where installed)."""
    import uvicorn

    if settings.upstream_base_url is None:
        raise ConfigError(
            "upstream_base_url: required (--upstream-base-url or STEPCHAIN_UPSTREAM_BASE_URL); "
            "try `stepchain demo` to run without one"
        )
    check_database(settings)
    common = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    if settings.workers > 1:
        # Worker processes build their own app from the environment.
        for name, value in _as_environment(settings).items():
            os.environ[name] = value
        uvicorn.run("gateway.http.app:app_from_environment", factory=True, workers=settings.workers, **common)
        return
    from gateway.http.app import create_app, tune_gc_for_serving

    tune_gc_for_serving()
    uvicorn.run(create_app(settings), **common)


def check_database(settings: Settings) -> None:
    """Open and close the store ``settings.db`` names (applying migrations) before serving.

    Raises ConfigError with one line naming the database (never its password) when it cannot
    be reached, authenticated or opened, or its URL scheme is unknown.
    """
    import asyncio

    from gateway.http.app import store_for
    from store import redact_url
    from store.types import StoreError

    async def probe() -> None:
        store = store_for(settings)
        await store.open()
        await store.close()

    try:
        asyncio.run(probe())
    except (StoreError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"db: cannot open {redact_url(settings.db)}: {reason}") from None


def _as_environment(settings: Settings) -> dict[str, str]:
    """The settings as STEPCHAIN_* variables, read back by each worker's load_settings."""
    out = {}
    for name in Settings.__dataclass_fields__:
        value = getattr(settings, name)
        if value is None or name == "config":  # the file was read already: pass its values on
            continue
        if isinstance(value, tuple):  # [[tools]], [[upstream_fallbacks]]: a JSON list
            text = orjson.dumps(list(value)).decode()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        out[f"STEPCHAIN_{name.upper()}"] = text
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # bench/ lives in the checkout, not in the installed package: run it from there.
        import subprocess

        return subprocess.call([sys.executable, "-m", "bench", *argv[1:]])
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            cli = {k: v for k, v in vars(args).items() if k != "command"}
            serve(load_settings(cli))
        elif args.command == "demo":
            from .demo import run_demo

            return run_demo()
    except ConfigError as exc:
        print(f"stepchain: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
