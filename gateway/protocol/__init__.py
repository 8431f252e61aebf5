"""The wire formats, as pure functions and state machines (no I/O, no framework).

``validation`` and ``checks`` check a ``POST /v1/responses`` body; ``convert`` turns Responses
input items and tools into a Chat Completions request; ``tools`` plans the tool types clients
send (custom, namespace, hosted) as upstream functions; ``sealed`` seals ``encrypted_content``; ``events`` builds a response's output
items and streaming events from what the loop reports; ``response_object`` renders the
``Response`` object; ``usage`` sums token counts; ``sse`` frames events as bytes; ``truncation``
shapes tool output for the model. Shapes follow ``shared/reference/responses-api.md``.
"""
