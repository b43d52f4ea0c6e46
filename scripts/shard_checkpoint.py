"""Splits a single-file native checkpoint into N model-parallel shards for `torchrun --nproc_per_node N`.

Rank r's `consolidated.{r:02d}.pth` holds the slices that fairscale's layers in llama/model.py own on rank r:

    ColumnParallelLinear  wq, wk, wv, w1, w3, output   split along dim 0 (output features)
    RowParallelLinear     wo, w2                       split along dim 1 (input features)
    VocabParallelEmbedding tok_embeddings              split along dim 0 (vocabulary)
    RMSNorm weights                                    replicated

params.json is copied unchanged, and tokenizer.model too when present.

Usage:
    python scripts/shard_checkpoint.py models/stories260K models/stories260K-mp2 2
"""

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Union

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama.generation import load_params  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from scripts.convert_llama2c import write_files_atomically  # noqa: E402

PathLike = Union[str, os.PathLike]

SPLIT_DIM = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
    "tok_embeddings.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w2.weight": 1,
}
REPLICATED = ("attention_norm.weight", "ffn_norm.weight", "norm.weight")


def _suffix(key: str) -> str:
    """`layers.3.attention.wq.weight` -> `attention.wq.weight`; top-level keys are returned unchanged."""
    parts = key.split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" and len(parts) > 2 else key


def split_state_dict(sd: Dict[str, torch.Tensor], n: int) -> List[Dict[str, torch.Tensor]]:
    """The n per-rank state dicts of a full state dict (tensors are contiguous copies)."""
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, t in sd.items():
        suffix = _suffix(key)
        if suffix in SPLIT_DIM:
            dim = SPLIT_DIM[suffix]
            if t.shape[dim] % n:
                raise ValueError(f"{key} has {t.shape[dim]} rows along dim {dim}, not divisible by {n} shards")
            pieces = torch.chunk(t, n, dim=dim)
        elif suffix in REPLICATED:
            pieces = [t] * n
        else:
            raise ValueError(
                f"unexpected tensor {key!r} in the checkpoint; shard_checkpoint knows the Llama layers "
                f"({sorted(SPLIT_DIM)} split, {list(REPLICATED)} replicated): remove it or convert the "
                f"checkpoint to the native layout first"
            )
        for r, piece in enumerate(pieces):
            shards[r][key] = piece.clone().contiguous()
    return shards


def shard_checkpoint(src_dir: PathLike, out_dir: PathLike, n: int) -> Path:
    """Writes `out_dir/consolidated.00.pth .. consolidated.{n-1:02d}.pth`, params.json and tokenizer.model.

    Args:
        src_dir: native checkpoint directory with exactly one `*.pth` file and params.json.
        out_dir: destination directory (created if missing).
        n: number of model-parallel ranks; must divide n_heads, n_kv_heads, the FFN hidden size and the vocabulary.

    Returns:
        Path: out_dir.
    """
    src, out = Path(src_dir), Path(out_dir)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of shards n={n!r} must be a positive integer")
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {src} not found; pass a folder with consolidated.00.pth "
                                f"and params.json")
    if src.resolve() == out.resolve():
        raise ValueError(f"output directory {out} is the source directory; write the shards to a new directory")
    pths = sorted(src.glob("*.pth"))
    if len(pths) != 1:
        raise ValueError(
            f"{src} holds {len(pths)} checkpoint files ({[p.name for p in pths]}); shard_checkpoint splits a "
            f"single-file checkpoint: pass a directory with exactly one consolidated.00.pth"
        )
    params = load_params(src)
    sd = torch.load(pths[0], map_location="cpu", weights_only=True)
    if "tok_embeddings.weight" not in sd:
        raise ValueError(f"{pths[0]} has no tok_embeddings.weight; it is not a native Llama checkpoint")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size == -1:
        vocab_size = sd["tok_embeddings.weight"].shape[0]
    args = ModelArgs(**{**params, "vocab_size": vocab_size})
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "hidden_dim": args.hidden_dim,
             "vocab_size": vocab_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
    if bad:
        ok = [d for d in range(1, args.n_kv_heads + 1) if all(v % d == 0 for v in sizes.values())]
        raise ValueError(f"cannot split {src} into {n} shards: {', '.join(bad)} not divisible by {n}; "
                         f"shard counts that work: {ok}")
    stale = sorted(p.name for p in out.glob("*.pth")) if out.is_dir() else []
    if stale:
        raise ValueError(f"{out} already holds checkpoint files {stale}; pick an empty output directory")

    shards = split_state_dict(sd, n)
    writers: Dict[str, Callable[[Path], None]] = {}
    for r, shard in enumerate(shards):
        writers[f"consolidated.{r:02d}.pth"] = lambda p, shard=shard: torch.save(shard, p)
    if (src / "tokenizer.model").is_file():
        writers["tokenizer.model"] = lambda p: shutil.copyfile(src / "tokenizer.model", p)
    writers["params.json"] = lambda p: shutil.copyfile(src / "params.json", p)
    write_files_atomically(out, writers)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help="single-file native checkpoint directory")
    parser.add_argument("out_dir", help="output directory for the shards")
    parser.add_argument("n", type=int, help="number of model-parallel shards")
    args = parser.parse_args(argv)
    try:
        out = shard_checkpoint(args.src_dir, args.out_dir, args.n)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.n} shards to {out}")


if __name__ == "__main__":
    main()
