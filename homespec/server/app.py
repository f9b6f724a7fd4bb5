"""The HTTP face (DESIGN §8): FastAPI routes for ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/health`` and ``/metrics``, over a ``GenerationService``.

A route validates the body (``openai.py``), refuses a prompt that cannot fit by its size alone (characters, messages:
cheap checks before any tokenizing), encodes the prompt with its own copy of the tokenizer on a thread of its own
(a long prompt never stalls the event loop, so streams and ``/health`` go on), checks it against the context,
submits a ``Job`` and relays the job's events:
as SSE chunks ending with ``data: [DONE]``, or as one JSON object. A client that goes away cancels its job. Every
error, ours or the framework's, leaves in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from homespec.config import DEFAULT_READ_TIMEOUT_S, GenerationConfig, SamplingConfig
from homespec.engine import chat_ids
from homespec.errors import ConfigError
from homespec.events import GenerationFinished, TokensCommitted
from homespec.server.guard import BodyLimit
from homespec.server.openai import ApiError, ChatRequest, CompletionRequest, Reply
from homespec.server.service import Failed, GenerationService, Job

log = logging.getLogger("homespec.server")

DISCONNECT_POLL_S = 0.25  # non-streaming requests: how often to check that the client is still there
STALL_TICK_S = 0.05  # the event loop's watchdog ticks this often ...
STALL_S = 0.5  # ... and counts a stall when a tick comes this much late (nothing in a route may hold the loop)
CHARS_PER_TOKEN_LIMIT = 64  # a prompt of more than max_context x this many characters cannot fit: refused untokenized


@dataclass(frozen=True)
class ServerOptions:
    model_name: str  # the id clients use (``/v1/models``)
    max_context: int
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # a request's head, and then its body, must arrive within this

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context (no token of any vocabulary we run is that long)."""
        return self.max_context * CHARS_PER_TOKEN_LIMIT


class _LoopStalls:
    """The event loop's own clock: a task that should wake every ``STALL_TICK_S``; each wake later than ``STALL_S``
    is a stall (a route that held the loop). ``/metrics`` reports the count and the worst."""

    def __init__(self) -> None:
        self.count, self.worst_s = 0, 0.0

    def worst(self) -> float:
        return self.worst_s

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(STALL_TICK_S)
            late = loop.time() - before - STALL_TICK_S
            self.worst_s = max(self.worst_s, late)
            self.count += late > STALL_S


def create_app(service: GenerationService, tokenizer: Any, options: ServerOptions) -> FastAPI:
    stalls = _LoopStalls()
    service.metrics.gauges |= {"event_loop_stalls": lambda: stalls.count, "event_loop_stall_max_seconds": stalls.worst}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        watch = asyncio.create_task(stalls.watch())
        yield
        watch.cancel()

    app = FastAPI(title="HomeSpec", summary="OpenAI-compatible API over a HomeSpec pipeline", lifespan=lifespan)
    _error_handlers(app, options)
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="homespec-tokenize")  # one tokenizer, in turn

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    app.router.route_class = _json_off_loop(off_loop, options)

    def authorized(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.encode(), f"Bearer {options.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @functools.lru_cache(maxsize=1 << 16)
    def token_text(token: int) -> str:
        return str(tokenizer.decode([token]))

    def model_card() -> dict[str, Any]:
        return {"id": options.model_name, "object": "model", "created": 0, "owned_by": "homespec"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def get_model(model: str) -> dict[str, Any]:
        _check_model(model, options)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        body.check_supported()
        _check_model(body.model, options)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        _check_size(sum(len(m["content"]) for m in messages), len(messages), "messages", options)
        try:
            ids = await off_loop(chat_ids, tokenizer, messages)
        except Exception as exc:  # a template that refuses this conversation (role order, say)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        reply = Reply(True, options.model_name, body.logprob_top(), token_text)
        return await _respond(service, body, ids, reply, request, options)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        body.check_supported()
        _check_model(body.model, options)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = [int(t) for t in prompt]
            if any(not (0 <= t < len(tokenizer)) for t in ids):
                raise ApiError(400, f"token ids must be in [0, {len(tokenizer)})", param="prompt")
        else:
            text = prompt if isinstance(prompt, str) else "".join(str(p) for p in prompt)
            _check_size(len(text), 1, "prompt", options)
            ids = await off_loop(lambda: list(tokenizer(text)["input_ids"]))
        reply = Reply(False, options.model_name, body.logprob_top(), token_text)
        return await _respond(service, body, ids, reply, request, options)

    @app.get("/health")
    async def health() -> JSONResponse:
        down = service.down
        body = {"status": "down" if down else "ok", "model": options.model_name, "reason": service.down_reason}
        return JSONResponse(body, status_code=503 if down else 200)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _json_off_loop(off_loop: Callable[..., Any], options: ServerOptions) -> type[APIRoute]:
    """Routes whose JSON body is parsed on the tokenizer thread, and whose message count is checked before FastAPI
    validates each message on the event loop (100 000 messages: ~300 ms). A body that names ``"role"`` more often
    than the context has tokens is refused before it is parsed at all: parsing holds the GIL (~80 ms for 4 MB of
    small objects), a thread or not. Every message has one ``"role"`` key, so the count bounds the messages from
    above; only a body built to say ``"role"`` thousands of times elsewhere could be refused wrongly."""

    class Route(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Any]:
            handle = super().get_route_handler()

            async def parse_then_handle(request: Request) -> Any:
                body = await request.body() if request.method == "POST" else b""
                _check_size(0, body.count(b'"role"'), "messages", options)
                if body:
                    with contextlib.suppress(ValueError):  # not JSON: FastAPI's own check answers it
                        request._json = await off_loop(json.loads, body)  # starlette's cache, read by FastAPI
                        messages = request._json.get("messages") if isinstance(request._json, dict) else None
                        if isinstance(messages, list):
                            _check_size(0, len(messages), "messages", options)
                return await handle(request)

            return parse_then_handle

    return Route


def _check_size(chars: int, messages: int, param: str, options: ServerOptions) -> None:
    """Refuse, before tokenizing, a prompt too large to fit the context by its characters or message count."""
    if chars > options.max_prompt_chars or messages > options.max_context:
        raise ApiError(
            400, f"this model's context is {options.max_context} tokens; a prompt of {chars} characters in "
            f"{messages} message(s) cannot fit", param=param, code="context_length_exceeded",
        )  # fmt: skip


def _check_model(model: str, options: ServerOptions) -> None:
    if model != options.model_name:
        raise ApiError(
            404, f"model {model!r} does not exist; this server serves {options.model_name!r}", param="model",
            code="model_not_found",
        )  # fmt: skip


def _config(body: ChatRequest | CompletionRequest, prompt_tokens: int, options: ServerOptions) -> tuple[Any, int]:
    """The GenerationConfig for a body, and the seed it samples with (a fresh one when the body names none)."""
    if prompt_tokens == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    room = options.max_context - prompt_tokens
    limit = body.limit()
    if room < 1 or (limit is not None and limit > room):
        raise ApiError(
            400, f"this model's context is {options.max_context} tokens; the prompt has {prompt_tokens} and "
            f"{limit or 1} more were asked for", param="messages" if isinstance(body, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )  # fmt: skip
    temperature = 1.0 if body.temperature is None else body.temperature
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    try:
        sampling = SamplingConfig(temperature=temperature, top_p=body.top_p or 1.0, seed=seed)
        return GenerationConfig(max_tokens=limit or room, sampling=sampling, stop=body.stops()), seed
    except ConfigError as exc:
        raise ApiError(400, exc.message) from exc


async def _respond(
    service: GenerationService, body: ChatRequest | CompletionRequest, ids: list[int], reply: Reply,
    request: Request, options: ServerOptions,
) -> Any:  # fmt: skip
    config, seed = _config(body, len(ids), options)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[object] = asyncio.Queue()

    def post(event: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (server shutting down)
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(ids, config, post)
    service.submit(job)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(job, events, reply, len(ids), usage, seed), media_type="text/event-stream")
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, GenerationFinished):
                return reply.full(event.text, event.reason, len(ids), event.stats, seed, event.logprobs)
    finally:
        job.cancelled.set()  # no-op after the end; stops the job when the client left or the handler was cancelled


async def _sse(
    job: Job, events: asyncio.Queue[object], reply: Reply, prompt_tokens: int, usage: bool, seed: int
) -> AsyncIterator[str]:
    def data(obj: object) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        if reply.chat:
            yield data(reply.chunk(None, first=True))
        while True:
            event = await events.get()
            if isinstance(event, TokensCommitted) and (event.text or (reply.top is not None and event.logprobs)):
                yield data(reply.chunk(event.text, lps=event.logprobs))
            elif isinstance(event, Failed):
                yield data(event.error.body())
                break
            elif isinstance(event, GenerationFinished):
                last = reply.chunk(None, event.reason)
                last["homespec"] = reply.full("", event.reason, prompt_tokens, event.stats, seed)["homespec"]
                yield data(last)
                if usage:
                    yield data(reply.usage_chunk(prompt_tokens, event.stats.tokens))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away (or the stream ended): stop the job at its next step


def _error_handlers(app: FastAPI, options: ServerOptions) -> None:
    def shaped(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return shaped(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return shaped(ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json"))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"invalid request body: {'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
        return shaped(ApiError(400, message, param=".".join(loc) or None, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return shaped(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return shaped(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes, read_timeout_s=options.read_timeout_s)
