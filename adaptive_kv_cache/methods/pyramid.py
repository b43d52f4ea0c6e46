"""PyramidKV (Cai et al., 2024): SnapKV's scores with layer-wise budgets, more in the lower layers and less in
the upper ones, at the same mean (`budgets: pyramid`, `beta` as in kvpress)."""

from dataclasses import dataclass

from adaptive_kv_cache.methods.snapkv import SnapKV, SnapKVConfig


@dataclass(frozen=True)
class PyramidKVConfig(SnapKVConfig):
    method: str = "pyramidkv"
    budgets: str = "pyramid"


class PyramidKV(SnapKV):
    Config = PyramidKVConfig
