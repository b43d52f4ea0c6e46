"""A deliberately plain FastGen, written from fastgen.md alone: a full-size buffer plus a keep mask (what
cold-compress does), so it saves no memory.

It shares no policy, profiler or statistics code with `adaptive_kv_cache`: probabilities are recomputed here in
float64 from the queries and the held keys, recovery is summed over the whole L x L prompt map entry by entry,
and each head's kept set is decided in plain Python. Only the token classes (which pieces are special or
punctuation, unit-tested on their own) are shared. The packed cache must agree with it: same logits, same
kept positions.
"""

import math

import torch

from adaptive_kv_cache.tokens import special_mask
from masked_reference import MaskedCache


def ceil_ratio(r, n):
    return math.ceil(r * n - 1e-9)


class MaskedFastGenCache(MaskedCache):
    def __init__(self, config, classes, n_layers, prompt_tokens, max_len):
        super().__init__(config.evict_every, n_layers, prompt_tokens, max_len)
        self.cfg, self.classes = config, classes
        self.prompt_special = [special_mask(torch.tensor(p), classes) for p in prompt_tokens]
        bsz = len(prompt_tokens)
        self.special = torch.zeros(bsz, max_len, dtype=torch.bool)
        self.punct = torch.zeros_like(self.special)

    def new_layer(self, bsz, n_kv, xk):
        st = super().new_layer(bsz, n_kv, xk)
        st["score"] = torch.zeros(bsz, n_kv, self.max_len, dtype=torch.float64)
        st["prompt_map"] = [[None] * n_kv for _ in range(bsz)]  # (L, L) aggregated prompt attention
        st["policy"] = [[None] * n_kv for _ in range(bsz)]  # chosen candidate (tuple of names)
        return st

    def begin(self, tokens, start_pos):
        end = start_pos + tokens.shape[1]
        self.special[:, start_pos:end] = self.classes.special[tokens]
        self.punct[:, start_pos:end] = self.classes.punct[tokens]
        for b, sm in enumerate(self.prompt_special):
            hi = min(end, len(sm))
            if start_pos < hi:
                self.special[b, start_pos:hi] |= sm[start_pos:hi]
        super().begin(tokens, start_pos)

    def after_attention(self, layer_id, xq, view, stats):
        st = self.layers[layer_id]
        bsz = xq.shape[0]
        n_kv = st["k"].shape[1]
        end = self.stop
        for b in range(bsz):
            first = self.seen_from(b)
            for h in range(n_kv):
                held = st["keep"][b, h, :end]
                agg = self.probs(layer_id, xq, b, h, self.cfg.gqa_aggregation)  # (seqlen, end)
                counted = agg[max(0, first - self.start):]  # queries before the observation window do not count
                st["score"][b, h, :end] += counted.sum(0)
                if self.pending[b]:
                    L = self.prompt_lens[b]
                    m = st["prompt_map"][b][h]
                    m = torch.zeros(0, L, dtype=torch.float64) if m is None else m
                    rows = counted[: max(0, L - max(self.start, first)), :L]  # the prompt's counted queries
                    rows = torch.nn.functional.pad(rows, (0, L - rows.shape[1]))
                    st["prompt_map"][b][h] = torch.cat([m, rows])
                if self.finishing[b]:
                    st["policy"][b][h] = self.choose(b, st["prompt_map"][b][h])
                if self.evict and st["policy"][b][h] is not None:
                    st["keep"][b, h, :end] = self.kept(b, st["policy"][b][h], held, st["score"][b, h, :end])

    # --- FastGen by the definition --------------------------------------------------------------------------

    def seen_from(self, b):
        """First query position whose attention counts: 0, or the observation window's start (obs_window)."""
        W = self.cfg.obs_window
        return max(0, self.prompt_lens[b] - W) if W else 0

    def member_keeps(self, b, name, t, j, n, L, frequent_set):
        """Whether basic policy `name` keeps key j for the query at position t (n tokens seen)."""
        if name == "special":
            return bool(self.special[b, j])
        if name == "punct":
            return bool(self.punct[b, j])
        if name == "local":
            return t - j < ceil_ratio(self.cfg.r_l, L)
        if name == "frequent":
            return j in frequent_set
        return True  # full

    def top_frequent(self, b, candidates, score, n):
        """Top ceil(r_f * n) of `candidates` by score / (counted queries that saw j: n - max(j, first counted)),
        max-pooled over the `pool` nearest candidates in position order, ties towards the older token."""
        first = self.seen_from(b)
        held = sorted(candidates)
        norm = [float(score[j]) / max(1, n - max(j, first)) for j in held]
        h = self.cfg.pool // 2  # pooling: the best of the 2h + 1 nearest held tokens in order
        pooled = {j: max(norm[max(0, i - h): i + h + 1]) for i, j in enumerate(held)}
        ranked = sorted(held, key=lambda j: (-pooled[j], j))
        return set(ranked[: ceil_ratio(self.cfg.r_f, n)])

    def choose(self, b, A):
        """The first candidate whose recovery over the prompt map A (counted query rows x L) reaches T."""
        R, L = A.shape
        t, j = (L - R + torch.arange(R))[:, None], torch.arange(L)[None, :]  # the rows are the last R queries
        frequent = torch.zeros(L, dtype=torch.bool)
        frequent[list(self.top_frequent(b, range(L), A.sum(0), L))] = True
        window = self.cfg.obs_window
        # with an observation window each policy is the set it keeps when the prompt ends (n = L)
        local = (L - 1 - j) < ceil_ratio(self.cfg.r_l, L) if window else (t - j) < ceil_ratio(self.cfg.r_l, L)
        keeps = {"special": self.special[b, :L][None, :].expand(R, L),
                 "punct": self.punct[b, :L][None, :].expand(R, L),
                 "local": local.expand(R, L),
                 "frequent": frequent[None, :].expand(R, L),
                 "full": torch.ones(R, L, dtype=torch.bool)}
        causal = j <= t
        for cand in self.cfg.candidates:
            if self.cfg.T >= 1.0 and "full" not in cand:
                continue
            keep = torch.zeros(R, L, dtype=torch.bool)
            for m in cand:
                keep |= keeps[m]
            if "full" in cand or float((A * (keep & causal)).sum() / A.sum()) >= self.cfg.T:
                return cand
        return self.cfg.candidates[-1]

    def kept(self, b, cand, held, score):
        """The held tokens the hybrid keeps once n = end tokens have been seen."""
        n, L = self.stop, self.prompt_lens[b]
        held_pos = held.nonzero().flatten().tolist()
        frequent = self.top_frequent(b, held_pos, score, n) if "frequent" in cand else set()
        out = torch.zeros_like(held)
        for j in held_pos:
            out[j] = any(self.member_keeps(b, m, n - 1, j, n, L, frequent) for m in cand)
        return out

    def policies(self, layer_id):
        return [["+".join(c) for c in row] for row in self.layers[layer_id]["policy"]]
