"""Peer gateways run side by side with stepchain, each from PyPI in a venv of its own: the LiteLLM
proxy and vLLM's ``agentic-api`` (a Rust gateway with a server-side loop and a SQLite store).

A peer is never a project dependency and never enters the project's venv: it is installed once
into ``<cache>/stepchain-bench/<name>-<version>/`` (``$XDG_CACHE_HOME`` or ``~/.cache``) and
reused by later runs.

agentic-api forwards ``/v1/responses`` to an upstream that speaks the Responses API (vLLM), so it
is pointed at the bench upstream's ``/v1/responses`` mode (:mod:`bench.responses_upstream`, the
same scripted model); it stores every response in a SQLite file of its own, as stepchain does.

LiteLLM: Its config points the model ``scripted-model`` at the same scripted
upstream as stepchain, with ``use_chat_completions_api: true`` so ``POST /v1/responses`` goes
through LiteLLM's Responses → Chat Completions bridge (as stepchain's does), not to an upstream
``/responses`` that the scripted upstream does not have. Start-up stays offline: the bundled model
cost map, no telemetry, no database, access log off (as stepchain's is).

Anything that keeps the peer from running raises :class:`PeerUnavailable` with a one-line reason;
the harness reports ``peer unavailable: <reason>`` and carries on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from .processes import ServerError, ServerProcess, free_port, start_server

__all__ = [
    "AGENTIC_SPEC",
    "LITELLM_SPEC",
    "PeerUnavailable",
    "install_agentic",
    "install_litellm",
    "start_agentic",
    "start_litellm",
]

# A pinned release: newer ones require a certifi release that PyPI does not have yet, and a
# pin keeps runs comparable (and away from unvetted releases of a package that once shipped a
# compromised version).
LITELLM_VERSION = "1.102.4"
LITELLM_SPEC = f"litellm[proxy]=={LITELLM_VERSION}"
AGENTIC_VERSION = "0.9.0"
AGENTIC_SPEC = f"agentic-api=={AGENTIC_VERSION}"


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; ``str(exc)`` is the reason, one line."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stepchain-bench"


def install_litellm(spec: str = LITELLM_SPEC, *, log: Path | None = None) -> Path:
    """The ``litellm`` executable of a venv holding ``spec``; creates the venv on first use.

    Raises PeerUnavailable if the venv cannot be made or pip fails (no network, no wheel).
    Takes about a minute the first time.
    """
    return _install(spec, "litellm", log=log)


def install_agentic(spec: str = AGENTIC_SPEC, *, log: Path | None = None) -> Path:
    """The ``agentic-server`` executable of a venv holding ``spec`` (a 66 MB wheel with the Rust
    binaries); created on first use. Raises PeerUnavailable as :func:`install_litellm`."""
    return _install(spec, "agentic-server", log=log)


def _install(spec: str, executable: str, *, log: Path | None) -> Path:
    name = spec.replace("[proxy]", "").replace("==", "-").replace("/", "_").replace(" ", "")
    venv = cache_dir() / name
    exe = venv / "bin" / executable
    marker = venv / ".installed"
    if exe.exists() and marker.exists():
        return exe
    venv.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        print(f"bench: installing {spec} into {venv} (first run only) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out,
            timeout=300,
        )  # fmt: skip
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", spec],
            check=True, stdout=out, stderr=out, timeout=900,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise PeerUnavailable(f"pip could not install {spec}: {exc}") from None
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if not exe.exists():
        raise PeerUnavailable(f"{spec} installed no {executable} executable")
    marker.write_text(spec)
    return exe


_CONFIG = """\
model_list:
  - model_name: scripted-model
    litellm_params:
      model: openai/scripted-model
      api_base: {api_base}
      api_key: sk-bench
      use_chat_completions_api: true
litellm_settings:
  telemetry: false
  drop_params: true
"""

# uvicorn's dictConfig with the access log silenced: stepchain runs with access_log=False too.
_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    },
}

# Keep LiteLLM off the network and quiet at start-up and per request.
_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "DISABLE_ADMIN_UI": "True",
    "NO_DOCS": "True",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def start_litellm(exe: Path, upstream_base_url: str, work_dir: Path) -> ServerProcess:
    """Run the LiteLLM proxy (one worker) on a free loopback port against the upstream.

    Raises PeerUnavailable if it does not come up within 120 s.
    """
    config = work_dir / "litellm.yaml"
    config.write_text(_CONFIG.format(api_base=upstream_base_url))
    log_config = work_dir / "litellm-log.json"
    log_config.write_bytes(orjson.dumps(_LOG_CONFIG))
    port = free_port()
    argv = [
        str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--num_workers", "1", "--log_config", str(log_config),
    ]  # fmt: skip
    env = {k: v for k, v in _ENV.items()}
    # Never the project's venv: drop the project root from the peer's import path.
    env["PYTHONPATH"] = ""
    env.pop("VIRTUAL_ENV", None)
    try:
        return start_server(
            "litellm", argv, port=port, log_dir=work_dir, ready_path="/health/liveliness",
            env=env, timeout_s=120,
        )  # fmt: skip
    except ServerError as exc:
        last = str(exc).strip().splitlines()
        raise PeerUnavailable(f"litellm did not start: {last[-1] if last else exc}") from None


def start_agentic(exe: Path, upstream_root_url: str, work_dir: Path) -> ServerProcess:
    """Run agentic-api's gateway on a free loopback port against ``upstream_root_url`` (the
    upstream's root, without ``/v1``), with a fresh SQLite store in ``work_dir``.

    Raises PeerUnavailable if it does not come up within 120 s.
    """
    port = free_port()
    argv = [
        str(exe), "--llm-api-base", upstream_root_url, "--gateway-host", "127.0.0.1",
        "--gateway-port", str(port), "--db-url", f"sqlite://{work_dir / 'agentic.db'}",
    ]  # fmt: skip
    env = {"RUST_LOG": "warn", "NO_COLOR": "1", "HOME": str(work_dir)}
    try:
        return start_server(
            "agentic-api", argv, port=port, log_dir=work_dir, ready_path="/health", env=env,
            timeout_s=120,
        )  # fmt: skip
    except ServerError as exc:
        last = str(exc).strip().splitlines()
        raise PeerUnavailable(f"agentic-api did not start: {last[-1] if last else exc}") from None
