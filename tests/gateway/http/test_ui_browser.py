"""The trace viewer (``/ui``) in a real browser: headless Chromium (Debian's ``/usr/bin/chromium``)
driven by Playwright, against a real ``stepchain serve`` process with a scripted upstream and
real loopback tool servers; once on SQLite, once on PostgreSQL (one browser for both).

Screenshots go to ``$STEPCHAIN_ARTIFACTS`` (or a pytest temporary directory); the path is printed.
Without chromium the tests skip with one reason; with ``CI=true`` that is a failure instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.testing.scripted_upstream import Reply, ScriptedModel, create_scripted_upstream
from gateway.testing.serving import serve_app
from tests.gateway.harness import serve_process

CHROMIUM = "/usr/bin/chromium"
MODEL = "scripted-model"
KEY_A, KEY_B, ADMIN = "sk-tenant-a-0123456789", "sk-tenant-b-9876543210", "sk-admin-key-5555"
CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def _browser_or_skip() -> Any:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - in the test extra
        reason = "playwright is not installed"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium)"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run on CI: {reason}")
        pytest.skip(reason)
    return sync_playwright


class Tools:
    """Loopback tool servers: a slow weather lookup and one that waits for the test's go."""

    def __init__(self) -> None:
        self.go = threading.Event()

        async def weather(request: Request) -> Response:
            city = (await request.json())["city"]
            await asyncio.sleep(0.4)
            return JSONResponse({"city": city, "celsius": 20 + len(city)})

        async def gate(request: Request) -> Response:
            while not self.go.is_set():
                await asyncio.sleep(0.05)
            return JSONResponse({"released": True})

        self.app = Starlette(routes=[
            Route("/weather", weather, methods=["POST"]),
            Route("/gate", gate, methods=["POST"]),
        ])


class Site:
    def __init__(self, url: str, model: ScriptedModel, tools: Tools, shots: Path) -> None:
        self.url = url
        self.model = model
        self.tools = tools
        self.shots = shots
        self.ids: dict[str, str] = {}
        self.clients = contextlib.ExitStack()  # closed by the ``site`` fixture

    def client(self, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)
        self.clients.callback(client.close)
        return client

    def shot(self, page: Any, name: str) -> None:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, backend: str, module_db: str) -> Iterator[Site]:
    _browser_or_skip()
    tmp = tmp_path_factory.mktemp("ui")
    shots = Path(os.environ.get("STEPCHAIN_ARTIFACTS") or tmp / "artifacts") / (
        "ui" if backend == "sqlite" else f"ui-{backend}"
    )
    shots.mkdir(parents=True, exist_ok=True)
    model = ScriptedModel()
    tools = Tools()
    with serve_app(create_scripted_upstream(model)) as upstream, serve_app(tools.app) as tool_url:
        env = {
            "STEPCHAIN_UPSTREAM_BASE_URL": f"{upstream}/v1",
            "STEPCHAIN_DB": module_db,
            "STEPCHAIN_API_KEYS": f"{KEY_A},{KEY_B}",
            "STEPCHAIN_ADMIN_KEY": ADMIN,
            "STEPCHAIN_UPSTREAM_RETRY_MAX_S": "5",
            "STEPCHAIN_PRICES": '{"scripted-model": {"input": 2.5, "output": 10}}',
        }
        with serve_process([], tmp / "gateway.log", env=env) as (url, _proc), contextlib.ExitStack() as stack:
            s = Site(url, model, tools, shots)
            stack.enter_context(s.clients)
            admin = {"Authorization": f"Bearer {ADMIN}"}
            for body in (
                {"name": "get_weather", "description": "Weather for a city", "parameters": CITY,
                 "url": f"{tool_url}/weather"},
                {"name": "wait_for_go", "description": "Waits", "url": f"{tool_url}/gate",
                 "parameters": {"type": "object", "properties": {}}},
                {"name": "researcher", "kind": "agent", "description": "A sub-agent",
                 "model": MODEL, "instructions": "Research the question.", "tools": ["get_weather"]},
            ):
                reply = httpx.post(f"{url}/v1/tools", json=body, headers=admin, timeout=30)
                assert reply.status_code == 201, reply.text
            # Tenant A: a retried model call, then two weather calls in parallel, then the answer.
            model.replies.extend([
                Reply(status=500),
                Reply(tool_calls=[
                    {"id": "call_paris", "name": "get_weather", "arguments": '{"city": "Paris"}'},
                    {"id": "call_rome", "name": "get_weather", "arguments": '{"city": "Rome"}'},
                ]),
                Reply(content="Paris is 25 °C and Rome is 24 °C."),
            ])
            first = s.client(KEY_A).responses.create(model=MODEL, input="Weather in Paris and Rome?")
            assert first.status == "completed"
            s.ids["parallel"] = first.id
            # Tenant A again: an agent tool whose sub-agent makes its own model call.
            model.replies.extend([
                Reply(tool_calls=[{"id": "call_r", "name": "researcher",
                                   "arguments": '{"input": "How warm is Oslo?"}'}]),
                Reply(content="Oslo is mild today."),
                Reply(content="The researcher says Oslo is mild."),
            ])
            second = s.client(KEY_A).responses.create(
                model=MODEL, input="Ask the researcher about Oslo", previous_response_id=first.id
            )
            assert second.status == "completed"
            s.ids["agent"] = second.id
            yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (both backends' sites)."""
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            browser.close()


def _page_with_key(browser: Any, site: Site, key: str) -> Any:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(f"{site.url}/ui")
    page.get_by_test_id("key-input").fill(key)
    page.get_by_test_id("key-submit").click()
    expect(page.get_by_test_id("responses")).to_be_visible()
    return page


def test_the_list_shows_a_completed_response(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    page = _page_with_key(browser, site, KEY_A)
    row = page.locator(f'[data-testid="response-row"][data-id="{site.ids["parallel"]}"]')
    expect(row).to_be_visible()
    expect(row.get_by_test_id("status")).to_have_text("completed")
    expect(page.get_by_test_id("who")).to_have_text("tenant key")
    site.shot(page, "01-list-tenant")
    # Search by id narrows the list to that response.
    page.get_by_test_id("search").fill(site.ids["agent"][-12:])
    page.get_by_test_id("search").press("Enter")
    expect(page.get_by_test_id("response-row")).to_have_count(1)
    page.close()


def test_the_waterfall_shows_parallel_tool_calls_overlapping(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    page = _page_with_key(browser, site, KEY_A)
    page.goto(f"{site.url}/ui#/responses/{site.ids['parallel']}")
    bars = page.locator('[data-testid="bar"][data-kind="tool_call"]')
    expect(bars).to_have_count(2)
    first, second = (bars.nth(i).bounding_box() for i in range(2))
    assert first is not None and second is not None
    # Both ran at once: their bars share a stretch of the time axis.
    assert max(first["x"], second["x"]) < min(first["x"] + first["width"], second["x"] + second["width"])
    # The retried model call is marked.
    expect(page.get_by_test_id("retries")).to_have_count(1)
    expect(page.get_by_test_id("response-cost")).to_contain_text("$")  # priced model calls
    site.shot(page, "02-waterfall-parallel")
    page.close()


def test_the_inspector_shows_the_tool_output_and_the_upstream_request(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    page = _page_with_key(browser, site, KEY_A)
    page.goto(f"{site.url}/ui#/responses/{site.ids['parallel']}")
    page.locator('[data-testid="wf-row"]').filter(has_text="get_weather").first.click()
    inspector = page.get_by_test_id("inspector")
    expect(inspector.get_by_test_id("step-output")).to_contain_text('"celsius"')
    expect(inspector.get_by_test_id("step-arguments")).to_contain_text('"city"')
    site.shot(page, "03-inspector-tool")
    page.locator('[data-testid="wf-row"]').filter(has_text="MODEL").first.click()
    expect(inspector.get_by_test_id("step-request")).to_contain_text('"messages"')
    expect(inspector.get_by_test_id("step-attempts")).to_be_visible()
    page.close()


def test_sub_agent_steps_nest_under_their_agent_step_and_collapse(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    page = _page_with_key(browser, site, KEY_A)
    page.goto(f"{site.url}/ui#/responses/{site.ids['agent']}")
    rows = page.get_by_test_id("wf-row")
    expect(rows).to_have_count(4)  # model call, researcher, its model call, model call
    expect(page.get_by_test_id("previous-link")).to_have_text(site.ids["parallel"])
    site.shot(page, "04-agent-nested")
    page.get_by_test_id("toggle").first.click()
    expect(rows).to_have_count(3)
    page.close()


def test_an_in_progress_response_turns_completed_without_a_reload(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    site.model.replies.extend([
        Reply(tool_calls=[{"id": "call_go", "name": "wait_for_go", "arguments": "{}"}]),
        Reply(content="Released, and finished.", chunk_size=4),
    ])
    running = site.client(KEY_A).responses.create(model=MODEL, input="Wait for go", background=True)
    page = _page_with_key(browser, site, KEY_A)
    page.goto(f"{site.url}/ui#/responses/{running.id}")
    head = page.get_by_test_id("response-head")
    expect(head.get_by_test_id("status")).to_have_text("in progress")
    expect(page.locator('[data-testid="bar"][data-state="processing"]')).to_have_count(1)
    site.shot(page, "05-in-progress")
    site.tools.go.set()
    expect(head.get_by_test_id("status")).to_have_text("completed")
    expect(page.get_by_test_id("answer")).to_have_text("Released, and finished.")
    site.shot(page, "06-completed-live")
    page.close()


def test_a_second_tenant_sees_none_of_the_first_tenants_responses(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    page = _page_with_key(browser, site, KEY_B)
    expect(page.get_by_test_id("response-row")).to_have_count(0)
    expect(page.get_by_test_id("responses")).to_contain_text("No responses yet.")
    site.shot(page, "07-tenant-b-empty")
    page.goto(f"{site.url}/ui#/responses/{site.ids['parallel']}")
    expect(page.get_by_test_id("error")).to_contain_text("not found")
    page.close()


def test_the_admin_sees_every_tenant_with_its_tenant_column(browser: Any, site: Site) -> None:
    from playwright.sync_api import expect

    page = _page_with_key(browser, site, ADMIN)
    expect(page.get_by_test_id("who")).to_have_text("admin key")
    expect(page.locator(f'[data-id="{site.ids["parallel"]}"]')).to_contain_text("tenant_")
    site.shot(page, "08-list-admin")
    page.close()


def test_the_page_holds_no_secret_and_loads_nothing_from_elsewhere(site: Site) -> None:
    with httpx.Client(base_url=site.url, timeout=30) as http:
        page = http.get("/ui")
        script = http.get("/ui/static/app.js")
    assert page.status_code == 200 and script.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for body in (page.text, script.text):
        assert ADMIN not in body and KEY_A not in body
        assert "http://" not in body and "https://" not in body
