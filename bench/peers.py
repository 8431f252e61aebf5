"""Peer gateways run side by side with stepchain: the LiteLLM proxy, from PyPI, in its own venv.

LiteLLM is never a project dependency and never enters the project's venv: it is installed once
into ``<cache>/stepchain-bench/litellm-<version>/`` (``$XDG_CACHE_HOME`` or ``~/.cache``) and
reused by later runs. Its config points the model ``scripted-model`` at the same scripted
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

__all__ = ["LITELLM_SPEC", "PeerUnavailable", "install_litellm", "start_litellm"]

# A pinned release: newer ones require a certifi release that PyPI does not have yet, and a
# pin keeps runs comparable (and away from unvetted releases of a package that once shipped a
# compromised version).
LITELLM_VERSION = "1.102.4"
LITELLM_SPEC = f"litellm[proxy]=={LITELLM_VERSION}"


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
    name = spec.replace("litellm[proxy]==", "litellm-").replace("/", "_").replace(" ", "")
    venv = cache_dir() / name
    exe = venv / "bin" / "litellm"
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
        raise PeerUnavailable(f"{spec} installed no litellm executable")
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
