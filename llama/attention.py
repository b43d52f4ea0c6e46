"""Attention kernels, side by side: the readable reference and the fast paths the model runs.

The cache describes what the new queries attend to (a `DenseView` or a `PackedView`); `attend` picks the kernel
from that description and from what the cache asked to learn about the attention (`StatsRequest`):

* `eager_attention`: Meta's explicit softmax(QK^T / sqrt(d)) V over a materialised (heads x queries x keys)
  score tensor. The reference the tests hold every other kernel to; never used by the model.
* `sdpa_attention`: PyTorch's `scaled_dot_product_attention` on a dense view: causal prefill, decode, and chunked
  prefill after cached positions. Grouped-query attention never copies the cache: a decode step folds the query
  heads that share a KV head into the query-length dimension, prefill uses SDPA's own `enable_gqa`.
* `chunked_attention`: a dense view in tiles of query rows (and segments), explicit softmax per tile, when the
  cache asked for statistics (attention column sums, local-band sums, a pooled heatmap). The statistics come
  from the same probabilities as the output, so profiling costs no second pass; memory is one tile,
  O(rows x keys) per KV head, never heads x L x L.
* `packed_attention`: a packed view (ragged segments stored in groups of a common width). One batched call per
  group, so the cost grows with the group widths, which the cache keeps close to the kept tokens. Explicit
  softmax where statistics are wanted, SDPA with a validity mask where not.

Shapes: xq is (bsz, seqlen, n_heads, head_dim), rotated, as `Attention.forward` has it; the output is
(bsz, seqlen, n_heads * head_dim). Query head i uses KV head i // n_rep (n_rep = n_heads // n_kv_heads), as
Meta's `repeat_kv` arranges them. A segment is one (sequence, KV head): segment id b * n_kv_heads + h.
"""

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

#: Position stored in an empty slot: later than any query, so the causal test masks it.
EMPTY_POS = torch.iinfo(torch.int32).max

#: Most bytes of one score tile in the tiled kernels (README, "Attention kernels"): on a CPU the products run best
#: at about TILE_ROWS query rows, which this bound rarely cuts; on a GPU fewer, larger launches do. Either way the
#: memory is O(rows x keys), never heads x L x L.
TILE_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}
TILE_ROWS = 128  # query rows (query heads x positions) per score product in the tiled kernel


def tile_bytes_for(device: torch.device) -> int:
    return TILE_BYTES.get(device.type, TILE_BYTES["cpu"])


@dataclass
class DenseView:
    """Keys and values of every (sequence, KV head) in position order: slot s holds position s.

    Attributes:
        keys: (bsz, n_kv_heads, cache_len, head_dim), cache_len = start_pos + seqlen.
        values: (bsz, n_kv_heads, cache_len, head_dim).
        start_pos: absolute position of the first query.
    """

    keys: torch.Tensor
    values: torch.Tensor
    start_pos: int


@dataclass
class KVGroup:
    """Segments of a packed store that share one width: a zero-copy view of the store's buffers.

    Attributes:
        keys: (n, width, head_dim), or None when the store holds codes (see `codes`).
        values: (n, width, head_dim), or None likewise.
        pos: (n, width) int32 absolute position of each slot's token; EMPTY_POS marks an empty slot.
        seg: (n,) long segment id (b * n_kv_heads + h) of each row.
        seg_range: (lo, hi) when seg is lo..hi-1 in order (rows are then a slice, not a gather).
        bias: (n, width) float32, 0 for a slot a decoding query may see and -inf for padding (every stored
            token precedes a decode step's query, so this is the whole mask of a decode step); None: use pos.
        codes: reader of quantised keys and values (adaptive_kv_cache/codecs.py), which the kernels dequantise
            a chunk of columns at a time, never the whole group: `chunk` (columns per read), `key_scale` and
            `value_scale` ((n, width) float32 per-slot factors, or None), and `keys(lo, hi)` / `values(lo, hi)`
            returning (n, hi - lo, head_dim) in the queries' dtype (possibly a reused buffer, valid until the
            next read) that, times the per-slot scale, are the dequantised rows. The kernels fold the scales
            into the scores (q . (s c) = s (q . c)) and the probabilities (p (s c) = (p s) c).
    """

    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    pos: torch.Tensor
    seg: torch.Tensor
    seg_range: Optional[Tuple[int, int]] = None
    bias: Optional[torch.Tensor] = None
    codes: Optional[object] = None

    @property
    def width(self) -> int:
        return self.pos.shape[1]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of a per-segment tensor (n_seg, ...) that belong to this group, in group order."""
        return take_rows(t, self.seg, self.seg_range)


def take_rows(t: torch.Tensor, seg: torch.Tensor, seg_range: Optional[Tuple[int, int]]) -> torch.Tensor:
    """t[seg] for a per-segment tensor t (n_seg, ...): a slice when seg is the range seg_range, else a gather."""
    if seg_range is not None:
        return t[seg_range[0] : seg_range[1]]
    return t.index_select(0, seg)


@dataclass
class PackedView:
    """Ragged (sequence, KV head) segments, stored in groups; slot order inside a segment is free.

    Attributes:
        groups: every segment appears in exactly one group.
        start_pos: absolute position of the first query.
        n_kv_heads: KV heads per sequence (segments = bsz * n_kv_heads).
    """

    groups: List[KVGroup]
    start_pos: int
    n_kv_heads: int


@dataclass
class StatsRequest:
    """What a cache wants to learn from this layer's attention probabilities.

    Probabilities of the query heads that share a KV head are combined by `gqa` (mean or max) first.

    Attributes:
        colsum: attention each key received, summed over the new queries.
        band_windows: per sequence, W > 0 asks for the part of colsum that comes from queries less than W
            positions after the key (FastGen's local-band sums); 0 or None: not for that sequence.
        gqa: 'mean' or 'max'.
        heatmap_seq: a sequence whose attention map is returned, pooled to at most heatmap_bins x heatmap_bins
            (dense views only).
        heatmap_bins: resolution of that map.
        window_from: per sequence, an absolute query position: asks for the attention each key received from
            the queries at that position or later only (SnapKV's observation window, TOVA's last query); a
            position past the pass (e.g. EMPTY_POS) leaves that sequence's window sums at 0. None: not asked.
    """

    colsum: bool = True
    band_windows: Optional[Sequence[int]] = None
    gqa: str = "mean"
    heatmap_seq: Optional[int] = None
    heatmap_bins: int = 512
    window_from: Optional[Sequence[int]] = None

    def wants_band(self) -> bool:
        return self.band_windows is not None and any(w > 0 for w in self.band_windows)


@dataclass
class AttentionStats:
    """Statistics in the layout of the view: one entry per group (a dense view is one group, slot = position).

    Attributes:
        colsum: per group, (n, width) float32.
        band: per group, (n, width) float32, or None when not asked for.
        heatmap: (n_kv_heads, R, C) float32 pooled prompt attention of one sequence, or None.
        window: per group, (n, width) float32 column sums over the queries at or after `window_from`, or None.
    """

    colsum: List[torch.Tensor] = field(default_factory=list)
    band: Optional[List[torch.Tensor]] = None
    heatmap: Optional[torch.Tensor] = None
    window: Optional[List[torch.Tensor]] = None


# --- the reference --------------------------------------------------------------------------------------------


def _padded(view) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any view as (n_seg, S, head_dim) keys and values plus (n_seg, S) positions (EMPTY_POS for padding)."""
    if isinstance(view, DenseView):
        bsz, n_kv, S, hd = view.keys.shape
        pos = torch.arange(S, dtype=torch.int32, device=view.keys.device).expand(bsz * n_kv, S)
        return view.keys.reshape(bsz * n_kv, S, hd), view.values.reshape(bsz * n_kv, S, hd), pos
    n_seg = sum(g.seg.numel() for g in view.groups)
    S = max(g.width for g in view.groups)
    kv = [dequantised(g) for g in view.groups]
    k0 = kv[0][0]
    keys = k0.new_zeros(n_seg, S, k0.shape[2])
    values = torch.zeros_like(keys)
    pos = torch.full((n_seg, S), EMPTY_POS, dtype=torch.int32, device=keys.device)
    for g, (k, v) in zip(view.groups, kv):
        keys[g.seg, : g.width], values[g.seg, : g.width], pos[g.seg, : g.width] = k, v, g.pos
    return keys, values, pos


def dequantised(g: KVGroup) -> Tuple[torch.Tensor, torch.Tensor]:
    """A group's keys and values, (n, width, head_dim) each, dequantised in full when stored as codes (the
    reference and tests; the kernels read codes a chunk at a time)."""
    if g.codes is None:
        return g.keys, g.values
    c = g.codes
    out = []
    for read, scale in ((c.keys, c.key_scale), (c.values, c.value_scale)):
        t = torch.cat([read(lo, min(g.width, lo + c.chunk)).clone() for lo in range(0, g.width, c.chunk)], 1)
        out.append(t if scale is None else t * scale[..., None].to(t.dtype))
    return out[0], out[1]


def _coded_scores(q: torch.Tensor, g: KVGroup, alpha: float, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bias + alpha * q . k over a coded group, a chunk of dequantised keys at a time, the key scales folded in
    after (few ops: this runs once per group, layer and decode step).

    Args:
        q: (n, rows, head_dim) queries of the group's segments.
        bias: broadcastable to (n, rows, width), in q's dtype, or None.

    Returns:
        torch.Tensor: (n, rows, width) in q's dtype.
    """
    c = g.codes
    s = q.new_empty(q.shape[0], q.shape[1], g.width)
    for lo in range(0, g.width, c.chunk):
        hi = min(g.width, lo + c.chunk)
        torch.bmm(q, c.keys(lo, hi).transpose(1, 2), out=s[:, :, lo:hi])
    if c.key_scale is None:
        s = s.mul_(alpha) if alpha != 1.0 else s
        return s if bias is None else s.add_(bias)
    ks = c.key_scale[:, None].to(s.dtype)
    return s.mul_(ks).mul_(alpha) if bias is None else torch.addcmul(bias, s, ks, value=alpha)


def _coded_output(p: torch.Tensor, g: KVGroup, dtype: torch.dtype) -> torch.Tensor:
    """p @ v over a coded group, a chunk of dequantised values at a time, the value scales folded into p.

    Args:
        p: (n, rows, width) float32 probabilities.

    Returns:
        torch.Tensor: (n, rows, head_dim) in `dtype`.
    """
    c = g.codes
    if c.value_scale is not None:
        p = p * c.value_scale[:, None]
    p = p.to(dtype)
    o = None
    for lo in range(0, g.width, c.chunk):
        hi = min(g.width, lo + c.chunk)
        v = c.values(lo, hi)
        o = torch.bmm(p[:, :, lo:hi], v) if o is None else o.baddbmm_(p[:, :, lo:hi], v)
    return o


def eager_attention(xq: torch.Tensor, view) -> torch.Tensor:
    """Meta's explicit softmax over every key slot of the view (the reference; materialises all scores).

    Args:
        xq: (bsz, seqlen, n_heads, head_dim) rotated queries.
        view: DenseView or PackedView.

    Returns:
        torch.Tensor: (bsz, seqlen, n_heads * head_dim).
    """
    bsz, seqlen, n_heads, head_dim = xq.shape
    keys, values, kpos = _padded(view)
    n_kv = keys.shape[0] // bsz
    S = keys.shape[1]
    keys = keys.view(bsz, n_kv, 1, S, head_dim)
    values = values.view(bsz, n_kv, 1, S, head_dim)
    xq = xq.view(bsz, seqlen, n_kv, n_heads // n_kv, head_dim).permute(0, 2, 3, 1, 4)
    # xq: (bsz, n_kv_heads, n_rep, seqlen, head_dim)
    qpos = view.start_pos + torch.arange(seqlen, device=xq.device)
    mask = kpos.view(bsz, n_kv, 1, 1, S) <= qpos.view(1, 1, 1, seqlen, 1)
    scores = torch.matmul(xq, keys.transpose(3, 4)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    scores = F.softmax(scores.float(), dim=-1).type_as(xq)
    output = torch.matmul(scores, values)  # (bsz, n_kv_heads, n_rep, seqlen, head_dim)
    return output.permute(0, 3, 1, 2, 4).reshape(bsz, seqlen, -1)


# --- dense fast paths -----------------------------------------------------------------------------------------


def sdpa_attention(xq: torch.Tensor, view: DenseView) -> torch.Tensor:
    """PyTorch SDPA on a dense view; GQA without copying the cache.

    Returns:
        torch.Tensor: (bsz, seqlen, n_heads * head_dim).
    """
    bsz, seqlen, n_heads, head_dim = xq.shape
    keys, values = view.keys, view.values  # (bsz, n_kv_heads, cache_len, head_dim)
    n_kv = keys.shape[1]
    if seqlen == 1:
        # Decode: the n_rep query heads of a KV head become n_rep query rows against the same keys, all visible.
        xq = xq.view(bsz, n_kv, n_heads // n_kv, head_dim)
        return F.scaled_dot_product_attention(xq, keys, values).view(bsz, 1, n_heads * head_dim)
    xq = xq.transpose(1, 2)  # (bsz, n_heads, seqlen, head_dim)
    if view.start_pos == 0:
        out = F.scaled_dot_product_attention(xq, keys, values, is_causal=True, enable_gqa=n_kv != n_heads)
    else:
        # is_causal aligns the diagonal top-left; after cached positions it must end bottom-right.
        mask = torch.ones(seqlen, keys.shape[2], dtype=torch.bool, device=xq.device).tril(view.start_pos)
        out = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, enable_gqa=n_kv != n_heads)
    return out.transpose(1, 2).reshape(bsz, seqlen, n_heads * head_dim)


def _combine_rep(p: torch.Tensor, n_rep: int, how: str) -> torch.Tensor:
    """(n, n_rep * rows, keys) probabilities of a query group -> (n, rows, keys), combined over the group."""
    p = p.view(p.shape[0], n_rep, -1, p.shape[-1])
    return p.mean(1) if how == "mean" else p.amax(1)


def _add_band(band: torch.Tensor, p: torch.Tensor, p_combined: Optional[torch.Tensor], colsum: torch.Tensor,
              q0: int, W: int, gqa: str) -> None:
    """Adds the attention of queries at positions q0, q0+1, ... to keys less than W positions before them.

    Keys at or after the last query's position - W + 1 are in the band for every query of the tile, keys before
    the first query's position - W + 1 for none: only the strip between needs the mask.

    Args:
        band: (n, keys) accumulator, slot = position.
        p: (n, n_rep, rows, keys) probabilities of the tile's queries.
        p_combined: p combined over the query group, (n, rows, keys), or None (then computed on the strip).
        colsum: (n, keys) the tile's column sums of the combined probabilities.
        q0: position of the tile's first query.
        W: window.
        gqa: how the query group is combined: mean | max.
    """
    rows, n_keys = p.shape[2], p.shape[3]
    hi = min(n_keys, max(0, q0 + rows - W))
    lo = min(hi, max(0, q0 - W + 1))
    band[:, hi:n_keys] += colsum[:, hi:]
    if hi > lo:
        strip = p_combined[..., lo:hi] if p_combined is not None else _combine_rep(
            p[..., lo:hi].reshape(p.shape[0], -1, hi - lo), p.shape[1], gqa)
        qpos = torch.arange(q0, q0 + rows, device=p.device).view(-1, 1)
        kpos = torch.arange(lo, hi, device=p.device).view(1, -1)
        band[:, lo:hi] += (strip * (qpos - kpos < W)).sum(1)


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim as float32; in place for float32 input, where the tile stays in cache (~20% faster
    on a CPU than writing a new tensor). The in-place form is ATen's `_softmax.out` (rows are read before they are
    written); a torch without it gets the allocating form."""
    if s.dtype == torch.float32:
        try:
            return torch.ops.aten._softmax.out(s, -1, False, out=s)
        except (AttributeError, RuntimeError):
            pass
    return torch.softmax(s, dim=-1, dtype=torch.float32)


def _pool_index(n: int, bins: int, device) -> Tuple[torch.Tensor, int]:
    """Bin of each of n positions when n positions are pooled into at most `bins` equal bins."""
    per = max(1, math.ceil(n / bins))
    return torch.arange(n, device=device) // per, math.ceil(n / per)


def chunked_attention(xq: torch.Tensor, view: DenseView, want: StatsRequest,
                      tile_bytes: Optional[int] = None) -> Tuple[torch.Tensor, AttentionStats]:
    """Causal attention over a dense view in tiles of query rows, with statistics from the same probabilities.

    Each tile is a few KV heads of one sequence and a block of query rows: scores (heads x rows x keys up to the
    tile's last query) in one batched matmul, the mask only on the diagonal block, softmax, then the output and
    the statistics from the probabilities in hand.

    Args:
        xq: (bsz, seqlen, n_heads, head_dim) rotated queries at positions start_pos ...
        view: keys/values of positions 0 .. start_pos + seqlen - 1.
        want: the statistics to return.
        tile_bytes: bytes of one tile's score block (default: `tile_bytes_for` the device).

    Returns:
        output: (bsz, seqlen, n_heads * head_dim).
        stats: colsum/band as one group of (bsz * n_kv_heads, cache_len); the heatmap if asked for.
    """
    tile_bytes = tile_bytes or tile_bytes_for(xq.device)
    bsz, seqlen, n_heads, head_dim = xq.shape
    n_kv, S = view.keys.shape[1], view.keys.shape[2]
    n_rep = n_heads // n_kv
    start = view.start_pos
    keys, values = view.keys, view.values
    # (bsz, n_kv, n_rep, seqlen, head_dim), scaled once
    q = xq.view(bsz, seqlen, n_kv, n_rep, head_dim).permute(0, 2, 3, 1, 4) * (1.0 / math.sqrt(head_dim))
    out = xq.new_empty(bsz, seqlen, n_kv, n_rep, head_dim)
    out_t = out.permute(0, 2, 3, 1, 4)  # a view in q's layout
    f32 = dict(dtype=torch.float32, device=xq.device)
    colsum = torch.zeros(bsz, n_kv, S, **f32)
    band = torch.zeros(bsz, n_kv, S, **f32) if want.wants_band() else None
    window = torch.zeros(bsz, n_kv, S, **f32) if want.window_from is not None else None
    heat = rbin = cbin = None
    if want.heatmap_seq is not None:
        rbin, nr = _pool_index(seqlen, want.heatmap_bins, xq.device)
        cbin, nc = _pool_index(S, want.heatmap_bins, xq.device)
        heat = torch.zeros(n_kv, nr, nc, **f32)
    el = max(4, xq.element_size())
    # about TILE_ROWS query rows per product (the matmuls' sweet spot here), fewer when a tile would outgrow
    # tile_bytes; more KV heads per tile while it stays within tile_bytes
    rows = max(1, min(seqlen, -(-TILE_ROWS // n_rep), tile_bytes // (n_rep * S * el)))
    heads = max(1, min(n_kv, tile_bytes // (n_rep * rows * S * el)))
    causal = torch.ones(rows, rows, dtype=torch.bool, device=xq.device).triu(1)
    # colsum of a tile = (weights of its query rows) @ probabilities: one matmul instead of two reductions
    ones = torch.full((heads, 1, n_rep * rows), 1.0 / n_rep, dtype=torch.float32, device=xq.device)
    # Keys transposed once per layer and one score buffer for all tiles: a plain (rows x d) @ (d x keys) product
    # into memory that stays allocated runs ~1.5x faster on a CPU than a transposed operand into a new tensor.
    keys_t = keys.transpose(2, 3).contiguous()  # (bsz, n_kv_heads, head_dim, cache_len)
    scores = xq.new_empty(heads * n_rep * rows * S)
    for r0 in range(0, seqlen, rows):
        r1 = min(seqlen, r0 + rows)
        c, end = r1 - r0, start + r1  # queries in the tile; keys it can see
        for b in range(bsz):
            for h0 in range(0, n_kv, heads):
                h1 = min(n_kv, h0 + heads)
                qt = q[b, h0:h1, :, r0:r1].reshape(h1 - h0, n_rep * c, head_dim)
                s = scores[: (h1 - h0) * n_rep * c * end].view(h1 - h0, n_rep * c, end)
                torch.bmm(qt, keys_t[b, h0:h1, :, :end], out=s)
                s.view(h1 - h0, n_rep, c, end)[..., start + r0 :].masked_fill_(causal[:c, :c], float("-inf"))
                p = _softmax_(s)
                o = torch.bmm(p.type_as(xq), values[b, h0:h1, :end])
                out_t[b, h0:h1, :, r0:r1] = o.view(h1 - h0, n_rep, c, head_dim)
                if want.gqa == "mean":
                    cs = torch.bmm(ones[: h1 - h0, :, : n_rep * c], p).view(h1 - h0, end)
                    pr = None
                else:
                    pr = _combine_rep(p, n_rep, "max")  # (heads, c, end)
                    cs = pr.sum(1)
                colsum[b, h0:h1, :end] += cs
                if band is not None and want.band_windows[b] > 0:
                    _add_band(band[b, h0:h1], p.view(h1 - h0, n_rep, c, end), pr, cs, start + r0,
                              want.band_windows[b], want.gqa)
                if window is not None and want.window_from[b] < start + r1:
                    i0 = max(0, want.window_from[b] - start - r0)  # first row of the tile in the window
                    if pr is None:  # mean over the query group
                        cw = p.view(h1 - h0, n_rep, c, end)[:, :, i0:].sum((1, 2)) / n_rep
                    else:
                        cw = pr[:, i0:].sum(1)
                    window[b, h0:h1, :end] += cw
                if heat is not None and b == want.heatmap_seq:
                    pr = _combine_rep(p, n_rep, want.gqa) if pr is None else pr
                    pooled = torch.zeros(h1 - h0, c, heat.shape[2], **f32).index_add_(2, cbin[:end], pr)
                    heat[h0:h1].index_add_(1, rbin[r0:r1], pooled)
    if heat is not None:  # mean over the positions pooled into each cell
        heat /= torch.bincount(rbin).view(1, -1, 1) * torch.bincount(cbin).view(1, 1, -1)
    stats = AttentionStats(colsum=[colsum.view(bsz * n_kv, S)],
                           band=None if band is None else [band.view(bsz * n_kv, S)], heatmap=heat,
                           window=None if window is None else [window.view(bsz * n_kv, S)])
    return out.view(bsz, seqlen, n_heads * head_dim), stats


# --- packed -----------------------------------------------------------------------------------------------------


def packed_attention(xq: torch.Tensor, view: PackedView, want: Optional[StatsRequest] = None,
                     tile_bytes: Optional[int] = None) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """Attention over ragged segments, one batched call per group (and per tile of query rows when long).

    Args:
        xq: (bsz, seqlen, n_heads, head_dim) rotated queries at positions start_pos ...
        view: the groups; each segment's slots may be in any order (positions say which keys a query sees).
        want: statistics to return (None: none, and SDPA computes the groups).
        tile_bytes: bytes of one tile's score block (default: `tile_bytes_for` the device).

    Returns:
        output: (bsz, seqlen, n_heads * head_dim).
        stats: per group, colsum/band (n, width) in the group's slot order; None when want is None.
    """
    tile_bytes = tile_bytes or tile_bytes_for(xq.device)
    if xq.shape[1] == 1 and all(g.bias is not None for g in view.groups):
        return _packed_decode(xq, view, want)
    bsz, seqlen, n_heads, head_dim = xq.shape
    n_kv = view.n_kv_heads
    n_seg, n_rep = bsz * n_kv, n_heads // n_kv
    # (n_seg, n_rep * seqlen, head_dim), rows ordered (query head, position), scaled once
    q = xq.view(bsz, seqlen, n_kv, n_rep, head_dim).permute(0, 2, 3, 1, 4).reshape(n_seg, n_rep * seqlen, head_dim)
    q = q * (1.0 / math.sqrt(head_dim))
    out = torch.empty_like(q)
    qpos = view.start_pos + torch.arange(seqlen, device=xq.device, dtype=torch.int32)
    stats = windows = qfrom = None
    if want is not None:
        stats = AttentionStats(band=[] if want.wants_band() else None)
        if want.wants_band():
            windows = torch.tensor(want.band_windows, device=xq.device).repeat_interleave(n_kv)  # per segment
        if want.window_from is not None:
            stats.window = []
            qfrom = _per_segment(want.window_from, n_kv, xq.device)
    for g in view.groups:
        qg = g.rows(q)
        n, width = g.pos.shape[0], g.width
        if want is None and g.codes is None:
            og = _sdpa_group(qg, g, qpos, n_rep)
        else:
            el = max(4, xq.element_size())
            rows = max(1, min(seqlen, tile_bytes // max(1, n * n_rep * width * el)))
            og = torch.empty_like(qg)
            cs_g = torch.zeros(n, width, dtype=torch.float32, device=xq.device) if want is not None else None
            band_g = torch.zeros_like(cs_g) if windows is not None else None
            win_g = torch.zeros_like(cs_g) if qfrom is not None else None
            for r0 in range(0, seqlen, rows):
                r1 = min(seqlen, r0 + rows)
                qt = qg.view(n, n_rep, seqlen, head_dim)[:, :, r0:r1].reshape(n, -1, head_dim)
                s = (torch.bmm(qt, g.keys.transpose(1, 2)) if g.codes is None else _coded_scores(qt, g, 1.0)
                     ).view(n, n_rep, r1 - r0, width)
                visible = g.pos[:, None, :] <= qpos[r0:r1, None]  # (n, rows, width)
                s = s.masked_fill(~visible[:, None], float("-inf")).view(n, -1, width)
                p = torch.softmax(s, dim=-1, dtype=torch.float32)
                o = torch.bmm(p.type_as(xq), g.values) if g.codes is None else _coded_output(p, g, xq.dtype)
                og.view(n, n_rep, seqlen, head_dim)[:, :, r0:r1] = o.view(n, n_rep, r1 - r0, head_dim)
                if want is None:
                    continue
                pr = _combine_rep(p, n_rep, want.gqa)  # (n, rows, width)
                cs_g += pr.sum(1)
                if band_g is not None:
                    near = (qpos[r0:r1, None].long() - g.pos[:, None, :].long()) < g.rows(windows).view(-1, 1, 1)
                    band_g += (pr * (near & visible)).sum(1)
                if win_g is not None:  # rows at or after the sequence's window start
                    late = qpos[r0:r1].long()[None, :] >= g.rows(qfrom)[:, None]  # (n, rows)
                    win_g += (pr * late[..., None]).sum(1)
            if want is not None:
                stats.colsum.append(cs_g)
            if band_g is not None:
                stats.band.append(band_g)
            if win_g is not None:
                stats.window.append(win_g)
        _put_rows(out, g, og)
    out = out.view(bsz, n_kv, n_rep, seqlen, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(bsz, seqlen, n_heads * head_dim), stats


def _per_segment(values: Sequence[int], n_kv: int, device) -> torch.Tensor:
    """(bsz,) per-sequence values -> (bsz * n_kv,) long, one per segment."""
    return torch.tensor(values, dtype=torch.long, device=device).repeat_interleave(n_kv)


def _put_rows(out: torch.Tensor, g: KVGroup, rows: torch.Tensor) -> torch.Tensor:
    """out[g.seg] = rows; returns out."""
    if g.seg_range is not None:
        out[g.seg_range[0] : g.seg_range[1]] = rows
    else:
        out.index_copy_(0, g.seg, rows)
    return out


def _packed_decode(xq: torch.Tensor, view: PackedView, want: Optional[StatsRequest]
                   ) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """One query position: every stored slot precedes it, so each group's additive bias is the whole mask and
    the scores of a group are one fused matmul (this path runs once per layer and token: few, fused ops)."""
    bsz, _, n_heads, head_dim = xq.shape
    n_kv = view.n_kv_heads
    n_seg, n_rep = bsz * n_kv, n_heads // n_kv
    q = xq.view(n_seg, n_rep, head_dim)  # no copy
    scale = 1.0 / math.sqrt(head_dim)
    # one group of every segment in order (the common case) is the output itself; else rows are scattered
    out = None if len(view.groups) == 1 and view.groups[0].seg_range == (0, n_seg) else torch.empty_like(q)
    stats = None
    if want is not None:
        stats = AttentionStats(band=[] if want.wants_band() else None)
        if want.wants_band():
            windows = torch.tensor(want.band_windows, device=xq.device).repeat_interleave(n_kv)
        if want.window_from is not None:
            stats.window = []
            late = _per_segment(want.window_from, n_kv, xq.device) <= view.start_pos  # (n_seg,)
    for g in view.groups:
        qg = g.rows(q)
        if want is None and g.codes is None:
            og = F.scaled_dot_product_attention(qg[:, None], g.keys[:, None], g.values[:, None],
                                                attn_mask=g.bias[:, None, None].to(q.dtype))[:, 0]
            out = og if out is None else _put_rows(out, g, og)
            continue
        if g.codes is None:
            s = torch.baddbmm(g.bias[:, None].to(q.dtype), qg, g.keys.transpose(1, 2), alpha=scale)  # (n, n_rep, w)
        else:
            s = _coded_scores(qg, g, scale, g.bias[:, None].to(q.dtype))
        p = torch.softmax(s, dim=-1, dtype=torch.float32)
        og = torch.bmm(p.type_as(q), g.values) if g.codes is None else _coded_output(p, g, q.dtype)
        if want is not None:
            pr = p.mean(1) if want.gqa == "mean" else p.amax(1)  # (n, width)
            stats.colsum.append(pr)
            if stats.band is not None:
                near = (view.start_pos - g.pos.long()) < g.rows(windows)[:, None]
                stats.band.append(pr * near)
            if stats.window is not None:
                stats.window.append(pr * g.rows(late)[:, None])
        out = og if out is None else _put_rows(out, g, og)
    return out.reshape(bsz, 1, n_heads * head_dim), stats


def _sdpa_group(qg: torch.Tensor, g: KVGroup, qpos: torch.Tensor, n_rep: int) -> torch.Tensor:
    """SDPA over one group with a validity mask: scaled queries (n, n_rep * seqlen, head_dim) -> same shape."""
    n, width = g.keys.shape[0], g.keys.shape[1]
    seqlen = qpos.numel()
    if seqlen == 1:
        mask = (g.pos <= qpos[0]).view(n, 1, 1, width)
    else:
        mask = (g.pos[:, None, :] <= qpos[:, None]).repeat(1, n_rep, 1).view(n, 1, n_rep * seqlen, width)
    # the queries come scaled
    out = F.scaled_dot_product_attention(qg[:, None], g.keys[:, None], g.values[:, None], attn_mask=mask, scale=1.0)
    return out[:, 0]


# --- dispatch -------------------------------------------------------------------------------------------------


def attend(xq: torch.Tensor, view, want: Optional[StatsRequest] = None
           ) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """The layer's attention with the kernel the view and the request call for.

    Args:
        xq: (bsz, seqlen, n_heads, head_dim) rotated queries.
        view: DenseView or PackedView from the cache.
        want: statistics the cache asked for, or None.

    Returns:
        output: (bsz, seqlen, n_heads * head_dim).
        stats: AttentionStats when `want` was given, else None.
    """
    if isinstance(view, DenseView):
        if want is None:
            return sdpa_attention(xq, view), None
        return chunked_attention(xq, view, want)
    return packed_attention(xq, view, want)
