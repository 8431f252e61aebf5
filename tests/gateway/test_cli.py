"""The `stepchain` command: settings precedence, clear start-up errors, a real serve process,
the demo, and the README's SDK snippet run exactly as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gateway.cli import serve_command
from gateway.config import (
    README_BEGIN,
    README_END,
    ConfigError,
    Settings,
    load_settings,
    readme_table,
    redacted,
)
from gateway.testing.scripted_upstream import (
    Reply,
    ScriptedModel,
    create_scripted_upstream,
)
from gateway.testing.serving import serve_app
from tests.gateway import harness
from tests.gateway.harness import serve_process

ROOT = Path(__file__).resolve().parents[2]
STEPCHAIN = [sys.executable, "-m", "gateway.cli"]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STEPCHAIN, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("args", "env", "config", "message"),
    [
        pytest.param(["--port", "eighty"], {}, None, "port from --port: Input should be a valid integer", id="port-not-int"),
        pytest.param(["--port", "8080.9"], {}, None, "port from --port: Input should be a valid integer", id="port-fraction"),
        pytest.param(["--port", "70000"], {}, None, "port from --port: Input should be less than or equal to 65535", id="port-range"),
        pytest.param(["--upstream-base-url", "ftp://x"], {}, None, "upstream_base_url from --upstream-base-url: expected an http(s) URL", id="url"),
        pytest.param([], {"STEPCHAIN_MAX_RESPONSE_ITERATIONS": "0"}, None,
                     "max_response_iterations from STEPCHAIN_MAX_RESPONSE_ITERATIONS: Input should be greater than or equal to 1", id="env"),
        pytest.param([], {"STEPCHAIN_TOOLS": "[{"}, None, "tools from STEPCHAIN_TOOLS: expected a JSON list", id="env-table-not-json"),
        pytest.param(["--config", "/nonexistent.toml"], {}, None, "config: cannot read /nonexistent.toml", id="config-missing"),
        pytest.param([], {}, "port = 8080.9\n", "port from {config}: Input should be a valid integer, got 8080.9", id="file-float-port"),
        pytest.param([], {}, "workers = true\n", "workers from {config}: Input should be a valid integer, got True", id="file-bool-workers"),
        pytest.param([], {}, "log_level = 'loud'\n", "log_level from {config}: one of critical", id="file-log-level"),
        pytest.param([], {}, "not_a_setting = 1\n", "config: unknown setting 'not_a_setting' in {config}", id="file-unknown-key"),
        pytest.param([], {}, '[[tools]]\nname = "t"\nurl = "http://127.0.0.1:1/t"\ntimeout_s = "soon"\n',
                     "tools[0].timeout_s from {config}: Input should be a valid number", id="file-tool-field"),
        pytest.param([], {}, '[[tools]]\nname = "bad name"\nurl = "http://127.0.0.1:1/t"\n',
                     "tools[0] from {config}: name is required", id="file-tool-definition"),
        pytest.param([], {}, '[[tools]]\nname = "t"\nkind = "agent"\n',
                     "tools[0] from {config}: model is required for an agent tool", id="file-agent-tool"),
        pytest.param([], {}, '[[upstream_fallbacks]]\nbase_url = "nope"\napi_key = "fallback-secret"\n',
                     "upstream_fallbacks[0].base_url from {config}: expected an http(s) URL", id="file-fallback"),
        pytest.param([], {}, None, "upstream_base_url: required", id="no-upstream"),
    ],
)
def test_bad_settings_stop_start_up_with_one_line(tmp_path, args, env, config, message):
    env = {"STEPCHAIN_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", **env}
    if config is not None:
        path = tmp_path / "stepchain.toml"
        path.write_text(config)
        args = [*args, "--config", str(path)]
        message = message.format(config=path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPCHAIN_")}
    if message.startswith("upstream_base_url: required"):
        env = {}
    result = subprocess.run([*STEPCHAIN, "serve", *args], capture_output=True, text=True, timeout=60,
                            env={**clean, **env}, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("stepchain: ") and message in lines[0]
    assert "secret" not in result.stderr


def test_precedence_flag_over_environment_over_file_over_default(tmp_path, monkeypatch):
    config = tmp_path / "stepchain.toml"
    config.write_text(
        'port = 9001\nmax_response_iterations = 7\ndb = "from-file.db"\n'
        '[[tools]]\nname = "t"\nurl = "http://127.0.0.1:1/t"\n'
    )
    for name in [k for k in os.environ if k.startswith("STEPCHAIN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STEPCHAIN_PORT", "9002")
    monkeypatch.setenv("STEPCHAIN_DB", "from-env.db")
    settings = load_settings({"config": str(config), "port": "9003"})
    assert settings.port == 9003  # flag
    assert settings.db == "from-env.db"  # environment over file
    assert settings.max_response_iterations == 7  # file over default
    assert settings.max_response_step_depth == 8  # default
    assert [tool.definition() for tool in settings.tools] == [{"name": "t", "kind": "http", "url": "http://127.0.0.1:1/t"}]
    config.write_text("not_a_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'not_a_setting'"):
        load_settings({"config": str(config)})


def test_every_setting_is_a_serve_flag(tmp_path, monkeypatch):
    """The flags are generated from the model: one per field, each parsed like the variable."""
    for name in [k for k in os.environ if k.startswith("STEPCHAIN_")]:
        monkeypatch.delenv(name)
    assert {p.name for p in serve_command.params} == set(Settings.model_fields)
    ctx = serve_command.make_context("serve", [
        "--port", "9100", "--upstream-retry-max-s", "2.5", "--cancel-on-disconnect",
        "--no-pass-client-key", "--admin-key", "flag-secret", "--sqlite-synchronous", "full",
        "--tools", '[{"name": "t", "url": "http://127.0.0.1:1/t", "attach": "on_request"}]',
        "--upstream-fallbacks", '[{"base_url": "http://127.0.0.1:2/v1", "api_key": "fb-secret"}]',
    ])
    settings = load_settings(ctx.params)
    assert settings.port == 9100 and settings.upstream_retry_max_s == 2.5
    assert settings.cancel_on_disconnect is True and settings.pass_client_key is False
    assert settings.sqlite_synchronous == "FULL"
    assert settings.admin_key.get_secret_value() == "flag-secret"
    assert settings.tools[0].attach == "on_request"
    assert settings.upstream_fallbacks[0].api_key.get_secret_value() == "fb-secret"
    shown = repr(settings) + str(settings) + repr(redacted(settings))
    assert "flag-secret" not in shown and "fb-secret" not in shown


def test_keys_are_never_shown(monkeypatch):
    for name in [k for k in os.environ if k.startswith("STEPCHAIN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STEPCHAIN_UPSTREAM_API_KEY", "sk-upstream-secret")
    monkeypatch.setenv("STEPCHAIN_API_KEYS", "tenant-secret-1,tenant-secret-2")
    settings = load_settings({"admin_key": "admin-secret"})
    shown = repr(settings) + str(settings) + repr(redacted(settings)) + repr(settings.model_dump())
    for secret in ("sk-upstream-secret", "tenant-secret-1", "admin-secret"):
        assert secret not in shown
    assert settings.upstream_api_key.get_secret_value() == "sk-upstream-secret"
    with pytest.raises(ConfigError) as info:  # a bad key value is reported without the value
        load_settings({"admin_key": "admin-secret", "upstream_fallbacks": '[{"base_url": "x", "api_key": 5}]'})
    assert "admin-secret" not in str(info.value)


def test_readme_settings_table_is_generated_from_the_model():
    """After adding a setting run `python -m gateway.config --readme-table`."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(README_BEGIN) + len(README_BEGIN)
    assert readme[start:readme.index(README_END)].strip() == readme_table(), (
        "README.md's settings table differs from gateway/config.py: "
        "run `python -m gateway.config --readme-table`"
    )
    for name in Settings.model_fields:
        assert f"| `{name}` |" in readme


@pytest.mark.usefixtures("on_both_backends")
def test_serve_process_answers_the_sdk_and_the_readme_snippet_runs(tmp_path):
    db = harness.database_url or tmp_path / "db" / "s.db"  # a directory that does not exist yet
    model = ScriptedModel(default=lambda body: Reply(content=f"reply to {body['messages'][-1]['content']}"))
    with serve_app(create_scripted_upstream(model)) as upstream, serve_process(
        ["--db", str(db), "--upstream-base-url", f"{upstream}/v1"],
        tmp_path / "serve.log",
    ) as (url, _):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            assert client.responses.create(model="m", input="ping").output_text == "reply to ping"

        # The README's snippet, exactly as written, against this server on its port.
        readme = (ROOT / "README.md").read_text()
        snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
        snippet = snippet.replace("http://127.0.0.1:8080/v1", f"{url}/v1")
        result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "reply to Say hello", "reply to Stream a hello", "reply to And again"
    ]


def test_demo_runs_offline_and_shows_the_chain():
    result = _run("demo", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[tool done] get_weather" in out
    assert "Here is the weather:" in out
    assert "completed" in out
    chain_lines = [line for line in out.splitlines() if line.strip().startswith("#")]
    assert [line.split()[2] for line in chain_lines] == ["model_call", "tool_call", "tool_call", "model_call"]


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]


def _ppid(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.usefixtures("on_both_backends")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_with_two_workers_passes_every_setting_on_but_no_secret_in_their_environment(tmp_path):
    """Workers get the settings (tables and keys included) from the parent, not from the
    environment: no worker's /proc/<pid>/environ holds a key; leaving the block ends them all."""
    model = ScriptedModel(default=lambda body: Reply(content=f"{len(body.get('tools', []))} tools"))
    upstream_app = create_scripted_upstream(model)
    seen_keys: set[bytes] = set()

    async def recording_upstream(scope, receive, send):
        if scope["type"] == "http":
            seen_keys.add(dict(scope["headers"]).get(b"authorization", b""))
        await upstream_app(scope, receive, send)

    config = tmp_path / "stepchain.toml"
    config.write_text(
        'max_response_iterations = 5\n'
        '[[tools]]\nname = "from_config"\nurl = "http://127.0.0.1:9/t"\n'
        'headers = {X-Key = "header-secret-4"}\n'
        + '[[upstream_fallbacks]]\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "fallback-secret-3"\n'
    )
    secrets = [b"upstream-secret-1", b"admin-secret-2", b"fallback-secret-3", b"header-secret-4",
               b"tenant-secret-5"]
    with serve_app(recording_upstream) as upstream, serve_process(
        ["--workers", "2", "--config", str(config), "--db", str(harness.database_url or tmp_path / "w.db"),
         "--upstream-base-url", f"{upstream}/v1", "--admin-key", "admin-secret-2"],
        tmp_path / "serve.log",
        env={"STEPCHAIN_UPSTREAM_API_KEY": "upstream-secret-1", "STEPCHAIN_API_KEYS": "tenant-secret-5"},
    ) as (url, proc):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="tenant-secret-5", max_retries=0) as client:
            texts = {client.responses.create(model="m", input=f"q{i}").output_text for i in range(6)}
        with httpx.Client(base_url=url, timeout=30) as http:
            admin = [http.get("/v1/tools", headers={"authorization": "Bearer admin-secret-2"}).status_code
                     for _ in range(6)]
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert not [s for s in secrets if s in environ], pid
    assert texts == {"1 tools"}  # the config file's tool reached every worker
    assert seen_keys == {b"Bearer upstream-secret-1"}  # and the upstream key
    assert admin == [200] * 6  # and the admin key
    assert not [pid for pid in workers if _running(pid)], "workers outlived the test"


def test_serving_processes_collect_garbage_less_often() -> None:
    """The worker factory (and ``serve``) raise the GC thresholds; importing the app does not."""
    code = (
        "import gc\n"
        "before = gc.get_threshold()\n"
        "from gateway.http.app import SERVING_GC_THRESHOLDS, app_from_environment\n"
        "assert gc.get_threshold() == before, 'changed on import'\n"
        "app_from_environment()\n"
        "assert gc.get_threshold() == SERVING_GC_THRESHOLDS, gc.get_threshold()\n"
        "print('ok')\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STEPCHAIN_")},
        "STEPCHAIN_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
