"""The Llama fork without compression: greedy regression pin, cache equivalence, batching, chat format, errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from llama.chat_format import UNSAFE_ERROR
from llama.generation import Llama
from llama.kv_cache import DenseKVCache

from conftest import LLAMA2_TOKENIZER, TINY_PARAMS

PROMPT = "Once upon a time"
PROMPT_IDS = [1, 403, 407, 261, 378]  # BOS + "Once upon a time" in stories260K's tokenizer
# Greedy (temperature 0) continuation of PROMPT by stories260K: a regression pin, computed once with this code.
GREEDY_IDS = [
    432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
    410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394,
    261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432,
]
GREEDY_TEXT = (
    ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red "
    "ball. She wanted to play with it,"
)
BATCH_PROMPTS = ["Once upon a time", "Lily and Tom went to the park. They", "The cat"]
# float32 logits of a full pass and of a cached token-by-token pass differ by summation order alone: up to
# 1.4e-5 on stories260K (whose full float32 pass is itself 1.5e-5 away from a float64 reference); a cache
# bug (wrong position, mask or slot) shows up as differences above 1e-2.
LOGITS_TOL = dict(rtol=1e-5, atol=2e-5)


def build(ckpt_dir, tokenizer=None, **kw):
    """Llama.build on CPU with the test defaults (max_seq_len 512, max_batch_size 4)."""
    kw.setdefault("max_seq_len", 512)
    kw.setdefault("max_batch_size", 4)
    return Llama.build(str(ckpt_dir), str(tokenizer or ckpt_dir / "tokenizer.model"), device="cpu", **kw)


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def greedy(llama, prompt_tokens, max_gen_len, **kw):
    return llama.generate(prompt_tokens, max_gen_len=max_gen_len, temperature=0.0, **kw)[0]


# --- regression pin --------------------------------------------------------------------------------------------


def test_greedy_continuation_is_pinned(stories_llama):
    tok = stories_llama.tokenizer
    assert encode(stories_llama, PROMPT) == PROMPT_IDS
    assert greedy(stories_llama, [PROMPT_IDS], len(GREEDY_IDS)) == [GREEDY_IDS]
    assert tok.decode(GREEDY_IDS) == GREEDY_TEXT
    out = stories_llama.text_completion([PROMPT], temperature=0.0, max_gen_len=len(GREEDY_IDS))
    assert out == [{"generation": GREEDY_TEXT}]


# --- KV cache equivalence --------------------------------------------------------------------------------------


def incremental_logits(model, tokens, prefill):
    """Logits of `tokens` computed through a DenseKVCache: positions [0, prefill) at once, then one at a time.

    The cache starts with capacity 0, so decoding also exercises its geometric growth.
    """
    cache = DenseKVCache(model.params.n_layers, model.params.max_seq_len)
    chunks = [model(tokens[:, :prefill], 0, cache)]
    for t in range(prefill, tokens.shape[1]):
        chunks.append(model(tokens[:, t : t + 1], t, cache))
    assert cache.length == tokens.shape[1]
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("which", ["stories_llama", "tiny_llama"])
def test_token_by_token_decoding_matches_full_forward_batch1(request, which):
    llama = request.getfixturevalue(which)
    model = llama.model
    tokens = torch.tensor([PROMPT_IDS + GREEDY_IDS])  # 53 positions
    full = model(tokens, 0)
    assert full.shape == (1, tokens.shape[1], model.params.vocab_size)
    inc = incremental_logits(model, tokens, prefill=1)
    torch.testing.assert_close(inc, full, **LOGITS_TOL)
    # the comparison has teeth: a pass that sees the wrong positions gives other logits
    shifted = model(tokens[:, 1:], 0)
    assert (shifted[:, -1] - full[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("which", ["stories_llama", "tiny_llama"])
def test_batched_decoding_of_different_lengths_matches_full_forward(request, which):
    llama = request.getfixturevalue(which)
    model = llama.model
    prompts = [encode(llama, p) for p in BATCH_PROMPTS]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == 3
    T = max(lengths) + 12
    # pad every row to T with arbitrary valid tokens: logits at t depend only on tokens <= t
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.params.vocab_size, (3, T), generator=g)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    full = model(tokens, 0)
    inc = incremental_logits(model, tokens, prefill=min(lengths))  # as Llama.generate feeds it
    torch.testing.assert_close(inc, full, **LOGITS_TOL)
    for b in range(3):  # no leakage between the rows of a batch
        torch.testing.assert_close(full[b : b + 1], model(tokens[b : b + 1], 0), **LOGITS_TOL)


def test_batched_generate_equals_each_prompt_alone(stories_llama):
    prompts = [encode(stories_llama, p) for p in BATCH_PROMPTS]
    batched = greedy(stories_llama, prompts, 30)
    alone = [greedy(stories_llama, [p], 30)[0] for p in prompts]
    assert batched == alone
    assert all(len(t) == 30 for t in alone) and len({tuple(t) for t in alone}) == 3


# --- completion APIs -------------------------------------------------------------------------------------------


def test_text_completion_echo_and_logprobs(stories_llama):
    n = 8
    model, tok = stories_llama.model, stories_llama.tokenizer
    [echoed] = stories_llama.text_completion([PROMPT], temperature=0.0, max_gen_len=n, logprobs=True, echo=True)
    ids = PROMPT_IDS + GREEDY_IDS[:n]
    assert echoed["generation"] == tok.decode(ids)
    assert echoed["tokens"] == [tok.decode([i]) for i in ids]
    assert len(echoed["logprobs"]) == len(ids)
    assert echoed["logprobs"][0] == 0.0  # BOS has no prediction
    expected = F.log_softmax(model(torch.tensor([ids]), 0)[0, :-1], dim=-1)
    expected_chosen = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(echoed["logprobs"][1:]), expected_chosen, rtol=1e-4, atol=1e-4)
    # greedy: each generated token has the largest log-probability of its step
    torch.testing.assert_close(expected_chosen[-n:], expected.max(-1).values[-n:], rtol=0, atol=0)

    [plain] = stories_llama.text_completion([PROMPT], temperature=0.0, max_gen_len=n, logprobs=True)
    assert plain["generation"] == tok.decode(GREEDY_IDS[:n])
    assert len(plain["tokens"]) == len(plain["logprobs"]) == n
    assert plain["logprobs"] == pytest.approx(echoed["logprobs"][-n:], abs=1e-6)


@pytest.mark.parametrize("compress", [False, True])
def test_prompts_fed_in_chunks_generate_like_one_pass(stories_llama, compress):
    """generate feeds long prompts in passes of prefill_chunk tokens: same tokens and log-probabilities."""
    from llama import Llama

    prompts = [encode(stories_llama, p) for p in BATCH_PROMPTS[:2]]  # 5 and 11 tokens
    g = Llama(stories_llama.model, stories_llama.tokenizer, kv_config={"T": 0.9} if compress else None)
    one, one_lp = g.generate(prompts, 12, temperature=0.0, logprobs=True, echo=True)
    g.prefill_chunk = 2  # the shortest prompt takes three passes, the last one token long
    chunked, chunked_lp = g.generate(prompts, 12, temperature=0.0, logprobs=True, echo=True)
    assert chunked == one
    for a, b in zip(chunked_lp, one_lp):
        assert a == pytest.approx(b, abs=1e-4)


def test_chat_prompt_follows_llama2_format(stories_llama):
    tok, fmt = stories_llama.tokenizer, stories_llama.chat_format
    sys_msg, user = "Always answer with a story.", "Tell me about a cat."
    dialog = [{"role": "system", "content": sys_msg}, {"role": "user", "content": user}]
    expected = tok.encode(f"[INST] <<SYS>>\n{sys_msg}\n<</SYS>>\n\n{user} [/INST]", bos=True, eos=False)
    assert fmt.encode_dialog_prompt(dialog) == expected
    assert expected[0] == tok.bos_id and tok.eos_id not in expected

    answer, follow_up = "The cat sat.", "And then?"
    dialog += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
    expected_multi = tok.encode(
        f"[INST] <<SYS>>\n{sys_msg}\n<</SYS>>\n\n{user} [/INST] {answer} ", bos=True, eos=True
    ) + tok.encode(f"[INST] {follow_up} [/INST]", bos=True, eos=False)
    assert fmt.encode_dialog_prompt(dialog) == expected_multi
    assert expected_multi.count(tok.bos_id) == 2 and expected_multi.count(tok.eos_id) == 1


def test_chat_completion_is_generate_on_the_chat_prompt(stories_llama):
    dialogs = [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Once upon a time"}],
        [{"role": "user", "content": "Lily had a dog."}],
    ]
    out = stories_llama.chat_completion(dialogs, temperature=0.0, max_gen_len=16, logprobs=True)
    prompts = [stories_llama.chat_format.encode_dialog_prompt(d) for d in dialogs]
    expected = greedy(stories_llama, prompts, 16, stop_tokens=frozenset({stories_llama.tokenizer.eos_id}))
    assert [o["generation"] for o in out] == [
        {"role": "assistant", "content": stories_llama.tokenizer.decode(t)} for t in expected
    ]
    assert [len(o["logprobs"]) for o in out] == [len(t) for t in expected]
    assert [len(o["tokens"]) for o in out] == [len(t) for t in expected]
    assert all(len(t) > 0 for t in expected)


def test_chat_completion_refuses_special_tags_in_content(stories_llama):
    dialogs = [[{"role": "user", "content": "hi [INST] there"}], [{"role": "user", "content": "hi"}]]
    out = stories_llama.chat_completion(dialogs, temperature=0.0, max_gen_len=4)
    assert out[0]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    assert out[1]["generation"]["content"] != UNSAFE_ERROR


def test_each_sequence_stops_at_its_own_stop_token(stories_llama):
    p1 = PROMPT_IDS  # greedy starts with GREEDY_IDS[0] (",")
    p2 = encode(stories_llama, "The cat")
    stop = frozenset({GREEDY_IDS[0]})
    alone2 = greedy(stories_llama, [p2], 20, stop_tokens=stop)[0]
    assert len(alone2) == 20 and GREEDY_IDS[0] not in alone2  # precondition: p2 never emits the stop token
    assert greedy(stories_llama, [p1, p2], 20, stop_tokens=stop) == [[], alone2]

    # a batch whose sequences all stopped ends the generation: only the prompt pass ran
    assert greedy(stories_llama, [p1], 20, stop_tokens=stop) == [[]]
    assert stories_llama.kv_stats["tokens"] == len(p1)
    # the default stop token is EOS
    assert stories_llama.tokenizer.eos_id in stories_llama.tokenizer.stop_tokens


# --- bad input -------------------------------------------------------------------------------------------------


def test_build_missing_checkpoint_dir(dist, tmp_path, stories_dir):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory .*nope not found"):
        build(tmp_path / "nope", stories_dir / "tokenizer.model")


def test_build_dir_without_pth_files(dist, tmp_path, stories_dir):
    shutil.copyfile(stories_dir / "params.json", tmp_path / "params.json")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint files \(\*\.pth\)"):
        build(tmp_path, stories_dir / "tokenizer.model")


def test_build_shard_count_differs_from_world_size(dist, tmp_path, stories_dir):
    for name in ("consolidated.00.pth", "consolidated.01.pth"):
        shutil.copyfile(stories_dir / "consolidated.00.pth", tmp_path / name)
    shutil.copyfile(stories_dir / "params.json", tmp_path / "params.json")
    with pytest.raises(ValueError, match=r"holds 2 checkpoint shards but the run has 1 model-parallel ranks"):
        build(tmp_path, stories_dir / "tokenizer.model")


def test_build_missing_params_json(dist, tmp_path, stories_dir):
    shutil.copyfile(stories_dir / "consolidated.00.pth", tmp_path / "consolidated.00.pth")
    with pytest.raises(FileNotFoundError, match=r"params\.json not found"):
        build(tmp_path, stories_dir / "tokenizer.model")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"dim": 64, "n_layers": 5,', r"params\.json is not valid JSON \(line 1"),
        (json.dumps({**TINY_PARAMS, "n_head": 4}), r"unknown keys \['n_head'\]"),
    ],
    ids=["invalid_json", "unknown_key"],
)
def test_build_malformed_params_json(dist, tmp_path, stories_dir, text, message):
    shutil.copyfile(stories_dir / "consolidated.00.pth", tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        build(tmp_path, stories_dir / "tokenizer.model")


def test_build_tokenizer_vocab_differs_from_model(dist, stories_dir):
    assert LLAMA2_TOKENIZER.is_file(), f"{LLAMA2_TOKENIZER} missing"
    with pytest.raises(ValueError, match=r"has 32000 tokens but the model in .* has vocab_size=512"):
        build(stories_dir, LLAMA2_TOKENIZER)


def test_prompt_longer_than_max_seq_len(stories_llama):
    with pytest.raises(ValueError, match=r"prompt 1 has 513 tokens, more than max_seq_len=512"):
        greedy(stories_llama, [PROMPT_IDS, [1] + [300] * 512], 4)


def test_more_prompts_than_max_batch_size(stories_llama):
    with pytest.raises(ValueError, match=r"5 prompts exceed max_batch_size=4"):
        stories_llama.text_completion([PROMPT] * 5, max_gen_len=4)


def test_empty_prompt(stories_llama):
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        greedy(stories_llama, [PROMPT_IDS, []], 4)


SYS = {"role": "system", "content": "s"}
USER = {"role": "user", "content": "u"}
ASSISTANT = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([USER, USER], r"dialog 1, message 1: expected role 'assistant'.*got 'user'"),
        ([USER, ASSISTANT, SYS, USER], r"dialog 1, message 2: expected role 'user'.*got 'system'"),
        ([{"role": "bot", "content": "x"}], r"dialog 1, message 0: role 'bot' is not one of"),
        ([USER, ASSISTANT], r"dialog 1: the last message must come from the user, got 'assistant'"),
        ([], r"dialog 1: expected a non-empty list"),
        ([SYS], r"dialog 1: a system message must be followed by a user message"),
        ([{"role": "user", "content": 5}], r"dialog 1, message 0: content must be a string, got int"),
        ([{"role": "user"}], r"dialog 1, message 0: expected a dict with exactly 'role' and 'content'"),
    ],
    ids=["wrong_order", "late_system", "bad_role", "ends_with_assistant", "empty", "system_only",
         "non_string_content", "missing_content"],
)
def test_malformed_dialog(stories_llama, dialog, message):
    with pytest.raises(ValueError, match=message):
        stories_llama.chat_completion([[USER], dialog], max_gen_len=4)
