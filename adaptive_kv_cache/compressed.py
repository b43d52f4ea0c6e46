"""The compressed KV cache: a packed store per layer, driven by a compression method.

The cache is generic; a method (FastGen in `adaptive_kv_cache/fastgen.py`) is a small class that says which
per-slot fields it keeps, which attention statistics it needs, and which slots to keep. The cache runs the
phases every method shares:

* a sequence reads its prompt (it is *pending*): its segments keep every token and the method may ask for
  statistics (while every sequence is pending the store is one position-ordered block, so attention runs the
  dense tiled kernel and the statistics come from the same probabilities as the output);
* the pass in which its prompt ends: the method decides per segment (`on_prompt_end`, e.g. FastGen's profiler)
  and the layer is compacted to what it keeps;
* decoding: every pass appends the new token ("attend first"); every `evict_every` passes (k) one batched
  compaction applies the method's keep rule ("then compress"). Between compactions a segment may hold up to
  k - 1 tokens more than its method keeps; k = 1 evicts after every token, as the paper describes.

A codec (`adaptive_kv_cache/codecs.py`) decides how kept tokens are stored: each layer keeps full precision while
any sequence reads its prompt and is sealed (quantised) right after the compaction of the pass in which the last
prompt ends, so methods profile on full-precision keys and nothing is quantised that the prompt's end evicts.

Compaction is the only step that reads anything back on the host (the new segment lengths). Decode steps between
compactions issue no host-device synchronisation.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from adaptive_kv_cache.codecs import Codec
from adaptive_kv_cache.store import PackedStore
from llama.attention import AttentionStats, DenseView, StatsRequest
from llama.kv_cache import KVCache


class CompressionMethod:
    """The interface between a method and `CompressedCache` (all hooks are called per layer except `begin`).

    Attributes:
        name: registry name.
        slot_fields: per-slot fields the method keeps next to keys, values and positions:
            name -> (dtype, value of an empty slot).
    """

    name = "none"
    slot_fields: Dict[str, Tuple[torch.dtype, float]] = {}

    def begin(self, cache: "CompressedCache", tokens: torch.Tensor, start_pos: int) -> Dict[str, torch.Tensor]:
        """Per-slot field values of the new tokens: name -> (bsz, seqlen) (same for every KV head)."""
        return {}

    def stats_request(self, cache: "CompressedCache", layer_id: int) -> Optional[StatsRequest]:
        return None

    def on_stats(self, cache: "CompressedCache", layer_id: int, stats: AttentionStats) -> None:
        """Consumes what attention reported (e.g. accumulates scores into the store's fields)."""

    def on_prompt_end(self, cache: "CompressedCache", layer_id: int, segments: torch.Tensor) -> None:
        """The prompts of `segments` ((n_seg,) bool) ended in this pass: decide how to compress them."""

    def keep(self, cache: "CompressedCache", layer_id: int) -> List[Optional[torch.Tensor]]:
        """Per group of the layer's store, (n, width) bool slots to keep (None: keep all)."""
        return [None] * len(cache.stores[layer_id].groups)

    def policy_names(self) -> List[str]:
        return []

    def policy_counts(self, cache: "CompressedCache", layer_id: int) -> List[int]:
        return []

    def head_info(self, cache: "CompressedCache", layer_id: int) -> List[List[Tuple[str, float]]]:
        """Per sequence, per local KV head: (policy or budget name, a quality figure such as recovery)."""
        return []


@dataclass
class Pass:
    """What the host knows about the forward pass in flight."""

    start_pos: int
    seqlen: int
    finishing: List[bool]  # prompt ends in this pass (the sequence was pending)
    compact: bool  # compaction after attention in this pass
    new_fields: Dict[str, torch.Tensor]
    slot_values: Optional[Dict[str, torch.Tensor]] = None

    @property
    def end(self) -> int:
        return self.start_pos + self.seqlen


class CompressedCache(KVCache):
    """KV cache for one generation over a batch of prompts, compressed by `method` on a packed store."""

    def __init__(self, method: CompressionMethod, n_layers: int, prompt_tokens: Sequence[Sequence[int]],
                 max_seq_len: int, evict_every: int = 1, store_options: Optional[Dict] = None,
                 codec: Optional[Codec] = None):
        """
        Args:
            method: the compression method (one instance per generation; it may keep per-layer state).
            n_layers: attention layers of the model.
            prompt_tokens: the batch's prompts; sequence b is pending until its len(prompt_tokens[b]) tokens
                have been processed.
            max_seq_len: hard limit on positions.
            evict_every: k, passes between compactions once a sequence decodes.
            store_options: keyword arguments of every layer's PackedStore (grouping, free columns).
            codec: how kept tokens are stored (adaptive_kv_cache/codecs.py; None: full precision). Layers are
                sealed (quantised) after the compaction of the pass in which the batch's last prompt ends.
        """
        self.method = method
        self.codec = codec if codec is not None else Codec()
        self.head_dim = 0
        self.kv_dtype: Optional[torch.dtype] = None
        self.n_layers = n_layers
        self.prompt_tokens = [list(p) for p in prompt_tokens]
        self.prompt_lens = [len(p) for p in prompt_tokens]
        self.max_seq_len = max_seq_len
        self.evict_every = evict_every
        self.store_options = dict(store_options or {})
        self.pending = [True] * len(self.prompt_lens)
        self.stores: List[Optional[PackedStore]] = [None] * n_layers
        self.n_kv_heads = 0
        self.length = 0
        self.steps_since_compaction = 0
        self.peak_allocated = 0
        self.peak_raw = 0
        self._allocation_key: Optional[Tuple] = None
        self.pass_: Optional[Pass] = None

    @property
    def bsz(self) -> int:
        return len(self.prompt_lens)

    # --- per forward pass -------------------------------------------------------------------------------------

    def begin(self, tokens: torch.Tensor, start_pos: int) -> None:
        bsz, seqlen = tokens.shape
        if bsz != self.bsz:
            raise ValueError(f"the cache was set up for {self.bsz} sequences, got a batch of {bsz}")
        if start_pos != self.length:
            raise ValueError(
                f"start_pos={start_pos} but the cache holds {self.length} positions; a cache serves one "
                f"generation: feed positions in order or start a new cache"
            )
        if start_pos + seqlen > self.max_seq_len:
            raise ValueError(f"{start_pos + seqlen} positions exceed max_seq_len={self.max_seq_len}")
        end = start_pos + seqlen
        finishing = [p and n <= end for p, n in zip(self.pending, self.prompt_lens)]
        decoding = any(finishing) or not all(self.pending)
        compact = any(finishing) or (decoding and self.steps_since_compaction + 1 >= self.evict_every)
        self.pass_ = Pass(start_pos, seqlen, finishing, compact, {})
        self.pass_.new_fields = self.method.begin(self, tokens, start_pos)

    def end(self) -> None:
        p = self.pass_
        self.length = p.end
        self.pending = [pend and not fin for pend, fin in zip(self.pending, p.finishing)]
        self.steps_since_compaction = 0 if p.compact else self.steps_since_compaction + 1
        stores = [s for s in self.stores if s is not None and s.allocated]
        # allocated bytes change only with the buffers: sum them again only when a store's buffers or the codec's
        # side buffers changed
        key = (*(s.version if s is not None else -1 for s in self.stores),
               *(self.codec.side_bytes(i) for i in range(self.n_layers)))
        if key != self._allocation_key:
            self._allocation_key = key
            self.peak_allocated = max(self.peak_allocated, sum(self._allocated(i) for i, s in enumerate(self.stores)
                                                               if s is not None and s.allocated))
        self.peak_raw = max(self.peak_raw, sum(self._raw_bytes(s) for s in stores))

    # --- per layer --------------------------------------------------------------------------------------------

    def min_free(self) -> int:
        """Free columns a layer needs after this pass: the rest of the longest prompt, and the appends until the
        next eviction. Eviction then runs on the k-step schedule alone, which every sequence of a batch shares, so
        a sequence keeps the same tokens whatever it is batched with."""
        steps = self.evict_every - (0 if self.pass_.compact else self.steps_since_compaction + 1)
        return max(1, steps) + max(0, max(self.prompt_lens) - self.pass_.end)

    def append(self, layer_id, start_pos, xk, xv):
        bsz, seqlen, n_kv, head_dim = xk.shape
        n_seg = bsz * n_kv
        if self.stores[layer_id] is None:
            self.n_kv_heads, self.head_dim, self.kv_dtype = n_kv, head_dim, xk.dtype
            self.stores[layer_id] = PackedStore(n_seg, dict(self.method.slot_fields), **self.store_options)
        store = self.stores[layer_id]
        k, v = xk.transpose(1, 2), xv.transpose(1, 2)  # (bsz, n_kv, seqlen, head_dim)
        sealed = self.codec.sealed(store) if store.allocated else False
        rows = (k.reshape(n_seg * seqlen, head_dim), v.reshape(n_seg * seqlen, head_dim))
        values = {**(self.codec.encode(*rows) if sealed else dict(zip(("k", "v"), rows))),
                  **self._slot_values(n_kv, xk.device)}
        store.append(values, self.min_free())
        if sealed:
            self.codec.after_append(layer_id, store, k.reshape(n_seg, seqlen, head_dim),
                                    v.reshape(n_seg, seqlen, head_dim), start_pos)
            view = store.view(start_pos, n_kv)
            for g, reader in zip(view.groups, self.codec.readers(layer_id, store)):
                g.codes = reader
            return view
        if store.positional:
            # nothing evicted yet: slot s holds position s in every segment, a dense view for the fast kernels
            k, v = store.field("k")[0], store.field("v")[0]
            return DenseView(k.view(bsz, n_kv, -1, head_dim), v.view(bsz, n_kv, -1, head_dim), start_pos)
        return store.view(start_pos, n_kv)

    def _slot_values(self, n_kv: int, device) -> Dict[str, torch.Tensor]:
        """Positions and method fields of the new slots, (n_seg * seqlen,) segment-major; made once per pass."""
        p = self.pass_
        if p.slot_values is None:
            bsz = self.bsz
            pos = p.start_pos + torch.arange(p.seqlen, dtype=torch.int32, device=device)
            p.slot_values = {"pos": pos.repeat(bsz * n_kv)}
            for name, t in p.new_fields.items():  # (bsz, seqlen), the same for every KV head of a sequence
                dtype = self.method.slot_fields[name][0]
                p.slot_values[name] = t[:, None].expand(bsz, n_kv, p.seqlen).reshape(-1).to(dtype)
        return p.slot_values

    def stats_request(self, layer_id: int) -> Optional[StatsRequest]:
        return self.method.stats_request(self, layer_id)

    def after_attention(self, layer_id, xq, view, stats):
        p = self.pass_
        if stats is not None:
            self.method.on_stats(self, layer_id, stats)
        if any(p.finishing):
            seg = torch.tensor(p.finishing, device=xq.device).repeat_interleave(self.n_kv_heads)
            self.method.on_prompt_end(self, layer_id, seg)
        store = self.stores[layer_id]
        if p.compact:
            store.compact(self.method.keep(self, layer_id), self.min_free())
        if not self.codec.sealed(store) and all(f or not pend for pend, f in zip(self.pending, p.finishing)):
            # every prompt has been read and profiled on full precision: quantise what this layer keeps
            self.codec.seal(layer_id, store, p.end)

    # --- what the methods read ----------------------------------------------------------------------------------

    def per_segment(self, values: Sequence) -> torch.Tensor:
        """(bsz,) per-sequence values -> (n_seg,) per-segment long tensor."""
        device = next(s.device for s in self.stores if s is not None)
        return torch.tensor(values, device=device).repeat_interleave(self.n_kv_heads)

    # --- reporting ----------------------------------------------------------------------------------------------

    def _raw_bytes(self, store: PackedStore, element_size: Optional[int] = None) -> int:
        """What an uncompressed cache of the same tokens allocates: every segment holds every position (in the
        model's dtype, or `element_size` bytes per number)."""
        el = element_size or self.kv_dtype.itemsize
        return 2 * store.n_seg * self.length * self.head_dim * el

    def _bytes(self, layer_id: int) -> Dict[str, int]:
        return self.codec.nbytes(layer_id, self.stores[layer_id], self.length, self.head_dim,
                                 self.kv_dtype.itemsize)

    def _allocated(self, layer_id: int) -> int:
        b = self._bytes(layer_id)
        return b["codes"] + b["scales"] + b["residual"]

    def memory_stats(self) -> Dict:
        """Per-layer and total KV memory of this generation, summed over model-parallel ranks.

        Returns:
            dict with `layers` (one dict per layer: raw_bytes, allocated_bytes, kept_bytes, slack_bytes,
            metadata_bytes, kept_tokens, segments, codes_bytes, scales_bytes, residual_bytes, raw16_bytes,
            policies {name: count}), `total` (the same summed), `kv_quant` (the codec),
            `peak_allocated_bytes`, `peak_raw_bytes`, `tokens` (positions processed), `batch`, `candidates`
            (policy names) and `heads`: per layer, per sequence, per local KV head, (policy, recovery) of this rank.
        """
        names = self.method.policy_names()
        rows = []
        for layer_id, st in enumerate(self.stores):
            if st is None or not st.allocated:
                rows.append([0.0] * (11 + len(names)))
                continue
            b = self._bytes(layer_id)
            allocated = b["codes"] + b["scales"] + b["residual"]
            kv_fields = ("k", "v") if not self.codec.sealed(st) else self.codec.code_fields + self.codec.scale_fields
            meta = st.nbytes([n for n in st.buf if n not in kv_fields])
            rows.append([self._raw_bytes(st), allocated, b["kept"], allocated - b["kept"], meta, sum(st.lengths),
                         st.n_seg, b["codes"], b["scales"], b["residual"], self._raw_bytes(st, 2),
                         *self.method.policy_counts(self, layer_id)])
        table = torch.tensor(rows + [[self.peak_allocated, self.peak_raw] + [0.0] * (9 + len(names))],
                             dtype=torch.float64)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from fairscale.nn.model_parallel.initialize import get_model_parallel_group

            store = next((s for s in self.stores if s is not None and s.allocated), None)
            device = store.device if store is not None else "cpu"
            table = table.to(device)
            torch.distributed.all_reduce(table, group=get_model_parallel_group())
            table = table.cpu()
        keys = ["raw_bytes", "allocated_bytes", "kept_bytes", "slack_bytes", "metadata_bytes", "kept_tokens",
                "segments", "codes_bytes", "scales_bytes", "residual_bytes", "raw16_bytes"]
        layers = []
        for r in table[:-1].tolist():
            d = {k: int(v) for k, v in zip(keys, r)}
            d["policies"] = {n: int(c) for n, c in zip(names, r[len(keys):])}
            layers.append(d)
        total = {k: sum(d[k] for d in layers) for k in keys}
        total["policies"] = {n: sum(d["policies"][n] for d in layers) for n in names}
        return {
            "layers": layers,
            "total": total,
            "peak_allocated_bytes": int(table[-1, 0]),
            "peak_raw_bytes": int(table[-1, 1]),
            "tokens": self.length,
            "batch": self.bsz,
            "candidates": names,
            "method": self.method.name,
            "kv_quant": self.codec.name,
            "heads": [self.method.head_info(self, i) if s is not None else [] for i, s in enumerate(self.stores)],
        }
