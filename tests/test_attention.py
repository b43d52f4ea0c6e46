"""Attention kernels: eager == SDPA == tiled == packed on random ragged views, statistics against a naive
float64 computation written here, and a long prompt that must not materialise heads x L x L scores."""

import math
import random

import pytest
import torch

from llama.attention import (
    EMPTY_POS,
    DenseView,
    KVGroup,
    PackedView,
    StatsRequest,
    attend,
    chunked_attention,
    eager_attention,
    packed_attention,
    sdpa_attention,
)

HD = 8


def naive(xq, keys, values, kpos, start_pos, gqa="mean", windows=None):
    """Attention by the definition, one (sequence, query head, query) at a time, in float64.

    Args:
        xq: (bsz, seqlen, n_heads, hd).
        keys, values: per segment (b * n_kv + h) a (slots, hd) tensor; kpos: per segment a list of positions
            (EMPTY_POS: empty slot).

    Returns:
        out (bsz, seqlen, n_heads * hd); per segment the column sums and band sums over its slots.
    """
    bsz, seqlen, n_heads, hd = xq.shape
    n_kv = len(keys) // bsz
    n_rep = n_heads // n_kv
    out = torch.zeros(bsz, seqlen, n_heads, hd, dtype=torch.float64)
    colsum = [torch.zeros(len(p), dtype=torch.float64) for p in kpos]
    band = [torch.zeros(len(p), dtype=torch.float64) for p in kpos]
    for b in range(bsz):
        for h in range(n_kv):
            seg = b * n_kv + h
            k, v = keys[seg].double(), values[seg].double()
            pos = torch.tensor(kpos[seg], dtype=torch.long)
            for i in range(seqlen):
                qp = start_pos + i
                visible = pos <= qp
                probs = []
                for r in range(n_rep):
                    q = xq[b, i, h * n_rep + r].double()
                    s = (k @ q) / math.sqrt(hd)
                    s[~visible] = float("-inf")
                    p = torch.softmax(s, 0)
                    out[b, i, h * n_rep + r] = p @ v
                    probs.append(p)
                p = torch.stack(probs)
                agg = p.mean(0) if gqa == "mean" else p.amax(0)
                colsum[seg] += agg
                if windows is not None and windows[b] > 0:
                    band[seg] += agg * ((qp - pos) < windows[b])
    return out.view(bsz, seqlen, -1), colsum, band


def dense_case(bsz, n_kv, n_rep, S, seqlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    xq = torch.randn(bsz, seqlen, n_kv * n_rep, HD, generator=g)
    keys = torch.randn(bsz, n_kv, S, HD, generator=g) * 1.5
    values = torch.randn(bsz, n_kv, S, HD, generator=g)
    view = DenseView(keys, values, S - seqlen)
    flat_k = list(keys.reshape(bsz * n_kv, S, HD))
    flat_v = list(values.reshape(bsz * n_kv, S, HD))
    return xq, view, flat_k, flat_v, [list(range(S))] * (bsz * n_kv)


def packed_case(bsz, n_kv, n_rep, start_pos, seqlen, groups, pad, seed=0):
    """Random ragged segments: each holds a random subset of the earlier positions plus the new ones, in a
    shuffled slot order, inside groups (lists of segment ids) padded to a common width plus `pad` columns."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n_seg = bsz * n_kv
    xq = torch.randn(bsz, seqlen, n_kv * n_rep, HD, generator=g)
    kpos = []
    for _ in range(n_seg):
        kept = rng.sample(range(start_pos), rng.randint(1, start_pos))
        slots = kept + list(range(start_pos, start_pos + seqlen))
        rng.shuffle(slots)
        kpos.append(slots)
    keys = [torch.randn(len(p), HD, generator=g) * 1.5 for p in kpos]
    values = [torch.randn(len(p), HD, generator=g) for p in kpos]
    kv_groups = []
    for members in groups:
        width = max(len(kpos[i]) for i in members) + pad
        K = torch.zeros(len(members), width, HD)
        V = torch.zeros_like(K)
        P = torch.full((len(members), width), EMPTY_POS, dtype=torch.int32)
        for r, i in enumerate(members):
            n = len(kpos[i])
            K[r, :n], V[r, :n], P[r, :n] = keys[i], values[i], torch.tensor(kpos[i], dtype=torch.int32)
        bias = torch.zeros(P.shape).masked_fill_(P == EMPTY_POS, float("-inf"))
        seg = torch.tensor(members)
        rng_ = (members[0], members[-1] + 1) if members == list(range(members[0], members[-1] + 1)) else None
        kv_groups.append(KVGroup(K, V, P, seg, rng_, bias))
    view = PackedView(kv_groups, start_pos, n_kv)
    # the naive reference reads the slots in group order, padding included (empty slots are never visible)
    order = {i: (gi, r) for gi, members in enumerate(groups) for r, i in enumerate(members)}
    flat_k, flat_v, flat_p = [], [], []
    for i in range(n_seg):
        gi, r = order[i]
        flat_k.append(kv_groups[gi].keys[r])
        flat_v.append(kv_groups[gi].values[r])
        flat_p.append(kv_groups[gi].pos[r].long().tolist())
    return xq, view, flat_k, flat_v, flat_p


def group_stats(view, per_seg):
    """Naive per-segment statistics rearranged into the view's groups."""
    return [torch.stack([per_seg[int(i)] for i in g.seg]) for g in view.groups]


# --- the reference itself -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 5])
def test_eager_reference_matches_the_definition(seqlen):
    xq, view, k, v, p = dense_case(2, 2, 3, 13, seqlen)
    ref, _, _ = naive(xq, k, v, p, view.start_pos)
    torch.testing.assert_close(eager_attention(xq, view).double(), ref, atol=1e-5, rtol=1e-5)
    xq, view, k, v, p = packed_case(2, 2, 3, 11, seqlen, [[0, 3], [1], [2]], pad=2)
    ref, _, _ = naive(xq, k, v, p, view.start_pos)
    torch.testing.assert_close(eager_attention(xq, view).double(), ref, atol=1e-5, rtol=1e-5)


# --- dense kernels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S, seqlen", [(17, 17), (17, 6), (17, 1)])  # prefill, chunked prefill, decode
@pytest.mark.parametrize("n_rep", [1, 3])
def test_sdpa_equals_eager(S, seqlen, n_rep):
    xq, view, *_ = dense_case(2, 2, n_rep, S, seqlen)
    torch.testing.assert_close(sdpa_attention(xq, view), eager_attention(xq, view), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("S, seqlen, tile", [(23, 23, 1 << 20), (23, 23, 300), (29, 9, 250), (29, 1, 250)])
def test_tiled_kernel_equals_eager_and_its_statistics_equal_the_definition(gqa, S, seqlen, tile):
    """Tiles that split rows and KV heads unevenly (tile bytes not dividing anything), GQA, batch 2 with
    different band windows (0: no band for that sequence)."""
    xq, view, k, v, p = dense_case(2, 3, 3, S, seqlen, seed=1)
    want = StatsRequest(band_windows=[4, 0], gqa=gqa)
    out, stats = chunked_attention(xq, view, want, tile_bytes=tile)
    torch.testing.assert_close(out, eager_attention(xq, view), atol=1e-5, rtol=1e-5)
    _, colsum, band = naive(xq, k, v, p, view.start_pos, gqa=gqa, windows=[4, 0])
    torch.testing.assert_close(stats.colsum[0].double(), torch.stack(colsum), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.band[0].double(), torch.stack(band), atol=1e-5, rtol=1e-5)


def test_tiled_kernel_heatmap_is_the_pooled_attention_map():
    xq, view, k, v, p = dense_case(2, 2, 2, 10, 10, seed=2)
    want = StatsRequest(heatmap_seq=1, heatmap_bins=4)  # 10 positions -> bins of 3: 0-2, 3-5, 6-8, 9
    _, stats = chunked_attention(xq, view, want, tile_bytes=200)
    probs = torch.softmax((xq[1].transpose(0, 1) @ view.keys[1].repeat_interleave(2, 0).transpose(1, 2)
                           / math.sqrt(HD)).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(),
                                                         float("-inf")), -1)  # (heads, 10, 10)
    agg = probs.view(2, 2, 10, 10).mean(1)
    bins = [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    expected = torch.tensor([[[float(agg[h][list(r)][:, list(c)].mean()) for c in bins] for r in bins]
                             for h in range(2)])
    torch.testing.assert_close(stats.heatmap, expected, atol=1e-6, rtol=1e-5)


# --- packed kernel ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 4])  # decode, and a chunk of new tokens after compressed positions
@pytest.mark.parametrize("groups", [[[0, 1, 2, 3]], [[0, 3], [1], [2]]])
def test_packed_equals_eager_on_ragged_views(seqlen, groups):
    xq, view, *_ = packed_case(2, 2, 3, 12, seqlen, groups, pad=3, seed=3)
    ref = eager_attention(xq, view)
    out, stats = packed_attention(xq, view)
    assert stats is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out, stats = packed_attention(xq, view, StatsRequest(), tile_bytes=200)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(stats.colsum) == len(groups)


@pytest.mark.parametrize("seqlen", [1, 4])
@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_packed_statistics_equal_the_definition(seqlen, gqa):
    xq, view, k, v, p = packed_case(2, 2, 3, 12, seqlen, [[0, 3], [1, 2]], pad=2, seed=4)
    out, stats = packed_attention(xq, view, StatsRequest(band_windows=[0, 5], gqa=gqa), tile_bytes=100)
    ref, colsum, band = naive(xq, k, v, p, view.start_pos, gqa=gqa, windows=[0, 5])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for got, exp in zip(stats.colsum, group_stats(view, colsum)):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
    for got, exp in zip(stats.band, group_stats(view, band)):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)


def test_attend_picks_kernels_from_the_view():
    xq, view, *_ = dense_case(1, 2, 2, 9, 9)
    out, stats = attend(xq, view)
    assert stats is None
    out2, stats = attend(xq, view, StatsRequest())
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    assert stats.colsum[0].shape == (2, 9)


# --- memory ---------------------------------------------------------------------------------------------------------


def _peak_growth_mb(fn) -> float:
    """Peak resident memory during fn() minus the resident memory before it, in MB (Linux)."""
    def read(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    with open("/proc/self/clear_refs", "w") as f:  # resets the high-water mark to the current RSS
        f.write("5")
    before = read("VmRSS")
    fn()
    return read("VmHWM") - before


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("compressed", [False, True])
def test_long_prompt_never_materialises_heads_x_L_x_L(dist, stories_llama, make_random_ckpt, compressed):
    """4,096 tokens through a layer with 32 heads: a (heads x L x L) float32 score tensor would be 2 GiB (and
    Meta's explicit softmax holds two); the KV cache is 8 MiB. The whole forward must stay within 256 MiB."""
    from llama import Llama

    params = {"dim": 256, "n_layers": 1, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 512, "multiple_of": 32}
    ckpt = make_random_ckpt(params, seed=3, scale=0.05)
    g = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len=4096, max_batch_size=1, device="cpu",
                    kv_config={"T": 0.9} if compressed else None)
    tokens = torch.randint(3, 512, (1, 4096), generator=torch.Generator().manual_seed(0))
    cache = g.new_cache(tokens.tolist(), 4096)
    g.model.forward(tokens[:, :8], 0, None)  # warm up the allocator and the kernels
    grown = _peak_growth_mb(lambda: g.model.forward(tokens, 0, cache, last_logits_only=True))
    assert grown < 256, f"the forward pass grew memory by {grown:.0f} MB"


# --- window sums (the queries at or after a position: SnapKV's observation window, TOVA's last query) -----------


def naive_window(xq, k, v, p, start_pos, window_from, gqa):
    """Per segment, the column sums over the queries at or after window_from[b], from `naive` run on those
    queries alone (a query's attention does not depend on the other queries)."""
    bsz, seqlen, n_heads = xq.shape[:3]
    n_kv = len(k) // bsz
    n_rep = n_heads // n_kv
    out = []
    for b in range(bsz):
        i0 = min(seqlen, max(0, window_from[b] - start_pos))
        for h in range(n_kv):
            seg = b * n_kv + h
            if i0 == seqlen:
                out.append(torch.zeros(len(p[seg]), dtype=torch.float64))
                continue
            _, colsum, _ = naive(xq[b : b + 1, i0:, h * n_rep : (h + 1) * n_rep], k[seg : seg + 1], v[seg : seg + 1], p[seg : seg + 1],
                                 start_pos + i0, gqa=gqa)
            out.append(colsum[0])
    return out


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize("S, seqlen, tile", [(23, 23, 1 << 20), (23, 23, 300), (29, 9, 250), (29, 1, 250)])
def test_tiled_kernel_window_sums_equal_the_definition(gqa, S, seqlen, tile):
    """Windows that start inside a tile, before the pass, and after it (EMPTY_POS: nothing)."""
    xq, view, k, v, p = dense_case(3, 2, 3, S, seqlen, seed=5)
    window_from = [S - 5, 0, EMPTY_POS]
    out, stats = chunked_attention(xq, view, StatsRequest(gqa=gqa, window_from=window_from), tile_bytes=tile)
    torch.testing.assert_close(out, eager_attention(xq, view), atol=1e-5, rtol=1e-5)
    expected = naive_window(xq, k, v, p, view.start_pos, window_from, gqa)
    torch.testing.assert_close(stats.window[0].double(), torch.stack(expected), atol=1e-5, rtol=1e-5)
    _, colsum, _ = naive(xq, k, v, p, view.start_pos, gqa=gqa)
    torch.testing.assert_close(stats.colsum[0].double(), torch.stack(colsum), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seqlen", [1, 4])
@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_packed_window_sums_equal_the_definition(seqlen, gqa):
    xq, view, k, v, p = packed_case(2, 2, 3, 12, seqlen, [[0, 3], [1, 2]], pad=2, seed=6)
    window_from = [12 + seqlen - 1, 0] if seqlen > 1 else [EMPTY_POS, 12]
    _, stats = packed_attention(xq, view, StatsRequest(gqa=gqa, window_from=window_from), tile_bytes=100)
    expected = naive_window(xq, k, v, p, view.start_pos, window_from, gqa)
    for got, exp in zip(stats.window, group_stats(view, expected)):
        torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)
