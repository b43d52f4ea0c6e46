"""Every registered method (FastGen has its own file): budgets kept exactly with the bytes to show for it, a
budget of 100% equal to the dense cache, the packed store equal to a masked reference written from the papers,
a batch of two equal to each alone, GQA compressed per KV head; the registry's configs and errors."""

import json
import math

import pytest
import torch

from adaptive_kv_cache.config import KVConfigError, resolve_kv_config
from adaptive_kv_cache.registry import CONFIG_DIR, METHODS, defaults, load_method_config, method_class
from llama import Llama
from llama.attention import EMPTY_POS
from llama.tokenizer import load_tokenizer
from cuda_checks import assert_steady_decode_never_synchronises
from methods_reference import MaskedMethodCache, budget_of, headkv_split, pyramid

NAMES = [m for m in METHODS if m != "fastgen"]
#: Small windows and sinks so that a ~100-token prompt leaves something to rank (the defaults suit 2k prompts).
TEST_OPTIONS = {"streaming_llm": {"sinks": 2}, "snapkv": {"window": 8}, "pyramidkv": {"window": 8, "beta": 4},
                "adakv": {"window": 8}, "headkv": {"window": 8}, "razor": {"retrieval": 0.25, "sinks": 2}}
#: The registry's methods, and AdaKV around a second scorer (the wrapper composes with any).
SETTINGS = [(m, {}) for m in NAMES] + [("adakv", {"scorer": "h2o"})]
IDS = [m if not o else f"{m}-{o['scorer']}" for m, o in SETTINGS]


@pytest.fixture(params=["tiny_llama", "stories_llama"])
def llama(request):
    return request.getfixturevalue(request.param)


STORIES = ""
SCORES_DIR = None


@pytest.fixture(autouse=True, scope="module")
def _stories(shared_dir, tmp_path_factory):
    global STORIES, SCORES_DIR
    STORIES = (shared_dir / "data" / "tinystories_valid.txt").read_text()
    SCORES_DIR = tmp_path_factory.mktemp("head_scores")


def head_scores_file(llama, uniform: bool = False) -> str:
    """HeadKV scores for this model's shape (random but fixed, or all 0: uniform budgets), as a JSON file."""
    p = llama.model.params
    g = torch.Generator().manual_seed(p.n_layers * 10 + p.n_kv_heads)
    scores = torch.zeros(p.n_layers, p.n_kv_heads) if uniform else torch.rand(p.n_layers, p.n_kv_heads, generator=g)
    path = SCORES_DIR / f"{p.n_layers}x{p.n_kv_heads}{'-uniform' if uniform else ''}.json"
    path.write_text(json.dumps({"scores": scores.tolist()}))
    return str(path)


def story_tokens(llama, n: int, offset: int = 0):
    return [llama.tokenizer.bos_id] + llama.tokenizer.encode(STORIES, bos=False, eos=False)[offset : offset + n - 1]


def config(name, **over):
    opts = dict(TEST_OPTIONS.get(name, {}))
    if over.get("scorer") == "h2o":
        opts.pop("window", None)
    return load_method_config({"method": name, **opts, **over})


def compressed(llama, cfg, uniform_scores: bool = False) -> Llama:
    """A generator around the shared model with this config (HeadKV gets scores of the model's shape)."""
    if cfg.budgets == "headkv" and cfg.head_scores is None:
        cfg = cfg.replace(head_scores=head_scores_file(llama, uniform_scores))
    return Llama(llama.model, llama.tokenizer, kv_config=cfg)


def teacher_force(model, cache, tokens, P):
    logits = [model.forward(tokens[:, :P], 0, cache)[:, -1]]
    for pos in range(P, tokens.shape[1]):
        logits.append(model.forward(tokens[:, pos : pos + 1], pos, cache)[:, -1])
    return torch.stack(logits, 1)


def kept_positions(cache, layer_id):
    st = cache.stores[layer_id]
    out = [st.slot_positions(i) for i in range(st.n_seg)]
    return [out[b * cache.n_kv_heads : (b + 1) * cache.n_kv_heads] for b in range(cache.bsz)]


# --- packed == masked reference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("name, over", SETTINGS, ids=IDS)
def test_packed_equals_masked_reference(llama, name, over, k):
    """Logits and each KV head's kept positions equal a full-size buffer + mask written from the papers, for a
    batch of two whose prompts end at different steps, evicting every token and every 4 tokens."""
    p1, p2 = story_tokens(llama, 120), story_tokens(llama, 90, offset=300)
    tokens = torch.tensor([p1, p2 + story_tokens(llama, 30, offset=600)])
    prompts = [p1[:100], p2]
    g = compressed(llama, config(name, evict_every=k, **over))
    cfg = g.kv_config
    packed = g.new_cache(prompts, 120)
    a = teacher_force(llama.model, packed, tokens, 90)
    retrieval = packed.method.retrieval.cpu() if name == "razor" else None
    ref = MaskedMethodCache(cfg, llama.model.params.n_layers, prompts, 128, retrieval=retrieval)
    b = teacher_force(llama.model, ref, tokens, 90)
    for layer_id in range(llama.model.params.n_layers):
        assert kept_positions(packed, layer_id) == ref.kept_positions(layer_id), f"layer {layer_id}"
    torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)
    total = packed.memory_stats()["total"]
    assert total["kept_bytes"] < 0.75 * total["raw_bytes"]  # the comparison has teeth: half the prompt went


# --- budgets kept exactly, with the bytes to show for it -------------------------------------------------------------


def expected_lengths(cfg, cache, layer_id, n, L, n_kv):
    """Per sequence, per KV head, the tokens a segment holds right after an eviction at n positions."""
    out = []
    for b, Lb in enumerate(L):
        B = budget_of(cfg, Lb)
        if cfg.method == "pyramidkv":
            B = pyramid(cfg, B, Lb, layer_id, cache.n_layers)
        grown = n - Lb if not cfg.decode else 0  # prefill-only methods append every generated token
        if cfg.method == "razor":
            full = cache.method.retrieval[layer_id].tolist()
            out.append([n if f else min(B, Lb) + grown for f in full])
        elif cfg.budgets == "headkv":
            out.append([x + grown for x in headkv_split(cfg, B, Lb)[layer_id]])
        else:
            out.append([min(B, Lb) + grown] * n_kv)
    return out


def assert_budget_kept(cfg, cache, prompts, n):
    """Every segment holds exactly what its method keeps right after an eviction at n positions."""
    for layer_id, store in enumerate(cache.stores):
        lengths = [store.lengths[b * cache.n_kv_heads : (b + 1) * cache.n_kv_heads] for b in range(len(prompts))]
        if cfg.budgets == "adakv":  # per sequence n_kv x budget in all, each head at least its floor
            for b, row in enumerate(lengths):
                B = budget_of(cfg, len(prompts[b]))
                grown = 0 if cfg.decode else n - len(prompts[b])
                assert sum(row) == cache.n_kv_heads * (B + grown)
                assert min(row) >= math.floor(cfg.alpha * B) + grown
        else:
            assert lengths == expected_lengths(cfg, cache, layer_id, n, [len(p) for p in prompts],
                                               cache.n_kv_heads), f"layer {layer_id} at {n}"


def budget_run(llama, cfg_of):
    """Prompts of 150 and 110 tokens, teacher-forced to 170 positions with k = 4; yields (config, cache, n) after
    every eviction once both prompts have ended, for each budget `cfg_of(budget)` returns a config for."""
    prompts = [story_tokens(llama, 150), story_tokens(llama, 110, offset=400)]
    tokens = torch.tensor([prompts[0] + story_tokens(llama, 20, offset=900),
                           prompts[1] + story_tokens(llama, 60, offset=900)])
    for budget in ({"budget": 0.3}, {"budget_tokens": 40}):
        cfg = cfg_of(budget)
        if cfg is None:
            continue
        g = compressed(llama, cfg)
        cache = g.new_cache(prompts, 170)
        llama.model.forward(tokens[:, :110], 0, cache)
        checked = 0
        for pos in range(110, 170):
            llama.model.forward(tokens[:, pos : pos + 1], pos, cache)
            if pos + 1 < 150 or cache.steps_since_compaction != 0:
                continue  # the long prompt still pending, or no eviction in this pass
            checked += 1
            assert_budget_kept(g.kv_config, cache, prompts, pos + 1)
            yield g.kv_config, cache
        assert checked >= 4


@pytest.mark.parametrize("name, over", SETTINGS, ids=IDS)
def test_each_method_keeps_exactly_its_budget(stories_llama, name, over):
    for cfg, cache in budget_run(stories_llama, lambda budget: config(name, evict_every=4, **budget, **over)):
        stats = cache.memory_stats()
        for store, layer in zip(cache.stores, stats["layers"]):
            k_buf = store.buf["k"]
            row = 2 * k_buf.shape[1] * k_buf.element_size()
            assert layer["kept_tokens"] == sum(store.lengths) and layer["kept_bytes"] == layer["kept_tokens"] * row
            assert layer["allocated_bytes"] == (k_buf.numel() + store.buf["v"].numel()) * k_buf.element_size()
            padding = sum(int((p == EMPTY_POS).sum()) for p in store.field("pos"))
            headroom = sum(g.n * (g.cap - g.width) for g in store.groups)
            assert layer["slack_bytes"] == (padding + headroom) * row
            assert all(g.cap - g.width <= store.free_limit(g.width, cfg.evict_every) for g in store.groups)


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
@pytest.mark.parametrize("name, over", SETTINGS, ids=IDS)
def test_each_method_with_a_codec_keeps_its_budget_in_codes(stories_llama, name, over, kv_quant):
    """`kv_quant` is an option of every method: the same exact kept-token counts as in full precision, every layer
    sealed once both prompts ended (no full-precision keys or values left in the store), the allocated bytes equal
    to the codec's formula (codes + scales + full-precision window) over the store's slots, and the kept positions
    of the full-precision run wherever scores were taken on full-precision keys."""
    if name == "razor":
        over = {**over, "decode": False}  # razor merges full-precision keys at decode evictions (its config says)
    # int8 with a share of the prompt, int4 with a token count: both budget forms, each codec once
    use = {"int8": "budget", "int4": "budget_tokens"}[kv_quant]

    def cfg_of(budget, quant=kv_quant):
        return config(name, evict_every=4, kv_quant=quant, **budget, **over) if use in budget else None

    def held(cache):
        return [[st.slot_positions(i) for i in range(st.n_seg)] for st in cache.stores]

    # the same method in full precision: its kept positions after each eviction
    ref = [held(cache) for _, cache in budget_run(stories_llama, lambda budget: cfg_of(budget, "none"))]
    runs = 0
    for cfg, cache in budget_run(stories_llama, cfg_of):
        # scores come from full-precision keys until the last prompt ends (the first check, at 150 positions), so
        # the kept sets match there; prefill-only methods never rescore, so they match at every later eviction
        if runs == 0 or not cfg.decode:
            assert held(cache) == ref[runs]
        runs += 1
        assert cfg.kv_quant == kv_quant and cache.codec.name == kv_quant
        stats = cache.memory_stats()
        assert stats["kv_quant"] == kv_quant
        hd, el = cache.head_dim, cache.kv_dtype.itemsize
        for layer_id, (store, layer) in enumerate(zip(cache.stores, stats["layers"])):
            assert "k" not in store.buf and "v" not in store.buf
            slots = sum(g.n * g.cap for g in store.groups)
            if kv_quant == "int8":  # one int8 per number, one float32 scale per token for keys and for values
                codes, scales, residual = slots * 2 * hd, slots * 2 * 4, 0
            else:  # two codes a byte; per-token value scales (min, step) and per-(block, channel) key scales
                st = cache.codec.state[layer_id]
                blocks, window = st["kp"].shape[1], st["rk"].shape[1]
                codes = slots * 2 * (hd // 2)
                scales = slots * 2 * 4 + 2 * store.n_seg * blocks * hd * 4
                residual = 2 * store.n_seg * window * hd * el
            assert (layer["codes_bytes"], layer["scales_bytes"], layer["residual_bytes"]) == (codes, scales, residual)
            assert layer["allocated_bytes"] == codes + scales + residual
            assert layer["kept_tokens"] == sum(store.lengths)
    assert runs >= 4


def test_every_method_takes_kv_quant_and_razor_needs_prefill_only_compression():
    from adaptive_kv_cache.cli import kv_config_from_flags

    for name in NAMES:
        if name != "razor":
            assert load_method_config({"method": name, "kv_quant": "int4"}).kv_quant == "int4"
            assert kv_config_from_flags(method=name, kv_quant="int8").kv_quant == "int8"
    assert load_method_config({"method": "razor", "kv_quant": "int8", "decode": False}).kv_quant == "int8"
    with pytest.raises(KVConfigError, match="kv_quant='int8' needs decode=false for razor"):
        load_method_config({"method": "razor", "kv_quant": "int8"})
    with pytest.raises(KVConfigError, match="kv_quant='int3' is not allowed; allowed values: 'none', 'int8'"):
        load_method_config({"method": "tova", "kv_quant": "int3"})


# --- 100% == dense, batch == alone, GQA --------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [{"budget": 1.0, "decode": False}, {"budget_tokens": 512}],
                         ids=["ratio_prefill_only", "tokens"])
@pytest.mark.parametrize("name, over", SETTINGS, ids=IDS)
def test_full_budget_equals_dense_token_for_token(llama, name, over, budget):
    prompt = story_tokens(llama, 120)
    dense, _ = llama.generate([prompt], 30, temperature=0)
    if name == "razor":
        budget = {**budget, "retrieval": 0.0}
    g = compressed(llama, config(name, **over, **budget), uniform_scores=True)  # headkv: the uniform split
    out, _ = g.generate([prompt], 30, temperature=0)
    assert out == dense
    total = g.kv_stats["total"]
    assert total["kept_tokens"] == total["segments"] * g.kv_stats["tokens"]


@pytest.mark.parametrize("name, over", SETTINGS, ids=IDS)
def test_batch_of_two_equals_each_alone(llama, name, over):
    p1, p2 = story_tokens(llama, 110), story_tokens(llama, 70, offset=500)
    g = compressed(llama, config(name, evict_every=4, **over))
    batch, _ = g.generate([p1, p2], 30, temperature=0)
    alone = [g.generate([p], 30, temperature=0)[0][0] for p in (p1, p2)]
    assert batch == alone


@pytest.mark.parametrize("name", ["h2o", "tova", "snapkv", "adakv"])
def test_gqa_compresses_each_kv_head_on_its_own(tiny_llama, name):
    """4 query heads share 2 KV heads: the store holds one segment per KV head (never per query head), and the
    heads keep different sets (the reference test checks which)."""
    prompt = story_tokens(tiny_llama, 100)
    cache = compressed(tiny_llama, config(name)).new_cache([prompt], 100)
    tiny_llama.model.forward(torch.tensor([prompt]), 0, cache)
    params = tiny_llama.model.params
    assert params.n_heads == 2 * params.n_kv_heads
    differ = 0
    for layer_id in range(params.n_layers):
        assert cache.stores[layer_id].n_seg == params.n_kv_heads
        heads = kept_positions(cache, layer_id)[0]
        differ += heads[0] != heads[1]
    assert differ > 0


def test_razor_probe_finds_the_heads_a_plain_computation_finds(tiny_llama):
    """The echo + induction score of every KV head equals a direct computation: the model's attention maps on a
    random sequence repeated twice, from hooks-free re-implementation of the layer's query/key projections."""
    from adaptive_kv_cache.methods.razor import probe_head_scores

    cfg = config("razor", probe_tokens=12, seed=3)
    model = tiny_llama.model
    scores = probe_head_scores(model, cfg, model.params.vocab_size, "cpu")
    g = torch.Generator().manual_seed(3)
    r = torch.randint(3, model.params.vocab_size, (12,), generator=g)
    tokens = torch.cat([r, r])[None]
    # the dense cache holds every layer's rotated keys; the queries are recomputed from the same inputs
    from llama.kv_cache import DenseKVCache

    maps = []

    class Maps(DenseKVCache):
        def after_attention(self, layer_id, xq, view, stats):
            q = xq[0].double().transpose(0, 1)  # (heads, T, hd)
            k = view.keys[0].double().repeat_interleave(xq.shape[2] // view.keys.shape[1], 0)
            s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
            T = s.shape[-1]
            maps.append(torch.softmax(s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), -1))

    model.forward(tokens, 0, Maps(model.params.n_layers, 64))
    for layer_id, p in enumerate(maps):
        n_kv = model.params.n_kv_heads
        p = p.view(n_kv, -1, 24, 24).mean(1)
        expected = [sum(float(p[h, t, t - 12] + p[h, t, t - 11]) for t in range(12, 24)) / 12 for h in range(n_kv)]
        assert scores[layer_id].tolist() == pytest.approx(expected, abs=1e-5)


# --- configs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shipped_json_is_the_methods_defaults(name):
    d = defaults(name)
    assert d["method"] == name
    cfg = load_method_config({"method": name})
    if name in ("adakv", "headkv"):
        assert cfg.budgets == name and cfg.method == d["scorer"] and cfg.alpha == d["alpha"]
        return
    assert cfg == method_class(name).Config(method=name)  # JSON == dataclass defaults
    assert cfg.to_dict() == d
    assert resolve_kv_config(str(CONFIG_DIR / f"{name}.json")) == cfg


def test_fastgen_json_equals_the_old_default_and_old_format_maps_to_fastgen():
    from adaptive_kv_cache.config import DEFAULT_CONFIG_PATH, FastGenConfig

    assert {**json.loads(DEFAULT_CONFIG_PATH.read_text()), "method": "fastgen"} == defaults("fastgen")
    assert resolve_kv_config({"T": 0.9}) == FastGenConfig(T=0.9)
    assert resolve_kv_config({"method": "fastgen", "T": 0.9}) == FastGenConfig(T=0.9)


def test_budget_as_ratio_or_tokens():
    assert config("snapkv", budget_tokens=128).budget is None
    assert config("snapkv", budget_tokens=128).with_overrides({"budget": 0.25}).budget_tokens is None
    assert budget_of(config("h2o", budget=0.25), 2048) == 512


@pytest.mark.parametrize("bad, words", [
    ({"method": "snap"}, ["method='snap'", "registered", "snapkv"]),
    ({"method": "h2o", "window": 4}, ["unknown key 'window'", "h2o", "recent"]),
    ({"method": "h2o", "budget": 0.5, "budget_tokens": 10}, ["exactly one", "budget_tokens"]),
    ({"method": "tova", "budget": 1.5}, ["budget=1.5", "(0, 1]"]),
    ({"method": "tova", "budget_tokens": 0}, ["budget_tokens=0"]),
    ({"method": "snapkv", "decode": True}, ["decode=true", "prompt"]),
    ({"method": "snapkv", "kernel": 4}, ["kernel=4", "odd"]),
    ({"method": "h2o", "budgets": "triangle"}, ["budgets='triangle'", "adakv"]),
    ({"method": "adakv", "scorer": "razor"}, ["scorer='razor'", "snapkv"]),
])
def test_bad_settings_fail_in_one_line_before_model_work(tmp_path, bad, words):
    with pytest.raises(KVConfigError) as e:
        Llama.build(str(tmp_path / "missing"), str(tmp_path / "missing.model"), 64, 1, kv_config=bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("kv config: ")
    for w in words:
        assert w in msg


def test_cli_flags_pick_a_method_and_its_options(tmp_path):
    from adaptive_kv_cache.cli import UserError, kv_config_from_flags

    cfg = kv_config_from_flags(method="snapkv", budget=0.3, kv_option=["window=16", "pooling=max"])
    assert (cfg.method, cfg.budget, cfg.window, cfg.pooling) == ("snapkv", 0.3, 16, "max")
    cfg = kv_config_from_flags(method="adakv", budget_tokens=64, kv_option=["scorer=tova", "alpha=0.5"])
    assert (cfg.method, cfg.budgets, cfg.budget_tokens, cfg.alpha) == ("tova", "adakv", 64, 0.5)
    path = tmp_path / "kv.json"
    path.write_text(json.dumps({"method": "streaming_llm", "sinks": 8}))
    cfg = kv_config_from_flags(kv_config=str(path), evict_every=2)
    assert (cfg.method, cfg.sinks, cfg.evict_every, cfg.budget) == ("streaming_llm", 8, 2, 0.5)
    assert kv_config_from_flags(T=0.9).T == 0.9  # FastGen's flags as before
    with pytest.raises(UserError, match="--T is not an option of method h2o"):
        kv_config_from_flags(method="h2o", T=0.9)
    with pytest.raises(UserError, match="--budget is not an option of method fastgen"):
        kv_config_from_flags(budget=0.5)
    with pytest.raises(UserError, match="contradicts"):
        kv_config_from_flags(kv_config=str(path), method="h2o")


@pytest.mark.parametrize("name", NAMES)
def test_heatmap_observer_sees_every_layer_with_each_heads_budget(tiny_llama, name):
    """The same heatmaps as FastGen's for every method: each layer's pooled prompt attention per KV head, the
    titles saying what each head keeps."""
    prompt = story_tokens(tiny_llama, 40)
    seen = []
    g = compressed(tiny_llama, config(name, budget=0.5))
    g.attention_observer = lambda layer, seq, attn, names, recs: seen.append((layer, seq, tuple(attn.shape), names))
    g.model.forward(torch.tensor([prompt]), 0, g.new_cache([prompt], 40))
    assert [s[:3] for s in seen] == [(0, 0, (2, 40, 40)), (1, 0, (2, 40, 40))]
    cfg = g.kv_config
    for layer, _, _, names in seen:
        if name == "razor":
            full = g.kv_method.context.get()[layer].tolist()
            assert names == [f"{cfg.method}: keeps {40 if f else 20} of 40" for f in full]
        elif name == "headkv":
            assert names == [f"{cfg.method}: keeps {b} of 40" for b in headkv_split(cfg, 20, 40)[layer]]
        elif name != "adakv":
            B = 20 if name != "pyramidkv" else pyramid(cfg, 20, 40, layer, 2)
            assert names == [f"{cfg.method}: keeps {B} of 40"] * 2
        else:
            assert sum(int(n.split()[2]) for n in names) == 40


# --- top-k -----------------------------------------------------------------------------------------------------------


def _plain_top_k(scores, pos, valid, k):
    """Independent reference: per row, sort the valid slots by (-score, position) in Python, keep the first k."""
    out = []
    for i in range(scores.shape[0]):
        held = [j for j in range(scores.shape[1]) if valid[i, j]]
        ranked = sorted(held, key=lambda j: (-float(scores[i, j]), int(pos[i, j])))[: int(k[i])]
        out.append(sorted(ranked))
    return out


@pytest.mark.parametrize("case", ["distinct", "straddling_tie", "tie_inside", "few_valid", "unequal_k", "minus_inf",
                                  "k_zero", "k_all"])
def test_top_k_equals_a_plain_ranking_with_and_without_the_threshold_shortcut(monkeypatch, case):
    """`top_k` (a k-th-value threshold where that is exact, the full ranking otherwise) keeps exactly what a plain
    Python ranking keeps; the cases pick which path runs, and the test checks that it did."""
    from adaptive_kv_cache import budgets as B

    g = torch.Generator().manual_seed(7)
    rows, S = 4, 50
    pos = torch.stack([torch.randperm(200, generator=g)[:S] for _ in range(rows)])
    valid = torch.rand(rows, S, generator=g) < 0.9
    scores = torch.rand(rows, S, generator=g)
    k = torch.full((rows,), 20)
    if case == "straddling_tie":  # three slots share the 20th best score: position decides which two stay
        order = scores.masked_fill(~valid, -1).argsort(-1, descending=True)
        scores[0, order[0, 18:21]] = float(scores[0, order[0, 18]])
    elif case == "tie_inside":  # ties above the threshold do not matter
        order = scores.masked_fill(~valid, -1).argsort(-1, descending=True)
        scores[:, order[0, :5]] = 0.999
    elif case == "few_valid":
        valid[1, 15:] = False
    elif case == "unequal_k":
        k[2] = 7
    elif case == "minus_inf":  # valid slots may score -inf; they are ranked by position like the rest
        scores[3, :30] = float("-inf")
    elif case == "k_zero":
        k[:] = 0
    elif case == "k_all":
        k[:] = S + 3
    shortcut = []
    real = B._top_k_by_threshold
    monkeypatch.setattr(B, "_top_k_by_threshold", lambda *a: shortcut.append(real(*a)) or shortcut[-1])
    keep = B.top_k(scores, pos, valid, k)
    assert [r.nonzero().flatten().tolist() for r in keep] == _plain_top_k(scores, pos, valid, k)
    exact = case in ("distinct", "tie_inside", "k_zero", "k_all")
    assert (shortcut[0] is not None) == exact


# --- HeadKV ----------------------------------------------------------------------------------------------------------


def test_headkv_budgets_split_the_models_budget_by_score():
    from adaptive_kv_cache.budgets import headkv_budgets

    scores = torch.tensor([[0.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    b = headkv_budgets(scores, 10, alpha=0.2)
    assert int(b.sum()) == 6 * 10 and (b >= 2).all()
    assert b.tolist() == [[2, 14], [2 + 36, 2], [2, 2]]  # pool 48: 1/4 and 3/4
    assert headkv_budgets(torch.zeros(2, 3), 7, 0.5).tolist() == [[7, 7, 7], [7, 7, 7]]  # no scores: uniform
    odd = headkv_budgets(torch.tensor([[1.0, 1.0, 1.0]]), 5, 0.0)
    assert sorted(odd.flatten().tolist()) == [5, 5, 5] and int(odd.sum()) == 15
    # capped at the prompt: the first head's excess goes to the others by score, the total stays 3 x 10
    assert headkv_budgets(torch.tensor([[6.0, 3.0, 1.0]]), 10, 0.0, cap=12).tolist() == [[12, 12, 6]]
    assert headkv_budgets(torch.tensor([[6.0, 3.0, 1.0]]), 10, 0.0, cap=13).tolist() == [[13, 13, 4]]
    assert headkv_budgets(torch.tensor([[1.0, 0.0, 0.0]]), 10, 0.2, cap=12).tolist() == [[12, 9, 9]]
    assert headkv_budgets(torch.tensor([[6.0, 3.0, 1.0]]), 20, 0.2, cap=12).tolist() == [[12, 12, 12]]  # > prompt


def test_headkv_keeps_each_heads_scored_budget(tiny_llama, tmp_path):
    """Scores written next to a checkpoint (as scripts/score_heads.py does) set each head's budget."""
    path = tmp_path / "head_scores.json"
    scores = [[0.9, 0.02], [0.0, 0.08]]  # the first head's share exceeds its prompt: it is capped
    path.write_text(json.dumps({"scores": scores}))
    prompt = story_tokens(tiny_llama, 100)
    g = compressed(tiny_llama, load_method_config({"method": "headkv", "window": 8, "head_scores": str(path)}))
    cache = g.new_cache([prompt], 100)
    tiny_llama.model.forward(torch.tensor([prompt]), 0, cache)
    expected = headkv_split(load_method_config({"method": "headkv", "head_scores": str(path)}), 50, 100)
    assert [cache.stores[i].lengths for i in range(2)] == expected
    assert sum(map(sum, expected)) == 4 * 50  # the model's budget, exactly: no head holds more than its prompt
    with pytest.raises(KVConfigError, match="score_heads.py"):
        Llama(tiny_llama.model, tiny_llama.tokenizer, kv_config={"method": "headkv"})  # no ckpt_dir scores


def test_score_heads_script_writes_scores_next_to_the_checkpoint(dist, tiny_ckpt_dir, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("score_heads", Path(__file__).parents[1] / "scripts" / "score_heads.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--ckpt_dir", str(tiny_ckpt_dir), "--lengths", "320", "--depths", "0.5", "--trials", "1",
                    "--out", str(tmp_path / "s.json")])
    d = json.loads(out.read_text())
    assert d["items"] == 2 and len(d["scores"]) == 2 and all(len(r) == 2 for r in d["scores"])
    assert all(0 <= x <= 1 for r in d["scores"] for x in r) and sum(map(sum, d["scores"])) > 0
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "bytes"])
def test_token_span_finds_the_planted_fact(stories_dir, tokenizer):
    """The span covers exactly the fact's tokens, whatever the neighbours merged into (hand-built prompts)."""
    from adaptive_kv_cache.methods.headkv import token_span

    class Bytes:  # one token per character: spans are character offsets
        def decode(self, ids):
            return "".join(map(chr, ids))

    if tokenizer == "bytes":
        tok, text = Bytes(), "ab. The code is 12. cd The code is 12."
        ids = [ord(c) for c in text]
        assert token_span(tok, ids, "The code is 12.") == (4, 19)
    else:
        tok = load_tokenizer(str(stories_dir / "tokenizer.model"))
        before, fact, after = tok.encode("Once upon a time", False, False), tok.encode("Tom is 42.", False, False), \
            tok.encode("They played.", False, False)
        assert token_span(tok, before + fact + after, "Tom is 42.") == (len(before), len(before) + len(fact))
    with pytest.raises(ValueError, match="not in the prompt"):
        token_span(tok, ids if tokenizer == "bytes" else before + after, "The code is 13.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_decode_between_evictions_never_synchronises(dist, stories_dir, name):
    """Steady-state decode (no prompt ending, no eviction due) issues no host-device synchronisation."""
    g = Llama.build(str(stories_dir), str(stories_dir / "tokenizer.model"), 256, 1, device="cuda")
    g = compressed(g, config(name, evict_every=8))
    assert_steady_decode_never_synchronises(g, story_tokens(g, 80))
