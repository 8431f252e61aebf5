"""The `stepchain` command: settings precedence, clear start-up errors, a real serve process,
the demo, and the README's SDK snippet run exactly as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from gateway.config import ConfigError, load_settings
from gateway.testing.scripted_upstream import (
    Reply,
    ScriptedModel,
    create_scripted_upstream,
)
from gateway.testing.serving import serve_app
from tests.gateway.harness import serve_process

ROOT = Path(__file__).resolve().parents[2]
STEPCHAIN = [sys.executable, "-m", "gateway.cli"]


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*STEPCHAIN, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param(["--port", "eighty"], {}, "port from --port: expected int", id="port-not-int"),
        pytest.param(["--port", "70000"], {}, "port: must be at most 65535", id="port-range"),
        pytest.param(["--upstream-base-url", "ftp://x"], {}, "upstream_base_url: expected an http(s) URL", id="url"),
        pytest.param([], {"STEPCHAIN_MAX_RESPONSE_ITERATIONS": "0"}, "max_response_iterations: must be at least 1", id="env"),
        pytest.param(["--config", "/nonexistent.toml"], {}, "config: cannot read /nonexistent.toml", id="config-missing"),
        pytest.param([], {}, "upstream_base_url: required", id="no-upstream"),
    ],
)
def test_bad_settings_stop_start_up_with_one_line(args, env, message):
    env = {"STEPCHAIN_UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", **env} if "no-upstream" not in message else env
    if message.startswith("upstream_base_url: required"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEPCHAIN_")}
        result = subprocess.run([*STEPCHAIN, "serve"], capture_output=True, text=True, timeout=60,
                                env=env, cwd=ROOT)
    else:
        result = _run("serve", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("stepchain: ") and message in lines[0]


def test_precedence_flag_over_environment_over_file_over_default(tmp_path):
    config = tmp_path / "stepchain.toml"
    config.write_text(
        'port = 9001\nmax_response_iterations = 7\ndb = "from-file.db"\n'
        '[[tools]]\nname = "t"\nurl = "http://127.0.0.1:1/t"\n'
    )
    settings = load_settings(
        {"config": str(config), "port": "9003"},
        {"STEPCHAIN_PORT": "9002", "STEPCHAIN_DB": "from-env.db"},
    )
    assert settings.port == 9003  # flag
    assert settings.db == "from-env.db"  # environment over file
    assert settings.max_response_iterations == 7  # file over default
    assert settings.max_response_step_depth == 8  # default
    assert settings.tools == ({"name": "t", "url": "http://127.0.0.1:1/t"},)
    config.write_text("not_a_setting = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'not_a_setting'"):
        load_settings({"config": str(config)}, {})


def test_serve_process_answers_the_sdk_and_the_readme_snippet_runs(tmp_path):
    model = ScriptedModel(default=lambda body: Reply(content=f"reply to {body['messages'][-1]['content']}"))
    with serve_app(create_scripted_upstream(model)) as upstream, serve_process(
        ["--db", str(tmp_path / "db" / "s.db"), "--upstream-base-url", f"{upstream}/v1"],
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


def test_serve_with_two_workers_passes_every_setting_on(tmp_path):
    """Worker processes rebuild the settings from the environment: tables included."""
    model = ScriptedModel(default=lambda body: Reply(content=f"{len(body.get('tools', []))} tools"))
    config = tmp_path / "stepchain.toml"
    config.write_text(
        'max_response_iterations = 5\n'
        '[[tools]]\nname = "from_config"\nurl = "http://127.0.0.1:9/t"\n'
        '[[upstream_fallbacks]]\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    with serve_app(create_scripted_upstream(model)) as upstream, serve_process(
        ["--workers", "2", "--config", str(config), "--db", str(tmp_path / "w.db"),
         "--upstream-base-url", f"{upstream}/v1"],
        tmp_path / "serve.log",
    ) as (url, _):
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            texts = {client.responses.create(model="m", input=f"q{i}").output_text for i in range(6)}
    assert texts == {"1 tools"}  # the config file's tool reached every worker


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
