"""The target's next token per node: greedy, or a draw keyed on (request seed, absolute position) (DESIGN §4.4).

A keyed draw is an exponential race: every token i of the vocabulary gets an Exp(1) variate E_i from a
counter-based hash (SplitMix64) of ``(seed, position, i)``, and the draw is the token with the largest p_i / E_i,
p the filtered target distribution (temperature, top-k, top-p). That is an exact sample of p (the race is won by
token i with probability p_i / Σp). Every node at the same position with the same prefix draws with the same
variates, so speculative output equals plain sampling with the same seed, token for token, whatever the tree, the
stage count or the mode.

Why a race and not the inverse CDF of one uniform: a tree's forward computes the same logits as a single row up
to fp32 rounding (other matrix shapes), and a draw must not flip on that. The inverse CDF flips whenever u lands
within the rounding of a cumulative boundary, which happens each time u falls among the vocabulary's long tail of
tiny probabilities (measured: a token of p = 2e-6 drawn, then a neighbour under a tree's rounding). The race flips
only when the two best p_i / E_i are within the rounding of each other: some thousand times rarer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from homespec.config import SamplingConfig
from homespec.core.messages import RESULT_TOP_K

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


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


@functools.lru_cache(maxsize=32)
def keyed_exponentials(seed: int, position: int, vocab: int) -> torch.Tensor:
    """[vocab] float64 Exp(1) variates, one per token, that depend only on (seed, position): the SplitMix64 stream
    of the key, computed in numpy's wrapping uint64 on the CPU (so every device draws alike)."""
    key = np.uint64(_splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)))
    with np.errstate(over="ignore"):
        x = key + (np.arange(1, vocab + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)  # in (0, 1)
    return torch.from_numpy(-np.log(u))


def next_tokens(logits: torch.Tensor, positions: Sequence[int], cfg: SamplingConfig) -> list[int]:
    """Per row of logits [n, vocab] for the node at ``positions[i]``: the token at ``positions[i] + 1``."""
    if cfg.greedy:
        return [int(t) for t in torch.argmax(logits, dim=-1)]
    probs = filtered_probs(logits, cfg)  # [n, vocab]
    vocab = probs.shape[-1]
    race = torch.stack([keyed_exponentials(cfg.seed, p + 1, vocab) for p in positions]).to(probs.device)  # [n, vocab]
    return [int(i) for i in torch.argmax(probs / race, dim=-1)]


def top_logprobs(
    logits: torch.Tensor, k: int = RESULT_TOP_K, chosen: Sequence[int] = ()
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The target's top-k tokens [n, k] and their log-probs [n, k] (for display, token recycling and the API's
    logprobs), and the log-prob of each ``chosen`` token (one per row, or none), all from the raw distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, tokens = torch.topk(logp, k, dim=-1)
    picked = logp.gather(-1, torch.tensor(list(chosen), device=logp.device)[:, None])[:, 0].tolist() if chosen else []
    return tokens, values, picked
