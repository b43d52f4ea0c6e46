"""Packed per-(sequence, KV head) storage of one layer; knows nothing of compression policies.

Segment i = (sequence b, KV head h), i = b * n_kv_heads + h, holds the tokens its method keeps. Segments are stored
in groups of similar length: group g occupies rows [base, base + n * cap) of one flat buffer per field, as an
(n, cap) block whose first `width` columns are in use. Every field (keys, values, positions, and whatever
per-slot fields a method registers: scores, token classes, ...) has this layout, so a group is a zero-copy
(n, width, ...) view for attention. A segment shorter than its group's width has empty slots (position
EMPTY_POS, bias -inf), which attention masks; they are the padding that grouping trades for fewer kernel calls,
and they count as slack, not as kept bytes.

All segments take one new token per position, so appends write the same column of every group (its `width`),
host-known, with no search and no host-device synchronisation. `compact` is the one batched pass that drops
slots; the cache calls it every k decode steps. It reads the new lengths on the host (one synchronisation) and then
either fills each segment's holes with its own tail slots in place (a few slots move, nothing is allocated); or,
when a group is out of free columns but the grouping still holds (segments that keep growing: the steady state of
decoding), copies each group's used columns in one block into buffers with more columns and fills the holes
there; or, when the members' lengths drifted apart, re-groups the segments into new buffers slot by slot.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from llama.attention import EMPTY_POS, KVGroup, PackedView, take_rows


#: Single-column appends whose destination rows are prepared at once.
AHEAD = 32


@dataclass
class _Group:
    base: int  # first flat row
    n: int  # segments
    cap: int  # columns allocated per segment
    width: int  # columns in use (appends go to column `width`)
    seg: torch.Tensor  # (n,) long segment ids, on the store's device
    seg_range: Optional[Tuple[int, int]]  # (lo, hi) when seg == lo..hi-1
    members: List[int]  # seg on the host
    max_padding: int = 0  # padding slots beyond which the group is re-grouped

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return take_rows(t, self.seg, self.seg_range)


def plan_groups(lengths: Sequence[int], headroom: int, tolerance: float, max_groups: int) -> List[List[int]]:
    """Splits segments into groups of similar length.

    Segments sorted by length (longest first) are cut where a length falls below (1 - tolerance) x the group's
    longest, so a group's padding is at most `tolerance` of its rows; then the two neighbouring groups whose
    merge adds the least padding are merged until at most `max_groups` remain.

    Args:
        lengths: kept tokens per segment.
        headroom: free columns every group gets on top of its longest segment.
        tolerance: padding allowed inside a group, as a share of its longest segment.
        max_groups: bound on the number of groups (kernel calls per layer).

    Returns:
        List[List[int]]: segment ids per group; each list in increasing id order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: List[List[int]] = []
    for i in order:
        if groups and lengths[i] >= (1.0 - tolerance) * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])

    def rows(g: List[int]) -> int:
        return len(g) * (lengths[g[0]] + headroom)

    while len(groups) > max_groups:
        j = min(range(len(groups) - 1), key=lambda j: rows(groups[j] + groups[j + 1]) - rows(groups[j])
                - rows(groups[j + 1]))
        groups[j:j + 2] = [groups[j] + groups[j + 1]]
    return [sorted(g) for g in groups]


class PackedStore:
    """One layer's segments. Buffers are allocated by the first `append`, never in the constructor.

    Attributes:
        lengths: used slots per segment, on the host (appends add to it, compactions read it back).
        positional: no slot was ever dropped and the layer is one block in segment order, so slot s of every
            segment holds position s (the dense kernels apply).
    """

    def __init__(self, n_seg: int, fields: Dict[str, Tuple[torch.dtype, float]], tolerance: float = 0.1,
                 max_groups: int = 4, growth: float = 1 / 32, min_slack: int = 1):
        """
        Args:
            n_seg: segments (bsz * local KV heads).
            fields: per-slot fields besides keys, values and positions: name -> (dtype, value of an empty slot).
            tolerance, max_groups: grouping (see `plan_groups`).
            growth, min_slack: a (re)allocated group gets max(min_slack, growth x width) free columns, so segments
                that keep growing (full heads, FastGen's frequent budget) are copied O(log n) times, while short
                ones carry only a few spare slots.
        """
        self.n_seg = n_seg
        # bias: 0, or -inf on the padding of a group (decode attention adds it to the scores instead of masking)
        self.spec: Dict[str, Tuple[Optional[torch.dtype], float]] = {
            "k": (None, 0.0), "v": (None, 0.0), "pos": (torch.int32, EMPTY_POS), "bias": (torch.float32, 0.0),
            **fields}
        self.tolerance = tolerance
        self.max_groups = max_groups
        self.growth = growth
        self.min_slack = min_slack
        self.buf: Dict[str, torch.Tensor] = {}
        self._dtype: Dict[str, torch.dtype] = {}
        self._row_shape: Dict[str, Tuple[int, ...]] = {}
        self.device: Optional[torch.device] = None
        self.groups: List[_Group] = []
        self._blocks: Dict[str, List[torch.Tensor]] = {}  # per field, per group: the (n, cap, ...) block
        self._dest: Optional[torch.Tensor] = None  # (n_seg,) flat row of each segment's append at column width
        self._dest_off = 0  # columns appended since _dest was set
        self._ahead: Optional[Tuple[torch.Tensor, ...]] = None  # AHEAD x (n_seg,): rows of the next 1-column appends
        self._ahead_from = 0
        self.lengths: List[int] = [0] * n_seg
        self.positional = True
        self.version = 0  # bumped whenever the buffers are replaced, added or freed (allocated bytes may change)

    # --- layout ---------------------------------------------------------------------------------------------

    @property
    def allocated(self) -> bool:
        return bool(self.buf)

    def _allocate(self, plan: List[List[int]], caps: List[int], fill: bool = True
                  ) -> Tuple[List[_Group], Dict[str, torch.Tensor]]:
        """New groups and buffers for `plan`: every slot empty (position EMPTY_POS, fields their fill value), or
        uninitialised when not `fill` (the caller writes every row)."""
        groups, base = [], 0
        for members, cap in zip(plan, caps):
            lo = members[0]
            contiguous = members == list(range(lo, lo + len(members)))
            groups.append(_Group(base, len(members), cap, 0,
                                 torch.tensor(members, dtype=torch.long, device=self.device),
                                 (lo, lo + len(members)) if contiguous else None, members))
            base += len(members) * cap
        buf = {name: torch.full((base,) + self._row_shape[name], value, dtype=self._dtype[name], device=self.device)
                     if fill else torch.empty((base,) + self._row_shape[name], dtype=self._dtype[name],
                                              device=self.device)
               for name, (_, value) in self.spec.items()}
        return groups, buf

    def _set_buffers(self, groups: List[_Group], buf: Dict[str, torch.Tensor]) -> None:
        self.groups, self.buf = groups, buf
        self.version += 1
        self._blocks = {name: self._block_views(t) for name, t in buf.items()}

    def _block_views(self, t: torch.Tensor) -> List[torch.Tensor]:
        """Per group, the (n, cap, ...) block of a flat per-slot buffer."""
        return [t[g.base : g.base + g.n * g.cap].view(g.n, g.cap, *t.shape[1:]) for g in self.groups]

    def _set_padding_limit(self, g: _Group, lengths: List[int]) -> None:
        padding = sum(g.width - lengths[i] for i in g.members)
        g.max_padding = max(int(2 * self.tolerance * g.n * g.width), 2 * padding) + g.n

    def _install(self, groups: List[_Group], buf: Dict[str, torch.Tensor], widths: List[int],
                 lengths: List[int]) -> None:
        self._set_buffers(groups, buf)
        for g, w in zip(self.groups, widths):
            g.width = w
            self._set_padding_limit(g, lengths)
        for pos, bias in zip(self.field("pos"), self.field("bias")):
            bias.masked_fill_(pos == EMPTY_POS, float("-inf"))  # columns < width: padding; later ones stay 0
        self._set_dest()

    def _set_dest(self) -> None:
        dest = torch.empty(self.n_seg, dtype=torch.long, device=self.device)
        for g in self.groups:
            dest.index_copy_(0, g.seg, g.base + g.cap * torch.arange(g.n, device=self.device) + g.width)
        self._dest, self._dest_off, self._ahead = dest, 0, None

    def _append_rows(self, s: int) -> torch.Tensor:
        """(n_seg * s,) flat rows of the next s columns, segment-major. A decode step takes a prepared row of
        `_ahead` (one tensor op per AHEAD steps instead of one per step and layer)."""
        off = self._dest_off
        self._dest_off += s
        if s > 1:
            return ((self._dest + off)[:, None] + torch.arange(s, device=self.device)).view(-1)
        if self._ahead is None or not 0 <= off - self._ahead_from < len(self._ahead):
            self._ahead = (self._dest + torch.arange(off, off + AHEAD, device=self.device)[:, None]).unbind(0)
            self._ahead_from = off
        return self._ahead[off - self._ahead_from]

    def field(self, name: str) -> List[torch.Tensor]:
        """Per group, the (n, width, ...) view of a field."""
        return [b[:, : g.width] for b, g in zip(self._blocks[name], self.groups)]

    def view(self, start_pos: int, n_kv_heads: int) -> PackedView:
        """The groups as a PackedView; keys and values are None where a codec replaced them by codes (the cache
        then attaches each group's reader)."""
        blocks = self._blocks
        kb, vb, pb, bb = blocks.get("k"), blocks.get("v"), blocks["pos"], blocks["bias"]
        groups = []
        for i, g in enumerate(self.groups):  # one pass (this runs per layer and decode step)
            w = g.width
            groups.append(KVGroup(None if kb is None else kb[i][:, :w], None if vb is None else vb[i][:, :w],
                                  pb[i][:, :w], g.seg, g.seg_range, bb[i][:, :w]))
        return PackedView(groups, start_pos, n_kv_heads)

    # --- writes ----------------------------------------------------------------------------------------------

    def append(self, values: Dict[str, torch.Tensor], min_free: int) -> None:
        """Appends s new slots to every segment, at column `width` of its group.

        Args:
            values: name -> (n_seg * s, ...) values of the new slots, segment-major; 'k', 'v' and 'pos' are
                required, fields left out keep their empty value.
            min_free: free columns every group needs after the new ones when the store must (re)allocate first
                (e.g. the rest of a prompt that arrives in chunks).
        """
        s = values["pos"].shape[0] // self.n_seg
        if not self.buf:
            self.device = values["pos"].device
            for name, (dtype, _) in self.spec.items():
                v = values.get(name)
                self._dtype[name] = dtype or v.dtype
                self._row_shape[name] = tuple(v.shape[1:]) if v is not None else ()
            self._install(*self._allocate([list(range(self.n_seg))], [self._capacity(s, min_free)]), [0],
                          self.lengths)
        elif not self.has_room(s):
            self._relayout([None] * len(self.groups), self.lengths, s + min_free)
        idx = self._append_rows(s)
        for name, v in values.items():
            self.buf[name].index_copy_(0, idx, v)
        for g in self.groups:
            g.width += s
        self.lengths = [n + s for n in self.lengths]

    def has_room(self, s: int) -> bool:
        """Every group can take s more columns."""
        return all(g.width + s <= g.cap for g in self.groups)

    def compact(self, keep: List[Optional[torch.Tensor]], min_free: int) -> List[int]:
        """Drops the slots `keep` does not keep, leaving at least `min_free` free columns per group.

        Args:
            keep: per group, (n, width) bool over its view (None: keep all of that group).
            min_free: free columns every group needs after the compaction.

        Returns:
            List[int]: used slots per segment afterwards (read on the host: one synchronisation).
        """
        masks = [None if k is None else k & (p != EMPTY_POS) for k, p in zip(keep, self.field("pos"))]
        counts = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        for g, m in zip(self.groups, masks):
            if m is not None:
                counts.index_copy_(0, g.seg, m.sum(1))
        lengths = counts.tolist()
        if lengths != self.lengths:
            self.positional = False
        if self._fits(lengths, min_free):
            for i, (g, m) in enumerate(zip(self.groups, masks)):
                if m is not None:
                    self._fill_holes(i, m, max(lengths[j] for j in g.members))
            self._set_dest()
        else:
            self._relayout(masks, lengths, min_free)
        self.lengths = lengths
        return lengths

    def _capacity(self, width: int, min_free: int) -> int:
        """Columns for a group of this width: `min_free` free ones, or the growth slack if that is more."""
        return width + max(min_free, self.min_slack, int(self.growth * width))

    def free_limit(self, width: int, min_free: int) -> int:
        """Most free columns a group of this width may keep: twice what an allocation gives it (freed memory is
        given back)."""
        return 2 * (self._capacity(width, min_free) - width) + 1

    def _fits(self, lengths: List[int], min_free: int) -> bool:
        """The current groups can take the new lengths: `min_free` free columns but not many more, and each
        group's padding within twice what grouping allowed when it was made."""
        for g in self.groups:
            longest = max(lengths[i] for i in g.members)
            if not min_free <= g.cap - longest <= self.free_limit(longest, min_free):
                return False
            if sum(longest - lengths[i] for i in g.members) > g.max_padding:
                return False
        return True

    def _fill_holes(self, i: int, keep: torch.Tensor, width: int) -> None:
        """In place: each segment's kept slots beyond its new length move into its holes before it (dropped
        slots or padding); the freed columns become padding (before `width`) or free space (from `width` on).

        Args:
            i: the group.
            keep: (n, g.width) bool, kept used slots.
            width: the group's new width (its longest segment).
        """
        g = self.groups[i]
        n, old = keep.shape
        cols = torch.arange(old, device=keep.device)
        inside = cols < keep.sum(1, keepdim=True)
        flat = g.base + g.cap * torch.arange(n, device=keep.device)[:, None] + cols
        holes = flat[~keep & inside]  # row-major, and per row as many holes as movers
        movers = flat[keep & ~inside]
        freed = flat[~inside]
        for name, t in self.buf.items():
            if name == "bias":
                continue
            t.index_copy_(0, holes, t.index_select(0, movers))
            if name not in ("k", "v"):  # stale keys and values are never read: positions and bias mask them
                t.index_fill_(0, freed, self.spec[name][1])
        # 0 where a segment holds a token or an append will go, -inf on the padding before `width`
        bias = self._blocks["bias"][i][:, :old]
        bias.copy_(torch.where(inside | (cols >= width), 0.0, float("-inf")))
        g.width = width

    def _relayout(self, masks: List[Optional[torch.Tensor]], lengths: List[int], min_free: int) -> None:
        """New buffers for the new lengths: the same groups with new capacities while the grouping still holds
        (the steady state of decoding, where segments keep growing), else new groups."""
        plan = plan_groups(lengths, min_free, self.tolerance, self.max_groups)
        widths = [max(lengths[i] for i in members) for members in plan]
        caps = [self._capacity(w, min_free) for w in widths]
        if plan == [g.members for g in self.groups] and all(c >= g.width for c, g in zip(caps, self.groups)):
            self._grow(masks, lengths, widths, caps)
        else:
            self._regroup(masks, lengths, plan, widths, caps)

    def _grow(self, masks: List[Optional[torch.Tensor]], lengths: List[int], widths: List[int],
              caps: List[int]) -> None:
        """The same groups in new buffers of capacities `caps`: each group's used columns are copied in one block
        (no per-slot indexing) and the holes are then filled as `compact` does in place."""
        old_groups, old_blocks = self.groups, self._blocks
        groups, buf = self._allocate([g.members for g in old_groups], caps, fill=False)
        self._set_buffers(groups, buf)
        for name, blocks in self._blocks.items():
            fill = self.spec[name][1]
            for og, old, new in zip(old_groups, old_blocks[name], blocks):
                new[:, : og.width].copy_(old[:, : og.width])
                new[:, og.width :].fill_(fill)
        for i, (g, og, m, w) in enumerate(zip(groups, old_groups, masks, widths)):
            g.width = og.width  # the masks index the old columns, which the copy kept in place
            if m is not None:
                self._fill_holes(i, m, w)
            self._set_padding_limit(g, lengths)
        self._set_dest()

    def _regroup(self, masks: List[Optional[torch.Tensor]], lengths: List[int], plan: List[List[int]],
                 widths: List[int], caps: List[int]) -> None:
        """Moves the kept slots into new buffers grouped by `plan`; slot order inside a segment is preserved (a
        segment that keeps everything stays in position order)."""
        groups, buf = self._allocate(plan, caps)
        # flat destination row of slot r of segment i: its group's base + member index * cap + r
        seg_row = torch.empty(self.n_seg, dtype=torch.long, device=self.device)
        for g in groups:
            seg_row.index_copy_(0, g.seg, g.base + g.cap * torch.arange(g.n, device=self.device))
        src, dst = [], []
        for g, m, p in zip(self.groups, masks, self.field("pos")):
            m = (p != EMPTY_POS) if m is None else m
            # slot r of row i goes to its segment's new row start + its rank among the kept slots of row i
            dst.append((torch.cumsum(m, 1) - 1 + g.rows(seg_row)[:, None])[m])
            src.append((g.base + g.cap * torch.arange(g.n, device=m.device)[:, None]
                        + torch.arange(m.shape[1], device=m.device))[m])
        src, dst = torch.cat(src), torch.cat(dst)
        for name, t in self.buf.items():
            if name != "bias":
                buf[name].index_copy_(0, dst, t.index_select(0, src))
        if self.positional and not (len(plan) == 1 and plan[0] == list(range(self.n_seg))):
            self.positional = False
        self._install(groups, buf, widths, lengths)

    def add_field(self, name: str, dtype: torch.dtype, fill: float, row_shape: Tuple[int, ...] = ()) -> None:
        """Adds a per-slot field to an allocated store, every slot at `fill` (e.g. codes replacing keys)."""
        self.spec[name] = (dtype, fill)
        self._dtype[name], self._row_shape[name] = dtype, tuple(row_shape)
        self.version += 1
        rows = self.buf["pos"].shape[0]
        t = self.buf[name] = torch.full((rows,) + tuple(row_shape), fill, dtype=dtype, device=self.device)
        self._blocks[name] = self._block_views(t)

    def drop_field(self, name: str) -> None:
        """Frees a per-slot field nobody needs any more."""
        self.version += 1
        for d in (self.spec, self.buf, self._dtype, self._row_shape, self._blocks):
            d.pop(name, None)

    # --- accounting ------------------------------------------------------------------------------------------

    def nbytes(self, names: Sequence[str]) -> int:
        return sum(self.buf[n].numel() * self.buf[n].element_size() for n in names if n in self.buf)

    def slot_positions(self, seg: int) -> List[int]:
        """Sorted positions held by one segment (tests and debugging)."""
        for g, p in zip(self.groups, self.field("pos")):
            if seg in g.members:
                row = p[g.members.index(seg)]
                return sorted(row[row != EMPTY_POS].tolist())
        raise IndexError(seg)
