"""Slow: LangChain's ChatOpenAI, pointed at a live fleetlm server, answers a chat turn."""

from __future__ import annotations

import pytest

from tests.server.test_openai_sdk import server  # noqa: F401  (the live-server fixture)

pytestmark = pytest.mark.slow


def test_langchain_chat_openai_answers(server):  # noqa: F811
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server[0], api_key="unused", model="smollm2-135m", temperature=0,
                     max_tokens=24, max_retries=0)
    reply = llm.invoke("What is the capital of France?")
    assert "Paris" in reply.content
    chunks = list(llm.stream("What is the capital of France?"))
    assert "".join(c.content for c in chunks) == reply.content
