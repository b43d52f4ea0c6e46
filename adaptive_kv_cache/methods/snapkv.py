"""SnapKV (Li et al., 2024): the prompt's last queries (the observation window) vote for the keys to keep.

While a prompt is read, attention returns the column sums of the queries among its last `window` positions
(`window_from` = prompt length - window), accumulated in a per-slot `score` (the prompt may arrive in chunks).
When the prompt ends, the scores of the keys before the window are pooled along positions (avg or max,
`kernel` wide, zero padded at both ends of that prefix, as kvpress does) and the segment keeps the window plus
the best pooled keys up to its budget. Prefill only: generated tokens are appended and never evicted.

With `gqa: mean` the order is kvpress's (pooling and the mean over a query group are linear, so pooling the
group's mean equals the mean of the pooled heads).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaptive_kv_cache.config import _check_int, _fail
from adaptive_kv_cache.methods.base import PROTECT, BudgetConfig, ScoredMethod, _check_choice, prompt_lens
from llama.attention import EMPTY_POS, StatsRequest


@dataclass(frozen=True)
class SnapKVConfig(BudgetConfig):
    """window: observation window (the prompt's last queries, always kept); kernel: odd pooling width
    (1: no pooling); pooling: avg | max."""

    method: str = "snapkv"
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"
    decode: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("window", self.window, 1)
        _check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            _fail(f"kernel={self.kernel} must be odd (the pooled scores keep one value per position)")
        _check_choice("pooling", self.pooling, ("avg", "max"))
        if self.decode:
            _fail(f"decode=true is not allowed for {self.method or 'snapkv'}: its scores come from the prompt's "
                  f"observation window, so it compresses once, when the prompt ends; set decode to false")


class SnapKV(ScoredMethod):
    Config = SnapKVConfig
    slot_fields = {"score": (torch.float32, 0.0)}

    @property
    def reserved(self) -> int:
        return self.config.window

    def wants(self, cache, layer_id):
        if not any(cache.pending):
            return None
        frm = [L - self.config.window if pend else EMPTY_POS for L, pend in zip(cache.prompt_lens, cache.pending)]
        return StatsRequest(gqa=self.config.gqa, window_from=frm)

    def take(self, cache, layer_id, stats):
        for score, w in zip(cache.stores[layer_id].field("score"), stats.window):
            score += w

    def keep(self, cache, layer_id):
        out = super().keep(cache, layer_id)
        if not any(p and not f for p, f in zip(cache.pending, cache.pass_.finishing)):
            cache.stores[layer_id].drop_field("score")  # no prompt left to observe: free the scores
        return out

    def score(self, cache, layer_id, lay):
        pos, valid = lay["pos"], lay["valid"]
        L = prompt_lens(cache)[:, None]
        prefix = valid & (pos < L - self.config.window)
        order = pos.argsort(-1)  # at a prompt's end its segment holds positions 0 .. L - 1
        x = (lay["score"].double() * prefix).gather(-1, order)[:, None]
        k = self.config.kernel
        if self.config.pooling == "avg":
            x = F.avg_pool1d(x, k, stride=1, padding=k // 2)
        else:
            x = F.max_pool1d(x, k, stride=1, padding=k // 2)
        pooled = torch.empty_like(x[:, 0]).scatter_(-1, order, x[:, 0])
        return torch.where(prefix, pooled, PROTECT + pos.double())
