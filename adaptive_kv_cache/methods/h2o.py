"""H2O (Zhang et al., NeurIPS 2023): heavy hitters (the most attention received so far) plus recent tokens.

Every pass asks attention for the column sums of its queries (prompt and decode alike) and adds them to a
per-slot `score`; an eviction keeps the last ceil(recent x budget) positions and fills the rest of the budget
with the highest scores. `normalize: true` divides a token's score by the queries that saw it (the fix for the
bias towards old tokens that FastGen's frequent policy uses; with it H2O ranks as FastGen's frequent set).
"""

import math
from dataclasses import dataclass

import torch

from adaptive_kv_cache.config import _check_float
from adaptive_kv_cache.methods.base import PROTECT, BudgetConfig, ScoredMethod, _check_bool, positions_now
from llama.attention import StatsRequest


@dataclass(frozen=True)
class H2OConfig(BudgetConfig):
    """recent: share of the budget for the most recent tokens, [0, 1] (the paper: half heavy, half recent);
    normalize: rank by attention per query that saw the token instead of the raw sum."""

    method: str = "h2o"
    recent: float = 0.5
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "recent", _check_float("recent", self.recent, 0.0, 1.0, lo_open=False))
        _check_bool("normalize", self.normalize)


class H2O(ScoredMethod):
    Config = H2OConfig
    slot_fields = {"score": (torch.float32, 0.0)}

    def wants(self, cache, layer_id):
        return StatsRequest(gqa=self.config.gqa)

    def take(self, cache, layer_id, stats):
        for score, colsum in zip(cache.stores[layer_id].field("score"), stats.colsum):
            score += colsum

    def score(self, cache, layer_id, lay):
        n = positions_now(cache)[:, None]
        s = lay["score"].double()
        if self.config.normalize:
            s = s / (n - lay["pos"]).clamp(min=1)
        window = cache.per_segment([math.ceil(self.config.recent * b - 1e-9)
                                    for b in self.budgets(cache, layer_id)])[:, None]
        recent = lay["pos"] >= n - window
        return torch.where(recent, PROTECT + lay["pos"].double(), s)
