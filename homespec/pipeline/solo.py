"""One request alone on a decoder that runs requests in ticks (both executors of ``core.step``)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.step import DecodeStep, Draft
from homespec.errors import RequestFailedError


class Stepper(Protocol):
    def join(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> int: ...

    def step(self) -> list[tuple[int, DecodeStep | RequestFailedError]]: ...

    def leave(self, req: int, stats: bool = False) -> None: ...


def decode_alone(
    decoder: Stepper,
    prompt: Sequence[int],
    draft: Draft,
    sampling: SamplingConfig,
    tree_cfg: TreeConfig,
    trace: bool = False,
    max_new: int | None = None,
) -> Generator[DecodeStep, None, None]:
    """A DecodeStep each time one of the request's waves is verified, until the caller stops (closing the generator
    ends the request on every stage, and its stage statistics are read); RequestFailedError if it fails."""
    req = decoder.join(prompt, draft, sampling, tree_cfg, trace, max_new)
    done = False
    try:
        while True:
            for r, step in decoder.step():
                if r != req:
                    continue
                if isinstance(step, RequestFailedError):
                    raise step
                yield step
    except GeneratorExit:
        done = True  # the caller has all the tokens it wanted
        raise
    finally:
        decoder.leave(req, stats=done)
