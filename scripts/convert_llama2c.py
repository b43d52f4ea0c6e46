"""Converts a llama2.c legacy checkpoint (`.bin`, "version 0") into a native `consolidated.00.pth` + `params.json`.

The legacy format (Karpathy's llama2.c `export.py --version 0` / `legacy_export`) is a header of 7 int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means the output
classifier is stored separately, a positive one that it is shared with the token embedding) followed by
little-endian float32 arrays:

    token_embedding (vocab, dim), rms_att (n_layers, dim), wq (n_layers, dim, dim),
    wk (n_layers, kv_dim, dim), wv (n_layers, kv_dim, dim), wo (n_layers, dim, dim), rms_ffn (n_layers, dim),
    w1 (n_layers, hidden, dim), w2 (n_layers, dim, hidden), w3 (n_layers, hidden, dim), rms_final (dim),
    freq_cis_real (seq_len, head_size / 2), freq_cis_imag (seq_len, head_size / 2), [wcls (vocab, dim)]

llama2.c applies RoPE to interleaved pairs like Meta's code, so wq / wk need no permutation.

Usage:
    python scripts/convert_llama2c.py stories260K.bin models/stories260K [--tokenizer tokenizer.model]
"""

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from llama.model import ModelArgs  # noqa: E402

HEADER = struct.Struct("<7i")
LEGACY_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned export formats (version >= 1) start with it
NORM_EPS = 1e-5  # llama2.c does not store it; every llama2.c model uses 1e-5

PathLike = Union[str, os.PathLike]


def write_files_atomically(out_dir: PathLike, writers: Dict[str, Callable[[Path], None]]) -> None:
    """Writes a set of files into `out_dir` so that a failure never leaves a half-written checkpoint.

    Every file is first written into a temporary directory on the same file system. If `out_dir` does not
    exist, the temporary directory is renamed to it; otherwise each file is moved into place with an atomic
    `os.replace`, in the order of `writers` (put params.json last: a directory with params.json is complete).

    Args:
        out_dir: destination directory (created, with its parents, if missing).
        writers: file name -> function writing that file to the path it is given.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output {out} exists and is not a directory; pass a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = not out.exists()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent if fresh else out))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the renamed directory gets the usual mode
    try:
        for name, write in writers.items():
            write(tmp / name)
        if fresh:
            os.rename(tmp, out)
        else:
            for name in writers:
                os.replace(tmp / name, out / name)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def params_for(dim: int, hidden_dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int) -> dict:
    """The params.json whose `ModelArgs.hidden_dim` reproduces `hidden_dim`.

    Picks the largest power-of-two `multiple_of` (256 down to 1) with which Meta's SwiGLU sizing rule gives
    `hidden_dim` (stories260K: 172 -> multiple_of 4); only when no power of two does (a hidden size below
    2 * 4 * dim / 3) is `ffn_dim_multiplier` added.
    """
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
              "vocab_size": vocab_size, "norm_eps": NORM_EPS}

    def hidden(**extra) -> int:
        return ModelArgs(**params, **extra).hidden_dim

    powers = [2 ** i for i in range(8, -1, -1)]
    for m in powers:
        if hidden(multiple_of=m) == hidden_dim:
            return dict(sorted({**params, "multiple_of": m}.items()))
    base = int(2 * (4 * dim) / 3)
    m = next(p for p in powers if hidden_dim % p == 0)
    mult = hidden_dim / base
    for _ in range(4):  # int(mult * base) may land one below hidden_dim through rounding: nudge up
        if hidden(multiple_of=m, ffn_dim_multiplier=mult) == hidden_dim:
            return dict(sorted({**params, "multiple_of": m, "ffn_dim_multiplier": mult}.items()))
        mult = float(torch.nextafter(torch.tensor(mult, dtype=torch.float64),
                                     torch.tensor(float("inf"), dtype=torch.float64)))
    raise ValueError(f"cannot express hidden_dim={hidden_dim} for dim={dim} with multiple_of/ffn_dim_multiplier")


def read_llama2c(bin_path: PathLike) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Reads a llama2.c legacy `.bin` file.

    Returns:
        (params, state_dict): the native params.json dict and the Meta-named float32 tensors.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the header is not a legacy llama2.c header or the file size does not match it.
    """
    path = Path(bin_path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint {path} not found; pass the path of a legacy .bin file")
    data = path.read_bytes()
    if len(data) < HEADER.size:
        raise ValueError(
            f"{path} is {len(data)} bytes, shorter than the {HEADER.size}-byte llama2.c header; "
            f"the file is truncated or not a llama2.c checkpoint"
        )
    header = HEADER.unpack_from(data)
    if header[0] == LEGACY_MAGIC:
        raise ValueError(
            f"{path} is a versioned llama2.c export (magic 'ak42', version {header[1]}); only the legacy format "
            f"is supported: re-export it with llama2.c's `export.py --version 0`"
        )
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = header
    shared = vocab_size > 0
    vocab_size = abs(vocab_size)
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    values = (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)
    bad = [f"{n}={v}" for n, v in zip(names, values) if v <= 0]
    if not bad:
        if dim % n_heads or (dim // n_heads) % 2:
            bad.append(f"dim={dim} is not n_heads={n_heads} times an even head size")
        elif n_heads % n_kv_heads:
            bad.append(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    if bad:
        raise ValueError(f"{path} has an invalid llama2.c header ({', '.join(bad)}); it is not a legacy llama2.c "
                         f"checkpoint or it is corrupted")

    head_size = dim // n_heads
    kv_dim = n_kv_heads * head_size
    L = n_layers
    shapes = [
        ("token_embedding", (vocab_size, dim)),
        ("rms_att", (L, dim)),
        ("wq", (L, dim, dim)),
        ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)),
        ("wo", (L, dim, dim)),
        ("rms_ffn", (L, dim)),
        ("w1", (L, hidden_dim, dim)),
        ("w2", (L, dim, hidden_dim)),
        ("w3", (L, hidden_dim, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_size // 2)),
        ("freq_cis_imag", (seq_len, head_size // 2)),
    ] + ([] if shared else [("wcls", (vocab_size, dim))])
    n_floats = sum(torch.Size(s).numel() for _, s in shapes)
    expected = HEADER.size + 4 * n_floats
    if len(data) != expected:
        raise ValueError(
            f"{path} is {len(data)} bytes but its header ({', '.join(f'{n}={v}' for n, v in zip(names, values))}, "
            f"{'shared' if shared else 'separate'} classifier) implies {expected} bytes; "
            + ("the file is truncated: download or export it again" if len(data) < expected else
               "the file has trailing data: it is not a legacy (version 0) llama2.c export")
        )

    flat = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=HEADER.size)
    arrays, at = {}, 0
    for name, shape in shapes:
        n = torch.Size(shape).numel()
        arrays[name] = flat[at : at + n].view(shape)
        at += n

    sd: Dict[str, torch.Tensor] = {
        "tok_embeddings.weight": arrays["token_embedding"],
        "norm.weight": arrays["rms_final"],
        "output.weight": arrays["token_embedding"] if shared else arrays["wcls"],
    }
    for i in range(L):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = arrays["wq"][i]
        sd[p + "attention.wk.weight"] = arrays["wk"][i]
        sd[p + "attention.wv.weight"] = arrays["wv"][i]
        sd[p + "attention.wo.weight"] = arrays["wo"][i]
        sd[p + "feed_forward.w1.weight"] = arrays["w1"][i]
        sd[p + "feed_forward.w2.weight"] = arrays["w2"][i]
        sd[p + "feed_forward.w3.weight"] = arrays["w3"][i]
        sd[p + "attention_norm.weight"] = arrays["rms_att"][i]
        sd[p + "ffn_norm.weight"] = arrays["rms_ffn"][i]
    # clone: torch.save of a view would store the whole file's buffer once per tensor
    sd = {k: v.clone() for k, v in sd.items()}
    return params_for(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size), sd


def convert_llama2c(bin_path: PathLike, out_dir: PathLike, tokenizer_path: Optional[PathLike] = None) -> Path:
    """Converts a llama2.c legacy `.bin` into `out_dir/consolidated.00.pth` and `out_dir/params.json`.

    Args:
        bin_path: the llama2.c legacy checkpoint.
        out_dir: destination directory (created if missing; existing files of the same names are replaced).
        tokenizer_path: optional sentencepiece `tokenizer.model` to copy next to the weights (llama2.c's own
            `tokenizer.bin` is not a sentencepiece model and cannot be used).

    Returns:
        Path: out_dir.
    """
    out = Path(out_dir)
    params, sd = read_llama2c(bin_path)
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer_path} not found; pass the model's sentencepiece "
                                f"tokenizer.model or leave --tokenizer out")
    others = sorted(p.name for p in out.glob("*.pth") if p.name != "consolidated.00.pth") if out.is_dir() else []
    if others:
        raise ValueError(f"{out} already holds other checkpoint files {others}; Llama.build would take them as "
                         f"extra model-parallel shards: pick an empty output directory")
    writers: Dict[str, Callable[[Path], None]] = {"consolidated.00.pth": lambda p: torch.save(sd, p)}
    if tokenizer_path is not None:
        writers["tokenizer.model"] = lambda p: shutil.copyfile(tokenizer_path, p)
    writers["params.json"] = lambda p: p.write_text(json.dumps(params, sort_keys=True))
    write_files_atomically(out, writers)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bin_path", help="llama2.c legacy .bin checkpoint")
    parser.add_argument("out_dir", help="output directory for consolidated.00.pth and params.json")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece tokenizer.model to copy alongside")
    args = parser.parse_args(argv)
    try:
        out = convert_llama2c(args.bin_path, args.out_dir, args.tokenizer)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out / 'consolidated.00.pth'} and {out / 'params.json'}")


if __name__ == "__main__":
    main()
