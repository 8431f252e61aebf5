"""One typed settings object (pydantic-settings), built from CLI flags, ``STEPCHAIN_*`` variables
and a TOML file.

Precedence, highest first: the ``stepchain serve`` flag ``--<name-with-dashes>``, the environment
variable ``STEPCHAIN_<NAME>``, the key ``<name>`` of the ``--config`` TOML file (plus its
``[[tools]]`` and ``[[upstream_fallbacks]]`` tables), the default. Flags and variables are text
and are parsed once (``"8080"`` → 8080, ``"true"``/``"false"`` for switches, a JSON list for the
two tables); the file's values are typed and must have the right type already (``port = 8080.9``
and ``workers = true`` are errors). Every value is validated once, at start-up: a bad one raises
:class:`ConfigError` with one line naming the setting, where it came from and what is wrong.

Keys (``upstream_api_key``, ``admin_key``, ``api_keys``, each fallback's ``api_key``) are
``SecretStr``: no repr, log line or error message shows them; ``.get_secret_value()`` where used.

``Settings(...)`` takes only the values it is given (tests and embedding); :func:`load_settings`
reads the flags, the environment and the file. ``python -m gateway.config --readme-table``
rewrites the settings table in README.md from the fields below.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

from executors.registry import ToolDefinitionError, validate_tool_definition
from gateway.errors import ConfigError

__all__ = [
    "ConfigError",
    "ModelPrice",
    "Settings",
    "ToolSetting",
    "UpstreamFallback",
    "database_error",
    "load_settings",
    "readme_table",
]

ENV_PREFIX = "STEPCHAIN_"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _check_http_url(value: str | None) -> str | None:
    if value is None:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL such as http://127.0.0.1:9000/v1, got {value!r}")
    return value


class UpstreamFallback(BaseModel):
    """One ``[[upstream_fallbacks]]`` table: another Chat Completions server, tried in order when
    the primary stays down."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    base_url: str = Field(description="its Chat Completions base URL (`…/v1`)")
    api_key: SecretStr | None = Field(None, description="sent as `Authorization: Bearer`")
    model: str | None = Field(None, description="model name used instead of the request's")
    label: str | None = Field(None, description="name recorded on steps (default: base_url)")
    pass_client_key: bool = Field(
        False, description="with the setting pass_client_key, send the client's key here too"
    )

    _url = field_validator("base_url")(_check_http_url)


class ToolSetting(BaseModel):
    """One ``[[tools]]`` table: a tool definition as ``POST /v1/tools`` takes it
    (:mod:`executors.registry`), registered (or replaced) at start-up."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    kind: Literal["http", "agent", "mcp"] = "http"
    attach: Literal["always", "on_request"] | None = None
    url: str | None = None
    # Literal header values are secrets (the admin API shows them as "***"): kept out of reprs.
    headers: dict[str, str] | None = Field(None, repr=False)
    timeout_s: float | None = None
    idempotent: bool | None = None
    allow_private: bool | None = None
    require_approval: Any = None
    server_url: str | None = None
    allowed_tools: Any = None
    model: str | None = None
    instructions: str | None = None
    tools: list[str] | None = None

    @model_validator(mode="after")
    def _valid_definition(self) -> ToolSetting:
        try:
            validate_tool_definition(self.definition(), env_prefix=None)
        except ToolDefinitionError as exc:
            raise ValueError(exc.message) from None
        return self

    def definition(self) -> dict[str, Any]:
        """The registration body (fields that were given)."""
        return self.model_dump(exclude_none=True)


class MCPServerSetting(BaseModel):
    """One ``[[mcp_servers]]`` table: an MCP server registered at start-up as a ``kind: "mcp"``
    tool source named ``server_label`` (see ``executors/registry.py``)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    server_label: str
    server_url: str
    server_description: str | None = None
    headers: dict[str, str] | None = Field(None, repr=False)
    allowed_tools: Any = None
    require_approval: Any = None
    attach: Literal["always", "on_request"] | None = None
    timeout_s: float | None = None
    allow_private: bool | None = None

    @model_validator(mode="after")
    def _valid_definition(self) -> MCPServerSetting:
        try:
            validate_tool_definition(self.definition(), env_prefix=None)
        except ToolDefinitionError as exc:
            raise ValueError(exc.message) from None
        return self

    def definition(self) -> dict[str, Any]:
        """The registration body."""
        body = self.model_dump(exclude_none=True)
        body["name"] = body.pop("server_label")
        if "server_description" in body:
            body["description"] = body.pop("server_description")
        body["kind"] = "mcp"
        return body


class ModelPrice(BaseModel):
    """One ``[prices."model-name"]`` table: USD per million tokens (``cached_input`` defaults
    to ``input``, ``reasoning`` to ``output``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)
    reasoning: float | None = Field(None, ge=0)


class Settings(BaseSettings):
    """Everything the gateway process is configured with. Times are seconds, sizes bytes."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, strict=True, frozen=True, extra="forbid", validate_default=True
    )

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    upstream_base_url: str | None = Field(
        None, description="the Chat Completions base URL (`…/v1`); required by `serve`"
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="sent upstream as `Authorization: Bearer`"
    )
    db: str = Field(
        "./stepchain.db",
        description="the store: an SQLite file path or `sqlite:///path` (WAL mode), or `postgresql://…` (replicas share it)",
    )
    config: str | None = Field(
        None,
        description="TOML file with these settings, `[[tools]]` and `[[upstream_fallbacks]]`",
    )
    max_response_iterations: int = Field(
        10, ge=1, description="transitions that append steps, per loop level"
    )
    max_response_step_depth: int = Field(8, ge=1, description="agent-tool recursion depth")
    max_response_steps: int = Field(
        200, ge=1, description="steps one response may record, all agent scopes counted"
    )
    workers: int = Field(1, ge=1, description="worker processes (they share the database)")
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for `/v1/tools` (required when `api_keys` is set)"
    )
    api_keys: SecretStr | None = Field(
        None, description="tenant API keys, comma-separated; none (and no file) = open gateway"
    )
    api_keys_file: str | None = Field(None, description="tenant API keys, one per line")
    pass_client_key: bool = Field(
        False, description="send the client's own key upstream instead of `upstream_api_key`"
    )
    insecure_open: bool = Field(
        False,
        description="serve on a non-loopback `host` with neither `api_keys` nor `admin_key` "
        "(refused otherwise)",
    )
    upstream_fallbacks: tuple[UpstreamFallback, ...] = Field(
        (),
        strict=False,
        description="`[[upstream_fallbacks]]` `{base_url, api_key?, model?, label?, "
        "pass_client_key?}`, tried in "
        "order when the primary stays down (flag and variable: a JSON list)",
    )
    upstream_max_retries: int = Field(3, ge=0, description="retries per upstream")
    upstream_retry_max_s: float = Field(60.0, gt=0, description="time budget of those retries")
    upstream_connect_timeout: float = Field(10.0, gt=0, description="model call: TCP/TLS connect")
    upstream_first_byte_timeout: float = Field(
        120.0, gt=0, description="model call: until the first byte of the answer"
    )
    upstream_idle_timeout: float = Field(
        120.0, gt=0, description="model call: longest pause between streamed chunks"
    )
    upstream_read_timeout: float = Field(
        600.0, gt=0, description="model call: longest wait for one read (non-streamed bodies)"
    )
    upstream_total_timeout: float = Field(1800.0, gt=0, description="model call: all of it")
    tool_output_max_bytes: int = Field(
        50_000, ge=1, description="tool output shown to the model (the store keeps it whole)"
    )
    tool_output_max_lines: int = Field(2_000, ge=1, description="the same, in lines")
    tool_max_response_bytes: int = Field(
        5_000_000, ge=1, description="largest tool response body read"
    )
    tool_allowed_hosts: str | None = Field(
        None,
        description="comma-separated hosts tools (HTTP, MCP) may call (`*.example.com` allowed); "
        "listed hosts may be private",
    )
    tool_allowed_networks: str | None = Field(
        None,
        description="comma-separated CIDRs tools may reach although private "
        "(`127.0.0.0/8,10.0.0.0/8`)",
    )
    tool_env_prefix: str = Field(
        "STEPCHAIN_TOOL_",
        min_length=1,
        description="tool headers `env:NAME` may only read variables starting with this",
    )
    live_logs_max_bytes: int = Field(
        256_000_000, ge=1, description="streamed responses' event logs cached in memory, in all (the store has them all)"
    )
    stream_events_stored_first: bool = Field(
        True,
        description="a streamed event reaches clients only once it is in the store, so a stream "
        "re-attached anywhere after a crash is exact (off: sent first, stored within ~40 ms)",
    )
    stream_flush_s: float = Field(
        0.04,
        ge=0,
        description="streamed events are stored (and, stored-first, sent) in writes at most this "
        "many seconds apart after a model call's first delta, which is stored at once",
    )
    live_log_max_bytes: int = Field(
        16_000_000, ge=1, description="one response's event log cached in memory; older events are read from the store"
    )
    history_cache_max_bytes: int = Field(
        256_000_000, ge=1, description="conversation histories cached for previous_response_id"
    )
    retention_days: float | None = Field(
        None, gt=0, description="delete finished responses (steps, events) older than this; "
        "none = keep"
    )
    mcp_timeout_s: float = Field(
        30.0, gt=0, description="client-supplied MCP servers: time for one listing or call"
    )
    max_body_bytes: int = Field(20_000_000, ge=1, description="largest request body")
    model_context_windows: dict[str, int] = Field(
        {},
        description="context window in tokens by model name (`\"*\"`: any other), for "
        "`truncation: \"auto\"` (a TOML table; flag and variable: a JSON object)",
    )
    encrypted_content_key: SecretStr | None = Field(
        None,
        description="Fernet key sealing `encrypted_content` (compaction and reasoning items); "
        "the same on every replica. Default: a random key kept in `<db>.key`",
    )
    cancel_on_disconnect: bool = Field(
        False, description="cancel a streamed response when its client goes away"
    )
    shutdown_grace_s: float = Field(
        30.0, gt=0, description="SIGTERM: time in-flight responses get to finish"
    )
    lease_s: float = Field(
        30.0,
        gt=0,
        description="lease of a running response: a hung process's responses are taken over "
        "after this time (a dead process's within about a second)",
    )
    sqlite_synchronous: str = Field(
        "NORMAL",
        description="SQLite `PRAGMA synchronous`: OFF, NORMAL (WAL: a power cut may lose the "
        "last commits, never corrupts), FULL, EXTRA",
    )
    log_level: str = Field(
        "info", description="uvicorn log level: critical, error, warning, info, debug, trace"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line (response, step, retry and "
        "error events with ids, tenant and timings; never a secret)"
    )
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict,
        strict=False,
        description="`[prices.\"model\"]` `{input, output, cached_input?, reasoning?}` in USD "
        "per million tokens (a name ending in `*` is a prefix); a model without one has an "
        "unknown cost, never 0 (flag and variable: a JSON object)",
    )
    tools: tuple[ToolSetting, ...] = Field(
        (),
        strict=False,
        description="`[[tools]]` tool definitions as `POST /v1/tools` takes them, registered at "
        "start-up (flag and variable: a JSON list)",
    )
    mcp_servers: tuple[MCPServerSetting, ...] = Field(
        (),
        strict=False,
        description="`[[mcp_servers]]` MCP servers `{server_label, server_url, headers?, "
        "allowed_tools?, require_approval?, attach?, timeout_s?, allow_private?}` registered at "
        "start-up (flag and variable: a JSON list)",
    )
    hosted_tool_map: dict[str, str] = Field(
        {},
        strict=False,
        description="hosted tool types a registered tool runs, e.g. `{web_search = "
        "\"my_search_tool\"}` (flag and variable: a JSON object); other hosted types are left "
        "out of what the model is offered",
    )
    reasoning_to_upstream: Literal["off", "encrypted", "all"] = Field(
        "encrypted",
        description="reasoning items of the input sent back upstream as `reasoning_content` on "
        "the next assistant message: `encrypted` (those whose `encrypted_content` the client "
        "round-trips, e.g. Codex CLI), `all`, or `off` (for upstreams that refuse the field)",
    )

    @classmethod
    def settings_customise_sources(  # type: ignore[no-untyped-def]
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        """``Settings(...)`` uses only its arguments; :func:`load_settings` adds the rest."""
        return (init_settings,)

    _urls = field_validator("upstream_base_url")(_check_http_url)

    @field_validator("tool_allowed_networks")
    @classmethod
    def _networks(cls, value: str | None) -> str | None:
        for net in (value or "").split(","):
            if net.strip():
                try:
                    ipaddress.ip_network(net.strip(), strict=False)
                except ValueError:
                    raise ValueError(f"{net.strip()!r} is not a network such as 10.0.0.0/8") from None
        return value

    @field_validator("sqlite_synchronous")
    @classmethod
    def _synchronous(cls, value: str) -> str:
        if value.upper() not in _SQLITE_SYNCHRONOUS:
            raise ValueError(f"one of {' '.join(_SQLITE_SYNCHRONOUS)}, got {value!r}")
        return value.upper()

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in _LOG_LEVELS:
            raise ValueError(f"one of {' '.join(_LOG_LEVELS)}, got {value!r}")
        return value.lower()


_SECRET = frozenset(
    name for name, f in Settings.model_fields.items() if "SecretStr" in str(f.annotation)
)
_TABLES = frozenset({"tools", "upstream_fallbacks", "mcp_servers"})
_JSON = _TABLES | {"hosted_tool_map", "model_context_windows", "prices"}  # flags, variables: JSON


def flag_name(name: str) -> str:
    """``upstream_base_url`` → ``--upstream-base-url``."""
    return "--" + name.replace("_", "-")


@functools.cache
def _adapter(name: str) -> TypeAdapter[Any]:
    return TypeAdapter(Settings.model_fields[name].annotation)


def _parse_text(name: str, value: Any, source: str) -> Any:
    """A flag's or variable's text as the field's type (tables: a JSON list)."""
    if not isinstance(value, str):  # a switch flag (already a bool), or a JSON-decoded table
        return value
    try:
        if name in _JSON:
            return _adapter(name).validate_json(value)
        return _adapter(name).validate_strings(value)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, {name: source}, prefix=(name,))) from None


def _one_line(exc: ValidationError, sources: Mapping[str, str], prefix: tuple[Any, ...] = ()) -> str:
    """The first error of ``exc`` as ``name[0].field from SOURCE: what is wrong, got VALUE``."""
    error = exc.errors(include_url=False)[0]
    loc = (*prefix, *error["loc"])
    name = str(loc[0]) if loc else "settings"
    where = name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown setting"
    secret = name in _SECRET or any(p in ("api_key", "headers") for p in loc[1:])
    got = ""
    if not secret and error["type"] not in ("extra_forbidden", "value_error", "missing"):
        got = f", got {error['input']!r}"
    return f"{where} from {sources.get(name, 'default')}: {message}{got}"


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in Settings.model_fields:
            raise ConfigError(f"config: unknown setting {key!r} in {path}")
        values[name] = value
    return values


def load_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """Merge flag values (None = not given), ``STEPCHAIN_*`` variables and the config file.

    Raises ConfigError (one line naming the setting and its source) for an unknown config key,
    a value of the wrong type or out of range, or an unreadable config file.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    try:
        env = EnvSettingsSource(Settings, env_prefix=ENV_PREFIX, case_sensitive=False)()
    except SettingsError as exc:  # a table variable that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = field.group(1) if field else "*"
        raise ConfigError(f"{name} from {ENV_PREFIX}{name.upper()}: expected a JSON list") from None
    given = {k: v for k, v in (flags or {}).items() if v is not None and k in Settings.model_fields}
    config_path = given.get("config") or env.get("config")
    if config_path:
        for name, value in _read_file(str(config_path)).items():
            values[name], sources[name] = value, str(config_path)
    for name, value in env.items():
        source = ENV_PREFIX + name.upper()
        values[name], sources[name] = _parse_text(name, value, source), source
    for name, value in given.items():
        source = flag_name(name)
        values[name], sources[name] = _parse_text(name, value, source), source
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, sources)) from None


def database_error(db: str, exc: BaseException) -> ConfigError:
    """The one line for a store ``db`` that cannot be opened (or fails the start-up's first
    reads) because of ``exc``: ``db: cannot open URL: reason``, with the URL's password (in
    its user part or a ``password=`` parameter) shown as ``***`` wherever it appears."""
    from store import redact_url

    reason = " ".join(str(exc).split()) or type(exc).__name__
    line = f"db: cannot open {redact_url(db)}: {reason}"
    for password in _passwords(db):
        line = line.replace(password, "***")
    return ConfigError(line)


def _passwords(url: str) -> list[str]:
    """The password of a database URL as it may appear (raw and decoded), longest first."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    found += [value for key, value in parse_qsl(parts.query) if key.lower() == "password"]
    found += [unquote(p) for p in found]
    return sorted({p for p in found if p}, key=len, reverse=True)


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as a dict for logs: secrets ``"***"``, tables by name or URL."""
    out = settings.model_dump(exclude=set(_TABLES))
    for name in _SECRET:
        if out.get(name) is not None:
            out[name] = "***"
    out["tools"] = [t.name for t in settings.tools]
    out["mcp_servers"] = [m.server_label for m in settings.mcp_servers]
    out["upstream_fallbacks"] = [f.base_url for f in settings.upstream_fallbacks]
    return out


# -- the README's settings table -------------------------------------------------------------

README_BEGIN = "<!-- settings table: generated by `python -m gateway.config --readme-table` -->"
README_END = "<!-- end of settings table -->"


def _default_text(name: str) -> str:
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    if default is None or default == () or default == {}:
        return "—"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, str):
        return f"`{default}`"
    return str(default)


def readme_table() -> str:
    """The Markdown table of every setting: name (flag, variable), default, meaning."""
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        rows.append(f"| `{name}` | {_default_text(name)} | {f.description} |")
    return "\n".join(rows)


def rewrite_readme(path: Path) -> bool:
    """Replace the table between the markers in ``path``; True when the file changed."""
    text = path.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r"\n.*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: the settings table markers are missing")
    new = pattern.sub(lambda _m: f"{README_BEGIN}\n{readme_table()}\n{README_END}", text)
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m gateway.config --readme-table [README.md]
    args = sys.argv[1:]
    if args[:1] != ["--readme-table"]:
        raise SystemExit("usage: python -m gateway.config --readme-table [README.md]")
    target = Path(args[1]) if len(args) > 1 else Path(__file__).resolve().parents[1] / "README.md"
    print(f"{target}: {'rewritten' if rewrite_readme(target) else 'up to date'}")
