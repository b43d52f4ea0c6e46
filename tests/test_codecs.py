"""Codecs: quantisation error bounds, attention over codes against the eager reference over the dequantised
cache, allocated bytes against the formula and the buffers, and every codec composed with FastGen and with a
method that keeps everything."""


import pytest
import torch

from adaptive_kv_cache.codecs import Int4, Int8, make_codec, pack_nibbles, quantise_int8, unpack_nibbles
from adaptive_kv_cache.compressed import CompressedCache, CompressionMethod
from adaptive_kv_cache.config import FastGenConfig, KVConfigError
from adaptive_kv_cache.fastgen import FastGen
from adaptive_kv_cache.store import PackedStore
from llama import Llama
from llama.attention import EMPTY_POS, KVGroup, PackedView, StatsRequest, dequantised, eager_attention, \
    packed_attention

HD = 8


# --- quantise / dequantise ----------------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step_and_zero_or_constant_rows_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 64, generator=g) * torch.rand(500, 1, generator=g) * 10
    x[0] = 0.0
    x[1] = 0.75  # constant rows: codes 127, scale |c| / 127
    x[2] = -3.0
    codes, scale = quantise_int8(x)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127
    err = (codes.float() * scale[:, None] - x).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(codes[0], torch.zeros(64, dtype=torch.int8)) and scale[0] == 0
    for r in (1, 2):  # exact up to the float32 rounding of 127 * (|c| / 127)
        assert torch.allclose(codes[r].float() * scale[r], x[r], rtol=2 ** -23, atol=0)


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (5, 7, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 7, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)


def sealed_store(codec, n_seg=4, length=100, end=None, keep=None, seed=0, dtype=torch.float32):
    """A store of `length` positions per segment (slot order shuffled per group by a compaction when `keep`
    is given), sealed by `codec` at `end`. Returns (store, {(seg, pos): (key, value)})."""
    g = torch.Generator().manual_seed(seed)
    store = PackedStore(n_seg, {}, max_groups=2)
    k = torch.randn(n_seg, length, HD, generator=g) * torch.linspace(0.5, 4, HD)  # channels of different ranges
    k[:, :, 3] = 1.25  # a constant channel: exact through int4's per-channel blocks
    v = torch.randn(n_seg, length, HD, generator=g, dtype=dtype)
    v[:, 7] = -0.5  # a constant token: exact through int4's per-token values
    store.append({"k": k.reshape(-1, HD).to(dtype), "v": v.reshape(-1, HD),
                  "pos": torch.arange(length, dtype=torch.int32).repeat(n_seg)}, min_free=8)
    if keep is not None:
        store.compact([torch.rand(store.field("pos")[0].shape, generator=g) < keep], min_free=8)
    held = {}
    for grp, p in zip(store.groups, store.field("pos")):
        for r, s in enumerate(grp.members):
            for pos in p[r][p[r] != EMPTY_POS].tolist():
                held[(s, pos)] = (k[s, pos].to(dtype), v[s, pos])
    codec.seal(0, store, length if end is None else end)
    return store, held


def read_back(codec, store):
    """{(seg, pos): (key, value)} dequantised through the codec's readers."""
    out = {}
    for i, (grp, p) in enumerate(zip(store.groups, store.field("pos"))):
        k, v = dequantised(KVGroup(None, None, p, grp.seg, None, None, codec.readers(0, store)[i]))
        for r, s in enumerate(grp.members):
            for c, pos in enumerate(p[r].tolist()):
                if pos != EMPTY_POS:
                    out[(s, pos)] = (k[r, c], v[r, c])
    return out


@pytest.mark.parametrize("keep", [None, 0.6])
def test_int4_error_bounds_per_key_channel_block_and_value_token(keep):
    G, R, L = 16, 20, 100
    codec = Int4(group=G, residual=R, chunk_bytes=256)
    store, held = sealed_store(codec, length=L, keep=keep)
    got = read_back(codec, store)
    assert got.keys() == held.keys()
    r0 = (L - R) // G * G
    for (s, pos), (k, v) in held.items():
        gk, gv = got[(s, pos)]
        if pos >= r0:  # the full-precision window
            assert torch.equal(gk, k) and torch.equal(gv, v)
            continue
        # keys: per channel over the tokens of the block this segment holds, computed here from `held`
        block = torch.stack([held[(s, p)][0] for p in range(pos // G * G, pos // G * G + G) if (s, p) in held])
        step = (block.amax(0) - block.amin(0)) / 15
        assert ((gk - k).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
        assert gk[3] == k[3] == 1.25  # the constant channel is exact
        vstep = (v.max() - v.min()) / 15
        assert ((gv - v).abs() <= vstep / 2 * (1 + 1e-5) + 1e-6).all()
        if pos == 7:
            assert torch.equal(gv, v)  # the constant token is exact


def test_int4_window_moves_and_blocks_quantise_as_they_leave_it():
    G, R = 8, 12
    codec = Int4(group=G, residual=R)
    store, _ = sealed_store(codec, n_seg=2, length=30)
    st = codec.state[0]
    assert st["r0"] == 16
    g = torch.Generator().manual_seed(5)
    for pos in range(30, 45):
        k, v = torch.randn(2, 1, HD, generator=g), torch.randn(2, 1, HD, generator=g)
        store.append({**codec.encode(k.view(2, HD), v.view(2, HD)),
                      "pos": torch.tensor([pos, pos], dtype=torch.int32)}, min_free=4)
        codec.after_append(0, store, k, v, pos)
        assert st["r0"] == (pos + 1 - R) // G * G  # every block older than R tokens is quantised
        assert pos + 1 - st["r0"] <= st["rk"].shape[1] == R + G  # the window never grows in decode


# --- attention over codes ---------------------------------------------------------------------------------------


def coded_view(codec, store, start_pos, n_kv):
    view = store.view(start_pos, n_kv)
    for grp, reader in zip(view.groups, codec.readers(0, store)):
        grp.codes = reader
    return view


def dense_equivalent(view):
    """The same view with the dequantised keys and values in full precision (the reference's input)."""
    groups = []
    for grp in view.groups:
        k, v = dequantised(grp)
        groups.append(KVGroup(k, v, grp.pos, grp.seg, grp.seg_range, grp.bias))
    return PackedView(groups, view.start_pos, view.n_kv_heads)


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
@pytest.mark.parametrize("seqlen", [1, 3])
@pytest.mark.parametrize("want", [None, StatsRequest(band_windows=[4, 0])])
def test_attention_over_codes_equals_attention_over_the_dequantised_cache(codec_name, seqlen, want):
    bsz, n_kv, n_rep, L = 2, 2, 3, 60
    codec = Int8(chunk_bytes=2 * 2 * HD * 4 * 7) if codec_name == "int8" else Int4(8, 12, chunk_bytes=700)
    store, _ = sealed_store(codec, n_seg=bsz * n_kv, length=L, keep=0.7, seed=1)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(bsz * n_kv, seqlen, HD, generator=g), torch.randn(bsz * n_kv, seqlen, HD, generator=g)
    store.append({**codec.encode(k.reshape(-1, HD), v.reshape(-1, HD)),
                  "pos": torch.arange(L, L + seqlen, dtype=torch.int32).repeat(bsz * n_kv)}, min_free=4)
    codec.after_append(0, store, k, v, L)
    view = coded_view(codec, store, L, n_kv)
    assert all(grp.codes.chunk < grp.width for grp in view.groups)  # several chunks per group
    xq = torch.randn(bsz, seqlen, n_kv * n_rep, HD, generator=g)
    out, stats = packed_attention(xq, view, want)
    ref_view = dense_equivalent(view)
    torch.testing.assert_close(out, eager_attention(xq, ref_view), atol=1e-5, rtol=0)
    if want is not None:
        _, ref_stats = packed_attention(xq, ref_view, want)  # held to the float64 definition in test_attention
        for a, b in zip(stats.colsum + stats.band, ref_stats.colsum + ref_stats.band):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# --- the cache: bytes, methods, budgets ------------------------------------------------------------------------


def run(llama, method, codec, prompts, steps, evict_every=4):
    """Prefill then `steps` decode steps (teacher-forced on story-like tokens); returns the cache."""
    params = llama.model.params
    cache = CompressedCache(method, params.n_layers, prompts, params.max_seq_len, evict_every=evict_every,
                            codec=codec)
    P = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [5] * (P - len(p)) for p in prompts])
    llama.model.forward(tokens, 0, cache)
    for pos in range(P, P + steps):
        llama.model.forward(torch.full((len(prompts), 1), 7 + pos % 50), pos, cache)
    return cache


def prompts_of(llama, n=2, length=70):
    text = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. " * 4
    ids = llama.tokenizer.encode(text, bos=True, eos=False)
    return [ids[: length - 9 * b] for b in range(n)]


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
def test_allocated_bytes_equal_the_formula_and_the_buffers(tiny_llama, codec_name):
    codec = Int4(group=8, residual=16) if codec_name == "int4" else make_codec(codec_name)
    cfg = FastGenConfig(T=0.9, evict_every=4, kv_quant=codec_name)
    method = FastGen(cfg, Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config=cfg).token_classes)
    cache = run(tiny_llama, method, codec, prompts_of(tiny_llama), steps=37)
    stats = cache.memory_stats()
    hd, length = cache.head_dim, cache.length
    for layer_id, (layer, store) in enumerate(zip(stats["layers"], cache.stores)):
        slots = sum(grp.n * grp.cap for grp in store.groups)
        n_seg = store.n_seg
        if codec_name == "int8":
            codes, scales, residual = slots * 2 * hd, slots * 2 * 4, 0
            side = []
        else:
            st = codec.state[layer_id]
            blocks, window = st["kp"].shape[1], st["rk"].shape[1]
            codes, scales = slots * 2 * (hd // 2), slots * 2 * 4 + 2 * n_seg * blocks * hd * 4
            residual = 2 * n_seg * window * hd * 4
            side = [st[n] for n in ("kp", "rk", "rv")]
        assert (layer["codes_bytes"], layer["scales_bytes"], layer["residual_bytes"]) == (codes, scales, residual)
        assert layer["allocated_bytes"] == codes + scales + residual
        physical = sum(t.numel() * t.element_size() for t in side) + sum(
            store.buf[n].numel() * store.buf[n].element_size() for n in codec.code_fields + codec.scale_fields)
        assert layer["allocated_bytes"] == physical  # the counted bytes are the tensors' bytes
        assert "k" not in store.buf and "v" not in store.buf  # full precision freed
        assert layer["raw16_bytes"] == 2 * n_seg * length * hd * 2
        assert layer["raw_bytes"] == 2 * n_seg * length * hd * 4
    assert stats["kv_quant"] == codec_name


@pytest.mark.parametrize("codec_name", ["none", "int8", "int4"])
def test_peak_allocated_is_the_largest_sum_of_physical_buffers_over_the_passes(tiny_llama, codec_name):
    """The cache recounts its allocated bytes only when a buffer changes; the peak must still be the largest
    total of the tensors it holds after any pass (counted here from the tensors themselves)."""
    codec = Int4(group=8, residual=16) if codec_name == "int4" else make_codec(codec_name)
    cfg = FastGenConfig(T=0.9, evict_every=4, kv_quant=codec_name)
    method = FastGen(cfg, Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config=cfg).token_classes)
    prompts = prompts_of(tiny_llama)
    params = tiny_llama.model.params
    cache = CompressedCache(method, params.n_layers, prompts, params.max_seq_len, evict_every=4, codec=codec)

    def physical():
        total = 0
        for layer_id, store in enumerate(cache.stores):
            names = ("k", "v") if "k" in store.buf else codec.code_fields + codec.scale_fields
            total += sum(store.buf[n].numel() * store.buf[n].element_size() for n in names)
            st = codec.state.get(layer_id, {})
            total += sum(st[n].numel() * st[n].element_size() for n in ("kp", "rk", "rv") if n in st)
        return total

    P = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [5] * (P - len(p)) for p in prompts])
    seen = []
    for start in range(0, P, 24):  # the prompt in chunks, then decode: buffers grow, shrink and are sealed
        tiny_llama.model.forward(tokens[:, start : start + 24], start, cache)
        seen.append(physical())
    for pos in range(P, P + 41):
        tiny_llama.model.forward(torch.full((len(prompts), 1), 7 + pos % 50), pos, cache)
        seen.append(physical())
    assert len(set(seen)) > 2  # the test exercises changes
    assert cache.peak_allocated == max(seen)
    assert cache.memory_stats()["total"]["allocated_bytes"] == seen[-1]


def positions_held(cache):
    return [[cache.stores[i].slot_positions(s) for s in range(cache.stores[i].n_seg)]
            for i in range(cache.n_layers)]


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
def test_no_eviction_keeps_every_token_with_each_codec(tiny_llama, codec_name):
    prompts = prompts_of(tiny_llama)
    cache = run(tiny_llama, CompressionMethod(), make_codec(codec_name), prompts, steps=20)
    assert positions_held(cache) == [[list(range(cache.length))] * cache.stores[0].n_seg] * cache.n_layers
    assert all(cache.codec.sealed(s) for s in cache.stores)


@pytest.mark.parametrize("codec_name", ["int8", "int4"])
def test_fastgen_with_a_codec_profiles_on_full_precision_and_keeps_its_budget(tiny_llama, codec_name):
    prompts = prompts_of(tiny_llama)

    def fastgen(quant, **kw):
        cfg = FastGenConfig(evict_every=4, kv_quant=quant, **kw)
        return FastGen(cfg, Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config=cfg).token_classes)

    # policies are chosen on full-precision statistics: the same as without the codec
    ref = run(tiny_llama, fastgen("none", T=0.9), make_codec("none"), prompts, steps=21)
    got = run(tiny_llama, fastgen(codec_name, T=0.9), make_codec(codec_name), prompts, steps=21)
    for layer_id in range(ref.n_layers):
        assert torch.equal(ref.method.state[layer_id]["choice"], got.method.state[layer_id]["choice"])
        assert torch.equal(ref.method.state[layer_id]["recovery"], got.method.state[layer_id]["recovery"])
    # a rule whose kept set does not depend on scores keeps exactly the same tokens
    local = dict(T=0.0, candidates=(("special", "punct", "local"), ("full",)), r_l=0.2)
    ref = run(tiny_llama, fastgen("none", **local), make_codec("none"), prompts, steps=21)
    got = run(tiny_llama, fastgen(codec_name, **local), make_codec(codec_name), prompts, steps=21)
    assert positions_held(got) == positions_held(ref)
    assert got.memory_stats()["total"]["kept_tokens"] == ref.memory_stats()["total"]["kept_tokens"]


def test_generation_with_kv_quant_from_the_config(tiny_llama):
    prompts = prompts_of(tiny_llama)
    for quant in ("int8", "int4"):
        llama = Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config={"kv_quant": quant, "T": 0.9})
        out, _ = llama.generate(prompts, max_gen_len=20, temperature=0)
        assert all(len(o) == 20 for o in out) and llama.kv_stats["kv_quant"] == quant


def test_unknown_kv_quant_is_rejected_with_the_choices():
    with pytest.raises(KVConfigError, match="kv_quant='int3' is not allowed; allowed values: 'none', 'int8', 'int4'"):
        FastGenConfig(kv_quant="int3")
    with pytest.raises(ValueError, match="choose one of: none, int8, int4"):
        make_codec("fp8")


def test_kv_quant_flag_reaches_the_config_and_needs_compression():
    from adaptive_kv_cache.cli import ArgumentParser, UserError, add_common_arguments, check_common, \
        kv_config_from_flags

    assert kv_config_from_flags(kv_quant="int4").kv_quant == "int4"
    assert kv_config_from_flags().kv_quant == "none"
    parser = ArgumentParser()
    add_common_arguments(parser, ckpt_dir="unused", max_gen_len=8)
    with pytest.raises(UserError, match="--kv_quant int8 quantises the compressed cache; drop --no-compress"):
        check_common(parser.parse_args(["--kv_quant", "int8", "--no-compress"]))
    with pytest.raises(UserError, match="invalid choice: 'int2'"):
        parser.parse_args(["--kv_quant", "int2"])


def test_the_log_shows_codes_scales_window_and_the_16_bit_saving(tiny_llama):
    from adaptive_kv_cache.report import memory_table, summary

    cache = run(tiny_llama, CompressionMethod(), Int4(group=8, residual=16), prompts_of(tiny_llama), steps=5)
    stats = cache.memory_stats()
    lines = memory_table(stats).splitlines()
    assert lines[0].endswith("| codes MB | scales MB | residual MB | saved vs 16-bit dense % |")
    t = stats["total"]
    alloc = t["codes_bytes"] + t["scales_bytes"] + t["residual_bytes"]
    assert alloc == t["allocated_bytes"]
    assert lines[-1].endswith(f"| {100 * (1 - alloc / t['raw16_bytes']):.2f} |")
    assert (f"Stored as int4 codes: {t['codes_bytes']} B codes + {t['scales_bytes']} B scales + "
            f"{t['residual_bytes']} B full-precision window = {alloc} B allocated") in summary(stats)
