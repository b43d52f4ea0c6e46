"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks (the first positions) plus a window of recent tokens.

Needs no statistics, so attention always runs the fastest kernel. A segment keeps `sinks` first positions and
the most recent budget - sinks; with `decode: true` the window slides during decoding (a constant-size cache).
"""

from dataclasses import dataclass

import torch

from adaptive_kv_cache.config import _check_int
from adaptive_kv_cache.methods.base import PROTECT, BudgetConfig, ScoredMethod


@dataclass(frozen=True)
class StreamingConfig(BudgetConfig):
    """sinks: first positions always kept (kvpress: 4; SmolLM2 prompts carry no BOS, so they are the sink)."""

    method: str = "streaming_llm"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("sinks", self.sinks, 0)


class StreamingLLM(ScoredMethod):
    Config = StreamingConfig

    def score(self, cache, layer_id, lay):
        pos = lay["pos"].double()
        return torch.where(lay["pos"] < self.config.sinks, 2 * PROTECT, pos)  # then the newest first
