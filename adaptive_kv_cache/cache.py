"""FastGen's cache manager: per-(sequence, KV head) physically compressed KV storage.

Storage of one layer is a flat, packed buffer: segment i = (sequence b, KV head h), i = b * n_kv_heads + h, owns
rows [off_i, off_i + cap_i) of `k` and `v` (each (sum cap, head_dim)), of which the first len_i hold its kept
tokens in no particular order (keys carry their RoPE already, so order does not matter). Allocated bytes are
sum(cap) * 2 * head_dim * dtype size; cap_i - len_i is the growth slack. A re-layout gives each segment
ceil(len_i / 8) spare rows, at least 1 and at most growth_slack (so short prompts are not dwarfed by it and long
ones re-layout rarely); a segment whose slack passes 2 * growth_slack after evictions triggers a re-layout.

Life of a sequence: while its prompt is being processed it keeps everything and accumulates, in row chunks,
the two vectors the profiler needs (attention column sums and local-band sums). When its last prompt token has
been processed, the profiler picks one hybrid per KV head, the segment keeps what that hybrid keeps, and the
layer is re-laid out to the kept tokens. From then on every step appends the new token, returns the padded
view for attention ("attend first"), accumulates the attention each token received, and evicts what the
head's hybrid no longer keeps ("then compress"), filling holes from the segment's tail.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from adaptive_kv_cache.policies import (
    BASIC_ORDER,
    Local,
    TokenStats,
    basic_policies,
    build_candidates,
    union_keep,
)
from adaptive_kv_cache.profiler import profile
from adaptive_kv_cache.tokens import TokenClasses, special_mask
from llama.kv_cache import KVCache

SPECIAL, PUNCT = 1, 2  # bits of the per-slot class byte


@dataclass
class LayerStore:
    """Packed storage of one layer for all (sequence, KV head) segments."""

    k: torch.Tensor  # (sum cap, head_dim)
    v: torch.Tensor  # (sum cap, head_dim)
    pos: torch.Tensor  # (sum cap,) int32, absolute position of each slot's token
    cls: torch.Tensor  # (sum cap,) uint8, SPECIAL | PUNCT bits
    score: torch.Tensor  # (sum cap,) float32, attention received so far (summed over queries)
    band: torch.Tensor  # (sum cap,) float32, attention received from queries within the local window
    off: torch.Tensor  # (n_seg,) long
    cap: torch.Tensor  # (n_seg,) long
    len: torch.Tensor  # (n_seg,) long
    flags: torch.Tensor  # (n_seg, n_basic) bool, the hybrid of each segment (all False while pending)
    choice: torch.Tensor  # (n_seg,) long, index into candidates; -1 while pending
    recovery: torch.Tensor  # (n_seg, n_candidates) float64; NaN while pending
    stride: int = 0  # the common capacity when every segment has the same one (then off = i * stride), else 0

    @property
    def slot_bytes(self) -> int:
        """Metadata bytes per slot (not K/V)."""
        return sum(t.element_size() for t in (self.pos, self.cls, self.score, self.band))

    def view_index(self):
        """(n_seg, S) flat row of each padded slot and (n_seg, S) validity, S = longest segment."""
        S = int(self.len.max())
        ar = torch.arange(S, device=self.off.device)
        idx = (self.off[:, None] + ar).clamp(max=self.k.shape[0] - 1)
        return idx, ar < self.len[:, None]

    def relayout(self, extra: torch.Tensor, max_slack: int, resize: torch.Tensor,
                 keep: Optional[torch.Tensor] = None) -> None:
        """Re-packs the kept rows of every segment into new buffers; the `resize` ones get capacity
        len + extra + slack.

        Only segments that need it are resized, so a segment's capacity depends on its own history alone, not
        on which other segments share the buffer (the totals are the same however heads are split over ranks).
        The old buffers are left untouched (a view handed to attention stays valid).

        Args:
            extra: (n_seg,) rows about to be appended.
            max_slack: cap on the spare rows of a resized segment, which get ceil((len + extra) / 8), at least 1.
            resize: (n_seg,) bool.
            keep: (n_seg, S) bool over view_index's slots, rows to carry over (default: all valid ones).
        """
        idx, valid = self.view_index()
        keep = valid if keep is None else keep & valid
        new_len = keep.sum(-1)
        need = new_len + extra
        cap = torch.where(resize, need + torch.clamp((need + 7) // 8, min=1, max=max_slack), self.cap)
        off = torch.cumsum(cap, 0) - cap
        src = idx[keep]
        dst = (off[:, None] + torch.cumsum(keep, -1) - 1)[keep]
        total = int(cap.sum())
        for name in ("k", "v", "pos", "cls", "score", "band"):
            old = getattr(self, name)
            new = old.new_zeros((total,) + tuple(old.shape[1:]))
            new[dst] = old[src]
            setattr(self, name, new)
        self.off, self.cap, self.len = off, cap, new_len
        self.stride = int(cap[0]) if bool((cap == cap[0]).all()) else 0

    def remove(self, idx: torch.Tensor, valid: torch.Tensor, drop: torch.Tensor) -> None:
        """Removes the dropped slots of every segment, moving tail slots into the holes.

        Args:
            idx, valid: (n_seg, S) from view_index.
            drop: (n_seg, S) bool, slots to remove (a subset of valid).
        """
        new_len = self.len - drop.sum(-1)
        ar = torch.arange(drop.shape[1], device=drop.device)
        inside = ar < new_len[:, None]
        holes = idx[drop & inside]  # row-major: by segment, then slot
        movers = idx[valid & ~drop & ~inside]  # same count per segment, same order
        for name in ("k", "v", "pos", "cls", "score", "band"):
            t = getattr(self, name)
            t[holes] = t[movers]
        self.len = new_len


class FastGenCache(KVCache):
    """Adaptive KV cache for one generation over a batch of prompts (FastGen, ICLR 2024)."""

    def __init__(
        self,
        config,
        classes: TokenClasses,
        n_layers: int,
        prompt_tokens: Sequence[Sequence[int]],
        max_seq_len: int,
        observer: Optional[Callable] = None,
    ):
        """
        Args:
            config: FastGenConfig.
            classes: special/punctuation classes of the tokenizer's vocabulary.
            n_layers: attention layers of the model.
            prompt_tokens: the batch's prompts; sequence b is profiled once its len(prompt_tokens[b]) tokens
                have been processed.
            max_seq_len: hard limit on positions.
            observer: optional callable(layer_id, seq, attention (n_kv_heads, L, L), policy names, recoveries),
                called once per layer with the prompt attention map of the first sequence profiled in the
                first forward pass (for heatmaps); it costs one L x L map per KV head of one layer.
        """
        self.config = config
        self.classes = classes
        self.n_layers = n_layers
        self.prompt_tokens = [list(p) for p in prompt_tokens]
        self.prompt_lens = [len(p) for p in prompt_tokens]
        self.max_seq_len = max_seq_len
        self.observer = observer
        self.candidates = build_candidates(config)
        self.basics = basic_policies(config)
        self.local = Local(config.r_l)
        self.candidate_flags = torch.stack([c.flags() for c in self.candidates])  # (n_cand, n_basic)
        self.layers: List[Optional[LayerStore]] = [None] * n_layers
        self.length = 0
        self.peak_allocated = 0
        self.peak_raw = 0
        self.attn_for_observer: Optional[int] = None
        self._observed: Optional[torch.Tensor] = None
        self._prompt_special: Optional[List[torch.Tensor]] = None
        self._step = None
        self.profiling_seconds = 0.0  # wall time of the work that only profiling needs (statistics, choice)

    # --- per forward pass -------------------------------------------------------------------------------------

    def begin(self, tokens: torch.Tensor, start_pos: int) -> None:
        bsz, seqlen = tokens.shape
        if bsz != len(self.prompt_lens):
            raise ValueError(f"the cache was set up for {len(self.prompt_lens)} sequences, got a batch of {bsz}")
        if start_pos != self.length:
            raise ValueError(
                f"start_pos={start_pos} but the cache holds {self.length} positions; a cache serves one "
                f"generation: feed positions in order or start a new cache"
            )
        if start_pos + seqlen > self.max_seq_len:
            raise ValueError(f"{start_pos + seqlen} positions exceed max_seq_len={self.max_seq_len}")
        device = tokens.device
        if self.classes.special.device != device:
            self.classes = self.classes.to(device)
        if self._prompt_special is None:
            # Chat markers span several pieces: match them on each whole prompt, whose end is known.
            self._prompt_special = [
                special_mask(torch.tensor(p, dtype=torch.long, device=device), self.classes)
                for p in self.prompt_tokens
            ]
        special = self.classes.special[tokens]
        for b, prompt_special in enumerate(self._prompt_special):
            lo, hi = start_pos, min(start_pos + seqlen, len(prompt_special))
            if lo < hi:
                special[b, : hi - lo] |= prompt_special[lo:hi]
        cls = special.to(torch.uint8) * SPECIAL | self.classes.punct[tokens].to(torch.uint8) * PUNCT
        end = start_pos + seqlen
        lens = torch.tensor(self.prompt_lens, device=device)
        self._step = {
            "start_pos": start_pos,
            "seqlen": seqlen,
            "cls": cls,  # (bsz, seqlen)
            "prompt_len": lens,  # (bsz,)
            "finishing": lens <= end,  # prompt complete after this pass (profiled once, when still pending)
        }
        if self.observer is not None and start_pos == 0 and bool(self._step["finishing"].any()):
            # heatmaps need the whole prompt's rows in one pass: the first sequence whose prompt ends in it
            self.attn_for_observer = int(self._step["finishing"].nonzero()[0, 0])

    def end(self) -> None:
        self.length = self._step["start_pos"] + self._step["seqlen"]
        self.peak_allocated = max(self.peak_allocated, sum(self._kv_bytes(s) for s in self.layers if s is not None))
        self.peak_raw = max(self.peak_raw, sum(self._raw_bytes(s) for s in self.layers if s is not None))
        self.attn_for_observer = None

    # --- per layer --------------------------------------------------------------------------------------------

    def _store(self, layer_id: int, xk: torch.Tensor) -> LayerStore:
        st = self.layers[layer_id]
        if st is not None:
            return st
        bsz, n_kv, _, head_dim = xk.shape
        n_seg = bsz * n_kv
        device = xk.device
        zeros = torch.zeros(n_seg, dtype=torch.long, device=device)
        empty = xk.new_zeros(0, head_dim)
        st = LayerStore(
            k=empty, v=empty.clone(),
            pos=torch.zeros(0, dtype=torch.int32, device=device),
            cls=torch.zeros(0, dtype=torch.uint8, device=device),
            score=torch.zeros(0, dtype=torch.float32, device=device),
            band=torch.zeros(0, dtype=torch.float32, device=device),
            off=zeros, cap=zeros.clone(), len=zeros.clone(),
            flags=torch.zeros(n_seg, len(BASIC_ORDER), dtype=torch.bool, device=device),
            choice=torch.full((n_seg,), -1, dtype=torch.long, device=device),
            recovery=torch.full((n_seg, len(self.candidates)), float("nan"), dtype=torch.float64, device=device),
        )
        self.layers[layer_id] = st
        return st

    def update(self, layer_id, start_pos, xq, xk, xv):
        step = self._step
        bsz, n_kv, seqlen, head_dim = xk.shape
        n_seg = bsz * n_kv
        st = self._store(layer_id, xk)
        slack = self.config.growth_slack
        full = st.len + seqlen > st.cap
        if bool(full.any()):
            st.relayout(torch.full_like(st.len, seqlen), slack, resize=full)

        # append the new tokens
        ar_new = torch.arange(seqlen, device=xk.device)
        slots = (st.off + st.len)[:, None] + ar_new  # (n_seg, seqlen)
        st.k[slots] = xk.reshape(n_seg, seqlen, head_dim)
        st.v[slots] = xv.reshape(n_seg, seqlen, head_dim)
        st.pos[slots] = (start_pos + ar_new).to(torch.int32)
        st.cls[slots] = step["cls"].repeat_interleave(n_kv, dim=0)
        st.score[slots] = 0.0
        st.band[slots] = 0.0
        st.len = st.len + seqlen

        # the padded view the new queries attend to: a strided view of storage when all segments share one
        # capacity and nothing is evicted in place this step (all-full or still-profiling layers), else a copy
        idx, valid = st.view_index()
        S = idx.shape[1]
        evicts = bool(((st.choice >= 0) & ~st.flags[:, BASIC_ORDER.index("full")]).any())
        if st.stride and not evicts:
            keys = st.k.view(n_seg, st.stride, head_dim)[:, :S].view(bsz, n_kv, S, head_dim)
            values = st.v.view(n_seg, st.stride, head_dim)[:, :S].view(bsz, n_kv, S, head_dim)
        else:
            keys = st.k[idx].view(bsz, n_kv, S, head_dim)
            values = st.v[idx].view(bsz, n_kv, S, head_dim)
        kpos = st.pos[idx].long().view(bsz, n_kv, S)
        qpos = start_pos + ar_new
        mask = valid.view(bsz, n_kv, 1, 1, S) & (kpos[:, :, None, None, :] <= qpos[:, None])
        # mask: (bsz, n_kv, 1, seqlen, S)

        pending = st.choice.view(bsz, n_kv) < 0
        frequent = st.flags[:, BASIC_ORDER.index("frequent")].view(bsz, n_kv)
        profiling = bool(pending.any())
        if profiling:
            t0 = self._clock(xq)
        if profiling or bool(frequent.any()):
            self._accumulate(layer_id, st, xq, keys, kpos, mask, idx, valid, pending, profiling)

        n_now = start_pos + seqlen
        finishing = (step["finishing"][:, None] & pending).reshape(-1)  # (n_seg,)
        if bool(finishing.any()):
            self._profile(layer_id, st, idx, valid, finishing, n_now)
        if profiling:
            self.profiling_seconds += self._clock(xq) - t0
        active = (st.choice >= 0) & ~finishing
        if bool(active.any()):
            idx, valid = st.view_index()
            keep = union_keep(st.flags, self.basics, self._stats(st, idx, valid, n_now))
            drop = valid & ~keep & active[:, None]
            if bool(drop.any()):
                st.remove(idx, valid, drop)
                loose = st.cap - st.len > 2 * slack
                if bool(loose.any()):
                    st.relayout(torch.zeros_like(st.len), slack, resize=loose)
        return keys, values, mask

    @staticmethod
    def _clock(x: torch.Tensor) -> float:
        if x.is_cuda:  # kernels run asynchronously: time what they did, not their launch
            torch.cuda.synchronize(x.device)
        return time.perf_counter()

    def _accumulate(self, layer_id, st, xq, keys, kpos, mask, idx, valid, pending, need_band: bool):
        """Adds this pass's attention (aggregated over each query group) to every slot's score and band."""
        step = self._step
        bsz, n_kv, n_rep, seqlen, head_dim = xq.shape
        S = keys.shape[2]
        window = self.local.window(step["prompt_len"]).view(bsz, 1, 1, 1)
        score = torch.zeros(bsz, n_kv, S, dtype=torch.float32, device=xq.device)
        band = torch.zeros_like(score)
        observe = self.attn_for_observer
        rows = []
        kT = keys.unsqueeze(2).transpose(3, 4)  # (bsz, n_kv, 1, head_dim, S)
        # While every head is still reading its prompt nothing has been evicted, so slot s holds position s in
        # every segment and a row chunk only needs the keys up to its last position (half the work of L x L).
        causal = need_band and bool(pending.all())
        chunk = self.config.profile_chunk
        scale = 1 / math.sqrt(head_dim)
        for r0 in range(0, seqlen, chunk):
            r1 = min(seqlen, r0 + chunk)
            c = step["start_pos"] + r1 if causal else S
            d = step["start_pos"] + r0 if causal else 0  # keys before d are visible to every row of the chunk
            s = torch.matmul(xq[:, :, :, r0:r1] * scale, kT[..., :c]).float()
            s[..., d:].masked_fill_(~mask[:, :, :, r0:r1, d:c], float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = p.mean(2) if self.config.gqa_aggregation == "mean" else p.amax(2)  # (bsz, n_kv, r1 - r0, c)
            score[..., :c] += p.sum(2)
            if need_band:
                qpos = (step["start_pos"] + torch.arange(r0, r1, device=xq.device)).view(1, 1, -1, 1)
                band[..., :c] += (p * (kpos[:, :, None, :c] > qpos - window)).sum(2)  # qpos - kpos < window
            if observe is not None:
                rows.append(torch.nn.functional.pad(p[observe], (0, S - c)).cpu())
        st.score.index_add_(0, idx[valid], score.view(-1, S)[valid])
        if need_band:
            pend_rows = pending.reshape(-1)[:, None] & valid
            st.band.index_add_(0, idx[pend_rows], band.view(-1, S)[pend_rows])
        if observe is not None:
            L = self.prompt_lens[observe]
            self._observed = torch.cat(rows, dim=1)[:, :L, :L]  # (n_kv, L, L) in slot order = position order

    def _stats(self, st: LayerStore, idx, valid, n_now: int, n=None) -> TokenStats:
        n_seg = idx.shape[0]
        n_kv = n_seg // len(self.prompt_lens)
        lens = self._step["prompt_len"].repeat_interleave(n_kv)[:, None]
        cls = st.cls[idx]
        return TokenStats(
            valid=valid,
            pos=st.pos[idx].long(),
            special=(cls & SPECIAL).bool(),
            punct=(cls & PUNCT).bool(),
            score=st.score[idx],
            n=torch.full_like(lens, n_now) if n is None else n,
            prompt_len=lens,
        )

    def _profile(self, layer_id, st, idx, valid, seg: torch.Tensor, n_now: int) -> None:
        """Profiles the segments `seg` (n_seg,) bool whose prompts are complete, then compresses them."""
        n_kv = seg.shape[0] // len(self.prompt_lens)
        lens = self._step["prompt_len"].repeat_interleave(n_kv)[:, None]
        # Profiling looks at the prompt alone: n = L.
        stats = self._stats(st, idx, valid, n_now, n=lens)
        stats.valid = valid & (stats.pos < lens)
        choice, recovery = profile(stats, st.band[idx], self.candidates, self.config.T)
        st.choice = torch.where(seg, choice, st.choice)
        st.recovery[seg] = recovery[seg]
        st.flags[seg] = self.candidate_flags.to(seg.device)[choice[seg]]

        # keep what each hybrid keeps as the cache stands now (tokens past the prompt, if this pass went past
        # it, are judged at the current length)
        stats = self._stats(st, idx, valid, n_now)
        keep = union_keep(st.flags, self.basics, stats)
        # new buffers rather than moving rows in place: attention may still read a view of the old ones
        st.relayout(torch.zeros_like(st.len), self.config.growth_slack, resize=seg, keep=keep | ~seg[:, None])

        if self.attn_for_observer is not None:
            b = self.attn_for_observer
            names = [self.candidates[int(c)].name for c in st.choice.view(-1, n_kv)[b]]
            recs = [float(st.recovery.view(-1, n_kv, len(self.candidates))[b, h, int(c)])
                    for h, c in enumerate(st.choice.view(-1, n_kv)[b])]
            self.observer(layer_id, b, self._observed, names, recs)
            self._observed = None

    # --- reporting ----------------------------------------------------------------------------------------------

    @staticmethod
    def _kv_bytes(st: LayerStore) -> int:
        return 2 * st.k.numel() * st.k.element_size()

    def _raw_bytes(self, st: LayerStore) -> int:
        """What an uncompressed cache of the same tokens allocates: every segment holds every position."""
        return 2 * st.len.numel() * self.length * st.k.shape[1] * st.k.element_size()

    def memory_stats(self) -> Dict:
        """Per-layer and total KV memory of this generation, summed over model-parallel ranks.

        Returns:
            dict with `layers` (one dict per layer: raw_bytes, allocated_bytes, kept_bytes, slack_bytes,
            metadata_bytes, kept_tokens, segments, policies {candidate name: count}), `total` (the same summed),
            `peak_allocated_bytes`, `peak_raw_bytes`, `tokens` (positions processed), `batch`, and `heads`: per
            layer, per sequence, per local KV head, (policy name, recovery) of this rank.
        """
        names = [c.name for c in self.candidates]
        rows = []
        for st in self.layers:
            if st is None:
                rows.append([0.0] * (7 + len(names)))
                continue
            kept = int(st.len.sum())
            row_bytes = 2 * st.k.shape[1] * st.k.element_size()
            counts = torch.bincount(st.choice[st.choice >= 0], minlength=len(names)).tolist()
            rows.append([
                self._raw_bytes(st), self._kv_bytes(st), kept * row_bytes,
                self._kv_bytes(st) - kept * row_bytes, st.pos.numel() * st.slot_bytes, kept, st.len.numel(),
                *counts,
            ])
        table = torch.tensor(rows + [[self.peak_allocated, self.peak_raw] + [0.0] * (5 + len(names))],
                             dtype=torch.float64)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            from fairscale.nn.model_parallel.initialize import get_model_parallel_group

            device = self.layers[0].k.device if self.layers[0] is not None else "cpu"
            table = table.to(device)
            torch.distributed.all_reduce(table, group=get_model_parallel_group())
            table = table.cpu()
        keys = ["raw_bytes", "allocated_bytes", "kept_bytes", "slack_bytes", "metadata_bytes", "kept_tokens",
                "segments"]
        layers = []
        for r in table[:-1].tolist():
            d = {k: int(v) for k, v in zip(keys, r)}
            d["policies"] = {n: int(c) for n, c in zip(names, r[len(keys):])}
            layers.append(d)
        total = {k: sum(d[k] for d in layers) for k in keys}
        total["policies"] = {n: sum(d["policies"][n] for d in layers) for n in names}
        heads = []
        for st in self.layers:
            if st is None:
                heads.append([])
                continue
            bsz = len(self.prompt_lens)
            choice = st.choice.view(bsz, -1).tolist()
            rec = st.recovery.view(bsz, -1, len(names))
            heads.append([[(names[c] if c >= 0 else "pending", float(rec[b, h, c]) if c >= 0 else float("nan"))
                           for h, c in enumerate(choice[b])] for b in range(bsz)])
        return {
            "layers": layers,
            "total": total,
            "peak_allocated_bytes": int(table[-1, 0]),
            "peak_raw_bytes": int(table[-1, 1]),
            "tokens": self.length,
            "batch": len(self.prompt_lens),
            "candidates": names,
            "heads": heads,
        }
