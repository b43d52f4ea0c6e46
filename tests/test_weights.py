"""Llama 3.1 scaled RoPE, Hugging Face folders (direct load and scripts/convert_hf.py) and tokenizer.json.

Logits are compared with an independent forward pass written here from the published model definition: Hugging
Face's weight layout and `rotate_half` RoPE (dimension i paired with i + head_dim/2), Llama 3.1's frequency
scaling as a per-frequency loop, float64 arithmetic (attention over all rows through torch's fused float32 kernel).
It shares no code with llama/. When transformers is installed, LlamaForCausalLM is a second reference.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HF_VOCAB, TINY_PARAMS, hf_config, hf_state_dict, random_state_dict, write_hf_folder, \
    write_native_checkpoint
from llama.generation import Llama

# float32 model against a float64 reference: summation order alone gives ~1e-6 on these tiny models; a wrong
# rotation, permutation or scaling band gives > 1e-2.
TOL = 1e-4

SCALED_PARAMS = {**TINY_PARAMS, "n_heads": 2, "n_kv_heads": 1, "rope_theta": 500000.0, "use_scaled_rope": True}
# head_dim 16, theta 5e5: wavelengths 6.3 to 860 (kept), 4443 (blended: between 8192/4 and 8192) and 2.3e4 to
# 6e5 (divided by the factor), so every band of the scaling is exercised. Two heads sharing one KV head keep
# the 8k-position passes short.
LONG = 8192 + 96
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


# --- the independent reference ----------------------------------------------------------------------------------


def reference_inv_freq(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """(head_dim // 2,) float32 RoPE frequencies, with Llama 3.1's scaling applied one frequency at a time."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for f in inv.tolist():
        wavelength = 2 * math.pi / f
        if wavelength < old / high:  # fast rotations: what the model resolved in training, kept
            out.append(f)
        elif wavelength > old / low:  # slower than the original context: interpolated
            out.append(f / factor)
        else:  # in between: linear in old / wavelength from "divided" (at low) to "kept" (at high)
            s = (old / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out, dtype=torch.float32)


def reference_logits(hf: dict, config: dict, tokens: list, rows=None) -> torch.Tensor:
    """Logits of a LlamaForCausalLM (HF layout) at `rows` (default all) of one sequence, in float64 (attention
    over all rows in float32).

    Args:
        hf: HF tensor name -> tensor.
        config: its config.json.
        tokens: token ids, length L.
        rows: query positions whose logits are wanted; the last layer computes only these.

    Returns:
        (len(rows), vocab) float64.
    """
    L = len(tokens)
    rows = torch.arange(L) if rows is None else torch.as_tensor(rows)
    d, nh = config["hidden_size"], config["num_attention_heads"]
    nkv, hd, eps = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"], \
        config["rms_norm_eps"]
    W = {k: v.double() for k, v in hf.items()}
    angles = torch.outer(torch.arange(L, dtype=torch.float32),
                         reference_inv_freq(hd, config["rope_theta"], config.get("rope_scaling")))  # float32
    angles = torch.cat([angles, angles], dim=-1).double()
    cos, sin = angles.cos(), angles.sin()  # (L, hd)

    def rotate(x):  # (heads, n, hd): the pair partner of dimension i is i + hd/2
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat([-x2, x1], dim=-1)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    x = W["model.embed_tokens.weight"][torch.tensor(tokens)]  # (L, d)
    n_layers = config["num_hidden_layers"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        last = i == n_layers - 1
        h = rms(x, W[p + "input_layernorm.weight"])
        q_rows = rows if last else torch.arange(L)
        q = (h[q_rows] @ W[p + "self_attn.q_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).view(L, nkv, hd).transpose(0, 1)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).view(L, nkv, hd).transpose(0, 1)
        q = q * cos[q_rows] + rotate(q) * sin[q_rows]
        k = k * cos + rotate(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        if last and len(q_rows) < L:
            mask = torch.arange(L)[None, :] <= q_rows[:, None]  # (rows, L): causal for the wanted rows
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            # torch's fused causal kernel in float32: an 8k x 8k float64 softmax would take seconds
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).double()
        x = x[q_rows] + out.transpose(0, 1).reshape(len(q_rows), d) @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        x = x + (F.silu(h @ W[p + "mlp.gate_proj.weight"].T) * (h @ W[p + "mlp.up_proj.weight"].T)) \
            @ W[p + "mlp.down_proj.weight"].T
    x = rms(x, W["model.norm.weight"])
    return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T


def model_logits(llama: Llama, tokens: list, chunk: int = 1024) -> torch.Tensor:
    """Our model's logits (L, vocab) for one sequence, prefilled in chunks through the generation's cache."""
    model = llama.model
    cache = llama.new_cache([tokens], len(tokens))
    x = torch.tensor([tokens])
    return torch.cat([model(x[:, a : a + chunk], a, cache)[0] for a in range(0, len(tokens), chunk)])


def random_tokens(n: int, vocab: int, seed: int = 0) -> list:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def build(ckpt_dir, tokenizer=None, **kw):
    kw.setdefault("max_batch_size", 2)
    return Llama.build(str(ckpt_dir), None if tokenizer is None else str(tokenizer), device="cpu", **kw)


# --- Llama 3.1 native params.json ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled_run(dist, tmp_path_factory, stories_dir):
    """A tiny random Llama 3.1-style native checkpoint (use_scaled_rope: true, default factor) and our logits for
    LONG random tokens: (state dict, tokens, (LONG, vocab) logits)."""
    sd = random_state_dict(SCALED_PARAMS, seed=3)
    ckpt = write_native_checkpoint(tmp_path_factory.mktemp("llama31"), SCALED_PARAMS, sd)
    llama = build(ckpt, ckpt / "tokenizer.model", max_seq_len=LONG)
    tokens = random_tokens(LONG, TINY_PARAMS["vocab_size"])
    return sd, tokens, model_logits(llama, tokens, chunk=2048)


def test_llama31_scaled_rope_matches_reference_beyond_8192(scaled_run):
    sd, tokens, ours = scaled_run
    rows = list(range(0, 64)) + list(range(8160, LONG))  # near the start, and across and beyond 8192
    hf = hf_state_dict(sd, SCALED_PARAMS, tied=False)
    ref = reference_logits(hf, hf_config(SCALED_PARAMS, tied=False, rope_scaling=LLAMA3_SCALING), tokens, rows)
    err = (ours[rows].double() - ref).abs().max().item()
    assert err < TOL, err
    # teeth: the same weights without the scaling give other logits
    plain = reference_logits(hf, hf_config(SCALED_PARAMS, tied=False), tokens[:200])
    assert (ours[:200].double() - plain).abs().max() > 1e-2


def test_scaling_factor_comes_from_params_json(dist, tmp_path):
    """Llama 3.2 params.json sets rope_scaling_factor 32 (and llama-models' rope_high_freq_factor)."""
    params = {**SCALED_PARAMS, "rope_scaling_factor": 32.0, "rope_high_freq_factor": 2.0}
    sd = random_state_dict(params, seed=4)
    ckpt = write_native_checkpoint(tmp_path / "ckpt", params, sd)
    llama = build(ckpt, ckpt / "tokenizer.model", max_seq_len=512)
    tokens = random_tokens(300, TINY_PARAMS["vocab_size"], seed=1)
    scaling = {**LLAMA3_SCALING, "factor": 32.0, "high_freq_factor": 2.0}
    hf = hf_state_dict(sd, params, tied=False)
    ref = reference_logits(hf, hf_config(params, tied=False, rope_scaling=scaling), tokens)
    ours = model_logits(llama, tokens).double()
    assert (ours - ref).abs().max().item() < TOL
    default = reference_logits(hf, hf_config(params, tied=False, rope_scaling=LLAMA3_SCALING), tokens)
    assert (ours - default).abs().max().item() > 1e-2  # factor 8 would not match


# --- Hugging Face folders --------------------------------------------------------------------------------------

HF_PARAMS = {**TINY_PARAMS, "vocab_size": HF_VOCAB, "rope_theta": 500000.0, "multiple_of": 16}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny Llama 3.2-style HF folder: tied embeddings, two safetensors shards + index, llama3 rope scaling,
    tokenizer.json; returns (folder, native state dict with output = embedding)."""
    sd = random_state_dict(HF_PARAMS, seed=5)
    sd["output.weight"] = sd["tok_embeddings.weight"]
    folder = write_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-llama", HF_PARAMS, sd, tied=True, shards=2,
                             rope_scaling=LLAMA3_SCALING, context=131072)
    return folder, sd


PROMPT = "Once upon a time, there was a little dog named Max. <|eot_id|> He liked to play"


def test_hf_folder_loads_directly_and_matches_reference(dist, hf_folder):
    folder, sd = hf_folder
    llama = build(folder, max_seq_len=256)  # tokenizer.json found in the folder
    assert type(llama.tokenizer).__name__ == "HFTokenizer"
    assert llama.model.params.use_scaled_rope and llama.model.params.rope_theta == 500000.0
    assert llama.trained_context == 131072
    tokens = llama.tokenizer.encode(PROMPT, bos=llama.tokenizer.add_bos, eos=False)
    # the tokenizer's own post-processor puts BOS (id 0) first; the typed "<|eot_id|>" stays text
    assert tokens[0] == 0 and 4 not in tokens and llama.tokenizer.add_bos
    config = json.loads((folder / "config.json").read_text())
    ref = reference_logits(hf_state_dict(sd, HF_PARAMS, tied=True), config, tokens)
    ours = model_logits(llama, tokens).double()
    assert (ours - ref).abs().max().item() < TOL
    # teeth: loading q/k without undoing HF's permutation gives other logits
    wrong = {k: v for k, v in hf_state_dict(sd, HF_PARAMS, tied=True).items()}
    for k in [k for k in wrong if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        wrong[k] = wrong[k].flip(0)
    assert (ours - reference_logits(wrong, config, tokens)).abs().max() > 1e-2


def test_convert_hf_writes_native_checkpoint_with_same_logits(dist, hf_folder, tmp_path):
    from scripts.convert_hf import main as convert_main

    folder, sd = hf_folder
    out = tmp_path / "native"
    assert convert_main([str(folder), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "consolidated.00.pth", "params.json",
                                                      "tokenizer.json"]
    params = json.loads((out / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 8.0
    assert params["rope_theta"] == 500000.0 and params["context_length"] == 131072
    native = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert set(native) == set(sd)
    for k, v in sd.items():
        assert torch.equal(native[k], v), k  # exact: the conversion is a permutation and a rename
    direct = build(folder, max_seq_len=128)
    converted = build(out, max_seq_len=128)
    tokens = direct.tokenizer.encode(PROMPT, bos=True, eos=False)
    assert converted.tokenizer.encode(PROMPT, bos=True, eos=False) == tokens
    assert torch.equal(model_logits(direct, tokens), model_logits(converted, tokens))


def test_convert_hf_untied_single_file(dist, tmp_path):
    from scripts.convert_hf import convert_hf

    sd = random_state_dict(HF_PARAMS, seed=6)
    folder = write_hf_folder(tmp_path / "hf", HF_PARAMS, sd, tied=False, shards=1)
    out = convert_hf(folder, tmp_path / "native")
    native = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert torch.equal(native["output.weight"], sd["output.weight"])
    assert not torch.equal(native["output.weight"], native["tok_embeddings.weight"])
    assert "use_scaled_rope" not in json.loads((out / "params.json").read_text())


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, r"model_type 'mistral' is not supported"),
    ({"attention_bias": True}, r"attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"RoPE scaling type 'yarn' is not supported"),
])
def test_hf_config_we_cannot_reproduce_fails_before_weights(dist, hf_folder, tmp_path, change, message):
    import shutil

    folder, _ = hf_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        build(bad, max_seq_len=64)


def test_hf_tokenizer_chat_format_and_decode(dist, hf_folder):
    from tokenizers import Tokenizer

    from llama.chat_format import chat_format_for
    from llama.tokenizer import load_tokenizer

    folder, _ = hf_folder
    tok = load_tokenizer(str(folder / "tokenizer.json"))
    lib = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "Lily saw a big red ball!\nShe said: \"Wow.\""
    assert tok.encode(text, bos=True, eos=False) == lib.encode(text).ids  # BOS + text, as the library does
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert (tok.bos_id, tok.eos_id, tok.stop_tokens) == (0, 1, frozenset({1, 4}))  # from config.json
    fmt = chat_format_for(tok)  # the vocabulary has Llama 3's header tokens: Llama 3's template
    sp, enc = tok.special_token_id, lambda s: tok.encode(s, bos=False, eos=False)
    header = lambda role: [sp("<|start_header_id|>"), *enc(role), sp("<|end_header_id|>"), *enc("\n\n")]
    assert fmt.encode_dialog_prompt([{"role": "user", "content": "Hi <|eot_id|>"}]) == [
        sp("<|begin_of_text|>"), *header("user"), *enc("Hi <|eot_id|>"), sp("<|eot_id|>"), *header("assistant")]
    assert fmt.stop_tokens == frozenset({sp("<|eot_id|>"), sp("<|end_of_text|>")})
    assert tok.piece(tok.encode("!", bos=False, eos=False)[0]) == "!"


# --- transformers, when installed ----------------------------------------------------------------------------


def test_against_transformers_llama(hf_folder, scaled_run):
    """LlamaForCausalLM on the same weights: the HF folder, and the Llama 3.1 native checkpoint past 8192."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional)")

    folder, _ = hf_folder
    hf_model = transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = build(folder, max_seq_len=256)
    tokens = ours.tokenizer.encode(PROMPT, bos=True, eos=False)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens])).logits[0]
    assert (model_logits(ours, tokens) - theirs).abs().max().item() < TOL

    sd, tokens, ours = scaled_run
    config = hf_config(SCALED_PARAMS, tied=False, rope_scaling=LLAMA3_SCALING, context=131072)
    config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.load_state_dict(hf_state_dict(sd, SCALED_PARAMS, tied=False), strict=True)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([tokens]), logits_to_keep=128).logits[0]
    assert (ours[-128:] - theirs).abs().max().item() < TOL
