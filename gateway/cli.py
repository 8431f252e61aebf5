"""The ``stepchain`` command (click): ``serve`` (the gateway) and ``demo`` (everything, offline).

Every setting of :class:`gateway.config.Settings` is a ``serve`` flag, generated from the model:
``--<name-with-dashes> VALUE`` (switches: ``--name/--no-name``; tables: a JSON list), also the
environment variable ``STEPCHAIN_<NAME>`` and a key of the ``--config`` TOML file. A bad value
stops start-up with one line on stderr (``stepchain: <setting> from <source>: …``) and exit
status 2. The benchmarks run from the repository: ``python -m bench`` (not part of the wheel).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from .config import ENV_PREFIX, ConfigError, Settings, flag_name, load_settings

__all__ = ["main", "serve"]


_METAVARS: dict[Any, str] = {int: "INTEGER", float: "NUMBER"}
_TABLES = ("tools", "upstream_fallbacks", "mcp_servers")


def _setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per settings field, in the model's order; None = not given."""
    for name, field in reversed(Settings.model_fields.items()):
        flag = flag_name(name)
        default = field.default if field.default not in (None, ()) else None
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

        tune_gc_for_serving()
        return create_app(self.settings)


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
    common: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    if settings.workers > 1:
        from uvicorn.supervisors import Multiprocess

        from gateway.http.auth import load_api_keys

        # Checked here too: a bad api_keys_file would otherwise fail in each worker.
        keys = settings.api_keys.get_secret_value() if settings.api_keys else None
        load_api_keys(keys, settings.api_keys_file)

        _drop_secret_variables()
        config = uvicorn.Config(WorkerApp(settings), factory=True, workers=settings.workers, **common)
        sock = config.bind_socket()
        try:
            Multiprocess(config, sockets=[sock]).run()
        except KeyboardInterrupt:  # pragma: no cover - Ctrl-C in a terminal
            pass
        return
    from gateway.http.app import create_app, tune_gc_for_serving

    tune_gc_for_serving()
    uvicorn.run(create_app(settings), **common)


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
