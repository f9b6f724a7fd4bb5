"""One request's fault is that request's alone (RELIABILITY.md): a request that fills the context, or one a stage
refuses, ends by itself while the other requests on the same stage processes complete token-identical to their solo
runs, and the stages are not rebuilt. Real stage processes over ZeroMQ, real HTTP with the ``openai`` client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.messages import Assign
from homespec.core.planner import even_split
from homespec.errors import RequestFailedError
from homespec.model.drafts import build_draft
from homespec.pipeline.cluster import LocalCluster
from homespec.pipeline.coordinator import PipelineDecoder
from tests.test_server import Server, chat

pytestmark = pytest.mark.slow

CONTEXT = 192
INNOCENT = "Explain what a hash table is to a beginner."
FILLER = "Repeat the word hello two hundred times, separated by spaces."  # long, and drafts hit: commits run deep


@pytest.mark.parametrize("mode", ["tree", "specpipe"])
def test_a_request_that_fills_the_context_does_not_fail_the_others(mode: str) -> None:
    """The filler asks for no max_tokens, so the server gives it all the room left (prompt + max_tokens = the
    context); its drafts hit, so speculation would commit past the context on a stage. It must end at the context
    (finish_reason length) while an innocent stream beside it completes with its solo text, on the same stages."""
    s = Server("--stages", "2", "--mode", mode, "--max-context", str(CONTEXT), "--draft", "ngram+recycle")
    try:
        solo = chat(s, INNOCENT, max_tokens=48, temperature=0).choices[0].message.content
        pids = s.stage_pids()
        got: dict[str, Any] = {}

        def filler() -> None:
            try:
                got["filler"] = chat(s, FILLER, temperature=0, max_tokens=openai.NOT_GIVEN)  # all the room left
            except openai.APIError as exc:  # recorded: the assertions below say what it must be
                got["filler"] = exc

        stream = iter(chat(s, INNOCENT, max_tokens=48, temperature=0, stream=True))
        parts = [next(stream).choices[0].delta.content or ""]
        thread = threading.Thread(target=filler)
        thread.start()
        parts.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
        thread.join(timeout=300)
        assert not thread.is_alive()
        assert "".join(parts) == solo, "the innocent stream differs from its solo run"
        reply = got["filler"]
        assert not isinstance(reply, openai.APIError), f"the filler failed: {reply}"
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens == CONTEXT
        assert s.stage_pids() == pids, "the stages were rebuilt"
        again = chat(s, INNOCENT, max_tokens=48, temperature=0).choices[0].message.content
        assert again == solo
    finally:
        s.close()


def test_a_request_a_stage_refuses_fails_alone(
    bundled: Any, tokenizer: Any, chat_ids: Callable[[str], list[int]]
) -> None:
    """The last stage's caches hold 96 tokens (the head plans by stage 0's 4096), and a 150-token prompt goes in
    beside a short one: the stage fails the long request (its cache is full) with a RequestFailedError of its own;
    the short one, in the same waves, completes with the tokens of its solo run, and the next request runs on the same
    stages."""
    assigns = [
        Assign(i, 2, "", a, b, "fp32", "cpu", 4096 if i == 0 else 96, 64, weights="int4")
        for i, (a, b) in enumerate(even_split(bundled.num_layers, 2))
    ]
    short = chat_ids("Name two planets.")
    long = chat_ids(" ".join(["planets"] * 140))
    assert len(long) > 96 > len(short) + 24
    with LocalCluster(assigns) as cluster:
        decoder = PipelineDecoder(cluster, "specpipe")

        def draft() -> Any:
            return build_draft("ngram", bundled, tokenizer, TreeConfig())

        def solo() -> list[int]:
            out: list[int] = []
            for step in decoder.decode(short, draft(), SamplingConfig(), TreeConfig(), max_new=24):
                out.extend(step.verification.emitted)
                if len(out) >= 24:
                    break
            return out[:24]

        alone = solo()
        a = decoder.join(short, draft(), SamplingConfig(), TreeConfig(), max_new=24)
        b = decoder.join(long, draft(), SamplingConfig(), TreeConfig(), max_new=8)
        tokens: list[int] = []
        failure = None
        for _ in range(400):
            for req, step in decoder.step():
                if isinstance(step, RequestFailedError):
                    assert req == b, f"request {req} failed: {step.message}"
                    failure = step
                elif req == a:
                    tokens.extend(step.verification.emitted)
            if len(tokens) >= 24 and failure is not None:
                break
        decoder.leave(a)
        assert failure is not None and "stage 1" in failure.message and "exceeds" in failure.message
        assert b not in decoder.runs
        assert tokens[:24] == alone
        assert solo() == alone  # the same stages serve the next request
        cluster.check_alive()
