"""FastGen cache: the checks of fastgen.md, the decode rules, positions, GQA, batching and byte accounting."""

import dataclasses
import json
import math

import pytest
import torch

from adaptive_kv_cache.config import FastGenConfig, KVConfigError
from adaptive_kv_cache.compressed import CompressedCache
from adaptive_kv_cache.fastgen import FastGen, FastGenCache
from adaptive_kv_cache.report import write_logs
from adaptive_kv_cache.tokens import special_mask
from cuda_checks import assert_steady_decode_never_synchronises
from fastgen_reference import MaskedFastGenCache
from llama import Llama
from llama.attention import EMPTY_POS, DenseView, PackedView, attend
from llama.kv_cache import DenseKVCache


@pytest.fixture(params=["tiny_llama", "stories_llama"])
def llama(request):
    """Each check runs on a tiny random model and on the real stories260K."""
    return request.getfixturevalue(request.param)


def with_kv(llama, **overrides) -> Llama:
    return Llama(llama.model, llama.tokenizer, kv_config=overrides)


def story_tokens(llama, n: int, offset: int = 0):
    ids = llama.tokenizer.encode(STORIES, bos=False, eos=False)[offset : offset + n - 1]
    return [llama.tokenizer.bos_id] + ids


STORIES = ""


@pytest.fixture(autouse=True, scope="module")
def _stories(shared_dir):
    global STORIES
    STORIES = (shared_dir / "data" / "tinystories_valid.txt").read_text()


def teacher_force(model, cache, tokens, P):
    """Prefill tokens[:, :P], then feed the rest one at a time. Returns (bsz, len - P + 1, vocab) logits."""
    logits = [model.forward(tokens[:, :P], 0, cache)[:, -1]]
    for pos in range(P, tokens.shape[1]):
        logits.append(model.forward(tokens[:, pos : pos + 1], pos, cache)[:, -1])
    return torch.stack(logits, 1)


def fastgen_cache(llama, prompts, store_options=None, **overrides):
    cfg = FastGenConfig().replace(**overrides)
    g = Llama(llama.model, llama.tokenizer, kv_config=cfg)
    return CompressedCache(FastGen(cfg, g.token_classes), llama.model.params.n_layers, prompts,
                           llama.model.params.max_seq_len, evict_every=cfg.evict_every, store_options=store_options)


def kept_positions(cache, layer_id):
    """(bsz, n_kv) nested lists of the sorted positions each segment holds."""
    st = cache.stores[layer_id]
    out = [st.slot_positions(i) for i in range(st.n_seg)]
    return [out[b * cache.n_kv_heads : (b + 1) * cache.n_kv_heads] for b in range(cache.bsz)]


def policies(cache, layer_id):
    names = cache.method.policy_names()
    return [[names[c] for c in row] for row in cache.method.state[layer_id]["choice"].view(cache.bsz, -1).tolist()]


# --- the five checks of fastgen.md -------------------------------------------------------------------------------


def test_check1_T1_picks_full_and_matches_uncompressed(llama):
    prompt = story_tokens(llama, 120)
    dense, _ = llama.generate([prompt], 40, temperature=0)
    g = with_kv(llama, T=1.0)
    packed, _ = g.generate([prompt], 40, temperature=0)
    assert packed == dense
    total = g.kv_stats["total"]
    assert total["policies"]["full"] == total["segments"] > 0
    assert total["kept_tokens"] == total["segments"] * g.kv_stats["tokens"]


def test_check2_T0_picks_special(llama):
    g = with_kv(llama, T=0.0)
    g.generate([story_tokens(llama, 100)], 8, temperature=0)
    total = g.kv_stats["total"]
    assert total["policies"]["special"] == total["segments"] > 0


def test_check3_recovery_nondecreasing_and_full_is_one(llama):
    prompt = story_tokens(llama, 150)
    cache = fastgen_cache(llama, [prompt])
    llama.model.forward(torch.tensor([prompt]), 0, cache)
    T = cache.method.config.T
    for layer_id in range(llama.model.params.n_layers):
        st = cache.method.state[layer_id]
        rec = st["recovery"]
        assert not torch.isnan(rec).any()
        assert (rec[:, 1:] >= rec[:, :-1] - 1e-12).all()
        assert (rec[:, -1] == 1.0).all()
        assert ((rec >= 0) & (rec <= 1)).all()
        for i, c in enumerate(st["choice"].tolist()):  # the chosen candidate is the first that reaches T
            assert rec[i, c] >= T and (rec[i, :c] < T).all()


@pytest.mark.parametrize("k", [1, 4])
def test_check4_allocated_bytes_are_kept_tokens_plus_padding_and_headroom(llama, k):
    """Allocated = kept + group padding + the free columns for the appends until the next eviction, and the
    log reports exactly the buffers' bytes."""
    prompt = story_tokens(llama, 130)
    cache = fastgen_cache(llama, [prompt, prompt[:90]], evict_every=k)
    tokens = torch.tensor([prompt, prompt[:90] + prompt[:40]])
    teacher_force(llama.model, cache, tokens, 90)
    stats = cache.memory_stats()
    for store, layer in zip(cache.stores, stats["layers"]):
        k_buf, v_buf = store.buf["k"], store.buf["v"]
        row = 2 * k_buf.shape[1] * k_buf.element_size()
        assert layer["allocated_bytes"] == k_buf.numel() * k_buf.element_size() + v_buf.numel() * v_buf.element_size()
        assert layer["allocated_bytes"] == sum(g.n * g.cap for g in store.groups) * row
        kept = sum(len(store.slot_positions(i)) for i in range(store.n_seg))
        assert layer["kept_tokens"] == kept and layer["kept_bytes"] == kept * row
        padding = sum(int((p == EMPTY_POS).sum()) for p in store.field("pos"))
        headroom = sum(g.n * (g.cap - g.width) for g in store.groups)
        assert layer["slack_bytes"] == (padding + headroom) * row
        # free columns: enough for the appends until the next eviction, and bounded (memory is given back)
        assert all(g.cap - g.width <= store.free_limit(g.width, k) for g in store.groups)
        if len(store.groups) < store.max_groups:  # no forced merge: padding within twice the grouping tolerance
            for g, p in zip(store.groups, store.field("pos")):
                assert int((p == EMPTY_POS).sum()) <= 2 * store.tolerance * g.n * g.width + g.n


@pytest.mark.parametrize("k,window,pool", [(1, 0, 1), (4, 0, 1), (1, 24, 1), (4, 24, 1), (4, 24, 5), (1, 0, 7)])
@pytest.mark.parametrize("T", [0.5, 0.9, 0.95])
def test_check5_packed_equals_masked_reference(llama, T, k, window, pool):
    """Logits, chosen policies and kept sets of the packed cache equal a plain full-size buffer + mask written
    from fastgen.md alone, for a batch of 2 whose prompts end at different steps (one sequence is profiled while
    the other still reads), evicting after every token (k = 1) and every 4 tokens; with the paper's profiling,
    with an observation window of the prompt's last 24 queries (obs_window) and with pooled frequency scores."""
    p1, p2 = story_tokens(llama, 140), story_tokens(llama, 100, offset=300)
    tokens = torch.tensor([p1, p2 + story_tokens(llama, 40, offset=600)])
    prompts = [p1[:110], p2]
    packed = fastgen_cache(llama, prompts, T=T, evict_every=k, obs_window=window, pool=pool)
    ref = MaskedFastGenCache(packed.method.config, packed.method.classes, llama.model.params.n_layers, prompts, 256)
    a = teacher_force(llama.model, packed, tokens, 100)
    b = teacher_force(llama.model, ref, tokens, 100)
    # fp32 logits of ~10 summed in different orders (tiled softmax, SDPA, float64 reference statistics) differ
    # by ~1e-5; one wrongly kept or evicted token moves them by 1e-3 or more
    torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    for layer_id in range(llama.model.params.n_layers):
        assert policies(packed, layer_id) == ref.policies(layer_id)
        assert kept_positions(packed, layer_id) == ref.kept_positions(layer_id)
    # the comparison has teeth: tokens were evicted (at 0.95 the random model keeps nearly all; with a window of
    # 24 queries it also keeps everything at 0.9: a random model's last queries spread their attention)
    if T < (0.9 if window else 0.95):
        assert packed.memory_stats()["total"]["kept_bytes"] < packed.memory_stats()["total"]["raw_bytes"]


def test_evict_every_k_holds_at_most_k_minus_1_extra_tokens(tiny_llama):
    """Between evictions a local head grows by one token per step, then drops back to its window."""
    tokens = story_tokens(tiny_llama, 90)
    P, k, W = 50, 5, math.ceil(0.2 * 50)
    cache = fastgen_cache(tiny_llama, [tokens[:P]], T=0.0, candidates=(("local",), ("full",)), r_l=0.2,
                          evict_every=k)
    tiny_llama.model.forward(torch.tensor([tokens[:P]]), 0, cache)
    sizes = []
    for pos in range(P, 70):
        tiny_llama.model.forward(torch.tensor([[tokens[pos]]]), pos, cache)
        sizes.append(len(cache.stores[0].slot_positions(0)))
        assert cache.stores[0].groups[0].cap <= W + k  # the free columns: the appends until the next eviction
    assert sizes == [W + (i + 1) % k if (i + 1) % k else W for i in range(20)]
    assert kept_positions(cache, 0)[0][0] == list(range(70 - W, 70))  # step 20 evicted


# --- decode rules ------------------------------------------------------------------------------------------------


def forced(llama, prompts, tokens, P, hybrid, **overrides):
    """Every head forced to `hybrid` (T=0 picks the first candidate), evicting after every token as the paper's
    decode rules read (k = 1); returns the cache after teacher forcing."""
    overrides = {"evict_every": 1, **overrides}
    cache = fastgen_cache(llama, prompts, T=0.0, candidates=(hybrid, ("full",)), **overrides)
    teacher_force(llama.model, cache, torch.tensor(tokens), P)
    return cache


def test_special_and_punct_keep_exactly_their_class(tiny_llama):
    text = "Tom said: \"Hi!\" Then, he ran. Was it fun? Yes!\nThe end."
    tokens = tiny_llama.tokenizer.encode(text * 3, bos=True, eos=False)
    P = 30
    cache = forced(tiny_llama, [tokens[:P]], [tokens], P, ("special", "punct"))
    ids = torch.tensor(tokens)
    classes = cache.method.classes
    member = special_mask(ids[:P], classes).tolist() + classes.special[ids[P:]].tolist()
    member = [m or p for m, p in zip(member, classes.punct[ids].tolist())]
    expected = [j for j, m in enumerate(member) if m]
    assert len(expected) > 5
    for layer_id in range(tiny_llama.model.params.n_layers):
        for head in kept_positions(cache, layer_id)[0]:
            assert head == expected


def test_local_window_slides(tiny_llama):
    tokens = story_tokens(tiny_llama, 80)
    P = 50
    for n in (P, P + 1, 80):
        cache = forced(tiny_llama, [tokens[:P]], [tokens[:n]], P, ("local",), r_l=0.2)
        W = math.ceil(0.2 * P)
        for layer_id in range(tiny_llama.model.params.n_layers):
            for head in kept_positions(cache, layer_id)[0]:
                assert head == list(range(n - W, n))


def test_frequent_keeps_top_normalised_scores(tiny_llama):
    tokens = story_tokens(tiny_llama, 90)
    P = 60
    cache = forced(tiny_llama, [tokens[:P]], [tokens], P, ("frequent",), r_f=0.25)
    n = len(tokens)
    for layer_id in range(tiny_llama.model.params.n_layers):
        assert all(len(h) == math.ceil(0.25 * n) for h in kept_positions(cache, layer_id)[0])
    # the reference ranks by its own float64 scores with a Python sort (it shares no policy code)
    ref = MaskedFastGenCache(cache.method.config, cache.method.classes, tiny_llama.model.params.n_layers,
                             [tokens[:P]], 128)
    teacher_force(tiny_llama.model, ref, torch.tensor([tokens]), P)
    for layer_id in range(tiny_llama.model.params.n_layers):
        assert kept_positions(cache, layer_id) == ref.kept_positions(layer_id)


def test_frequent_normalisation_prefers_recent_attention():
    from adaptive_kv_cache.policies import Frequent, TokenStats

    # token 0 received 3.0 over 10 queries (0.3 each); token 8 received 1.0 over 2 queries (0.5 each)
    s = TokenStats(
        valid=torch.ones(1, 10, dtype=torch.bool), pos=torch.arange(10)[None],
        special=torch.zeros(1, 10, dtype=torch.bool), punct=torch.zeros(1, 10, dtype=torch.bool),
        score=torch.tensor([[3.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0, 0.2]]),
        n=torch.tensor([[10]]), prompt_len=torch.tensor([[10]]),
    )
    keep = Frequent(r_f=0.1).keep(s)  # budget ceil(0.1 * 10) = 1
    assert keep.nonzero()[:, 1].tolist() == [8]
    assert Frequent(r_f=0.2).keep(s).nonzero()[:, 1].tolist() == [0, 8]
    # an observation window from position 8: only queries 8 and 9 were summed, so token 0 got 1.5 per counted
    # query and token 8 0.5
    windowed = dataclasses.replace(s, seen_from=torch.tensor([[8]]))
    assert Frequent(r_f=0.1).keep(windowed).nonzero()[:, 1].tolist() == [0]
    # pooled over 3: tokens 7 and 9 inherit token 8's 0.5, token 1 token 0's 0.3; ties keep the older token
    assert Frequent(r_f=0.3, pool=3).keep(s).nonzero()[:, 1].tolist() == [7, 8, 9]
    assert Frequent(r_f=0.5, pool=3).keep(s).nonzero()[:, 1].tolist() == [0, 1, 7, 8, 9]


def test_full_appends_every_token(tiny_llama):
    tokens = story_tokens(tiny_llama, 70)
    cache = fastgen_cache(tiny_llama, [tokens[:40]], T=1.0)
    teacher_force(tiny_llama.model, cache, torch.tensor([tokens]), 40)
    for layer_id in range(tiny_llama.model.params.n_layers):
        for head in kept_positions(cache, layer_id)[0]:
            assert head == list(range(70))


def test_keys_stay_at_absolute_positions_after_eviction(llama):
    """Kept keys are the keys rotated at their absolute positions (never re-rotated, never re-indexed).

    Layer 0's keys depend only on the token and its position, so they must equal the uncompressed cache's
    bit for bit; deeper layers see the compressed attention of the layers below and legitimately differ.
    """
    tokens = story_tokens(llama, 120)
    P = 80
    cache = forced(llama, [tokens[:P]], [tokens], P, ("special", "punct", "local"), r_l=0.1)
    dense = DenseKVCache(llama.model.params.n_layers, 512)
    teacher_force(llama.model, dense, torch.tensor([tokens]), P)
    store = cache.stores[0]
    for g, k, v, p in zip(store.groups, store.field("k"), store.field("v"), store.field("pos")):
        for r, h in enumerate(g.seg.tolist()):
            held = p[r] != EMPTY_POS
            pos = p[r][held].long()
            assert len(pos) < len(tokens) and int(pos.max()) == len(tokens) - 1  # evicted some, kept the newest
            torch.testing.assert_close(k[r][held], dense.cache_k[0][0, h, pos], atol=0, rtol=0)
            torch.testing.assert_close(v[r][held], dense.cache_v[0][0, h, pos], atol=0, rtol=0)


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_gqa_profile_aggregates_each_query_group(tiny_llama, aggregation):
    """Statistics are per KV head: the mean (or max) over the query heads sharing it, never expanded; the
    recovery of special+punct+frequent+local equals the brute-force sum over the aggregated map."""
    torch.manual_seed(0)
    bsz, n_kv, n_rep, L, hd = 1, 2, 3, 12, 8
    prompt = list(range(10, 10 + L))
    cfg = FastGenConfig(gqa_aggregation=aggregation)
    classes = Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config=cfg).token_classes
    cache = FastGenCache(cfg, classes, 1, [prompt], 64)
    xq, xk, xv = torch.randn(bsz, L, n_kv * n_rep, hd), torch.randn(bsz, L, n_kv, hd), torch.randn(bsz, L, n_kv, hd)
    cache.begin(torch.tensor([prompt]), 0)
    view = cache.append(0, 0, xk, xv)
    assert isinstance(view, DenseView) and view.keys.shape == (bsz, n_kv, L, hd)  # per KV head, not per query head
    _, stats = attend(xq, view, cache.stats_request(0))
    cache.after_attention(0, xq, view, stats)
    cache.end()
    q = xq.view(bsz, L, n_kv, n_rep, hd).permute(0, 2, 3, 1, 4)
    s = (q @ xk.transpose(1, 2)[:, :, None].transpose(3, 4)) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    agg = s.mean(2) if aggregation == "mean" else s.amax(2)  # (bsz, n_kv, L, L)
    W = math.ceil(cfg.r_l * L)
    band = torch.ones(L, L, dtype=torch.bool).tril() & ~torch.ones(L, L, dtype=torch.bool).tril(-W)
    ids = torch.tensor(prompt)
    protected = special_mask(ids, classes) | classes.punct[ids]
    budget = math.ceil(cfg.r_f * L)
    for h in range(n_kv):
        norm = agg[0, h].sum(0) / (L - torch.arange(L))
        top = sorted(range(L), key=lambda j: (-float(norm[j]), j))[:budget]
        freq = torch.zeros(L, dtype=torch.bool)
        freq[top] = True
        keep = (freq | protected)[None, :] | band  # (t, j)
        expected = (agg[0, h] * keep).sum() / agg[0, h].sum()
        assert float(cache.method.state[0]["recovery"][h, 3]) == pytest.approx(float(expected), abs=1e-6)


def test_batch_of_two_equals_each_alone(llama):
    p1, p2 = story_tokens(llama, 110), story_tokens(llama, 70, offset=500)
    g = with_kv(llama, T=0.9)
    batch, _ = g.generate([p1, p2], 30, temperature=0)
    alone = [g.generate([p], 30, temperature=0)[0][0] for p in (p1, p2)]
    assert batch == alone


# --- byte accounting ---------------------------------------------------------------------------------------------


def test_logged_bytes_equal_allocated_and_raw_equals_uncompressed(llama, tmp_path):
    tokens = story_tokens(llama, 110)
    P = 90
    cache = fastgen_cache(llama, [tokens[:P]])
    teacher_force(llama.model, cache, torch.tensor([tokens]), P)
    dense = DenseKVCache(llama.model.params.n_layers, 512, capacity=len(tokens))
    teacher_force(llama.model, dense, torch.tensor([tokens]), P)
    stats = cache.memory_stats()
    paths = write_logs(stats, tmp_path, config=cache.method.config.to_dict())
    logged = json.loads(paths["json"].read_text())
    for st, layer, k, v in zip(cache.stores, logged["layers"], dense.cache_k, dense.cache_v):
        assert layer["allocated_bytes"] == (st.buf["k"].numel() + st.buf["v"].numel()) * st.buf["k"].element_size()
        assert layer["raw_bytes"] == (k.numel() + v.numel()) * k.element_size()
    assert "| total ave |" in paths["md"].read_text()
    assert logged["total"]["allocated_bytes"] == sum(l["allocated_bytes"] for l in logged["layers"])


# --- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, key", [({"T": 1.5}, "T"), ({"r_l": 0}, "r_l"), ({"r_f": 2}, "r_f"),
                                      ({"candidates": [["foo"], ["full"]]}, "foo"), ({"candidates": []}, "candidates")])
def test_bad_settings_fail_before_model_work(tmp_path, bad, key):
    # the checkpoint directory does not exist: the config error must come first
    with pytest.raises(KVConfigError, match=key):
        Llama.build(str(tmp_path / "missing"), str(tmp_path / "missing.model"), 64, 1, kv_config=bad)


def test_malformed_config_file_fails_before_model_work(tmp_path):
    path = tmp_path / "kv.json"
    path.write_text('{"T": 0.9,,}')
    with pytest.raises(KVConfigError, match="line 1"):
        Llama.build(str(tmp_path / "missing"), str(tmp_path / "missing.model"), 64, 1, kv_config=str(path))


def test_cli_flags_override_config(tmp_path):
    from adaptive_kv_cache.cli import kv_config_from_flags

    assert kv_config_from_flags(compress=False) is None
    cfg = kv_config_from_flags(T=0.9, r_l=0.2)
    assert (cfg.T, cfg.r_l, cfg.r_f) == (0.9, 0.2, 0.3)
    with pytest.raises(KVConfigError, match="T"):
        kv_config_from_flags(T=-0.5)


def test_attention_reads_the_store_without_copying(tiny_llama):
    """While every prompt is pending the layer is one position-ordered block (a dense view of the store's own
    buffer, for the fast kernels); after profiling each group is a view of the packed buffer, never a copy."""
    tokens = story_tokens(tiny_llama, 60)
    cache = fastgen_cache(tiny_llama, [tokens[:40]], T=0.9)
    n_kv, hd = 2, 8
    cache.begin(torch.tensor([tokens[:40]]), 0)
    view = cache.append(0, 0, torch.randn(1, 40, n_kv, hd), torch.randn(1, 40, n_kv, hd))
    assert isinstance(view, DenseView)
    assert view.keys.untyped_storage().data_ptr() == cache.stores[0].buf["k"].untyped_storage().data_ptr()
    cache = fastgen_cache(tiny_llama, [tokens[:40]], T=0.5)
    teacher_force(tiny_llama.model, cache, torch.tensor([tokens[:45]]), 40)
    cache.begin(torch.tensor([[tokens[45]]]), 45)
    xk = torch.randn(1, 1, n_kv, hd)
    for layer_id in range(2):
        with torch.inference_mode():  # the model made the store's buffers in inference mode
            view = cache.append(layer_id, 45, xk, torch.randn(1, 1, n_kv, hd))
        assert isinstance(view, PackedView)  # T = 0.5 evicted in every layer
        for g in view.groups:
            assert g.keys.untyped_storage().data_ptr() == cache.stores[layer_id].buf["k"].untyped_storage().data_ptr()
            assert torch.equal(g.keys[:, -1], xk[0, 0][g.seg])  # the new token was appended in place
            assert (g.pos[:, -1] == 45).all()


def test_chunked_prefill_equals_one_pass(llama):
    """A prompt fed in three chunks is profiled and compressed exactly like the same prompt in one pass."""
    tokens = story_tokens(llama, 120)
    one = fastgen_cache(llama, [tokens[:100]], T=0.9)
    a = teacher_force(llama.model, one, torch.tensor([tokens]), 100)
    three = fastgen_cache(llama, [tokens[:100]], T=0.9)
    for lo, hi in ((0, 30), (30, 77), (77, 99)):
        llama.model.forward(torch.tensor([tokens[lo:hi]]), lo, three)
    b = teacher_force_from(llama.model, three, torch.tensor([tokens]), 99)
    torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    for layer_id in range(llama.model.params.n_layers):
        assert policies(one, layer_id) == policies(three, layer_id)
        assert kept_positions(one, layer_id) == kept_positions(three, layer_id)


def teacher_force_from(model, cache, tokens, pos0):
    """Feed tokens[:, pos0:] one at a time after a prefill of pos0 positions; logits of the last prompt token on."""
    return torch.stack([model.forward(tokens[:, p : p + 1], p, cache)[:, -1] for p in range(pos0, tokens.shape[1])],
                       1)


def test_heatmap_observer_gets_each_layer_once_and_tolerates_chunked_prefill(tiny_llama):
    tokens = story_tokens(tiny_llama, 50)
    seen = []
    cfg = FastGenConfig()
    g = Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config=cfg)
    observer = lambda layer, seq, attn, names, recs: seen.append((layer, seq, tuple(attn.shape), len(names)))  # noqa
    cache = FastGenCache(cfg, g.token_classes, 2, [tokens[:40]], 256, observer=observer)
    teacher_force(tiny_llama.model, cache, torch.tensor([tokens]), 40)
    assert seen == [(0, 0, (2, 40, 40), 2), (1, 0, (2, 40, 40), 2)]
    # a prompt that does not end in the first pass: no heatmap, no error
    cache = FastGenCache(cfg, g.token_classes, 2, [tokens[:40]], 256, observer=observer)
    tiny_llama.model.forward(torch.tensor([tokens[:20]]), 0, cache)
    tiny_llama.model.forward(torch.tensor([tokens[20:40]]), 20, cache)
    assert len(seen) == 2 and all((cache.method.state[i]["choice"] >= 0).all() for i in range(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_between_evictions_never_synchronises(dist, stories_dir):
    """Steady-state decode (no prompt ending, no eviction due) issues no host-device synchronisation."""
    g = Llama.build(str(stories_dir), str(stories_dir / "tokenizer.model"), 256, 1, device="cuda",
                    kv_config={"T": 0.9, "evict_every": 8})
    assert_steady_decode_never_synchronises(g, story_tokens(g, 80))


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("pool", [1, 3])
def test_frequent_ranks_by_score_then_age_in_any_slot_order(pool, ties):
    """Frequent's ranking equals a plain Python ranking (descending score, ties to the older token),
    with many ties or none (the k-th-score shortcut), empty slots, slots in random order, and budgets of 0,
    inside and beyond the width."""
    from adaptive_kv_cache.policies import Frequent, TokenStats

    g = torch.Generator().manual_seed(3)
    rows, width = 6, 40
    pos = torch.stack([torch.randperm(100, generator=g)[:width] for _ in range(rows)])
    valid = torch.rand(rows, width, generator=g) < 0.8
    pos = pos.masked_fill(~valid, torch.iinfo(torch.int32).max)  # an empty slot's position, as the store has it
    score = (torch.randint(0, 4, (rows, width), generator=g).float() * 0.25 if ties  # ties on purpose
             else torch.rand(rows, width, generator=g))
    n = torch.full((rows, 1), 100)
    s = TokenStats(valid=valid, pos=pos, special=torch.zeros_like(valid), punct=torch.zeros_like(valid),
                   score=score * (n - pos).clamp(1, 100), n=n, prompt_len=n)
    for r_f in (0.001, 0.05, 0.2, 0.35, 1.0):
        keep = Frequent(r_f=r_f, pool=pool).keep(s)
        budget = math.ceil(r_f * 100 - 1e-9)
        for i in range(rows):
            held = sorted((int(p), j) for j, p in enumerate(pos[i].tolist()) if valid[i, j])  # position order
            per = [float(score[i, j]) for _, j in held]
            if pool > 1:  # the best score among the pool nearest held tokens
                h = pool // 2
                per = [max(per[max(0, a - h) : a + h + 1]) for a in range(len(per))]
            ranked = sorted(range(len(held)), key=lambda a: (-per[a], held[a][0]))[:budget]
            want = sorted(held[a][1] for a in ranked)
            assert keep[i].nonzero().flatten().tolist() == want
