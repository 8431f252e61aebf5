"""One typed settings object, built from CLI flags, ``STEPCHAIN_*`` variables and a TOML file.

Precedence, highest first: command-line flag, environment variable ``STEPCHAIN_<NAME>``, the
``--config`` TOML file (top-level keys named as the fields below, plus ``[[tools]]`` tables),
the default. Every value is validated once at start-up; a bad one raises :class:`ConfigError`
with one line naming the setting, its source and what is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

__all__ = ["ConfigError", "Settings", "load_settings"]


class ConfigError(ValueError):
    """A setting with a bad value; the message is one line meant for the operator."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway process is configured with. Times are seconds, sizes bytes."""

    host: str = "127.0.0.1"
    port: int = 8080
    upstream_base_url: str | None = None
    upstream_api_key: str | None = None
    db: str = "./stepchain.db"
    config: str | None = None
    max_response_iterations: int = 10
    max_response_step_depth: int = 8
    workers: int = 1
    admin_key: str | None = None
    tool_output_max_bytes: int = 50_000
    tool_output_max_lines: int = 2_000
    tool_max_response_bytes: int = 5_000_000
    max_body_bytes: int = 20_000_000
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    upstream_idle_timeout: float = 120.0
    upstream_first_byte_timeout: float = 120.0
    upstream_total_timeout: float = 1800.0
    upstream_max_retries: int = 3
    upstream_retry_max_s: float = 60.0
    # Ordered fallbacks: [{"base_url", "api_key"?, "model"?}] tried when the primary stays down.
    upstream_fallbacks: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # Tenants: comma-separated API keys (or a file of one key per line); empty = open gateway.
    api_keys: str | None = None
    api_keys_file: str | None = None
    pass_client_key: bool = False
    tool_allowed_hosts: str | None = None
    cancel_on_disconnect: bool = False
    shutdown_grace_s: float = 30.0
    # A process holds a lease on each response it runs; a response whose lease runs out (its
    # process died) is resumed by another process after at most this many seconds.
    lease_s: float = 30.0
    sqlite_synchronous: str = "NORMAL"
    log_level: str = "info"
    tools: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # Hosted tool type (web_search, file_search, …) -> the registered tool that implements it.
    hosted_tool_map: dict[str, str] = field(default_factory=dict)
    # Fernet key of the encrypted_content the gateway hands out (shared by every replica).
    encrypted_content_key: str | None = None
    # Send reasoning from input items back upstream as `reasoning_content` on assistant messages.
    reasoning_to_upstream: bool = False


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_SECRET = {"upstream_api_key", "admin_key", "api_keys", "encrypted_content_key"}
_TABLES = {"tools", "upstream_fallbacks"}


def _convert(name: str, value: Any, source: str) -> Any:
    default = _FIELDS[name].default
    kind = type(default) if default is not None and default is not dataclasses.MISSING else str
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = lowered in ("1", "true", "yes", "on")
            elif not isinstance(value, bool):
                raise TypeError(value)
        elif kind is int and not isinstance(value, bool):
            value = int(value)
        elif kind is float:
            value = float(value)
        elif kind is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} from {source}: expected {kind.__name__}, got {value!r}"
        ) from None
    return value


def _tool_map(value: Any, source: str) -> dict[str, str]:
    """``hosted_tool_map``: a TOML table, or text ``type=tool,type=tool`` / a JSON object."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError:
                value = None
        else:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            if all(len(pair) == 2 for pair in pairs):
                value = {k.strip(): v.strip() for k, v in pairs}
            else:
                value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()
    ):
        raise ConfigError(
            f"hosted_tool_map from {source}: expected a table of tool type = registered tool "
            "name (e.g. web_search=my_search_tool)"
        )
    return dict(value)


def _validate(s: Settings) -> None:
    positive = (
        "port",
        "max_response_iterations",
        "max_response_step_depth",
        "workers",
        "tool_output_max_bytes",
        "tool_output_max_lines",
        "tool_max_response_bytes",
        "max_body_bytes",
    )
    for name in positive:
        if getattr(s, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(s, name)}")
    if s.port > 65535:
        raise ConfigError(f"port: must be at most 65535, got {s.port}")
    for name in ("upstream_connect_timeout", "upstream_read_timeout", "upstream_idle_timeout",
                 "upstream_first_byte_timeout", "upstream_total_timeout", "upstream_retry_max_s",
                 "shutdown_grace_s", "lease_s"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"{name}: must be more than 0 seconds, got {getattr(s, name)}")
    if s.upstream_base_url is not None:
        parts = urlsplit(s.upstream_base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"upstream_base_url: expected an http(s) URL such as http://127.0.0.1:9000/v1, "
                f"got {s.upstream_base_url!r}"
            )
    for i, fallback in enumerate(s.upstream_fallbacks):
        url = fallback.get("base_url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"upstream_fallbacks[{i}].base_url: expected an http(s) URL, got {url!r}")
    if s.upstream_max_retries < 0:
        raise ConfigError(f"upstream_max_retries: must be 0 or more, got {s.upstream_max_retries}")
    if s.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(f"sqlite_synchronous: one of OFF NORMAL FULL EXTRA, got {s.sqlite_synchronous!r}")


def load_settings(
    cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Merge CLI values (None = not given), the environment and the config file into Settings.

    Raises ConfigError for an unknown config key, a value of the wrong type, an unreadable
    config file, or a value out of range.
    """
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    env_values: dict[str, Any] = {
        name: environ[f"STEPCHAIN_{name.upper()}"]
        for name in _FIELDS
        if f"STEPCHAIN_{name.upper()}" in environ
    }
    for name in _TABLES & env_values.keys():
        # Tables come from the environment as a JSON list of objects.
        try:
            parsed = orjson.loads(env_values[name])
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
            raise ConfigError(f"{name} from STEPCHAIN_{name.upper()}: expected a JSON list of objects")
        env_values[name] = tuple(parsed)
    config_path = cli.get("config") or env_values.get("config")
    if config_path:
        try:
            with open(config_path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {config_path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"config: unknown setting {key!r} in {config_path}")
            if name in _TABLES:
                if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                    raise ConfigError(f"{name} in {config_path}: expected [[{name}]] tables")
                values[name] = tuple(value)
                continue
            values[name] = value
            sources[name] = config_path
    for name, value in env_values.items():
        values[name] = value
        sources[name] = f"STEPCHAIN_{name.upper()}"
    for name, value in cli.items():
        if name not in _FIELDS:
            continue
        values[name] = value
        sources[name] = f"--{name.replace('_', '-')}"
    for name, value in list(values.items()):
        if name == "hosted_tool_map":
            values[name] = _tool_map(value, sources.get(name, "default"))
        elif name not in _TABLES:
            values[name] = _convert(name, value, sources.get(name, "default"))
    settings = Settings(**values)
    _validate(settings)
    return settings


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as a dict with secrets replaced by ``"***"`` (for logs)."""
    out = dataclasses.asdict(settings)
    for name in _SECRET:
        if out.get(name):
            out[name] = "***"
    out["tools"] = [t.get("name") for t in settings.tools]
    out["upstream_fallbacks"] = [f.get("base_url") for f in settings.upstream_fallbacks]
    return out
