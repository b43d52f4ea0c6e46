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
