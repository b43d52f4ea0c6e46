"""FastGen cache: the checks of fastgen.md, the decode rules, positions, GQA, batching and byte accounting."""

import json
import math

import pytest
import torch

from adaptive_kv_cache.cache import FastGenCache
from adaptive_kv_cache.config import FastGenConfig, KVConfigError
from adaptive_kv_cache.policies import Local
from adaptive_kv_cache.report import write_logs
from adaptive_kv_cache.tokens import special_mask
from fastgen_reference import MaskedFastGenCache
from llama import Llama
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


def fastgen_cache(llama, prompts, **overrides):
    cfg = FastGenConfig().replace(**overrides)
    g = Llama(llama.model, llama.tokenizer, kv_config=cfg)
    return FastGenCache(cfg, g.token_classes, llama.model.params.n_layers, prompts, llama.model.params.max_seq_len)


def kept_positions(cache, layer_id):
    """(bsz, n_kv) nested lists of the sorted positions each segment holds."""
    st = cache.layers[layer_id]
    bsz = len(cache.prompt_lens)
    out = []
    for i in range(st.len.numel()):
        off, n = int(st.off[i]), int(st.len[i])
        out.append(sorted(st.pos[off : off + n].tolist()))
    n_kv = st.len.numel() // bsz
    return [out[b * n_kv : (b + 1) * n_kv] for b in range(bsz)]


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
    for st in cache.layers:
        rec = st.recovery
        assert not torch.isnan(rec).any()
        assert (rec[:, 1:] >= rec[:, :-1] - 1e-12).all()
        assert (rec[:, -1] == 1.0).all()
        assert ((rec >= 0) & (rec <= 1)).all()
        # the chosen candidate is the first that reaches T
        T = cache.config.T
        for i, c in enumerate(st.choice.tolist()):
            assert rec[i, c] >= T and (rec[i, :c] < T).all()


def test_check4_allocated_bytes_are_kept_tokens_plus_bounded_slack(llama):
    prompt = story_tokens(llama, 130)
    cache = fastgen_cache(llama, [prompt, prompt[:90]])
    tokens = torch.tensor([prompt, prompt[:90] + prompt[:40]])
    teacher_force(llama.model, cache, tokens, 90)
    stats = cache.memory_stats()
    for st, layer in zip(cache.layers, stats["layers"]):
        row = 2 * st.k.shape[1] * st.k.element_size()
        assert layer["allocated_bytes"] == st.k.numel() * st.k.element_size() + st.v.numel() * st.v.element_size()
        assert layer["kept_bytes"] == int(st.len.sum()) * row
        assert layer["allocated_bytes"] == int(st.cap.sum()) * row
        slack = st.cap - st.len
        assert (slack >= 0).all() and (slack <= 2 * cache.config.growth_slack).all()
        assert layer["slack_bytes"] == int(slack.sum()) * row


@pytest.mark.parametrize("T", [0.5, 0.9, 0.95])
def test_check5_packed_equals_masked_reference(llama, T):
    """Logits and kept sets of the packed cache equal a full-size buffer + mask, for a batch of 2 whose
    prompts end at different steps (so one sequence is profiled while the other is still reading)."""
    p1, p2 = story_tokens(llama, 140), story_tokens(llama, 100, offset=300)
    tokens = torch.tensor([p1, p2 + story_tokens(llama, 40, offset=600)])
    prompts = [p1[:110], p2]
    packed = fastgen_cache(llama, prompts, T=T)
    ref = MaskedFastGenCache(packed.config, packed.classes, llama.model.params.n_layers, prompts, 256)
    a = teacher_force(llama.model, packed, tokens, 100)
    b = teacher_force(llama.model, ref, tokens, 100)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for layer_id in range(llama.model.params.n_layers):
        assert kept_positions(packed, layer_id) == ref.kept_positions(layer_id)
    if T < 0.95:  # at 0.95 the random model keeps nearly everything and the growth slack can outweigh it
        assert packed.memory_stats()["total"]["allocated_bytes"] < packed.memory_stats()["total"]["raw_bytes"]


# --- decode rules ------------------------------------------------------------------------------------------------


def forced(llama, prompts, tokens, P, hybrid, **overrides):
    """Every head forced to `hybrid` (T=0 picks the first candidate); returns the cache after teacher forcing."""
    cache = fastgen_cache(llama, prompts, T=0.0, candidates=(hybrid, ("full",)), **overrides)
    teacher_force(llama.model, cache, torch.tensor(tokens), P)
    return cache


def test_special_and_punct_keep_exactly_their_class(tiny_llama):
    text = "Tom said: \"Hi!\" Then, he ran. Was it fun? Yes!\nThe end."
    tokens = tiny_llama.tokenizer.encode(text * 3, bos=True, eos=False)
    P = 30
    cache = forced(tiny_llama, [tokens[:P]], [tokens], P, ("special", "punct"))
    ids = torch.tensor(tokens)
    classes = cache.classes
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
    for layer_id, st in enumerate(cache.layers):
        assert (st.len == math.ceil(0.25 * n)).all()
        # every kept token outscores every evicted one that is still comparable: check against the scores the
        # reference accumulates for all tokens (nothing evicted there but the mask)
    ref = MaskedFastGenCache(cache.config, cache.classes, tiny_llama.model.params.n_layers, [tokens[:P]], 128)
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
    st = cache.layers[0]
    for h in range(st.len.numel()):
        off, n = int(st.off[h]), int(st.len[h])
        pos = st.pos[off : off + n].long()
        assert n < len(tokens) and int(pos.max()) == len(tokens) - 1  # evicted some, kept the newest
        torch.testing.assert_close(st.k[off : off + n], dense.cache_k[0][0, h, pos], atol=0, rtol=0)
        torch.testing.assert_close(st.v[off : off + n], dense.cache_v[0][0, h, pos], atol=0, rtol=0)


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_gqa_profile_aggregates_each_query_group(tiny_llama, aggregation):
    """Statistics are per KV head: the mean (or max) over the query heads sharing it, never expanded."""
    torch.manual_seed(0)
    bsz, n_kv, n_rep, L, hd = 1, 2, 3, 12, 8
    prompt = list(range(10, 10 + L))
    cfg = FastGenConfig(gqa_aggregation=aggregation, profile_chunk=5)  # chunks that do not divide L
    classes = Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config=cfg).token_classes
    cache = FastGenCache(cfg, classes, 1, [prompt], 64)
    xq, xk, xv = torch.randn(bsz, n_kv, n_rep, L, hd), torch.randn(bsz, n_kv, L, hd), torch.randn(bsz, n_kv, L, hd)
    cache.begin(torch.tensor([prompt]), 0)
    s = (xq @ xk[:, :, None].transpose(3, 4)) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    agg = s.mean(2) if aggregation == "mean" else s.amax(2)  # (bsz, n_kv, L, L)
    W = math.ceil(cfg.r_l * L)
    band = torch.ones(L, L, dtype=torch.bool).tril() & ~torch.ones(L, L, dtype=torch.bool).tril(-W)
    keys, values, mask = cache.update(0, 0, xq, xk, xv)
    assert keys.shape == (bsz, n_kv, L, hd)  # one row per KV head, not per query head
    st = cache.layers[0]
    assert st.len.numel() == bsz * n_kv
    # the recovery of 'full' is 1 and of special+punct+frequent+local equals the brute-force sum
    from adaptive_kv_cache.policies import Frequent

    ids = torch.tensor(prompt)
    protected = special_mask(ids, classes) | classes.punct[ids]
    for h in range(n_kv):
        colsum = agg[0, h].sum(0)
        freq = Frequent(cfg.r_f).keep(_stats_from(colsum, L))[0]
        keep = (freq | protected)[None, :] | band  # (t, j)
        expected = (agg[0, h] * keep).sum() / agg[0, h].sum()
        assert float(st.recovery[h, 3]) == pytest.approx(float(expected), abs=1e-6)


def _stats_from(colsum, L):
    from adaptive_kv_cache.policies import TokenStats

    return TokenStats(valid=torch.ones(1, L, dtype=torch.bool), pos=torch.arange(L)[None],
                      special=torch.zeros(1, L, dtype=torch.bool), punct=torch.zeros(1, L, dtype=torch.bool),
                      score=colsum[None], n=torch.tensor([[L]]), prompt_len=torch.tensor([[L]]))


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
    paths = write_logs(stats, tmp_path, config=cache.config.to_dict())
    logged = json.loads(paths["json"].read_text())
    for st, layer, k, v in zip(cache.layers, logged["layers"], dense.cache_k, dense.cache_v):
        assert layer["allocated_bytes"] == (st.k.numel() + st.v.numel()) * st.k.element_size()
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


def test_all_full_layers_attend_to_storage_without_copying(tiny_llama):
    """At T=1 every segment shares one stride and nothing is evicted: the view is the storage itself."""
    tokens = story_tokens(tiny_llama, 60)
    cache = fastgen_cache(tiny_llama, [tokens[:40]], T=1.0)
    teacher_force(tiny_llama.model, cache, torch.tensor([tokens[:45]]), 40)
    st = cache.layers[0]
    n_kv, hd = st.len.numel(), st.k.shape[1]
    cache.begin(torch.tensor([[tokens[45]]]), 45)
    xq, xk, xv = torch.randn(1, n_kv, 2, 1, hd), torch.randn(1, n_kv, 1, hd), torch.randn(1, n_kv, 1, hd)
    keys, values, mask = cache.update(0, 45, xq, xk, xv)
    assert st.stride > 0
    assert keys.untyped_storage().data_ptr() == st.k.untyped_storage().data_ptr()
    assert torch.equal(keys[0, :, -1], xk[0, :, 0]) and bool(mask.all())


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
    assert len(seen) == 2 and all(c >= 0 for st in cache.layers for c in st.choice.tolist())
