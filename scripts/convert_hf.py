#!/usr/bin/env python3
"""Converts a Hugging Face Llama folder into a native checkpoint.

Input: `config.json` + `model.safetensors` or sharded `model-0000N-of-0000M.safetensors` (read with the
`safetensors` package, one tensor at a time), tokenizer in `tokenizer.json` and/or `tokenizer.model`.
Output (`OUT_DIR`): `consolidated.00.pth` (Meta's tensor names, q/k rows un-permuted back to Meta's interleaved
RoPE pairs, `output.weight` = the embedding for tied models), `params.json` (with `use_scaled_rope` and the
rope_* factors for Llama 3.1-style scaling, `rope_theta`, and `context_length` from max_position_embeddings),
and copies of the tokenizer files (tokenizer.json with tokenizer_config.json, generation_config.json and
config.json beside it, since they name BOS / EOS).

The files are written into a temporary folder and moved into place at the end, so an interrupted run leaves
no half-written checkpoint. `Llama.build` also loads such folders directly; converting once saves the
renaming at each start and allows `scripts/shard_checkpoint.py`.

Usage:
    python scripts/convert_hf.py HF_DIR OUT_DIR [--dtype float32|bfloat16|float16]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Union

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow `python scripts/convert_hf.py` from anywhere
    sys.path.insert(0, str(REPO))

from llama.checkpoint import load_hf_folder  # noqa: E402
from llama.generation import DTYPES  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from scripts.convert_llama2c import write_files_atomically  # noqa: E402

# Copied next to the checkpoint when present: the tokenizer and the files that name its BOS / EOS ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


def _log(msg: str) -> None:
    print(f"[convert_hf] {msg}", file=sys.stderr, flush=True)


def convert_hf(hf_dir: Union[str, Path], out_dir: Union[str, Path], dtype: Optional[str] = None) -> Path:
    """Writes the native checkpoint of a Hugging Face Llama folder.

    Args:
        hf_dir: the Hugging Face folder.
        out_dir: the native checkpoint folder (created; files already there are replaced one by one).
        dtype: tensors' dtype in the output ('float32', 'bfloat16', 'float16'); None keeps the file's.

    Returns:
        out_dir as a Path.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} not found; pass a Hugging Face model folder")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of float32, bfloat16, float16")
    _log(f"reading {hf_dir}")
    params, state_dict = load_hf_folder(hf_dir, dtype=DTYPES[dtype] if dtype else None)
    params.pop("tie_word_embeddings")
    if state_dict["output.weight"] is state_dict["tok_embeddings.weight"]:
        # torch.save keeps shared storage shared; a copy keeps the native file a plain Meta state dict.
        state_dict["output.weight"] = state_dict["output.weight"].clone()
    ModelArgs(**params)  # the params we write must build a model
    params = {k: v for k, v in params.items() if v is not None}

    writers: Dict[str, callable] = {"consolidated.00.pth": lambda p: torch.save(state_dict, p)}
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            writers[name] = lambda p, src=hf_dir / name: shutil.copyfile(src, p)
    if (hf_dir / "tokenizer.json").is_file():
        # tokenizer.json alone does not say which ids are BOS / EOS; HFTokenizer reads them from config.json.
        writers["config.json"] = lambda p: shutil.copyfile(hf_dir / "config.json", p)
    writers["params.json"] = lambda p: p.write_text(json.dumps(params, indent=2) + "\n")  # last: marks complete
    _log(f"writing {out_dir} ({', '.join(writers)})")
    write_files_atomically(out_dir, writers)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("hf_dir", help="Hugging Face folder (config.json + *.safetensors + tokenizer)")
    parser.add_argument("out_dir", help="native checkpoint folder to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="tensor dtype of the output (default: as stored)")
    args = parser.parse_args(argv)
    try:
        out = convert_hf(args.hf_dir, args.out_dir, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert_hf: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
