"""What the scoring methods share: their common options, and a method class that turns scores into keep masks.

A scoring method (StreamingLLM, H2O, TOVA, SnapKV, ...) is a subclass of `ScoredMethod` that says which attention
statistics it wants and how it scores a layer's slots; budgets (`adaptive_kv_cache/budgets.py`) turn scores into
keep masks, so any scorer composes with any allocation (uniform, pyramid, adakv). Storage stays in the shared
`PackedStore`, phases and eviction in `CompressedCache`.

When a sequence's prompt ends, each of its (sequence, KV head) segments keeps its budget: `budget_tokens`, or
floor(budget x prompt length). Methods that evict during decoding (`decode: true`) keep that many tokens at
every eviction (every `evict_every` steps; between evictions a segment holds up to k - 1 more); the others
compress once, at the prompt's end, and append every generated token.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from adaptive_kv_cache import budgets as B
from adaptive_kv_cache.compressed import CompressedCache, CompressionMethod
from adaptive_kv_cache.config import _check_float, _check_int, _check_kv_quant, _fail
from llama.attention import AttentionStats, StatsRequest

#: Score of a slot a method always keeps (sinks, the recent or observation window), above any attention sum;
#: rankings run in float64, so PROTECT + position stays exact.
PROTECT = 1e12


def _check_choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        _fail(f"{name}={value!r} is not allowed; allowed values: {', '.join(repr(a) for a in allowed)}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(f"{name} must be true or false, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class BudgetConfig:
    """Options every scoring method takes (see each method's JSON in adaptive_kv_cache/configs/).

    method         registry name (each subclass's default is its own)
    budget         tokens each (sequence, KV head) keeps, as a share of its prompt, (0, 1]
    budget_tokens  ... or as a token count (>= 1); exactly one of budget and budget_tokens is set
    budgets        how the budget is split over heads and layers: uniform | pyramid | adakv | headkv
    head_scores    headkv: the scores file (default: head_scores.json next to the checkpoint)
    alpha          adakv, headkv: share of its budget each head keeps whatever the others need, [0, 1]
    beta           pyramid: largest / smallest non-reserved budget is about 2 beta - 1, >= 1
    gqa            how the query heads sharing a KV head are combined in the statistics: mean | max
    decode         evict during decoding too (keep the budget at every eviction), or only at the prompt's end
    evict_every    k: decode steps between evictions (1: after every token)
    kv_quant       how kept tokens are stored: none | int8 | int4 (adaptive_kv_cache/codecs.py); a layer is
                   quantised once every prompt has ended, so prompt-end scores use full-precision keys (decode-time
                   scores come from the attention over the codes)
    """

    method: str = ""
    budget: Optional[float] = 0.5
    budget_tokens: Optional[int] = None
    budgets: str = "uniform"
    alpha: float = 0.2
    beta: float = 20.0
    gqa: str = "mean"
    decode: bool = True
    evict_every: int = 16
    kv_quant: str = "none"
    head_scores: Optional[str] = None

    def __post_init__(self) -> None:
        from adaptive_kv_cache.registry import check_name

        check_name(self.method)
        if (self.budget is None) == (self.budget_tokens is None):
            _fail(f"give exactly one of budget (a share of the prompt) and budget_tokens (a token count), got "
                  f"budget={self.budget!r}, budget_tokens={self.budget_tokens!r}")
        if self.budget is not None:
            object.__setattr__(self, "budget", _check_float("budget", self.budget, 0.0, 1.0, lo_open=True))
        else:
            _check_int("budget_tokens", self.budget_tokens, 1)
        _check_choice("budgets", self.budgets, B.ALLOCATIONS)
        object.__setattr__(self, "alpha", _check_float("alpha", self.alpha, 0.0, 1.0, lo_open=False))
        object.__setattr__(self, "beta", _check_float("beta", self.beta, 1.0, float("inf"), lo_open=False))
        _check_choice("gqa", self.gqa, ("mean", "max"))
        _check_bool("decode", self.decode)
        _check_int("evict_every", self.evict_every, 1)
        _check_kv_quant(self.kv_quant)
        if self.head_scores is not None and not isinstance(self.head_scores, str):
            _fail(f"head_scores must be a path (a string), got {type(self.head_scores).__name__}")

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BudgetConfig":
        """From a mapping (parsed JSON); missing keys take the dataclass defaults."""
        if not isinstance(d, Mapping):
            _fail(f"expected a mapping (JSON object) of settings, got {type(d).__name__}")
        unknown = [k for k in d if k not in cls.field_names()]
        if unknown:
            _fail(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} for method "
                  f"{d.get('method', cls.__name__)!r}; known keys: {', '.join(cls.field_names())}")
        return cls(**dict(d))

    def with_overrides(self, overrides: Optional[Mapping[str, Any]]) -> "BudgetConfig":
        """A copy with `overrides` applied (a token budget replaces a share and vice versa), validated again."""
        if not overrides:
            return self
        d = self.to_dict()
        if "budget_tokens" in overrides and "budget" not in overrides:
            d["budget"] = None
        if "budget" in overrides and "budget_tokens" not in overrides:
            d["budget_tokens"] = None
        d.update(overrides)
        return type(self).from_dict(d)

    def replace(self, **overrides: Any) -> "BudgetConfig":
        return self.with_overrides(overrides)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for logs: the method and every option."""
        rest = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "method" and v is not None)
        return f"{self.method} ({rest})"


class ScoredMethod(CompressionMethod):
    """A method that scores a layer's slots and keeps the best `budget` per segment.

    Subclasses define `wants`/`take` (the statistics they ask attention for, and what they do with them) and
    `score` (a layer's slots, higher keeps); `reserved` is how many tokens the method always keeps (the
    pyramid's floor). An observer (heatmaps) gets each layer's pooled prompt attention and every head's kept
    count when the first pass ends a prompt.
    """

    Config = BudgetConfig
    slot_fields: Dict[str, Tuple[torch.dtype, float]] = {}

    def __init__(self, config: BudgetConfig, context: Any = None, observer=None):
        self.config = config
        self.context = context
        self.name = config.method
        self.decided: Dict[int, torch.Tensor] = {}  # per layer: (n_seg,) bool, the prompt has ended
        self.observer = observer
        self.observe_seq: Optional[int] = None
        self.heat: Dict[int, torch.Tensor] = {}

    @classmethod
    def prepare(cls, config: BudgetConfig, llama) -> Any:
        """What every generation of a `Llama` shares (made once per kv_config): HeadKV's head scores."""
        if config.budgets == "headkv":
            from adaptive_kv_cache.methods.headkv import load_head_scores

            scores = load_head_scores(config, getattr(llama, "ckpt_dir", None))
            p = llama.model.params
            if tuple(scores.shape) != (p.n_layers, p.n_kv_heads):
                _fail(f"head scores of shape {tuple(scores.shape)} do not fit this model's "
                      f"({p.n_layers} layers, {p.n_kv_heads} KV heads); score it with scripts/score_heads.py")
            return scores
        return None

    @classmethod
    def create(cls, config: BudgetConfig, context: Any, observer=None) -> "ScoredMethod":
        return cls(config, context, observer)

    @property
    def reserved(self) -> int:
        return 0

    # --- what subclasses define ---------------------------------------------------------------------------------

    def wants(self, cache: CompressedCache, layer_id: int) -> Optional[StatsRequest]:
        """The statistics this layer's attention should return (None: none, the fastest kernel)."""
        return None

    def take(self, cache: CompressedCache, layer_id: int, stats: AttentionStats) -> None:
        """Consumes them (e.g. adds column sums to a per-slot field)."""

    def score(self, cache: CompressedCache, layer_id: int, lay: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(n_seg, S) float64 scores of the layer's slots (higher keeps); `lay` holds 'pos' (long), 'valid' and
        the method's slot fields, each (n_seg, S) in the layout of `layer_fields`."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------------------------

    def begin(self, cache: CompressedCache, tokens: torch.Tensor, start_pos: int) -> Dict[str, torch.Tensor]:
        self.observe_seq = None
        if self.observer is not None and start_pos == 0 and any(cache.pass_.finishing):
            self.observe_seq = cache.pass_.finishing.index(True)  # heatmaps need the whole prompt in one pass
        return {}

    def stats_request(self, cache: CompressedCache, layer_id: int) -> Optional[StatsRequest]:
        want = self.wants(cache, layer_id)
        if self.observe_seq is None:
            return want
        return dataclasses.replace(want or StatsRequest(gqa=self.config.gqa), heatmap_seq=self.observe_seq)

    def on_stats(self, cache: CompressedCache, layer_id: int, stats: AttentionStats) -> None:
        if stats.heatmap is not None:
            self.heat[layer_id] = stats.heatmap
        self.take(cache, layer_id, stats)

    def observe(self, cache: CompressedCache, layer_id: int, keep: torch.Tensor) -> None:
        """Hands the observer this layer's heatmap with each head's kept tokens (`keep`: (n_seg, S))."""
        heat = self.heat.pop(layer_id, None)
        if heat is None or self.observer is None:
            return
        b, n_kv = self.observe_seq, cache.n_kv_heads
        kept = keep.sum(1).view(-1, n_kv)[b].tolist()
        L = cache.prompt_lens[b]
        self.observer(layer_id, b, heat.cpu(), [f"{self.name}: keeps {k} of {L}" for k in kept],
                      [float("nan")] * n_kv)

    def active(self, cache: CompressedCache) -> List[bool]:
        """Per sequence: compress in this pass (its prompt ends now, or it decodes and the method evicts then)."""
        return [fin or (not pend and self.config.decode) for fin, pend in zip(cache.pass_.finishing, cache.pending)]

    def segment_budgets(self, cache: CompressedCache, layer_id: int) -> torch.Tensor:
        """(n_seg,) tokens each segment keeps in this layer."""
        base = self.budgets(cache, layer_id)
        if self.config.budgets != "headkv":
            return cache.per_segment(base)
        rows = [B.headkv_budgets(self.context, b, self.config.alpha, cap=L)[layer_id]
                for b, L in zip(base, cache.prompt_lens)]
        return torch.cat(rows).to(cache.per_segment(base).device)

    def budgets(self, cache: CompressedCache, layer_id: int) -> List[int]:
        """Per sequence, tokens each of its heads keeps in this layer (before headkv's per-head split)."""
        c = self.config
        base = [B.budget_tokens(c.budget, c.budget_tokens, L) for L in cache.prompt_lens]
        if c.budgets == "pyramid":
            return B.pyramid_budgets(base, cache.prompt_lens, layer_id, cache.n_layers, self.reserved, c.beta)
        return base

    def keep(self, cache: CompressedCache, layer_id: int) -> List[Optional[torch.Tensor]]:
        store = cache.stores[layer_id]
        active = self.active(cache)
        if not any(active):
            return [None] * len(store.groups)
        lay = layer_fields(store, list(self.slot_fields))
        scores = self.score(cache, layer_id, lay)
        budget = self.segment_budgets(cache, layer_id)
        keep = self.allocate(scores, lay, budget, cache.n_kv_heads) | ~cache.per_segment(active).bool()[:, None]
        self.note_decided(cache, layer_id)
        self.observe(cache, layer_id, keep & lay["valid"])
        return to_groups(store, keep)

    def allocate(self, scores: torch.Tensor, lay: Dict[str, torch.Tensor], budget: torch.Tensor,
                 n_kv: int) -> torch.Tensor:
        if self.config.budgets == "adakv":
            return B.adakv_keep(scores, lay["pos"], lay["valid"], budget, n_kv, self.config.alpha)
        return B.top_k(scores, lay["pos"], lay["valid"], budget)

    def note_decided(self, cache: CompressedCache, layer_id: int) -> None:
        fin = cache.per_segment(cache.pass_.finishing).bool()
        prev = self.decided.get(layer_id)
        self.decided[layer_id] = fin if prev is None else prev | fin

    # --- reporting --------------------------------------------------------------------------------------------

    def policy_names(self) -> List[str]:
        return [self.name]

    def policy_counts(self, cache: CompressedCache, layer_id: int) -> List[int]:
        d = self.decided.get(layer_id)
        return [0 if d is None else int(d.sum())]

    def head_info(self, cache: CompressedCache, layer_id: int):
        """Per sequence, per KV head: (tokens it holds, nan)."""
        st = cache.stores[layer_id]
        n = [st.lengths[i] for i in range(st.n_seg)]
        return [[(f"{n[b * cache.n_kv_heads + h]} tokens", float("nan")) for h in range(cache.n_kv_heads)]
                for b in range(cache.bsz)]


def layer_fields(store, names: List[str]) -> Dict[str, torch.Tensor]:
    """A layer's slots as (n_seg, S) tensors, S = the widest group: 'pos' (long, EMPTY_POS where empty),
    'valid' (a token is there) and each named per-slot field (0 where empty)."""
    from llama.attention import EMPTY_POS

    S = max(g.width for g in store.groups)
    out = {}
    for name, fill in [("pos", EMPTY_POS)] + [(n, 0) for n in names]:
        parts = store.field(name)
        t = parts[0].new_full((store.n_seg, S), fill)
        for g, part in zip(store.groups, parts):
            t[g.seg, : g.width] = part
        out[name] = t.long() if name == "pos" else t
    out["valid"] = out["pos"] != EMPTY_POS
    return out


def to_groups(store, mask: torch.Tensor) -> List[torch.Tensor]:
    """(n_seg, S) per-slot mask -> per group (n, width), the inverse of `layer_fields`' layout."""
    return [g.rows(mask)[:, : g.width] for g in store.groups]


def positions_now(cache: CompressedCache) -> torch.Tensor:
    """(n_seg,) long: tokens seen by each segment after this pass (positions 0 .. end - 1)."""
    return cache.per_segment([cache.pass_.end] * cache.bsz)


def prompt_lens(cache: CompressedCache) -> torch.Tensor:
    return cache.per_segment(cache.prompt_lens)


class BudgetWrapper:
    """A wrapper that is not a method of its own (AdaKV, HeadKV): `{"method": NAME, "scorer": SCORER, ...}` is
    SCORER's config with `budgets` set to the wrapper's allocation, so the wrapper composes with any scorer.

    Attributes:
        allocation: the budgets.py allocation the wrapper stands for (also its registry name).
    """

    allocation = ""
    #: methods that own their budgets (or are wrappers themselves), so they cannot be wrapped
    UNWRAPPABLE = ("adakv", "headkv", "fastgen", "razor")

    @classmethod
    def config_from_dict(cls, d: Mapping[str, Any]):
        from adaptive_kv_cache.registry import METHODS, load_method_config

        d = dict(d)
        d.pop("method", None)
        scorer = d.pop("scorer", "snapkv")
        if scorer in cls.UNWRAPPABLE or scorer not in METHODS:
            allowed = [m for m in METHODS if m not in cls.UNWRAPPABLE]
            _fail(f"scorer={scorer!r} cannot be wrapped by {cls.allocation}; allowed scorers: {', '.join(allowed)}")
        if d.get("budgets", cls.allocation) != cls.allocation:
            _fail(f"budgets={d['budgets']!r} contradicts method {cls.allocation}; leave budgets out")
        return load_method_config({**d, "method": scorer, "budgets": cls.allocation})
