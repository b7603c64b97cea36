"""The OpenAI shapes at the HTTP edge: request bodies (pydantic) and response framing.

Requests: :class:`ChatCompletionRequest` (/v1/chat/completions) and
:class:`CompletionRequest` (/v1/completions). The fields fleetlm acts on are declared, and
so are the OpenAI chat fields a route may send on to a large upstream (tools, functions,
``metadata``, a message's ``name``, ``tool_calls``...): what goes upstream is built from
these declared fields only (:mod:`fleetlm.server.upstream_body`). Other OpenAI fields are
accepted and ignored (clients send many), so one SDK works unmodified. Range checks live in :class:`~fleetlm.engine.sampling_params.SamplingParams`,
whose errors name the field. Responses: the ``usage`` object and server-sent events
(``data: {json}`` per chunk, then ``data: [DONE]``).

This module knows the wire format only: not the engine, the tokenizer, or where an answer
comes from.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    ignore_eos: bool = False  # extension (as vLLM): generate max_tokens even past end-of-sequence
    # {"type": "text" | "json_object" | "json_schema", ...}; checked by SamplingParams
    response_format: dict[str, Any] | None = None


class FunctionCall(BaseModel):
    """A call the assistant made: ``arguments`` is a JSON text (free text: redacted)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = ""


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: str = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    """A function the model may call (``tools[].function``, or legacy ``functions[]``)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "function"  # only "function" tools can go to an upstream
    function: FunctionDefinition | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    # a string, or content parts: {"type": "text", "text"}, {"type": "image_url", ...},
    # {"type": "input_audio", ...}, {"type": "file", ...}, {"type": "refusal", "refusal"}
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None  # a participant's name (personal data: redacted upstream)
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool: the call this message answers
    function_call: FunctionCall | None = None  # assistant, legacy functions
    refusal: str | None = None  # assistant

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # read only when a route sends the request upstream (server/upstream_body.py): the local
    # model does not call tools
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | a function
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # legacy tools
    function_call: str | dict[str, Any] | None = None  # legacy tool_choice
    metadata: dict[str, str] | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


def usage(prompt: int, completion: int) -> dict[str, int]:
    """The OpenAI ``usage`` object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(chunks: AsyncIterator[dict[str, Any]], headers: dict[str, str] | None = None
        ) -> StreamingResponse:
    """A streaming response: each payload as one server-sent event, then ``[DONE]``."""
    async def body() -> AsyncIterator[bytes]:
        async for c in chunks:
            yield f"data: {json.dumps(c)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
