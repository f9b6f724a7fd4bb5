"""The target's next token per node: greedy, or a draw keyed on (request seed, absolute position) (DESIGN §4.4).

A keyed draw maps ``(seed, position)`` to a uniform u in [0, 1) with a counter-based hash (SplitMix64), then
takes the inverse CDF of the filtered target distribution (temperature, top-k, top-p) in token-id order. Every
node at the same position with the same prefix draws with the same u, so speculative output equals plain
sampling with the same seed, token for token, whatever the tree, the stage count or the mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from homespec.config import SamplingConfig
from homespec.core.messages import RESULT_TOP_K
from homespec.events import TokenLogprob

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on (seed, position): 53 random bits."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 11) / float(1 << 53)


def filtered_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a keyed draw samples from: [n, vocab] float64, rows sum to 1."""
    x = logits.double() / cfg.temperature  # [n, vocab]
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if cfg.top_p < 1.0:
        probs = probs.masked_fill(~_nucleus(probs, cfg.top_p), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _nucleus(probs: torch.Tensor, top_p: float, head: int = 1024) -> torch.Tensor:
    """Keep-mask [n, vocab]: the most probable tokens whose preceding mass is below top_p. Sorts only the top
    ``head`` tokens of each row, and the whole row only where those hold less than top_p."""
    k = min(head, probs.shape[-1])
    values, order = torch.topk(probs, k, dim=-1)  # [n, k], descending
    keep_sorted = (torch.cumsum(values, dim=-1) - values) < top_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep_sorted)
    short = values.sum(-1) < top_p  # [n]: the head is not enough
    if k < probs.shape[-1] and bool(short.any()):
        rows = probs[short]
        values, order = torch.sort(rows, dim=-1, descending=True, stable=True)
        keep_sorted = (torch.cumsum(values, dim=-1) - values) < top_p
        keep[short] = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return keep


def next_tokens(logits: torch.Tensor, positions: Sequence[int], cfg: SamplingConfig) -> list[int]:
    """Per row of logits [n, vocab] for the node at ``positions[i]``: the token at ``positions[i] + 1``."""
    if cfg.greedy:
        return [int(t) for t in torch.argmax(logits, dim=-1)]
    probs = filtered_probs(logits, cfg)  # [n, vocab]
    cdf = torch.cumsum(probs, dim=-1)  # [n, vocab]
    u = torch.tensor([keyed_uniform(cfg.seed, p + 1) for p in positions], dtype=torch.float64, device=cdf.device)  # [n]
    target = (u * cdf[:, -1]).unsqueeze(-1)  # [n, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [n]
    return [int(i) for i in idx.clamp(max=cdf.shape[-1] - 1)]


def top_logprobs(
    logits: torch.Tensor, k: int = RESULT_TOP_K, chosen: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The target's top-k tokens [n, k] and their log-probs [n, k] (for display, token recycling and the API's
    logprobs), and the log-prob of each ``chosen`` token (one per row, or none), all from the raw distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, tokens = torch.topk(logp, k, dim=-1)
    picked = logp.gather(-1, torch.tensor(list(chosen), device=logp.device)[:, None])[:, 0].tolist() if chosen else []
    return tokens, values, picked


def token_logprobs(
    tokens: Sequence[int], chosen_lp: Sequence[float], top_t: list[list[int]], top_lp: list[list[float]]
) -> list[TokenLogprob]:
    """Per row: the chosen token's log-prob and the top alternatives, as the engine reports them."""
    return [
        TokenLogprob(t, lp, tuple(zip(tt, tl, strict=True)))
        for t, lp, tt, tl in zip(tokens, chosen_lp, top_t, top_lp, strict=True)
    ]
