"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most.

Statistics are asked for only in the passes that end with an eviction, and only for the last query of the pass
(`window_from` = its position): the prompt's last token when a prompt ends, the current token while decoding.
They are used at once by the eviction of the same pass, so no per-slot field is stored. Per KV head (the
query heads sharing one are combined by `gqa`); the paper averages over all heads of a layer and keeps one set
per layer.
"""

from dataclasses import dataclass

import torch

from adaptive_kv_cache.methods.base import BudgetConfig, ScoredMethod
from llama.attention import StatsRequest


@dataclass(frozen=True)
class TOVAConfig(BudgetConfig):
    method: str = "tova"


class TOVA(ScoredMethod):
    Config = TOVAConfig

    def __init__(self, config, context=None, observer=None):
        super().__init__(config, context, observer)
        self.last = {}  # layer -> per group (n, width) attention of the pass's last query

    def wants(self, cache, layer_id):
        if not cache.pass_.compact:
            return None
        return StatsRequest(gqa=self.config.gqa, window_from=[cache.pass_.end - 1] * cache.bsz)

    def take(self, cache, layer_id, stats):
        self.last[layer_id] = stats.window

    def score(self, cache, layer_id, lay):
        store = cache.stores[layer_id]
        last = self.last.pop(layer_id)
        S = lay["pos"].shape[1]
        out = torch.zeros(store.n_seg, S, dtype=torch.float64, device=lay["pos"].device)
        for g, w in zip(store.groups, last):
            out[g.seg, : g.width] = w.double()
        return out
