#!/usr/bin/env python3
"""Converts a llama.cpp GGUF file of a Llama-architecture model to a native checkpoint.

Output directory layout (the same as Meta's Llama checkpoints plus a tokenizer):

* ``consolidated.00.pth``: ``Dict[str, torch.Tensor]`` of float32 tensors with Meta
  names, e.g. ``layers.0.attention.wq.weight`` of shape ``(n_heads*head_dim, dim)``.
* ``params.json``: ``dim, n_layers, n_heads, n_kv_heads, vocab_size, multiple_of,
  ffn_dim_multiplier, norm_eps, rope_theta``.
* ``tokenizer.gguf`` (:data:`TOKENIZER_FILENAME`): a tensor-less GGUF holding only the
  source file's ``tokenizer.*`` metadata; load it with
  ``llama.tokenizer_bpe.load_bpe(out_dir / "tokenizer.gguf")``.

Weights are dequantised with ``gguf.quants.dequantize``. No RoPE permutation is
applied: llama.cpp's HF->GGUF converter already permutes ``attn_q``/``attn_k`` of
llama models back into Meta's interleaved-pairs layout (which is what llama.cpp's
"normal" RoPE mode rotates), and ``tests/test_gguf_convert.py`` verifies this with an
independent forward pass.

Usage:
    python scripts/convert_gguf.py MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow `python scripts/convert_gguf.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

CHECKPOINT_FILENAME = "consolidated.00.pth"
PARAMS_FILENAME = "params.json"
TOKENIZER_FILENAME = "tokenizer.gguf"
OUTPUT_FILES = (CHECKPOINT_FILENAME, PARAMS_FILENAME, TOKENIZER_FILENAME)

# GGUF per-layer tensor name -> Meta per-layer tensor name.
_LAYER_TENSORS = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def _log(msg: str) -> None:
    print(f"[convert_gguf] {msg}", file=sys.stderr, flush=True)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """FFN hidden size exactly as Meta's ``FeedForward`` computes it.

    Args:
        dim: Model width.
        multiple_of: Rounding granularity.
        ffn_dim_multiplier: Optional scale applied after the 2/3 factor.

    Returns:
        The hidden size.
    """
    hidden = 4 * dim
    hidden = int(2 * hidden / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def choose_ffn_params(dim: int, hidden: int) -> Tuple[int, Optional[float]]:
    """Finds ``(multiple_of, ffn_dim_multiplier)`` that reproduce ``hidden`` exactly.

    Prefers no multiplier and ``multiple_of=256`` (Meta's value), then the largest
    power-of-two ``multiple_of`` that works; otherwise a
    multiplier ``hidden / base`` (nudged for float truncation) with the largest
    power-of-two divisor of ``hidden`` as ``multiple_of``.

    Args:
        dim: Model width.
        hidden: The GGUF's ``feed_forward_length``.

    Returns:
        ``(multiple_of, ffn_dim_multiplier)``.

    Raises:
        ValueError: If no combination reproduces ``hidden`` (cannot happen for
            ``hidden >= 1`` but checked rather than assumed).
    """
    # Meta's own checkpoints use 256; try it first so params.json looks familiar.
    candidates = [256] + [2**k for k in range(12, -1, -1) if k != 8]
    for m in candidates:
        if ffn_hidden_dim(dim, m, None) == hidden:
            return m, None
    base = int(2 * 4 * dim / 3)
    for m in candidates:
        if hidden % m:
            continue
        for mult in (hidden / base, (hidden + 0.5) / base, (hidden - m + 0.5) / base):
            mult = float(mult)
            if ffn_hidden_dim(dim, m, mult) == hidden:
                return m, mult
    raise ValueError(f"no multiple_of/ffn_dim_multiplier reproduces hidden={hidden} for dim={dim}")


def _f32_repr(x: float) -> float:
    # GGUF stores float32; the shortest decimal that round-trips the float32 gives
    # 1e-05 instead of 9.999999747378752e-06 in params.json.
    return float(str(np.float32(x)))


def _open_gguf(path: Path):
    import gguf

    if not path.exists():
        raise FileNotFoundError(
            f"GGUF file not found: {path} (run scripts/setup_models.py to fetch SmolLM2, "
            "or pass the path of an existing .gguf file)"
        )
    if not path.is_file():
        raise ValueError(f"{path} is not a file; pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass a llama.cpp .gguf model file"
        )
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on corrupt files
        raise ValueError(f"{path}: cannot read GGUF ({e}); the file may be truncated") from e


def _field(reader, key: str, default: Any = None, required: bool = True) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise ValueError(f"GGUF metadata key {key!r} is missing; not a complete llama GGUF")
        return default
    return field.contents()


def read_hparams(reader) -> Dict[str, Any]:
    """Reads and checks the llama hyper-parameters of a GGUF.

    Args:
        reader: A ``gguf.GGUFReader``.

    Returns:
        Dict with dim, n_layers, n_heads, n_kv_heads, hidden, vocab_size, norm_eps,
        rope_theta, context_length.

    Raises:
        ValueError: If the architecture is not llama or a feature is unsupported.
    """
    arch = _field(reader, "general.architecture", required=False)
    if arch != "llama":
        raise ValueError(
            f"unsupported architecture {arch!r}: only 'llama' GGUF files can be converted "
            "(general.architecture must be 'llama')"
        )
    dim = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv_heads = int(_field(reader, "llama.attention.head_count_kv", n_heads, required=False))
    head_dim = dim // n_heads
    if head_dim * n_heads != dim or n_heads % n_kv_heads:
        raise ValueError(f"inconsistent heads: dim={dim} n_heads={n_heads} n_kv_heads={n_kv_heads}")
    rope_dims = int(_field(reader, "llama.rope.dimension_count", head_dim, required=False))
    if rope_dims != head_dim:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dims} != head_dim={head_dim}) is unsupported")
    scaling = _field(reader, "llama.rope.scaling.type", "none", required=False)
    if scaling not in ("none", None):
        raise ValueError(f"RoPE scaling {scaling!r} is unsupported by the native model")
    tokens = _field(reader, "tokenizer.ggml.tokens", None, required=False)
    vocab_size = int(_field(reader, "llama.vocab_size", len(tokens) if tokens else 0, required=False))
    return {
        "dim": dim,
        "n_layers": int(_field(reader, "llama.block_count")),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "hidden": int(_field(reader, "llama.feed_forward_length")),
        "vocab_size": vocab_size,
        "norm_eps": _f32_repr(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_repr(_field(reader, "llama.rope.freq_base", 10000.0, required=False)),
        "context_length": int(_field(reader, "llama.context_length", 0, required=False)),
    }


def _expected_shapes(hp: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """GGUF tensor name -> Meta-orientation shape ``(out_features, in_features)``."""
    dim, hd = hp["dim"], hp["dim"] // hp["n_heads"]
    q, kv, hidden = hp["n_heads"] * hd, hp["n_kv_heads"] * hd, hp["hidden"]
    shapes = {"token_embd.weight": (hp["vocab_size"], dim), "output_norm.weight": (dim,)}
    per_layer = {
        "attn_q": (q, dim), "attn_k": (kv, dim), "attn_v": (kv, dim), "attn_output": (dim, q),
        "ffn_gate": (hidden, dim), "ffn_down": (dim, hidden), "ffn_up": (hidden, dim),
        "attn_norm": (dim,), "ffn_norm": (dim,),
    }
    for i in range(hp["n_layers"]):
        for name, shape in per_layer.items():
            shapes[f"blk.{i}.{name}.weight"] = shape
    return shapes


def _meta_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "tok_embeddings.weight"
    if gguf_name == "output_norm.weight":
        return "norm.weight"
    if gguf_name == "output.weight":
        return "output.weight"
    _, layer, kind, _ = gguf_name.split(".")
    return f"layers.{layer}.{_LAYER_TENSORS[kind]}.weight"


def _dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    arr = dequantize(tensor.data, tensor.tensor_type)
    # ggml lists dims fastest-first (ne0 = in_features); numpy/torch want the reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    arr = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    # F32 tensors come back as read-only views of the memory-mapped file.
    return arr if arr.flags.writeable else arr.copy()


def _write_tokenizer_gguf(reader, path: Path) -> None:
    """Copies every ``tokenizer.*`` key of ``reader`` into a tensor-less GGUF."""
    import gguf

    arch = _field(reader, "general.architecture")
    writer = gguf.GGUFWriter(path, arch)
    name = _field(reader, "general.name", None, required=False)
    if name is not None:
        writer.add_name(str(name))
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        n += 1
    if n == 0:
        raise ValueError("GGUF has no tokenizer.* metadata; cannot write a tokenizer")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def convert_gguf(gguf_path: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Converts a llama GGUF into ``consolidated.00.pth`` + ``params.json`` + ``tokenizer.gguf``.

    Files are written to a temporary directory next to ``out_dir`` and moved in
    only once everything (including a tokenizer load check) succeeded.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: Destination directory (created if needed; existing files with the
            same names are replaced).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileNotFoundError: If ``gguf_path`` does not exist.
        ValueError: If it is not a GGUF file, not a llama model, lacks tensors
            (all missing names are listed), has tensors of unexpected shape or
            unknown tensors, or uses unsupported features (RoPE scaling, partial RoPE).
    """
    import torch  # here, not at the top: setup_models.py's 'already converted' check stays instant
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_gguf(gguf_path)
    hp = read_hparams(reader)
    _log(
        f"{gguf_path.name}: dim={hp['dim']} n_layers={hp['n_layers']} n_heads={hp['n_heads']} "
        f"n_kv_heads={hp['n_kv_heads']} hidden={hp['hidden']} vocab={hp['vocab_size']}"
    )

    tensors = {t.name: t for t in reader.tensors}
    expected = _expected_shapes(hp)
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise ValueError(f"{gguf_path}: missing tensors: {shown}")
    unknown = sorted(set(tensors) - set(expected) - {"output.weight"})
    if unknown:
        # e.g. rope_freqs.weight (Llama 3.1 RoPE scaling) changes the maths; refuse
        # rather than silently drop weights.
        raise ValueError(f"{gguf_path}: unexpected tensors not supported by the native model: {unknown[:20]}")

    state: Dict[str, torch.Tensor] = {}
    for name, shape in list(expected.items()) + (
        [("output.weight", (hp["vocab_size"], hp["dim"]))] if "output.weight" in tensors else []
    ):
        arr = _dequantize(tensors[name])
        if arr.shape != shape:
            raise ValueError(f"{gguf_path}: tensor {name} has shape {arr.shape}, expected {shape}")
        state[_meta_name(name)] = torch.from_numpy(arr)
    if "output.weight" not in state:
        # Tied embeddings: a real copy, so in-place edits of one never alter the other.
        state["output.weight"] = state["tok_embeddings.weight"].clone()

    multiple_of, ffn_mult = choose_ffn_params(hp["dim"], hp["hidden"])
    assert ffn_hidden_dim(hp["dim"], multiple_of, ffn_mult) == hp["hidden"]
    params = {
        "dim": hp["dim"],
        "n_layers": hp["n_layers"],
        "n_heads": hp["n_heads"],
        "n_kv_heads": hp["n_kv_heads"],
        "vocab_size": hp["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_mult,
        "norm_eps": hp["norm_eps"],
        "rope_theta": hp["rope_theta"],
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise stick to out_dir
    try:
        _write_tokenizer_gguf(reader, tmp / TOKENIZER_FILENAME)
        from llama.tokenizer_bpe import load_bpe

        tok = load_bpe(tmp / TOKENIZER_FILENAME)
        if tok.n_words != hp["vocab_size"]:
            raise ValueError(f"tokenizer has {tok.n_words} tokens but the model vocab is {hp['vocab_size']}")
        with open(tmp / PARAMS_FILENAME, "w") as f:
            json.dump(params, f, indent=2)
            f.write("\n")
        _log(f"writing {CHECKPOINT_FILENAME} ({sum(t.numel() for t in state.values()) / 1e6:.1f}M float32 values)")
        torch.save(state, tmp / CHECKPOINT_FILENAME)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        else:
            # Keep unrelated files in an existing directory; each replace is atomic.
            for name in OUTPUT_FILES:
                os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"wrote {out_dir}")
    return out_dir


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_path", type=Path, help="llama.cpp .gguf file of a llama-architecture model")
    parser.add_argument("out_dir", type=Path, help="output directory for the native checkpoint")
    args = parser.parse_args(argv)
    try:
        convert_gguf(args.gguf_path, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
