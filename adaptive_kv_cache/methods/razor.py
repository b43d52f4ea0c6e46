"""RazorAttention (Tang et al., 2024): retrieval heads keep everything; the others keep sinks, a recent window
and one compensation token holding the mean of the keys and values they dropped.

Retrieval heads are found once per model (and kv_config) by a probe: a random token sequence repeated twice.
In the second copy an induction head attends to the token after the current token's previous occurrence and an
echo head to that occurrence itself; a KV head's score is the attention its query heads (combined by `gqa`)
give to those two positions, averaged over the second copy. The `retrieval` share of all KV heads of the model
with the highest scores keeps everything.

Any other head keeps, at every eviction, its `sinks` first positions, the newest budget - sinks - 1 tokens, and
one compensation slot: the first slot it ever dropped, whose key and value are overwritten by the running mean
of everything dropped so far (its `merged` field counts them; 0 marks an ordinary token). Attention treats it
as one more key at that slot's position.
"""

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from adaptive_kv_cache.config import _check_float, _check_int, _fail
from adaptive_kv_cache.methods.base import PROTECT, BudgetConfig, ScoredMethod, layer_fields, to_groups
from adaptive_kv_cache import budgets as B
from llama.attention import DenseView
from llama.kv_cache import KVCache


@dataclass(frozen=True)
class RazorConfig(BudgetConfig):
    """retrieval: share of the model's KV heads kept whole, [0, 1]; sinks: first positions always kept;
    probe_tokens: length of the random sequence the probe repeats; seed: its random generator's seed."""

    method: str = "razor"
    retrieval: float = 0.15
    sinks: int = 4
    probe_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "retrieval", _check_float("retrieval", self.retrieval, 0.0, 1.0, lo_open=False))
        _check_int("sinks", self.sinks, 0)
        _check_int("probe_tokens", self.probe_tokens, 2)
        _check_int("seed", self.seed, 0)
        if self.kv_quant != "none" and self.decode:
            # the compensation slot is a running mean written in place into full-precision keys and values; once
            # a codec has sealed the layer they are codes (int4: per-block scales), so only the prompt's end can merge
            _fail(f"kv_quant={self.kv_quant!r} needs decode=false for razor: its compensation slot merges "
                  f"full-precision keys, which a codec replaces once the prompt ends")


class _ProbeCache(KVCache):
    """A stand-alone pass that records, per layer and KV head, the echo + induction attention of the second copy
    of a repeated sequence (plain softmax over the short probe: 2 x probe_tokens positions)."""

    def __init__(self, period: int, gqa: str):
        self.period, self.gqa = period, gqa
        self.scores: List[torch.Tensor] = []

    def append(self, layer_id, start_pos, xk, xv):
        return DenseView(xk.transpose(1, 2), xv.transpose(1, 2), 0)

    def after_attention(self, layer_id, xq, view, stats):
        bsz, T, n_heads, hd = xq.shape
        n_kv = view.keys.shape[1]
        q = xq[0].transpose(0, 1).float().view(n_kv, n_heads // n_kv, T, hd)
        s = q @ view.keys[0].float()[:, None].transpose(2, 3) / math.sqrt(hd)
        p = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=s.device).tril(), float("-inf")).softmax(-1)
        p = p.mean(1) if self.gqa == "mean" else p.amax(1)  # (n_kv, T, T)
        t = torch.arange(self.period, T, device=p.device)
        echo = p[:, t, t - self.period]
        induction = p[:, t, t - self.period + 1]
        self.scores.append((echo + induction).mean(1))


def probe_head_scores(model, config: RazorConfig, vocab_size: int, device) -> torch.Tensor:
    """(n_layers, n_kv_heads) echo + induction scores of `model` on a random sequence repeated twice."""
    g = torch.Generator().manual_seed(config.seed)
    r = torch.randint(min(3, vocab_size - 1), vocab_size, (config.probe_tokens,), generator=g)
    probe = _ProbeCache(config.probe_tokens, config.gqa)
    model.forward(torch.cat([r, r])[None].to(device), 0, probe, last_logits_only=True)
    return torch.stack(probe.scores)


class RazorHeads:
    """Per layer, which local KV heads are retrieval heads; probed once, on the first generation."""

    def __init__(self, llama, config: RazorConfig):
        self.llama, self.config = llama, config
        self.scores: Optional[torch.Tensor] = None
        self.retrieval: Optional[torch.Tensor] = None  # (n_layers, n_kv_heads) bool

    def get(self) -> torch.Tensor:
        if self.retrieval is None:
            m = self.llama.model
            self.scores = probe_head_scores(m, self.config, m.params.vocab_size, self.llama.device).cpu()
            n = math.ceil(self.config.retrieval * self.scores.numel() - 1e-9)
            flat = torch.zeros(self.scores.numel(), dtype=torch.bool)
            flat[self.scores.flatten().argsort(descending=True, stable=True)[:n]] = True
            self.retrieval = flat.view_as(self.scores)
        return self.retrieval


class RazorAttention(ScoredMethod):
    Config = RazorConfig
    slot_fields = {"merged": (torch.float32, 0.0)}

    def __init__(self, config, context=None, observer=None):
        super().__init__(config, context, observer)
        self.retrieval: Optional[torch.Tensor] = None

    @classmethod
    def prepare(cls, config, llama):
        return RazorHeads(llama, config)

    def begin(self, cache, tokens, start_pos):
        if self.retrieval is None:
            self.retrieval = self.context.get().to(tokens.device)
        return super().begin(cache, tokens, start_pos)

    def keep(self, cache, layer_id):
        store = cache.stores[layer_id]
        active = self.active(cache)
        if not any(active):
            return [None] * len(store.groups)
        lay = layer_fields(store, ["merged"])
        pos, valid = lay["pos"], lay["valid"]
        comp = valid & (lay["merged"] > 0)
        ordinary = valid & ~comp
        budget = cache.per_segment(self.budgets(cache, layer_id))
        full = self.retrieval[layer_id].repeat(cache.bsz) | ~cache.per_segment(active).bool()
        over = valid.sum(1) > budget  # at most budget - 1 ordinary tokens + the compensation slot
        k_ord = torch.where(full | ~over, valid.sum(1), budget - 1)
        scores = torch.where(pos < self.config.sinks, 2 * PROTECT, pos.double())
        keep = B.top_k(scores, pos, ordinary, k_ord)
        drop = ordinary & ~keep
        # the compensation slot: the existing one, else the oldest dropped slot
        first = torch.where(drop, pos, torch.iinfo(torch.long).max).argmin(1)
        target = torch.where(comp.any(1), comp.long().argmax(1), first)
        merging = drop.any(1)
        self._merge(store, lay, drop, target, merging)
        has = merging | comp.any(1)
        keep[torch.arange(store.n_seg, device=keep.device)[has], target[has]] = True
        keep |= full[:, None]
        self.note_decided(cache, layer_id)
        self.observe(cache, layer_id, keep & valid)
        return to_groups(store, keep)

    @staticmethod
    def _merge(store, lay, drop: torch.Tensor, target: torch.Tensor, merging: torch.Tensor) -> None:
        """Writes the running mean of the dropped keys/values (and the compensation slot's own) into the target
        slots of the merging segments, in place in the store's buffers, one group at a time."""
        for g, k, v, merged in zip(store.groups, store.field("k"), store.field("v"), store.field("merged")):
            m = g.rows(merging)
            if not bool(m.any()):
                continue
            rows = torch.arange(g.n, device=m.device)[m]
            t = g.rows(target)[m]
            d = g.rows(drop)[m, : g.width]  # (r, width)
            old = merged[rows, t].double()  # tokens already in the slot
            total = old + d.sum(1).double()
            for x in (k, v):
                dropped = (x[rows].double() * d[..., None]).sum(1)
                x[rows, t] = ((x[rows, t].double() * old[:, None] + dropped) / total[:, None]).to(x.dtype)
            merged[rows, t] = total.float()

    def policy_names(self):
        return ["full (retrieval)", "sinks+window+compensation"]

    def policy_counts(self, cache, layer_id):
        if self.retrieval is None or layer_id not in self.decided:
            return [0, 0]
        d = self.decided[layer_id]
        r = self.retrieval[layer_id].repeat(cache.bsz)
        return [int((d & r).sum()), int((d & ~r).sum())]
