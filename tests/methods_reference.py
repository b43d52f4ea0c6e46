"""The registered scoring methods written plainly from their papers, over a full-size buffer plus a keep mask
(which saves no memory: the reference the packed cache must equal).

Shares no method, budget or statistics code with `adaptive_kv_cache`: attention probabilities are recomputed
here in float64 from the queries and the held keys, and each head's kept set is decided in plain Python with
sorted() on (key, position) tuples. Only the retrieval heads of RazorAttention (found by the model probe) come
from the method under test; everything Razor does with them is recomputed.
"""

import math

import torch

from masked_reference import MaskedCache


def budget_of(cfg, L):
    return cfg.budget_tokens if cfg.budget_tokens is not None else max(1, math.floor(cfg.budget * L + 1e-9))


def pyramid(cfg, b, L, layer, n_layers):
    """PyramidKV's linear ramp (kvpress's get_layer_budget with the window inside the budget)."""
    n = b - min(cfg.window, b)
    lo, hi = n / cfg.beta, 2 * n - n / cfg.beta
    if n_layers == 1 or b - n + hi > L:
        return b
    return b - n + round(hi - layer * (hi - lo) / (n_layers - 1))


def headkv_split(cfg, B, L=None):
    """HeadKV's per-head budgets, by the definition: floor(alpha B) each, the rest of layers x heads x B shared in
    proportion to the scores (largest remainders get the leftover tokens, ties to the earlier head); a head's
    share beyond its prompt L goes to the heads below L, in proportion to their scores, until none exceeds L."""
    import json

    scores = json.loads(open(cfg.head_scores).read())["scores"]
    flat = [max(0.0, x) for row in scores for x in row]
    total = sum(flat)
    share = [x / total for x in flat] if total > 0 else [1 / len(flat)] * len(flat)
    floor = math.floor(cfg.alpha * B)
    pool = (B - floor) * len(flat)
    room = math.inf if L is None else L - floor
    capped = set()
    n_kv = len(scores[0])
    while True:
        free = [i for i in range(len(flat)) if i not in capped]
        if not free:  # a budget beyond the prompt: every head keeps all of it
            return [[L] * n_kv for _ in scores]
        weight = {i: share[i] for i in free}
        if sum(weight.values()) == 0:
            weight = {i: 1.0 for i in free}
        left = pool - room * len(capped) if capped else pool
        raw = [room if i in capped else left * weight[i] / sum(weight.values()) for i in range(len(flat))]
        over = [i for i in free if raw[i] > room]
        if not over:
            break
        capped.update(over)
    out = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))[: pool - sum(out)]:
        out[i] += 1
    return [[floor + out[l * n_kv + h] for h in range(n_kv)] for l in range(len(scores))]


class MaskedMethodCache(MaskedCache):
    fields = {name: torch.float64 for name in ("acc", "window", "last", "merged")}

    def __init__(self, cfg, n_layers, prompt_tokens, max_len, retrieval=None):
        super().__init__(cfg.evict_every, n_layers, prompt_tokens, max_len)
        self.cfg, self.n_layers = cfg, n_layers
        self.method = cfg.method
        self.retrieval = retrieval  # razor: (n_layers, n_kv) bool

    # --- statistics by the definition ---------------------------------------------------------------------

    def after_attention(self, layer_id, xq, view, stats):
        st = self.layers[layer_id]
        bsz, seqlen = xq.shape[:2]
        n_kv = st["k"].shape[1]
        end = self.stop
        for b in range(bsz):
            for h in range(n_kv):
                agg = self.probs(layer_id, xq, b, h, self.cfg.gqa)  # (seqlen, end)
                st["acc"][b, h, :end] += agg.sum(0)
                st["last"][b, h, :end] = agg[-1]
                if self.method in ("snapkv", "pyramidkv") and self.pending[b]:
                    first = self.prompt_lens[b] - self.cfg.window
                    rows = [i for i in range(seqlen) if self.start + i >= first]
                    if rows:
                        st["window"][b, h, :end] += agg[rows].sum(0)
        active = [f or (not p and self.cfg.decode) for f, p in zip(self.finishing, self.pending)]
        if self.evict:
            budgets = [budget_of(self.cfg, L) for L in self.prompt_lens]
            if self.method == "pyramidkv":
                budgets = [pyramid(self.cfg, x, L, layer_id, self.n_layers) for x, L in zip(budgets, self.prompt_lens)]
            for b in range(bsz):
                if active[b]:
                    self.evict_sequence(layer_id, b, budgets[b], n_kv)

    # --- each method's keep rule -------------------------------------------------------------------------------

    def ranked(self, layer_id, b, h, n, L, B):
        """The held positions of one head, best first, as the method ranks them."""
        st, cfg = self.layers[layer_id], self.cfg
        held = st["keep"][b, h, :n].nonzero().flatten().tolist()
        if self.method == "streaming_llm":
            key = lambda j: (0, j) if j < cfg.sinks else (1, -j)  # noqa: E731
        elif self.method == "h2o":
            R = math.ceil(cfg.recent * B - 1e-9)
            acc = st["acc"][b, h]
            score = lambda j: float(acc[j]) / (max(1, n - j) if cfg.normalize else 1)  # noqa: E731
            key = lambda j: (0, -j) if j >= n - R else (1, -score(j), j)  # noqa: E731
        elif self.method == "tova":
            key = lambda j: (1, -float(st["last"][b, h, j]), j)  # noqa: E731
        else:  # snapkv, pyramidkv
            W, k = cfg.window, cfg.kernel
            x = st["window"][b, h]
            def pooled(j):
                near = [x[i] for i in range(j - k // 2, j + k // 2 + 1) if 0 <= i < L - W]
                return float(sum(near)) / k if cfg.pooling == "avg" else float(max(near + [0.0]))
            key = lambda j: (0, -j) if j >= L - W else (1, -pooled(j), j)  # noqa: E731
        return sorted(held, key=key), key

    def evict_sequence(self, layer_id, b, B, n_kv):
        st, n, L = self.layers[layer_id], self.stop, self.prompt_lens[b]
        if self.method == "razor":
            for h in range(n_kv):
                if not bool(self.retrieval[layer_id, h]):
                    self.razor(st, b, h, n, B)
            return
        if self.cfg.budgets == "adakv":
            floor = math.floor(self.cfg.alpha * B)
            chosen, pool = [], []
            for h in range(n_kv):
                order, key = self.ranked(layer_id, b, h, n, L, B)
                chosen += [(h, j) for j in order[:floor]]
                pool += [(key(j), j, h) for j in order[floor:]]
            chosen += [(h, j) for _, j, h in sorted(pool)[: n_kv * (B - floor)]]
            for h in range(n_kv):
                st["keep"][b, h] = False
            for h, j in chosen:
                st["keep"][b, h, j] = True
            return
        for h in range(n_kv):
            Bh = headkv_split(self.cfg, B, self.prompt_lens[b])[layer_id][h] if self.cfg.budgets == "headkv" else B
            order, _ = self.ranked(layer_id, b, h, n, L, B)  # H2O's recent window: the unsplit budget
            st["keep"][b, h] = False
            st["keep"][b, h, order[:Bh]] = True

    def razor(self, st, b, h, n, B):
        """Sinks + the newest tokens + one slot holding the mean of every token dropped so far."""
        held = st["keep"][b, h, :n].nonzero().flatten().tolist()
        if len(held) <= B:
            return
        comp = [j for j in held if st["merged"][b, h, j] > 0]
        ordinary = [j for j in held if j not in comp]
        order = sorted(ordinary, key=lambda j: (0, j) if j < self.cfg.sinks else (1, -j))
        kept, dropped = order[: B - 1], order[B - 1 :]
        slot = comp[0] if comp else min(dropped)
        m = float(st["merged"][b, h, slot])
        for name in ("k", "v"):
            total = st[name][b, h, slot].double() * m + sum(st[name][b, h, j].double() for j in dropped)
            st[name][b, h, slot] = (total / (m + len(dropped))).to(st[name].dtype)
        st["merged"][b, h, slot] = m + len(dropped)
        st["keep"][b, h] = False
        st["keep"][b, h, kept + [slot]] = True
