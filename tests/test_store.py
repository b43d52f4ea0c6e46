"""The packed store: grouping, appends, compaction in place and by re-grouping, against a plain dict model."""

import random

import pytest
import torch

from adaptive_kv_cache.store import PackedStore, plan_groups
from llama.attention import EMPTY_POS


def test_plan_groups_cuts_at_the_tolerance_and_merges_the_cheapest_neighbours():
    assert plan_groups([100, 95, 50, 48, 10], headroom=0, tolerance=0.1, max_groups=4) == [[0, 1], [2, 3], [4]]
    # two groups at most: merging [4] into [2, 3] pads 38 + 38... the cheapest merge keeps 100/95 apart
    assert plan_groups([100, 95, 50, 48, 10], headroom=0, tolerance=0.1, max_groups=2) == [[0, 1], [2, 3, 4]]
    assert plan_groups([7, 7, 7], headroom=4, tolerance=0.0, max_groups=4) == [[0, 1, 2]]
    assert plan_groups([5, 9], headroom=0, tolerance=0.5, max_groups=1) == [[0, 1]]


class Model:
    """What each segment should hold: position -> (key, value, score) rows."""

    def __init__(self, n_seg):
        self.seg = [dict() for _ in range(n_seg)]


def contents(store, seg):
    """{position: (key row, value row, score)} of one segment, read from the store's group views."""
    for g, k, v, p, sc in zip(store.groups, store.field("k"), store.field("v"), store.field("pos"),
                              store.field("score")):
        if seg in g.members:
            r = g.members.index(seg)
            held = (p[r] != EMPTY_POS).nonzero().flatten().tolist()
            return {int(p[r, c]): (k[r, c].tolist(), v[r, c].tolist(), float(sc[r, c])) for c in held}
    raise KeyError(seg)


def check(store, model):
    for i, expected in enumerate(model.seg):
        got = contents(store, i)
        assert got.keys() == expected.keys()
        for pos, (k, v, sc) in expected.items():
            assert got[pos] == (k, v, sc)
    assert store.lengths == [len(s) for s in model.seg]
    for g, p, b in zip(store.groups, store.field("pos"), store.field("bias")):
        assert torch.equal(b == float("-inf"), p == EMPTY_POS)  # bias masks exactly the padding
        assert (b[p != EMPTY_POS] == 0).all()
        assert g.width <= g.cap
    free = [b[:, g.width:] for b, g in zip(store._blocks["bias"], store.groups)]
    assert all((f == 0).all() for f in free)  # appends will land on a zero bias


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_appends_and_compactions_match_a_plain_model(seed, monkeypatch):
    relayouts = {"_grow": 0, "_regroup": 0}
    for name in relayouts:  # count which re-layout ran (same groups grown, or new groups)
        method = getattr(PackedStore, name)

        def spy(self, *a, _method=method, _name=name, **kw):
            relayouts[_name] += 1
            return _method(self, *a, **kw)
        monkeypatch.setattr(PackedStore, name, spy)
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_seg, hd = 6, 4
    store = PackedStore(n_seg, {"score": (torch.float32, 0.0)}, tolerance=0.1, max_groups=3)
    model = Model(n_seg)
    pos = 0
    reallocations = in_place = 0
    dropped = False
    for step in range(40):
        s = 5 if step == 0 else rng.choice([1, 1, 1, 2])
        k, v = torch.randn(n_seg * s, hd, generator=g), torch.randn(n_seg * s, hd, generator=g)
        positions = torch.arange(pos, pos + s, dtype=torch.int32).repeat(n_seg)
        store.append({"k": k, "v": v, "pos": positions}, min_free=3)
        for i in range(n_seg):
            for j in range(s):
                model.seg[i][pos + j] = (k[i * s + j].tolist(), v[i * s + j].tolist(), 0.0)
        pos += s
        for sc, grp in zip(store.field("score"), store.groups):  # scores accumulate like attention
            add = torch.rand(sc.shape, generator=g)
            sc += add
            for r, i in enumerate(grp.members):
                for c, p in enumerate(store.field("pos")[store.groups.index(grp)][r].tolist()):
                    if p != EMPTY_POS:
                        kk, vv, old = model.seg[i][p]
                        model.seg[i][p] = (kk, vv, float(sc[r, c]))
        check(store, model)
        if step % 3 == 2:
            keep, drops = [], {}
            for grp, p in zip(store.groups, store.field("pos")):
                # segments shrink at different rates, so groups drift apart and must be re-grouped at times
                mask = torch.rand(p.shape, generator=g) < [0.9, 0.6, 1.0, 0.5, 0.8, 0.3][grp.members[0]]
                keep.append(mask)
                for r, i in enumerate(grp.members):
                    for c, q in enumerate(p[r].tolist()):
                        if q != EMPTY_POS and not bool(mask[r, c]):
                            drops.setdefault(i, []).append(q)
            before = store.buf["k"].data_ptr()
            store.compact(keep, min_free=3)
            reallocations += store.buf["k"].data_ptr() != before
            in_place += store.buf["k"].data_ptr() == before
            for i, qs in drops.items():
                for q in qs:
                    del model.seg[i][q]
            check(store, model)
            dropped |= bool(drops)
            assert store.positional == (not dropped)
    assert reallocations and in_place  # both strategies ran
    assert relayouts["_grow"] and relayouts["_regroup"]  # and both kinds of re-layout


def test_store_stays_positional_while_nothing_is_dropped():
    store = PackedStore(2, {})
    for p in range(6):
        store.append({"k": torch.full((2, 1), float(p)), "v": torch.zeros(2, 1),
                      "pos": torch.tensor([p, p], dtype=torch.int32)}, min_free=1)
        store.compact([None] * len(store.groups), min_free=1)
        assert store.positional and len(store.groups) == 1
        assert store.field("pos")[0].tolist() == [list(range(p + 1))] * 2
    store.compact([torch.tensor([[True] * 6, [True] * 5 + [False]])], min_free=1)
    assert not store.positional


def test_free_columns_are_given_back_after_evictions():
    """A group whose segments shrank is re-laid out: evicted memory is freed, not kept as spare columns."""
    store = PackedStore(2, {})
    store.append({"k": torch.zeros(200, 1), "v": torch.zeros(200, 1),
                  "pos": torch.arange(100, dtype=torch.int32).repeat(2)}, min_free=4)
    keep = torch.zeros(2, 100, dtype=torch.bool)
    keep[:, :10] = True
    store.compact([keep], min_free=4)
    assert store.lengths == [10, 10]
    assert sum(g.n * g.cap for g in store.groups) <= 2 * (10 + store.free_limit(10, 4))
