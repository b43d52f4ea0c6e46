"""What the masked references share: a full-size buffer plus a keep mask per (sequence, KV head), the eviction
schedule written from its definition, and each head's attention probabilities recomputed in float64.

It shares no storage, statistics or method code with `adaptive_kv_cache`; only the view types that hand the
buffer to the model's attention come from `llama.attention`.
"""

import math

import torch

from llama.attention import EMPTY_POS, KVGroup, PackedView
from llama.kv_cache import KVCache


class MaskedCache(KVCache):
    """Subclasses add per-slot fields (`fields`) and decide what `keep` holds in `after_attention`.

    Attributes:
        fields: name -> dtype of the extra (bsz, n_kv, max_len) tensors each layer keeps.
    """

    fields = {}

    def __init__(self, evict_every, n_layers, prompt_tokens, max_len):
        self.evict_every, self.max_len = evict_every, max_len
        self.prompt_lens = [len(p) for p in prompt_tokens]
        self.layers = [None] * n_layers
        self.pending = [True] * len(prompt_tokens)
        self.since = 0  # passes since the last eviction
        self.length = 0

    def begin(self, tokens, start_pos):
        self.start, self.stop = start_pos, start_pos + tokens.shape[1]
        self.finishing = [p and n <= self.stop for p, n in zip(self.pending, self.prompt_lens)]
        decoding = any(self.finishing) or not all(self.pending)
        self.evict = any(self.finishing) or (decoding and self.since + 1 >= self.evict_every)

    def new_layer(self, bsz, n_kv, xk):
        """The layer's buffers: keys, values, the keep mask and `fields`."""
        hd = xk.shape[-1]
        st = {"k": xk.new_zeros(bsz, n_kv, self.max_len, hd), "v": xk.new_zeros(bsz, n_kv, self.max_len, hd),
              "keep": torch.zeros(bsz, n_kv, self.max_len, dtype=torch.bool)}
        st.update({name: torch.zeros(bsz, n_kv, self.max_len, dtype=dt) for name, dt in self.fields.items()})
        return st

    def append(self, layer_id, start_pos, xk, xv):
        bsz, seqlen, n_kv, hd = xk.shape
        if self.layers[layer_id] is None:
            self.layers[layer_id] = self.new_layer(bsz, n_kv, xk)
        st = self.layers[layer_id]
        st["k"][:, :, start_pos:self.stop] = xk.transpose(1, 2)
        st["v"][:, :, start_pos:self.stop] = xv.transpose(1, 2)
        st["keep"][:, :, start_pos:self.stop] = True
        keep = st["keep"][:, :, : self.stop].reshape(bsz * n_kv, self.stop)
        pos = torch.where(keep, torch.arange(self.stop, dtype=torch.int32), EMPTY_POS)
        bias = torch.zeros(pos.shape).masked_fill_(~keep, float("-inf"))
        group = KVGroup(st["k"][:, :, : self.stop].reshape(bsz * n_kv, self.stop, hd),
                        st["v"][:, :, : self.stop].reshape(bsz * n_kv, self.stop, hd), pos,
                        torch.arange(bsz * n_kv), (0, bsz * n_kv), bias)
        return PackedView([group], start_pos, n_kv)

    def probs(self, layer_id, xq, b, h, gqa):
        """(seqlen, stop) float64 attention of sequence b's new queries on KV head h's held keys, the query heads
        sharing it combined by `gqa` (mean or max)."""
        st = self.layers[layer_id]
        n_rep, hd = xq.shape[2] // st["k"].shape[1], xq.shape[-1]
        end = self.stop
        held = st["keep"][b, h, :end]
        q = xq[b, :, h * n_rep : (h + 1) * n_rep].double().transpose(0, 1)  # (n_rep, seqlen, hd)
        s = q @ st["k"][b, h, :end].double().T / math.sqrt(hd)
        visible = held[None, :] & (torch.arange(end)[None, :] <= torch.arange(self.start, end)[:, None])
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
        return p.mean(0) if gqa == "mean" else p.amax(0)

    def end(self):
        self.length = self.stop
        self.pending = [p and not f for p, f in zip(self.pending, self.finishing)]
        self.since = 0 if self.evict else self.since + 1

    def kept_positions(self, layer_id):
        """(bsz, n_kv) nested lists of the positions each head still holds."""
        keep = self.layers[layer_id]["keep"]
        return [[keep[b, h].nonzero().flatten().tolist() for h in range(keep.shape[1])]
                for b in range(keep.shape[0])]
