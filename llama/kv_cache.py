"""KV caches the attention layers talk to.

The cache owns storage and describes it; attention owns the math; compression is a step of its own after
attention. Each forward pass calls ``begin(tokens, start_pos)`` once; then every attention layer calls

    view = cache.append(layer_id, start_pos, xk, xv)      # store the new keys/values, describe what to attend
    output, stats = attend(xq, view, cache.stats_request(layer_id))
    cache.after_attention(layer_id, xq, view, stats)      # e.g. accumulate statistics, evict

and the pass ends with ``end()``. Caches are created per generation for the actual batch; nothing is allocated in
a constructor.
"""

from typing import Dict, List, Optional

import torch

from llama.attention import AttentionStats, DenseView, StatsRequest


class KVCache:
    """Interface of a KV cache."""

    def begin(self, tokens: torch.Tensor, start_pos: int) -> None:
        """Called once per forward pass before the first layer.

        Args:
            tokens: (bsz, seqlen) token ids about to be processed at positions start_pos...
            start_pos: absolute position of tokens[:, 0].
        """

    def append(self, layer_id: int, start_pos: int, xk: torch.Tensor, xv: torch.Tensor):
        """Stores the new keys/values of one layer and describes what the new queries attend to.

        Args:
            layer_id: index of the calling layer.
            start_pos: absolute position of the first new token.
            xk: (bsz, seqlen, n_kv_heads, head_dim) rotated keys of the new tokens.
            xv: (bsz, seqlen, n_kv_heads, head_dim) values of the new tokens.

        Returns:
            DenseView or PackedView (llama.attention) over every token the new queries may attend to,
            the new ones included.
        """
        raise NotImplementedError

    def stats_request(self, layer_id: int) -> Optional[StatsRequest]:
        """What this layer's attention should report back (None: nothing, the fastest kernel runs)."""
        return None

    def after_attention(self, layer_id: int, xq: torch.Tensor, view, stats: Optional[AttentionStats]) -> None:
        """Called after the layer attended: the place to accumulate statistics and to compress.

        Args:
            xq: (bsz, seqlen, n_heads, head_dim) the rotated queries.
            view: what `append` returned.
            stats: what attention reported for `stats_request(layer_id)`.
        """

    def end(self) -> None:
        """Called once per forward pass after the last layer."""

    def memory_stats(self) -> Dict:
        """Allocated and uncompressed bytes; see subclasses."""
        return {}


class NoCache(KVCache):
    """Stand-alone causal pass over the given tokens: nothing is kept."""

    def __init__(self, start_pos: int = 0):
        if start_pos != 0:
            raise ValueError(
                f"start_pos={start_pos} needs the keys of earlier positions: pass the generation's cache "
                f"to Transformer.forward"
            )

    def append(self, layer_id, start_pos, xk, xv):
        return DenseView(xk.transpose(1, 2), xv.transpose(1, 2), 0)


class DenseKVCache(KVCache):
    """Uncompressed cache: every (sequence, KV head) keeps every token, in position order.

    Storage for each layer is (bsz, n_kv_heads, capacity, head_dim), allocated on first use for the actual
    batch and grown geometrically (capped at max_seq_len) when a forward pass goes past the capacity.
    """

    def __init__(self, n_layers: int, max_seq_len: int, capacity: int = 0):
        """
        Args:
            n_layers: number of attention layers.
            max_seq_len: hard limit on positions.
            capacity: initial number of positions to allocate on first use (0 = exactly what the first
                pass needs); a generation passes prompt length + max_gen_len so no growth happens.
        """
        self.n_layers = n_layers
        self.max_seq_len = max_seq_len
        self.initial_capacity = capacity
        self.cache_k: List[torch.Tensor] = []
        self.cache_v: List[torch.Tensor] = []
        self.length = 0
        self._end = 0

    def begin(self, tokens, start_pos):
        if start_pos != self.length:
            raise ValueError(
                f"start_pos={start_pos} but the cache holds {self.length} positions; a cache serves one "
                f"generation: feed positions in order or start a new cache"
            )
        if start_pos + tokens.shape[1] > self.max_seq_len:
            raise ValueError(
                f"{start_pos + tokens.shape[1]} positions exceed max_seq_len={self.max_seq_len}; "
                f"build the model with a larger max_seq_len or shorten the input"
            )
        self._end = start_pos + tokens.shape[1]

    def _reserve(self, layer_id: int, needed: int, like: torch.Tensor):
        bsz, _, n_kv_heads, head_dim = like.shape
        if layer_id == len(self.cache_k):
            capacity = min(self.max_seq_len, max(needed, self.initial_capacity))
            self.cache_k.append(like.new_zeros(bsz, n_kv_heads, capacity, head_dim))
            self.cache_v.append(like.new_zeros(bsz, n_kv_heads, capacity, head_dim))
            return
        capacity = self.cache_k[layer_id].shape[2]
        if needed > capacity:
            grown = min(self.max_seq_len, max(needed, 2 * capacity))
            pad = (0, 0, 0, grown - capacity)
            self.cache_k[layer_id] = torch.nn.functional.pad(self.cache_k[layer_id], pad)
            self.cache_v[layer_id] = torch.nn.functional.pad(self.cache_v[layer_id], pad)

    def append(self, layer_id, start_pos, xk, xv):
        end = start_pos + xk.shape[1]
        self._reserve(layer_id, end, xk)
        self.cache_k[layer_id][:, :, start_pos:end] = xk.transpose(1, 2)
        self.cache_v[layer_id][:, :, start_pos:end] = xv.transpose(1, 2)
        keys = self.cache_k[layer_id][:, :, :end]  # (bsz, n_kv_heads, cache_len, head_dim)
        values = self.cache_v[layer_id][:, :, :end]
        return DenseView(keys, values, start_pos)

    def end(self):
        self.length = self._end

    def memory_stats(self) -> Dict:
        """Per-layer and total KV memory, in the same layout as the compressed caches report.

        raw_bytes counts the tokens held; allocated_bytes the buffers, whose capacity may exceed them.
        """
        layers = []
        for k, v in zip(self.cache_k, self.cache_v):
            bsz, n_kv_heads, _, head_dim = k.shape
            raw = 2 * bsz * n_kv_heads * self.length * head_dim * k.element_size()
            allocated = k.numel() * k.element_size() + v.numel() * v.element_size()
            layers.append({"raw_bytes": raw, "allocated_bytes": allocated, "kept_bytes": raw,
                           "slack_bytes": allocated - raw, "metadata_bytes": 0,
                           "kept_tokens": bsz * n_kv_heads * self.length, "segments": bsz * n_kv_heads,
                           "policies": {"full": bsz * n_kv_heads}})
        keys = [k for k in (layers[0] if layers else {}) if k != "policies"]
        total = {k: sum(d[k] for d in layers) for k in keys}
        total["policies"] = {"full": sum(d["policies"]["full"] for d in layers)}
        allocated = total.get("allocated_bytes", 0)
        return {"layers": layers, "total": total, "peak_allocated_bytes": allocated,
                "peak_raw_bytes": total.get("raw_bytes", 0), "tokens": self.length,
                "batch": self.cache_k[0].shape[0] if self.cache_k else 0, "candidates": ["full"], "heads": []}
