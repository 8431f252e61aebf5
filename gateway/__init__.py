"""The gateway: an OpenAI Responses API over any Chat Completions upstream.

One request flows down the subpackages, each importing only those below it::

    http/       ASGI app (Starlette): lifespan-owned resources, auth, routes by resource
      │         (responses, chat, models, tools), JSON bodies, the SSE response
      ▼
    engine/     ResponsesService: prepare → run the loop → store the result; the pure
      │         transition function, the loop, live event logs, crash recovery, task set
      ▼
    protocol/   the wire formats, pure: Responses ⇄ Chat Completions conversion, request
                validation, the output/event builder, the Response object, usage, SSE encoder

Beside them: ``observe`` (metrics, cost, structured logs and OpenTelemetry spans, reported
through one observer the engine calls; summaries for the trace viewer in ``ui`` and the terminal),
``config`` (settings), ``errors`` (the one exception tree every client-visible
error belongs to), ``cli`` and ``demo`` (the ``stepchain`` command), and ``testing`` (the scripted
demo model and loopback server helpers, used by the demo, tests and benchmarks only). Below the
gateway: ``executors`` (what runs a step) and ``store`` (the step-chain store).
"""
