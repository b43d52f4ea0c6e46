"""SmolLM2-135M-Instruct (GGUF-converted) through our Transformer: facts, ChatML, decoding, long context.

The model is produced by `python scripts/setup_models.py` (CI runs it first); a missing model fails, never skips.
"""

from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.kv_cache import DenseKVCache

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def smollm2(dist) -> Llama:
    for name in ("consolidated.00.pth", "params.json", "tokenizer.gguf"):
        if not (MODEL_DIR / name).is_file():
            pytest.fail(f"{MODEL_DIR / name} is missing: run `python scripts/setup_models.py` first")
    return Llama.build(str(MODEL_DIR), str(MODEL_DIR / "tokenizer.gguf"), max_seq_len=2048, max_batch_size=2,
                       device="cpu")


def test_greedy_completion_knows_berlin(smollm2):
    out = smollm2.text_completion(["The capital of France is Paris. The capital of Germany is"], temperature=0,
                                  max_gen_len=8)
    assert "Berlin" in out[0]["generation"]


def test_chatml_prompt_is_exact(smollm2):
    tok = smollm2.tokenizer
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = smollm2.chat_format.encode_dialog_prompt(dialog)
    start, end = tok.encode_special("<|im_start|>"), tok.encode_special("<|im_end|>")
    text = lambda s: tok.encode(s, bos=False, eos=False)  # noqa: E731
    expected = ([start] + text("system\nBe brief.") + [end] + text("\n") + [start] + text("user\nHi there") + [end]
                + text("\n") + [start] + text("assistant\n"))
    assert ids == expected
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert smollm2.chat_format.stop_tokens == {end}


def test_chat_answers_paris_and_stops_at_im_end(smollm2):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    answer = smollm2.chat_completion([dialog], temperature=0, max_gen_len=64)[0]["generation"]["content"]
    assert "Paris" in answer
    # the answer ended because the model produced <|im_end|>, not because max_gen_len ran out
    prompt = smollm2.chat_format.encode_dialog_prompt(dialog)
    unstopped, _ = smollm2.generate([prompt], 64, temperature=0, stop_tokens=frozenset({-1}))
    n = len(smollm2.tokenizer.encode(answer, bos=False, eos=False))
    assert n < 64
    assert unstopped[0][n] == smollm2.tokenizer.encode_special("<|im_end|>")


def test_incremental_decoding_equals_full_forward(smollm2):
    ids = smollm2.tokenizer.encode("Once upon a time, in a small village by the sea, there lived an old fisherman "
                                   "who told stories to every child he met.", bos=False, eos=False)
    tokens = torch.tensor([ids])
    full = smollm2.model.forward(tokens, 0)
    cache = DenseKVCache(smollm2.model.params.n_layers, 2048)
    P = 8
    steps = [smollm2.model.forward(tokens[:, :P], 0, cache)]
    steps += [smollm2.model.forward(tokens[:, p : p + 1], p, cache) for p in range(P, len(ids))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_config", [None, {"T": 0.95}], ids=["uncompressed", "fastgen"])
def test_long_context_fact_from_the_start(smollm2, shared_dir, kv_config):
    """A fact stated at the start of a ~1,800-token prompt is answered after ~1,740 tokens of filler."""
    tok = smollm2.tokenizer
    text = (shared_dir / "data" / "tinystories_valid.txt").read_text()
    filler = tok.decode(tok.encode(text, bos=False, eos=False)[:1740])
    dialog = [{"role": "user", "content": f'The secret word is "pineapple". Remember it.\n\n{filler}\n\n'
                                          f"What was the secret word?"}]
    prompt = smollm2.chat_format.encode_dialog_prompt(dialog)
    assert 1750 <= len(prompt) <= 1850
    g = Llama(smollm2.model, tok, kv_config=kv_config)
    out, _ = g.generate([prompt], 16, temperature=0, stop_tokens=g.chat_format.stop_tokens)
    assert "pineapple" in tok.decode(out[0]).lower()
    if kv_config is not None:
        total = g.kv_stats["total"]
        assert total["allocated_bytes"] < 0.75 * total["raw_bytes"]
