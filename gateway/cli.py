"""The ``stepchain`` command (click): ``serve`` (the gateway), ``demo`` (everything, offline),
``trace`` (one response's step chain as a tree) and ``responses`` (recent responses), the last
two read the database directly, so they work on a stopped gateway's.

Every setting of :class:`gateway.config.Settings` is a ``serve`` flag, generated from the model:
``--<name-with-dashes> VALUE`` (switches: ``--name/--no-name``; tables: a JSON list), also the
environment variable ``STEPCHAIN_<NAME>`` and a key of the ``--config`` TOML file. A bad value
stops start-up with one line on stderr (``stepchain: <setting> from <source>: …``) and exit
status 2. The benchmarks run from the repository: ``python -m bench`` (not part of the wheel).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from .config import ENV_PREFIX, ConfigError, Settings, database_error, flag_name, load_settings

__all__ = ["main", "serve"]


_METAVARS: dict[Any, str] = {int: "INTEGER", float: "NUMBER"}
_TABLES = ("tools", "upstream_fallbacks", "mcp_servers", "prices")


def _setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per settings field, in the model's order; None = not given."""
    for name, field in reversed(Settings.model_fields.items()):
        flag = flag_name(name)
        default = field.get_default(call_default_factory=True)
        default = default if default not in (None, (), {}) else None
        text = field.description + (f" (default {default})" if default is not None else "")
        text += f" [{ENV_PREFIX}{name.upper()}]"
        if field.annotation is bool:
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)
        else:
            metavar = _METAVARS.get(field.annotation, "JSON" if name in _TABLES else "TEXT")
            option = click.option(flag, name, default=None, metavar=metavar, help=text)
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """An OpenAI Responses API gateway over any Chat Completions upstream."""


@cli.command("serve")
@_setting_options
def serve_command(**flags: Any) -> None:
    """Run the gateway."""
    serve(load_settings(flags))


@cli.command("demo")
def demo_command() -> int:
    """Run the gateway against a built-in scripted model, offline."""
    from .demo import run_demo

    return run_demo()


def _db_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db", default=None, metavar="PATH",
        help=f"the gateway's SQLite database (default: {ENV_PREFIX}DB, else ./stepchain.db)",
    )(command)


class _StoreUnreadable(click.ClickException):
    """A database that cannot be opened: one line on stderr, exit status 1."""

    def show(self, file: Any = None) -> None:
        print(f"stepchain: {self.message}", file=sys.stderr)


async def _read_store(db: str | None, read: Callable[[Any], Any]) -> Any:
    """Open the gateway's database (never creating one), run ``read(store)``, close it."""
    from pathlib import Path

    from store import open_store, redact_url

    path = db or os.environ.get(ENV_PREFIX + "DB") or "./stepchain.db"
    shown = redact_url(path)
    if "://" not in path and not Path(path).is_file():
        raise _StoreUnreadable(f"cannot read the database {shown}: no such file")
    try:
        store = open_store(path)
        await store.open()
    except Exception as exc:  # not SQLite, locked, unreachable: one line, not a traceback
        raise _StoreUnreadable(f"cannot read the database {shown}: {exc}") from None
    try:
        return await read(store)
    finally:
        await store.close()


def _console() -> Any:
    """rich's console; piped output is plain text, wide enough for whole ids."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 160))
    return console


@cli.command("trace")
@click.argument("response_id")
@_db_option
def trace_command(response_id: str, db: str | None) -> int:
    """Print a response's step chain as a tree: timings, states, tokens, cost (from the store)."""
    import asyncio

    from gateway.observe.terminal import trace_tree

    async def read(store: Any) -> Any:
        record = await store.get_response(response_id)
        return None if record is None else (record, await store.list_steps(response_id))

    found = asyncio.run(_read_store(db, read))
    if found is None:
        raise _StoreUnreadable(f"no response with id {response_id!r} in the database")
    _console().print(trace_tree(*found))
    return 0


@cli.command("responses")
@_db_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--status", default=None, help="only responses with this status")
@click.option("--model", default=None, help="only responses of this model")
def responses_command(db: str | None, limit: int, status: str | None, model: str | None) -> int:
    """List recent responses, newest first, every tenant's (from the store)."""
    import asyncio

    from gateway.observe.terminal import responses_table

    async def read(store: Any) -> Any:
        records, _more = await store.list_responses_page(
            all_tenants=True, status=status, model=model, limit=limit
        )
        return [(r, await store.list_steps(r.id)) for r in records]

    rows = asyncio.run(_read_store(db, read))
    with_tenant = any(r.tenant for r, _ in rows)
    console = _console()
    if not rows:
        console.print("no responses")
    else:
        console.print(responses_table(rows, with_tenant=with_tenant))
    return 0


@cli.command(
    "bench", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def bench_command(ctx: click.Context) -> int:
    """Run the benchmarks from a checkout: ``python -m bench`` (bench/ is not installed)."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "bench", *ctx.args])


@dataclass(frozen=True)
class WorkerApp:
    """App factory for worker processes. uvicorn pickles it to each worker through the spawn
    pipe, so the settings (secrets included) reach workers without environment variables or
    files."""

    settings: Settings

    def __call__(self) -> Any:
        from gateway.http.app import create_app, tune_gc_for_serving

        _configure_logging(self.settings)
        tune_gc_for_serving()
        return create_app(self.settings)


def check_database(settings: Settings) -> None:
    """Open and close the store ``settings.db`` names (applying migrations) before serving.

    Raises ConfigError with one line naming the database (never its password) when it cannot
    be reached, authenticated or opened, or its URL scheme is unknown.
    """
    import asyncio

    from store import open_store
    from store.types import StoreError

    async def probe() -> None:
        store = open_store(settings.db, synchronous=settings.sqlite_synchronous)
        await store.open()
        await store.close()

    try:
        asyncio.run(probe())
    except (StoreError, ValueError, OSError) as exc:
        raise database_error(settings.db, exc) from None


def _configure_logging(settings: Settings) -> dict[str, Any]:
    """JSON log lines for ``--log-format json`` (uvicorn's own logging config is then skipped);
    for ``text``, uvicorn's config plus a root handler for every other logger."""
    from gateway.observe.logs import configure_logging, configure_text_logging

    if settings.log_format != "json":
        configure_text_logging(settings.log_level)
        return {}
    configure_logging("json", settings.log_level)
    return {"log_config": None}


def _drop_secret_variables() -> None:
    """Remove ``STEPCHAIN_*`` secrets from this process's environment (children inherit it)."""
    for name, field in Settings.model_fields.items():
        if "SecretStr" in str(field.annotation):
            os.environ.pop(ENV_PREFIX + name.upper(), None)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) only listens on this machine."""
    import ipaddress

    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def serve(settings: Settings) -> None:
    """Run the gateway under uvicorn (uvloop and httptools where installed).

    Raises ConfigError when ``upstream_base_url`` is missing, or when ``host`` is not a loopback
    address while neither ``api_keys`` (``api_keys_file``) nor ``admin_key`` is set (unless
    ``insecure_open``): an open gateway on a network interface serves anyone who reaches it.
    """
    import uvicorn

    if settings.upstream_base_url is None:
        raise ConfigError(
            "upstream_base_url: required (--upstream-base-url or STEPCHAIN_UPSTREAM_BASE_URL); "
            "try `stepchain demo` to run without one"
        )
    keyed = settings.api_keys or settings.api_keys_file or settings.admin_key
    if not keyed and not settings.insecure_open and not _is_loopback(settings.host):
        raise ConfigError(
            f"host: {settings.host} is reachable from the network but no keys are set; set "
            "STEPCHAIN_API_KEYS (or --api-keys-file) and STEPCHAIN_ADMIN_KEY, or pass "
            "--insecure-open to serve it open"
        )
    check_database(settings)
    common: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
        # WebSocket mode takes what HTTP takes: a message up to max_body_bytes gets an answer
        # (an error event past the limit), a frame much larger is closed with 1009.
        ws_max_size=max(16 * 1024 * 1024, settings.max_body_bytes + 1024 * 1024),
        **_configure_logging(settings),
    )
    if settings.workers > 1:
        from uvicorn.supervisors import Multiprocess

        from gateway.http.auth import load_api_keys

        # Checked here too: a bad api_keys_file would otherwise fail in each worker.
        keys = settings.api_keys.get_secret_value() if settings.api_keys else None
        load_api_keys(keys, settings.api_keys_file)

        _drop_secret_variables()
        # Prometheus multiprocess mode: every worker writes its values under one directory and
        # /metrics (served by any worker) sums them. Set before a worker imports the client.
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            import tempfile

            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="stepchain-metrics-")
        config = uvicorn.Config(WorkerApp(settings), factory=True, workers=settings.workers, **common)
        sock = config.bind_socket()
        try:
            Multiprocess(config, sockets=[sock]).run()
        except KeyboardInterrupt:  # pragma: no cover - Ctrl-C in a terminal
            pass
        return
    from gateway.http.app import create_app, tune_gc_for_serving

    tune_gc_for_serving()
    app = create_app(settings)
    quiet = _QuietFailedStartup(app)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addFilter(quiet)
    try:
        uvicorn.run(app, **common)
    except SystemExit:  # uvicorn's start-up failure (status 3)
        failure = app.startup_failure
        if failure is not None:
            raise failure from None  # one line, status 2, as check_database
        raise
    finally:
        uvicorn_errors.removeFilter(quiet)


class _QuietFailedStartup(logging.Filter):
    """Drops uvicorn's report of a start-up the database failed (the traceback, then
    "Application startup failed"): :func:`serve` tells it in one line instead."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return self.app.startup_failure is None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad setting or usage)."""
    try:
        status = cli.main(args=list(argv) if argv is not None else None, prog_name="stepchain",
                          standalone_mode=False)
    except ConfigError as exc:
        print(f"stepchain: {exc}", file=sys.stderr)
        return 2
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return status if isinstance(status, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
