"""FastGen's basic policies and their unions.

A policy is a small dataclass with a pure function from per-token statistics to a keep mask. The same
function serves profiling (statistics of the whole prompt, n = L) and decoding (statistics of the tokens a
head still holds, n = current length). Hybrids are unions of basic policies.

All tensors are batched over leading dimensions: one row per (sequence, KV head) segment, S token slots.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from adaptive_kv_cache.budgets import top_k


@dataclass
class TokenStats:
    """What a (sequence, KV head) knows about the tokens it holds.

    Attributes:
        valid: (..., S) bool, slot holds a token.
        pos: (..., S) long, absolute position j of each token.
        special: (..., S) bool, token is special (control token or part of a chat marker).
        punct: (..., S) bool, token is punctuation.
        score: (..., S) float, attention the token has received so far, summed over queries (for GQA,
            aggregated over the query group).
        n: (..., 1) long, tokens seen so far (current length); queries that could see token j: n - j.
        prompt_len: (..., 1) long, prompt length L, which fixes the local window.
        seen_from: (..., 1) long, the first query position `score` counts (an observation window's start:
            the queries before it were not summed), or None: every query counts.
    """

    valid: torch.Tensor
    pos: torch.Tensor
    special: torch.Tensor
    punct: torch.Tensor
    score: torch.Tensor
    n: torch.Tensor
    prompt_len: torch.Tensor
    seen_from: Optional[torch.Tensor] = None

    def normalised_score(self) -> torch.Tensor:
        """(..., S) accumulated attention divided by the number of counted queries that could see each token."""
        first = self.pos if self.seen_from is None else torch.maximum(self.pos, self.seen_from)
        return self.score / (self.n - first).clamp(min=1)


def ceil_ratio(ratio: float, n: torch.Tensor) -> torch.Tensor:
    """ceil(ratio * n) as long, in float64 with a tolerance so that e.g. 0.3 * 10 gives 3, not 4."""
    return torch.ceil(n.double() * ratio - 1e-9).long()


@dataclass(frozen=True)
class Special:
    name = "special"
    windowed = False

    def keep(self, s: TokenStats) -> torch.Tensor:
        return s.valid & s.special


@dataclass(frozen=True)
class Punct:
    name = "punct"
    windowed = False

    def keep(self, s: TokenStats) -> torch.Tensor:
        return s.valid & s.punct


@dataclass(frozen=True)
class Local:
    """The most recent W = ceil(r_l * L) tokens; the window is fixed by the prompt length L."""

    r_l: float
    name = "local"
    windowed = True

    def __post_init__(self):
        if not 0.0 < self.r_l <= 1.0:
            raise ValueError(f"r_l={self.r_l} is outside the allowed range (0, 1]")

    def window(self, prompt_len: torch.Tensor) -> torch.Tensor:
        return ceil_ratio(self.r_l, prompt_len)

    def keep(self, s: TokenStats) -> torch.Tensor:
        return s.valid & ((s.n - 1 - s.pos) < self.window(s.prompt_len))


@dataclass(frozen=True)
class Frequent:
    """The top ceil(r_f * n) tokens by normalised accumulated attention.

    `pool` > 1 (odd; an option of this project) ranks each token by the best score among its `pool` nearest
    held tokens in position order (itself and pool // 2 on each side; every prompt position while the prompt is
    profiled), so the neighbours of an attended token stay with it: a number spelt over several tokens is kept
    whole (SnapKV's max pooling).
    """

    r_f: float
    pool: int = 1
    name = "frequent"
    windowed = False

    def __post_init__(self):
        if not 0.0 < self.r_f <= 1.0:
            raise ValueError(f"r_f={self.r_f} is outside the allowed range (0, 1]")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool={self.pool} must be an odd number >= 1")

    def keep(self, s: TokenStats) -> torch.Tensor:
        score = s.normalised_score()
        if self.pool > 1:  # pooled in position order; empty slots (-inf) lend nothing, and borrow nothing
            score = score.masked_fill(~s.valid, float("-inf"))
            by_pos = torch.argsort(s.pos, dim=-1, stable=True)
            flat = score.gather(-1, by_pos).reshape(-1, 1, score.shape[-1])
            pooled = F.max_pool1d(flat, self.pool, stride=1, padding=self.pool // 2).view_as(score)
            score = torch.empty_like(score).scatter_(-1, by_pos, pooled)
        # descending score, ties towards the older token: the same set whatever order a packed cache holds
        return top_k(score, s.pos, s.valid, ceil_ratio(self.r_f, s.n))


@dataclass(frozen=True)
class Full:
    name = "full"
    windowed = False

    def keep(self, s: TokenStats) -> torch.Tensor:
        return s.valid


#: Basic policies by name; each factory takes the FastGen config.
POLICIES: Dict[str, object] = {
    "special": lambda cfg: Special(),
    "punct": lambda cfg: Punct(),
    "local": lambda cfg: Local(cfg.r_l),
    "frequent": lambda cfg: Frequent(cfg.r_f, cfg.pool),
    "full": lambda cfg: Full(),
}
BASIC_ORDER: Tuple[str, ...] = tuple(POLICIES)


@dataclass(frozen=True)
class Hybrid:
    """A union of basic policies: keeps a token when any member keeps it."""

    members: tuple

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    def keep(self, s: TokenStats) -> torch.Tensor:
        mask = torch.zeros_like(s.valid)
        for m in self.members:
            mask = mask | m.keep(s)
        return mask

    def flags(self) -> torch.Tensor:
        """(len(BASIC_ORDER),) bool membership vector over the basic policies."""
        names = {m.name for m in self.members}
        return torch.tensor([n in names for n in BASIC_ORDER])


def build_candidates(config) -> Tuple[Hybrid, ...]:
    """The config's candidate list as Hybrids, cheapest first."""
    return tuple(Hybrid(tuple(POLICIES[n](config) for n in cand)) for cand in config.candidates)


def basic_policies(config) -> Tuple[object, ...]:
    """One instance of each basic policy, in BASIC_ORDER."""
    return tuple(POLICIES[n](config) for n in BASIC_ORDER)


def union_keep(flags: torch.Tensor, basics: Sequence[object], s: TokenStats) -> torch.Tensor:
    """Keep masks of many segments whose hybrids differ, without a loop over segments.

    Args:
        flags: (..., len(basics)) bool, which basic policies each segment's hybrid contains.
        basics: the basic policies, in the order of the flags' last dimension.
        s: statistics with leading dims (...).

    Returns:
        torch.Tensor: (..., S) bool keep mask.
    """
    mask = torch.zeros_like(s.valid)
    for k, policy in enumerate(basics):
        member = flags[..., k : k + 1]
        if bool(member.any()):
            mask = mask | (member & policy.keep(s))
    return mask


