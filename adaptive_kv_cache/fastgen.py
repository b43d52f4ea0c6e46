"""FastGen (Ge et al., ICLR 2024) as a compression method over the packed store.

While a prompt is read, attention reports two vectors per (sequence, KV head): the attention each key received
(column sums) and the part of it from queries within the local window (band sums). When the prompt ends, the
profiler (`adaptive_kv_cache/profiler.py`, a pure function) picks for every segment the cheapest hybrid policy
recovering at least T of its attention, and the segment keeps what that hybrid keeps. During decoding every kept
token keeps accumulating the attention it receives (frequent heads rank by it) and each compaction applies the
segment's hybrid at the current length.

`obs_window` = W > 0 (an option of this project) replaces the prompt's queries by its last W (the observation
window, where a question sits): the column sums come from those queries only (`window_from`), recovery is their
attention's share on what each hybrid keeps at the prompt's end, and frequency ranks by that attention plus
every generated query's, per counted query.
"""

import time
from typing import Callable, Dict, List, Optional

import torch

from adaptive_kv_cache.codecs import make_codec
from adaptive_kv_cache.compressed import CompressedCache, CompressionMethod
from adaptive_kv_cache.policies import BASIC_ORDER, Local, TokenStats, basic_policies, build_candidates, union_keep
from adaptive_kv_cache.profiler import profile
from adaptive_kv_cache.tokens import TokenClasses, special_mask, token_classes
from llama.attention import StatsRequest

SPECIAL, PUNCT = 1, 2  # bits of the per-slot class byte


class FastGen(CompressionMethod):
    """Per-segment hybrid policies chosen by attention recovery.

    Per layer it keeps, for each segment: `choice` (index into the candidates, -1 while pending), `flags`
    (which basic policies the hybrid contains) and `recovery` (of every candidate).
    """

    name = "fastgen"
    slot_fields = {
        "cls": (torch.uint8, 0),  # SPECIAL | PUNCT bits
        "score": (torch.float32, 0.0),  # attention received so far, summed over queries (query group combined)
        "band": (torch.float32, 0.0),  # the part of it from queries within the local window; profiling only
    }

    def __init__(self, config, classes: TokenClasses, observer: Optional[Callable] = None):
        """
        Args:
            config: FastGenConfig.
            classes: special/punctuation classes of the tokenizer's vocabulary.
            observer: optional callable(layer_id, seq, attention (n_kv_heads, R, C), policy names, recoveries),
                called once per layer with the pooled prompt attention of the first sequence whose prompt ends in
                the first forward pass (heatmaps).
        """
        self.config = config
        self.classes = classes
        self.observer = observer
        self.candidates = build_candidates(config)
        self.basics = basic_policies(config)
        self.local = Local(config.r_l)
        self.candidate_flags = torch.stack([c.flags() for c in self.candidates])  # (n_cand, n_basic)
        self.state: Dict[int, Dict[str, torch.Tensor]] = {}
        self.scored_layers: set = set()  # layers with a decoding segment that ranks by score (frequent)
        self.evicting: Dict[int, set] = {}  # per layer, the segments whose hybrid can evict (not full)
        self.heat: Dict[int, torch.Tensor] = {}
        self.observe_seq: Optional[int] = None
        self.windows: List[int] = []
        self.window_from: List[int] = []
        self._prompt_special: Optional[List[torch.Tensor]] = None
        self._cls_table: Optional[torch.Tensor] = None  # (vocab,) uint8 class bits, made on the tokens' device
        self.profiling_seconds = 0.0  # wall time of the policy choice and the first compaction's keep masks

    @classmethod
    def prepare(cls, config, llama) -> TokenClasses:
        """What every generation of a `Llama` shares: the token classes of its vocabulary."""
        return token_classes(llama.tokenizer, config.special_strings)

    @classmethod
    def create(cls, config, classes: TokenClasses, observer: Optional[Callable] = None) -> "FastGen":
        return cls(config, classes, observer)

    # --- per pass ---------------------------------------------------------------------------------------------

    def begin(self, cache: CompressedCache, tokens: torch.Tensor, start_pos: int) -> Dict[str, torch.Tensor]:
        device = tokens.device
        if self._cls_table is None or self._cls_table.device != device:
            self.classes = self.classes.to(device)
            # one lookup per pass: SPECIAL | PUNCT bits of every vocabulary entry
            self._cls_table = (self.classes.special.to(torch.uint8) * SPECIAL
                               | self.classes.punct.to(torch.uint8) * PUNCT)
        if self._prompt_special is None:
            # Chat markers span several pieces: match them on each whole prompt, whose end is known.
            self._prompt_special = [special_mask(torch.tensor(p, dtype=torch.long, device=device), self.classes)
                                    for p in cache.prompt_tokens]
        seqlen = tokens.shape[1]
        cls = self._cls_table[tokens]  # (bsz, seqlen)
        for b, prompt_special in enumerate(self._prompt_special):
            lo, hi = start_pos, min(start_pos + seqlen, len(prompt_special))
            if lo < hi:
                cls[b, : hi - lo] |= prompt_special[lo:hi].to(torch.uint8) * SPECIAL
        # local windows of the sequences still reading their prompt (0: no band sums for that sequence)
        self.windows = [int(self.local.window(torch.tensor(n))) if pend else 0
                        for n, pend in zip(cache.prompt_lens, cache.pending)]
        # observation windows: the first query that counts (every query of a sequence that decodes)
        self.window_from = [self._seen_from(n) if pend else 0 for n, pend in zip(cache.prompt_lens, cache.pending)]
        self.observe_seq = None
        if self.observer is not None and start_pos == 0 and any(cache.pass_.finishing):
            # heatmaps need the whole prompt's rows in one pass: the first sequence whose prompt ends in it
            self.observe_seq = cache.pass_.finishing.index(True)
        return {"cls": cls}

    def _seen_from(self, prompt_len: int) -> int:
        """The first prompt query whose attention counts (0 without an observation window)."""
        return max(0, prompt_len - self.config.obs_window) if self.config.obs_window else 0

    def stats_request(self, cache: CompressedCache, layer_id: int) -> Optional[StatsRequest]:
        if any(cache.pending):  # profiling: band sums, or the observation window's column sums
            windowed = bool(self.config.obs_window)
            return StatsRequest(band_windows=None if windowed else self.windows,
                                window_from=self.window_from if windowed else None,
                                gqa=self.config.gqa_aggregation, heatmap_seq=self.observe_seq)
        if layer_id in self.scored_layers:
            return StatsRequest(gqa=self.config.gqa_aggregation)
        return None

    # --- per layer --------------------------------------------------------------------------------------------

    def _state(self, cache: CompressedCache, layer_id: int) -> Dict[str, torch.Tensor]:
        st = self.state.get(layer_id)
        if st is None:
            store = cache.stores[layer_id]
            n_seg, device = store.n_seg, store.device
            st = self.state[layer_id] = {
                "choice": torch.full((n_seg,), -1, dtype=torch.long, device=device),
                "flags": torch.zeros(n_seg, len(BASIC_ORDER), dtype=torch.bool, device=device),
                "recovery": torch.full((n_seg, len(self.candidates)), float("nan"), dtype=torch.float64,
                                       device=device),
            }
        return st

    def on_stats(self, cache: CompressedCache, layer_id: int, stats) -> None:
        store = cache.stores[layer_id]
        for score, colsum in zip(store.field("score"), stats.colsum if stats.window is None else stats.window):
            score += colsum
        if stats.band is not None:
            for band, b in zip(store.field("band"), stats.band):
                band += b
        if stats.heatmap is not None:
            self.heat[layer_id] = stats.heatmap

    def _token_stats(self, cache: CompressedCache, layer_id: int, n: torch.Tensor) -> List[TokenStats]:
        """Per group of the layer's store, the statistics the policies read; n: (n_seg,) current lengths."""
        store = cache.stores[layer_id]
        lens = cache.per_segment(cache.prompt_lens)
        seen = cache.per_segment([self._seen_from(n) for n in cache.prompt_lens]) if self.config.obs_window else None
        out = []
        for g, pos, cls, score in zip(store.groups, store.field("pos"), store.field("cls"), store.field("score")):
            out.append(TokenStats(
                valid=pos < n[g.seg, None],
                pos=pos.long(),
                special=(cls & SPECIAL).bool(),
                punct=(cls & PUNCT).bool(),
                score=score,
                n=n[g.seg, None],
                prompt_len=lens[g.seg, None],
                seen_from=None if seen is None else seen[g.seg, None],
            ))
        return out

    def on_prompt_end(self, cache: CompressedCache, layer_id: int, segments: torch.Tensor) -> None:
        t0 = _clock(segments)
        store = cache.stores[layer_id]
        st = self._state(cache, layer_id)
        lens = cache.per_segment(cache.prompt_lens)
        flags = self.candidate_flags.to(segments.device)
        # profiling looks at the prompt alone: keys and queries before L, n = L
        for g, stats, band in zip(store.groups, self._token_stats(cache, layer_id, lens), store.field("band")):
            choice, recovery = profile(stats, None if self.config.obs_window else band, self.candidates,
                                       self.config.T)
            fin = segments[g.seg]
            st["choice"][g.seg] = torch.where(fin, choice, st["choice"][g.seg])
            st["recovery"][g.seg] = torch.where(fin[:, None], recovery, st["recovery"][g.seg])
            st["flags"][g.seg] = torch.where(fin[:, None], flags[choice], st["flags"][g.seg])
        # what decoding needs, read on the host once per layer when a prompt ends
        frequent, full = (st["flags"][:, BASIC_ORDER.index(n)] for n in ("frequent", "full"))
        if bool(frequent.any()):
            self.scored_layers.add(layer_id)
        self.evicting[layer_id] = set(((st["choice"] >= 0) & ~full).nonzero().flatten().tolist())
        if layer_id in self.heat and self.observer is not None:
            b, n_kv = self.observe_seq, cache.n_kv_heads
            choice = st["choice"].view(-1, n_kv)[b].tolist()
            rec = st["recovery"].view(-1, n_kv, len(self.candidates))[b]
            self.observer(layer_id, b, self.heat.pop(layer_id).cpu(), [self.candidates[c].name for c in choice],
                          [float(rec[h, c]) for h, c in enumerate(choice)])
        if not any(p and not f for p, f in zip(cache.pending, cache.pass_.finishing)):
            store.drop_field("band")  # no prompt left to profile
        self.profiling_seconds += _clock(segments) - t0

    def keep(self, cache: CompressedCache, layer_id: int) -> List[Optional[torch.Tensor]]:
        st = self._state(cache, layer_id)
        store = cache.stores[layer_id]
        n_now = torch.full((store.n_seg,), cache.pass_.end, dtype=torch.long, device=store.device)
        decoding = st["choice"] >= 0
        evicting = self.evicting.get(layer_id, set())
        keep = []
        for g, stats in zip(store.groups, self._token_stats(cache, layer_id, n_now)):
            if not evicting.intersection(g.members):
                keep.append(None)  # full or pending: nothing to evict
                continue
            k = union_keep(st["flags"][g.seg], self.basics, stats)
            keep.append(k | ~decoding[g.seg, None])  # pending segments keep everything
        return keep

    # --- reporting ----------------------------------------------------------------------------------------------

    def policy_names(self) -> List[str]:
        return [c.name for c in self.candidates]

    def policy_counts(self, cache: CompressedCache, layer_id: int) -> List[int]:
        st = self.state.get(layer_id)
        if st is None:
            return [0] * len(self.candidates)
        return torch.bincount(st["choice"][st["choice"] >= 0], minlength=len(self.candidates)).tolist()

    def head_info(self, cache: CompressedCache, layer_id: int):
        st = self.state.get(layer_id)
        names = self.policy_names()
        if st is None:
            return [[("pending", float("nan"))] * cache.n_kv_heads for _ in range(cache.bsz)]
        choice = st["choice"].view(cache.bsz, -1).tolist()
        rec = st["recovery"].view(cache.bsz, -1, len(names))
        return [[(names[c] if c >= 0 else "pending", float(rec[b, h, c]) if c >= 0 else float("nan"))
                 for h, c in enumerate(choice[b])] for b in range(cache.bsz)]


def _clock(x: torch.Tensor) -> float:
    if x.is_cuda:  # kernels run asynchronously: time what they did, not their launch
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


def FastGenCache(config, classes: TokenClasses, n_layers: int, prompt_tokens, max_seq_len: int,
                 observer: Optional[Callable] = None) -> CompressedCache:
    """A compressed cache running FastGen with `config` (evict_every and kv_quant from the config)."""
    return CompressedCache(FastGen(config, classes, observer), n_layers, prompt_tokens, max_seq_len,
                           evict_every=config.evict_every, codec=make_codec(config.kv_quant))
