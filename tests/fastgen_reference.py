"""A deliberately simple FastGen reference: a full-size dense cache plus a keep mask (what cold-compress does).

It saves no memory. It exists so the packed FastGenCache can be checked against the plainest reading of the
algorithm: same policies and profiler (pure functions, unit-tested on their own), but every token stays at its
position in a (bsz, n_kv_heads, max_len, head_dim) buffer and eviction only clears a mask bit; attention
statistics are computed over the whole map at once, with no row chunks.
"""

import math

import torch

from adaptive_kv_cache.policies import BASIC_ORDER, Local, TokenStats, basic_policies, build_candidates, union_keep
from adaptive_kv_cache.profiler import profile
from adaptive_kv_cache.tokens import special_mask
from llama.kv_cache import KVCache


class MaskedFastGenCache(KVCache):
    def __init__(self, config, classes, n_layers, prompt_tokens, max_len):
        self.config, self.classes, self.max_len = config, classes, max_len
        self.prompt_lens = torch.tensor([len(p) for p in prompt_tokens])
        self.prompt_special = [special_mask(torch.tensor(p), classes) for p in prompt_tokens]
        self.candidates = build_candidates(config)
        self.basics = basic_policies(config)
        self.flags_of = torch.stack([c.flags() for c in self.candidates])
        self.layers = [None] * n_layers
        self.special = torch.zeros(len(prompt_tokens), max_len, dtype=torch.bool)
        self.punct = torch.zeros_like(self.special)

    def begin(self, tokens, start_pos):
        end = start_pos + tokens.shape[1]
        self.special[:, start_pos:end] = self.classes.special[tokens]
        self.punct[:, start_pos:end] = self.classes.punct[tokens]
        for b, sm in enumerate(self.prompt_special):
            hi = min(end, len(sm))
            if start_pos < hi:
                self.special[b, start_pos:hi] |= sm[start_pos:hi]
        self.start_pos, self.end_pos = start_pos, end

    def _stats(self, keep, score, n, L):
        bsz, n_kv, S = keep.shape
        return TokenStats(
            valid=keep, pos=torch.arange(S).expand(bsz, n_kv, S),
            special=self.special[:, None, :S].expand(bsz, n_kv, S), punct=self.punct[:, None, :S].expand(bsz, n_kv, S),
            score=score, n=n, prompt_len=L.view(bsz, 1, 1).expand(bsz, n_kv, 1),
        )

    def update(self, layer_id, start_pos, xq, xk, xv):
        bsz, n_kv, seqlen, hd = xk.shape
        if self.layers[layer_id] is None:
            z = xk.new_zeros(bsz, n_kv, self.max_len, hd)
            self.layers[layer_id] = {
                "k": z, "v": z.clone(), "keep": torch.zeros(bsz, n_kv, self.max_len, dtype=torch.bool),
                "score": torch.zeros(bsz, n_kv, self.max_len), "band": torch.zeros(bsz, n_kv, self.max_len),
                "flags": torch.zeros(bsz, n_kv, len(BASIC_ORDER), dtype=torch.bool),
                "choice": torch.full((bsz, n_kv), -1),
            }
        st = self.layers[layer_id]
        end = self.end_pos
        st["k"][:, :, start_pos:end] = xk
        st["v"][:, :, start_pos:end] = xv
        st["keep"][:, :, start_pos:end] = True
        keys, values, keep = st["k"][:, :, :end], st["v"][:, :, :end], st["keep"][:, :, :end]
        qpos = torch.arange(start_pos, end)
        mask = keep[:, :, None, None, :] & (torch.arange(end)[None, :] <= qpos[:, None])
        # mask: (bsz, n_kv, 1, seqlen, end)

        s = torch.matmul(xq, keys.unsqueeze(2).transpose(3, 4)) / math.sqrt(hd)
        p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), dim=-1)
        p = p.mean(2) if self.config.gqa_aggregation == "mean" else p.amax(2)  # (bsz, n_kv, seqlen, end)
        st["score"][:, :, :end] += p.sum(2)
        window = Local(self.config.r_l).window(self.prompt_lens).view(bsz, 1, 1, 1)
        in_band = (qpos.view(1, 1, -1, 1) - torch.arange(end).view(1, 1, 1, -1)) < window
        pending = st["choice"] < 0
        st["band"][:, :, :end] += (p * in_band).sum(2) * pending[..., None]

        L = self.prompt_lens
        finishing = (L <= end)[:, None] & pending
        if finishing.any():
            stats = self._stats(keep & (torch.arange(end) < L.view(bsz, 1, 1)), st["score"][:, :, :end],
                                L.view(bsz, 1, 1).expand(bsz, n_kv, 1), L)
            choice, _ = profile(stats, st["band"][:, :, :end], self.candidates, self.config.T)
            st["choice"] = torch.where(finishing, choice, st["choice"])
            st["flags"][finishing] = self.flags_of[choice[finishing]]
        active = st["choice"] >= 0
        stats = self._stats(keep.clone(), st["score"][:, :, :end], torch.full((bsz, n_kv, 1), end), L)
        new_keep = union_keep(st["flags"], self.basics, stats)
        st["keep"][:, :, :end] = torch.where(active[..., None], keep & new_keep, keep)
        return keys.clone(), values.clone(), mask

    def kept_positions(self, layer_id):
        """(bsz, n_kv) nested lists of the positions each head still holds."""
        keep = self.layers[layer_id]["keep"]
        return [[torch.nonzero(keep[b, h]).flatten().tolist() for h in range(keep.shape[1])]
                for b in range(keep.shape[0])]
