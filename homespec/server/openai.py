"""The OpenAI API's request and response shapes (DESIGN §8): what a body must hold, the errors it gets when it does
not, and the JSON objects and SSE chunks sent back. No engine, no threads: ``app.py`` joins this to the service.

Bodies are validated by pydantic; unknown fields are ignored (clients such as Open WebUI send their own), known
fields out of range get a 400 in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from homespec.core.messages import RESULT_TOP_K
from homespec.core.stops import MAX_STOP_CHARS, MAX_STOPS
from homespec.events import FinishReason, GenerationStats, TokenLogprob


class ApiError(Exception):
    """An error the client gets as an OpenAI-shaped JSON body with this HTTP status."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(400, f"content parts of type {part.type!r} are not supported", param="messages")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ApiError(
                400, f"stop takes at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters",
                param="stop",
            )  # fmt: skip
        return tuple(stops)

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: HomeSpec returns one choice per request", param="n")


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if (self.top_logprobs or 0) > RESULT_TOP_K:
            raise ApiError(
                400, f"top_logprobs is at most {RESULT_TOP_K} here (the last stage returns its top {RESULT_TOP_K})",
                param="top_logprobs",
            )  # fmt: skip

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_top(self) -> int | None:
        """How many alternatives per token to return, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise ApiError(400, "one prompt per request is supported (a list of one string is fine)", param="prompt")

    def limit(self) -> int | None:
        return self.max_tokens

    def logprob_top(self) -> int | None:
        return self.logprobs


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """One response's identity (id, created, model) and the builders of its JSON and chunks.

    ``top``: None when the body asked for no logprobs; else how many alternatives per token (``top_logprobs`` of a
    chat body, ``logprobs`` of a completions body). Log-probs are the model's raw distribution (before temperature
    and top-p), as the last stage computed them; a token's text is its own decoding (a token that ends inside a
    UTF-8 character reads as U+FFFD), its bytes that text's UTF-8.
    """

    def __init__(
        self, chat: bool, model: str, top: int | None = None, token_text: Callable[[int], str] | None = None
    ) -> None:
        self.chat, self.model, self.top = chat, model, top
        self.token_text = token_text or str
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = 0  # completions' text_offset of the next token

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def logprobs(self, lps: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """The ``logprobs`` of a choice for these tokens, in the chat or the completions shape."""
        if self.top is None:
            return None
        k = self.top
        if self.chat:
            return {"content": [self._entry(lp.token, lp.logprob) | {"top_logprobs": [
                self._entry(t, v) for t, v in lp.top[:k]]} for lp in lps], "refusal": None}  # fmt: skip
        texts = [self.token_text(lp.token) for lp in lps]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        tops = [
            {self.token_text(t): v for t, v in lp.top[:k]} | {text: lp.logprob}
            for lp, text in zip(lps, texts, strict=True)
        ]
        return {
            "tokens": texts,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def full(
        self, text: str, reason: FinishReason, prompt_tokens: int, stats: GenerationStats, seed: int,
        lps: Sequence[TokenLogprob] = (),
    ) -> Any:  # fmt: skip
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            choice |= {"logprobs": self.logprobs(lps), "finish_reason": finish_reason(reason)}
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(lps), "finish_reason": finish_reason(reason)}
            out = self._head("text_completion")
        out["choices"] = [choice]
        out["usage"] = usage(prompt_tokens, stats.tokens)
        out["homespec"] = homespec_stats(stats, seed)
        return out

    def chunk(
        self, text: str | None, reason: FinishReason | None = None, first: bool = False,
        lps: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:  # fmt: skip
        fr = finish_reason(reason) if reason else None
        logprobs = self.logprobs(lps) if lps else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": fr}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": fr}
            out = self._head("text_completion")
        out["choices"] = [choice]
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = usage(prompt_tokens, completion_tokens)
        return out


def homespec_stats(stats: GenerationStats, seed: int) -> dict[str, Any]:
    """The speculation stats every response carries (``homespec`` object)."""
    keep = (
        "mode", "draft", "tokens", "steps", "tokens_per_step", "target_forwards", "tokens_per_forward",
        "accepted_per_step", "stages", "busy_fraction", "draft_choices", "wall_s", "tokens_per_s",
    )  # fmt: skip
    d = stats.as_dict()
    return {k: d[k] for k in keep} | {"seed": seed}
