"""openai-agents (Agent + Runner) with OpenAIResponsesModel pointed at the gateway."""

from __future__ import annotations

import asyncio

import pytest

agents = pytest.importorskip("agents")

from agents import (  # noqa: E402
    Agent,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402

from gateway.testing.scripted_upstream import Reply  # noqa: E402
from tests.gateway.harness import running_gateway  # noqa: E402

# Run on both store backends (issue 11).
pytestmark = pytest.mark.usefixtures("on_both_backends")

set_tracing_disabled(True)  # no trace export: nothing may leave loopback

calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather for a city."""
    calls.append(city)
    return f"Sunny in {city}"


def _agent(url: str) -> tuple[Agent, AsyncOpenAI]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
    model = OpenAIResponsesModel(model="scripted-model", openai_client=client)
    return Agent(name="helper", instructions="Be brief.", model=model, tools=[get_weather]), client


def _script(model) -> None:
    model.replies.append(
        Reply(tool_calls=[{"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Lima"}'}])
    )
    model.replies.append(Reply(content="It is sunny in Lima."))


@pytest.mark.parametrize("streamed", [pytest.param(False, id="run"), pytest.param(True, id="run_streamed")])
def test_runner_with_a_client_function_tool(tmp_path, streamed):
    calls.clear()
    with running_gateway(tmp_path) as gw:
        _script(gw.model)

        async def main():
            agent, client = _agent(gw.url)
            try:
                if streamed:
                    result = Runner.run_streamed(agent, "Weather in Lima?")
                    kinds = [event.type async for event in result.stream_events()]
                    assert "raw_response_event" in kinds
                else:
                    result = await Runner.run(agent, "Weather in Lima?")
                return result.final_output
            finally:
                await client.close()

        final = asyncio.run(main())
    assert final == "It is sunny in Lima."
    assert calls == ["Lima"]
    # The second model call carried the tool output, answered by the model's own call_id.
    messages = gw.model.requests[-1]["messages"]
    tool_messages = [m for m in messages if m["role"] == "tool"]
    assert tool_messages == [{"role": "tool", "tool_call_id": "call_w1", "content": "Sunny in Lima"}]
    assert messages[0] == {"role": "system", "content": "Be brief."}
