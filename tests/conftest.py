"""Shared fixtures: the shared assets, a one-process distributed group, stories260K and a tiny random model.

Session fixtures build each model once; tests must not change a shared model's state (build a separate
`Llama(model, tokenizer, kv_config=...)` around `stories_llama.model` for a compressed run instead of calling
`set_kv_config` on the shared one).
"""

import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` from anywhere, without pytest.ini's pythonpath
    sys.path.insert(0, str(REPO))

from llama.generation import Llama, _init_distributed  # noqa: E402
from llama.model import ModelArgs  # noqa: E402

# The models are tiny: one thread is faster than two, and far faster when other jobs share the cores
# (intra-op threads then spin against each other: 15 ms instead of 3 us for a small softmax).
torch.set_num_threads(1)

SHARED = REPO.parent / "shared"
STORIES_DIR = SHARED / "models" / "stories260K"
STORIES_TOKENIZER = STORIES_DIR / "tokenizer.model"
LLAMA2_TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"

TINY_PARAMS = {
    "dim": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 512,
    "multiple_of": 8,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
}


def _require(path: Path) -> Path:
    """Fails (never skips) when a shared asset is missing: the tests are meaningless without it."""
    if not path.exists():
        pytest.fail(f"shared asset {path} is missing; the shared/ folder must sit next to the repository")
    return path


def random_state_dict(params: Dict, seed: int = 0, scale: float = 0.2) -> Dict[str, torch.Tensor]:
    """Random float32 weights in the native (Meta) layout for `params`.

    Linear and embedding weights are N(0, scale^2); norm weights are 1 + N(0, 0.1^2). `scale` around 0.2 keeps
    attention far from uniform for a small model.
    """
    args = ModelArgs(**params)
    g = torch.Generator().manual_seed(seed)
    head_dim, hidden = args.head_dim, args.hidden_dim
    kv = args.n_kv_heads * head_dim

    def w(*shape):
        return torch.randn(*shape, generator=g) * scale

    def norm():
        return 1.0 + 0.1 * torch.randn(args.dim, generator=g)

    sd = {"tok_embeddings.weight": w(args.vocab_size, args.dim), "norm.weight": norm(),
          "output.weight": w(args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd.update({
            p + "attention.wq.weight": w(args.n_heads * head_dim, args.dim),
            p + "attention.wk.weight": w(kv, args.dim),
            p + "attention.wv.weight": w(kv, args.dim),
            p + "attention.wo.weight": w(args.dim, args.n_heads * head_dim),
            p + "feed_forward.w1.weight": w(hidden, args.dim),
            p + "feed_forward.w2.weight": w(args.dim, hidden),
            p + "feed_forward.w3.weight": w(hidden, args.dim),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        })
    return sd


def write_native_checkpoint(out_dir: Path, params: Dict, state_dict: Dict[str, torch.Tensor],
                            tokenizer: Optional[Path] = STORIES_TOKENIZER) -> Path:
    """Writes params.json, consolidated.00.pth and (if given) a copy of `tokenizer` as tokenizer.model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params))
    torch.save(state_dict, out_dir / "consolidated.00.pth")
    if tokenizer is not None:
        shutil.copyfile(_require(Path(tokenizer)), out_dir / "tokenizer.model")
    return out_dir


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared read-only assets folder (`../shared` next to the repository)."""
    return _require(SHARED)


@pytest.fixture(scope="session")
def stories_dir(shared_dir) -> Path:
    """stories260K in native format: consolidated.00.pth, params.json, tokenizer.model."""
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model"):
        _require(STORIES_DIR / name)
    return STORIES_DIR


@pytest.fixture(scope="session")
def dist() -> None:
    """A single-process gloo group with fairscale model parallel size 1, initialised once per session."""
    from fairscale.nn.model_parallel.initialize import (
        get_model_parallel_world_size,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    _init_distributed()
    if not model_parallel_is_initialized():
        initialize_model_parallel(1)
    assert get_model_parallel_world_size() == 1


@pytest.fixture(scope="session")
def stories_llama(dist, stories_dir) -> Llama:
    """stories260K, uncompressed, CPU float32, max_seq_len 512, max_batch_size 4."""
    return Llama.build(str(stories_dir), str(stories_dir / "tokenizer.model"), max_seq_len=512, max_batch_size=4,
                       device="cpu")


@pytest.fixture(scope="session")
def make_random_ckpt(tmp_path_factory, stories_dir) -> Callable[..., Path]:
    """Factory: `make_random_ckpt(params, seed=0, scale=0.2)` writes a random native checkpoint to a new
    temp dir (with stories260K's tokenizer.model, so vocab_size must be 512) and returns the dir."""

    def make(params: Dict, seed: int = 0, scale: float = 0.2) -> Path:
        out = tmp_path_factory.mktemp("random_ckpt")
        return write_native_checkpoint(out, params, random_state_dict(params, seed, scale),
                                       stories_dir / "tokenizer.model")

    return make


@pytest.fixture(scope="session")
def tiny_ckpt_dir(make_random_ckpt) -> Path:
    """A tiny random model (TINY_PARAMS, seed 0, scale 0.2) with stories260K's tokenizer, in native format."""
    return make_random_ckpt(TINY_PARAMS, seed=0, scale=0.2)


@pytest.fixture(scope="session")
def tiny_llama(dist, tiny_ckpt_dir) -> Llama:
    """The tiny random model, uncompressed, CPU float32, max_seq_len 256, max_batch_size 4."""
    return Llama.build(str(tiny_ckpt_dir), str(tiny_ckpt_dir / "tokenizer.model"), max_seq_len=256,
                       max_batch_size=4, device="cpu")


# --- Hugging Face folders made in the tests --------------------------------------------------------------------

HF_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
HF_VOCAB = 384


def write_hf_tokenizer(out_dir: Path, vocab_size: int = HF_VOCAB) -> Path:
    """A Llama 3-style byte-level BPE tokenizer.json trained on the shared TinyStories text (deterministic).

    Its post-processor puts <|begin_of_text|> (id 0) in front of every text, as Llama 3's does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=HF_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_require(SHARED / "data" / "tinystories_valid.txt").read_text()], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    assert tok.get_vocab_size() == vocab_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF q/k row order, as HF's convert_llama_weights_to_hf does: in each head, the first and second
    members of the rotary pairs (rows 2j, 2j + 1) become the first and second halves (rows j, half + j)."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(native: Dict[str, torch.Tensor], params: Dict, tied: bool) -> Dict[str, torch.Tensor]:
    """A native state dict in Hugging Face's LlamaForCausalLM names and q/k row order (lm_head left out when
    `tied`: the embedding then serves as the output projection)."""
    args = ModelArgs(**params)
    out = {"model.embed_tokens.weight": native["tok_embeddings.weight"], "model.norm.weight": native["norm.weight"]}
    if not tied:
        out["lm_head.weight"] = native["output.weight"]
    names = {"attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = hf_permute(native[p + "attention.wq.weight"], args.n_heads)
        out[q + "self_attn.k_proj.weight"] = hf_permute(native[p + "attention.wk.weight"], args.n_kv_heads)
        for a, b in names.items():
            out[q + b] = native[p + a]
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(params: Dict, tied: bool, rope_scaling: Optional[Dict] = None, context: int = 4096) -> Dict:
    """config.json of a LlamaForCausalLM with the shape of `params` (legacy rope_theta / rope_scaling keys, as
    the Hub's Llama 3.x folders have them)."""
    args = ModelArgs(**params)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": context, "tie_word_embeddings": tied,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "bos_token_id": 0,
        "eos_token_id": [1, 4], "torch_dtype": "float32",
    }


def write_hf_folder(out_dir: Path, params: Dict, native: Dict[str, torch.Tensor], tied: bool = True,
                    shards: int = 2, rope_scaling: Optional[Dict] = None, context: int = 4096) -> Path:
    """A Hugging Face folder: config.json, `shards` safetensors files (+ index when > 1), tokenizer.json."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(params, tied, rope_scaling, context), indent=1))
    sd = hf_state_dict(native, params, tied)
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(out_dir / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s::shards]}
            save_file(part, str(out_dir / fname))
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    write_hf_tokenizer(out_dir, params["vocab_size"])
    return out_dir


SMOLLM2_TOKENIZER = REPO / "models" / "SmolLM2-135M-Instruct" / "tokenizer.gguf"


@pytest.fixture(scope="session", params=["llama2", "chatml"])
def task_builder(request, stories_dir):
    """benchmarks.tasks.TaskBuilder for each chat format: Llama 2 `[INST]` (stories260K's SentencePiece
    tokenizer) and ChatML (SmolLM2's BPE tokenizer; skipped where the converted model is absent)."""
    from benchmarks.tasks import TaskBuilder, TaskText
    from llama.chat_format import chat_format_for
    from llama.tokenizer import load_tokenizer

    if request.param == "chatml" and not SMOLLM2_TOKENIZER.is_file():
        pytest.skip(f"{SMOLLM2_TOKENIZER} not converted")
    path = stories_dir / "tokenizer.model" if request.param == "llama2" else SMOLLM2_TOKENIZER
    tok = load_tokenizer(str(path))
    fmt = chat_format_for(tok)
    assert type(fmt).__name__ == ("Llama2ChatFormat" if request.param == "llama2" else "HeaderChatFormat")
    return TaskBuilder(TaskText(tok), fmt)
