"""What a user would otherwise run on one machine: transformers' own ``generate``, plain greedy or with prompt lookup
(``prompt_lookup_num_tokens``), on the same weights. ``homespec bench`` measures it beside HomeSpec's modes in one
run (DESIGN §10); it is a yardstick, never a decoding path of HomeSpec.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

BASELINES = ("hf", "hf-lookup")  # bench mode names: transformers generate, plain and with prompt lookup
LOOKUP_TOKENS = 10  # transformers' documented example value for prompt_lookup_num_tokens


@dataclass(frozen=True)
class BaselineRun:
    tokens: tuple[int, ...]
    forwards: int  # target forwards after the prefill (one per streamer call)
    commit_times: tuple[tuple[float, int], ...]  # (perf_counter, tokens committed) per forward, prefill first


class TransformersBaseline:
    def __init__(self, folder: Path, dtype: torch.dtype | None = None, eos_ids: Sequence[int] = ()) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
        self.model.eval()
        self.eos_ids = list(eos_ids)

    def generate(self, prompt: Sequence[int], max_tokens: int, mode: str = "hf") -> BaselineRun:
        """Greedy ``generate``; ``mode`` ``hf-lookup`` adds prompt lookup. Records when each forward's tokens came."""
        import torch

        if mode not in BASELINES:
            raise ValueError(f"unknown baseline {mode!r}, expected one of {BASELINES}")
        times: list[tuple[float, int]] = []
        ids = torch.tensor([list(prompt)])
        extra: dict[str, Any] = {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if mode == "hf-lookup" else {}
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=self.eos_ids or None,
                pad_token_id=self.eos_ids[0] if self.eos_ids else None,
                streamer=_Clock(times.append),
                **extra,
            )
        tokens = tuple(int(t) for t in out[0, ids.shape[1] :])
        return BaselineRun(tokens, max(0, len(times) - 1), tuple(times))


class _Clock:
    """A transformers streamer that only notes the time and size of each ``put`` (the first is the prompt)."""

    def __init__(self, note: Callable[[tuple[float, int]], None]) -> None:
        self.note = note

    def put(self, value: torch.Tensor) -> None:
        self.note((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass
