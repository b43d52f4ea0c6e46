"""Checkpoint formats: Meta's native layout and Hugging Face Llama folders.

Native: `params.json` + `consolidated.NN.pth` (one file per model-parallel rank), Meta's tensor names.
Hugging Face: `config.json` + `model.safetensors` or sharded `model-0000N-of-0000M.safetensors` (with
`model.safetensors.index.json`), HF tensor names, tokenizer in `tokenizer.json` and/or `tokenizer.model`.

The one layout difference that is not a rename: HF's conversion script permutes the rows of every q and k
projection so that its `rotate_half` RoPE (which pairs dimension i with i + head_dim/2) computes what Meta's
RoPE computes on interleaved pairs (2i, 2i + 1). `hf_to_native_state_dict` undoes that permutation.
"""

import json
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

__all__ = [
    "ffn_params_for",
    "find_native_shards",
    "hf_params",
    "hf_to_native_state_dict",
    "is_hf_folder",
    "is_native_folder",
    "load_hf_folder",
    "read_hf_config",
    "trained_context",
    "unpermute_rotary_rows",
]

HF_LAYER_TENSORS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_TOP_TENSORS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# Keys some HF checkpoints carry that hold no weights of the model (precomputed RoPE tables).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def find_native_shards(ckpt_dir: Path) -> List[Path]:
    """consolidated.NN.pth files of a native checkpoint, in rank order (any *.pth, as Meta's loader does)."""
    return sorted(Path(ckpt_dir).glob("*.pth"))


def is_native_folder(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / "params.json").is_file()


def _safetensors_files(ckpt_dir: Path) -> List[Path]:
    return sorted(Path(ckpt_dir).glob("*.safetensors"))


def is_hf_folder(ckpt_dir: Path) -> bool:
    """A Hugging Face model folder: config.json next to safetensors (or pytorch_model*.bin) weights."""
    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir / "config.json").is_file() and not is_native_folder(ckpt_dir)


def read_hf_config(ckpt_dir: Path) -> dict:
    """config.json of a Hugging Face folder, checked to be an object."""
    path = Path(ckpt_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def ffn_params_for(dim: int, hidden_dim: int) -> Dict[str, object]:
    """`multiple_of` / `ffn_dim_multiplier` with which Meta's SwiGLU sizing rule gives `hidden_dim`.

    HF configs state the hidden size (intermediate_size); native params.json derives it from dim. Meta's own
    values are tried first (256 and 1024 without a multiplier, then Llama 3's 1024 with 1.3 and 256 with 1.5),
    then any power of two; failing those, `hidden_dim` itself as multiple_of with a multiplier small enough
    that rounding up lands on it.

    Returns:
        {"multiple_of": int, "ffn_dim_multiplier": float or None}.
    """

    def rule(multiple_of: int, mult: Optional[float]) -> int:
        h = int(2 * (4 * dim) / 3)
        if mult is not None:
            h = int(mult * h)
        return multiple_of * ((h + multiple_of - 1) // multiple_of)

    tries = [(256, None), (1024, None), (1024, 1.3), (256, 1.5), (4096, 1.3)]
    tries += [(2 ** k, None) for k in range(12, -1, -1)]
    for multiple_of, mult in tries:
        if rule(multiple_of, mult) == hidden_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    base = int(2 * (4 * dim) / 3)
    mult = hidden_dim / base
    # int(mult * base) is hidden_dim or hidden_dim - 1 (float rounding); rounding up to hidden_dim fixes both.
    assert rule(hidden_dim, mult) == hidden_dim, (dim, hidden_dim)
    return {"multiple_of": hidden_dim, "ffn_dim_multiplier": mult}


def _rope_settings(config: dict, where: str) -> Dict[str, object]:
    """rope_theta and Llama 3.1 scaling from a config (legacy `rope_scaling` or transformers 5 `rope_parameters`)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_scaling must be an object or null, got {rope!r}")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    out: Dict[str, object] = {"rope_theta": float(theta)}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return out
    if kind != "llama3":
        raise ValueError(
            f"{where}: RoPE scaling type {kind!r} is not supported (this model supports plain RoPE and Llama 3.1's "
            f"'llama3' scaling)"
        )
    out.update(
        use_scaled_rope=True,
        rope_scaling_factor=float(rope.get("factor", 8.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_old_context_len=int(rope.get("original_max_position_embeddings", 8192)),
    )
    return out


def hf_params(config: dict, where: str = "config.json") -> dict:
    """Native params.json for a Hugging Face LlamaForCausalLM config.

    Args:
        config: the parsed config.json.
        where: how to name the file in errors.

    Returns:
        dict of ModelArgs fields, plus `tie_word_embeddings` (bool) which the weights need and ModelArgs
        does not.

    Raises:
        ValueError: a config this model cannot reproduce (another architecture, biases, another activation,
            a head_dim other than hidden_size / num_attention_heads, an unsupported RoPE scaling).
    """
    model_type = config.get("model_type")
    if model_type != "llama":
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; only Llama-architecture "
                         f"models (model_type 'llama') load here")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (Meta's Llama layers have no biases)")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (Llama uses silu)")
    dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and n_heads and int(head_dim) * n_heads != dim:
        raise ValueError(f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                         f"{dim / n_heads:g}; such models are not supported")
    params = {
        "dim": dim,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "vocab_size": int(config["vocab_size"]),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        **ffn_params_for(dim, int(config["intermediate_size"])),
        **_rope_settings(config, where),
    }
    if config.get("max_position_embeddings"):
        params["context_length"] = int(config["max_position_embeddings"])
    params["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return params


def unpermute_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undoes HF's q/k row permutation, head by head.

    Within one head, HF row j < head_dim/2 holds Meta's row 2j (the first of pair j) and row head_dim/2 + j
    holds Meta's row 2j + 1 (the second of pair j).

    Args:
        w: (n_heads * head_dim, dim) q_proj or k_proj weight in HF order.
        n_heads: heads of that projection (num_attention_heads for q, num_key_value_heads for k).

    Returns:
        torch.Tensor: (n_heads * head_dim, dim), rows in Meta's interleaved order.
    """
    rows, cols = w.shape
    half = rows // n_heads // 2
    # (head, which half, pair, dim) -> (head, pair, which half, dim): the two halves become the pair members
    return w.reshape(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_native_state_dict(tensors: Dict[str, torch.Tensor], params: dict,
                            where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Renames HF tensors to Meta's names and un-permutes q/k rows.

    Args:
        tensors: HF name -> tensor (e.g. model.layers.0.self_attn.q_proj.weight).
        params: `hf_params` of the folder (n_heads, n_kv_heads, n_layers, tie_word_embeddings).
        where: how to name the checkpoint in errors.

    Returns:
        dict in the native layout (layers.0.attention.wq.weight, ...); `output.weight` is the embedding
        when the model ties them (no lm_head in the file).

    Raises:
        ValueError: a tensor is missing or unknown.
    """
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in tensors.items():
        if name.endswith(HF_IGNORED_SUFFIXES):
            continue
        if name in HF_TOP_TENSORS:
            out[HF_TOP_TENSORS[name]] = t
            continue
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
            suffix = ".".join(parts[3:])
            if suffix in HF_LAYER_TENSORS:
                native = f"layers.{parts[2]}.{HF_LAYER_TENSORS[suffix]}"
                if suffix == "self_attn.q_proj.weight":
                    t = unpermute_rotary_rows(t, params["n_heads"])
                elif suffix == "self_attn.k_proj.weight":
                    t = unpermute_rotary_rows(t, params["n_kv_heads"])
                out[native] = t
                continue
        unknown.append(name)
    if unknown:
        raise ValueError(f"{where}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
                         f"only Llama-architecture weights are understood")
    if "output.weight" not in out:
        if "tok_embeddings.weight" not in out:
            raise ValueError(f"{where}: no model.embed_tokens.weight")
        # Tied embeddings (SmolLM2, Llama 3.2 1B/3B): the output projection is the embedding matrix.
        out["output.weight"] = out["tok_embeddings.weight"]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{v}" for i in range(params["n_layers"]) for v in HF_LAYER_TENSORS.values()
    }
    missing = sorted(expected - set(out))
    if missing:
        raise ValueError(f"{where}: missing tensors (native names) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(out) - expected)
    if extra:
        raise ValueError(f"{where}: tensors beyond num_hidden_layers={params['n_layers']}: {extra[:5]}")
    return out


def _weight_files(ckpt_dir: Path) -> Tuple[str, List[Path]]:
    """('safetensors' | 'bin', files) of a HF folder, sharded or not."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
        files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are missing: {absent}")
        return "safetensors", files
    files = _safetensors_files(ckpt_dir)
    if files:
        return "safetensors", files
    files = sorted(ckpt_dir.glob("pytorch_model*.bin"))
    if files:
        return "bin", files
    raise FileNotFoundError(
        f"no weights in {ckpt_dir}: a Hugging Face folder holds model.safetensors (or model-0000N-of-0000M"
        f".safetensors shards) next to config.json"
    )


def check_hf_folder(ckpt_dir: Path) -> dict:
    """Validates a HF folder without reading weights (config and weight files); returns its native params."""
    params = hf_params(read_hf_config(ckpt_dir), where=str(Path(ckpt_dir) / "config.json"))
    _weight_files(ckpt_dir)
    return params


def _iter_hf_tensors(ckpt_dir: Path, dtype: Optional[torch.dtype]) -> Iterator[Tuple[str, torch.Tensor]]:
    kind, files = _weight_files(ckpt_dir)
    for path in files:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    yield name, t if dtype is None else t.to(dtype)
        else:
            for name, t in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
                yield name, t if dtype is None else t.to(dtype)


def load_hf_folder(ckpt_dir: Path, dtype: Optional[torch.dtype] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Reads a HF Llama folder into native params and a native state dict.

    Args:
        ckpt_dir: the folder (config.json + safetensors).
        dtype: convert every tensor to it as it is read (None: keep the file's dtype), so a bf16 checkpoint
            loaded as float32 never holds two copies of a tensor.

    Returns:
        (params, state_dict): params as `hf_params` (with tie_word_embeddings), the native state dict.
    """
    ckpt_dir = Path(ckpt_dir)
    params = check_hf_folder(ckpt_dir)
    tensors = dict(_iter_hf_tensors(ckpt_dir, dtype))
    return params, hf_to_native_state_dict(tensors, params, where=str(ckpt_dir))


def _llama2c_seq_len(path: Path) -> Optional[int]:
    """seq_len from a llama2.c legacy header (7 int32), or None when the file is not one."""
    try:
        with open(path, "rb") as f:
            header = f.read(28)
    except OSError:
        return None
    if len(header) < 28:
        return None
    dim, hidden, n_layers, n_heads, n_kv_heads, _vocab, seq_len = struct.unpack("<7i", header)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len) <= 0:
        return None
    return seq_len


def trained_context(ckpt_dir: Path, params: dict) -> Optional[int]:
    """The context length the model was trained on, where the checkpoint tells.

    Sources: params.json `context_length` (written by scripts/convert_hf.py), a HF config.json's
    max_position_embeddings, or the header of the llama2.c `.bin` the checkpoint was converted from when it
    sits next to it (stories260K: `llama2c/stories260K.bin`, 512).
    """
    if params.get("context_length"):
        return int(params["context_length"])
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "config.json").is_file():
        try:
            value = read_hf_config(ckpt_dir).get("max_position_embeddings")
        except ValueError:
            value = None
        if isinstance(value, int) and value > 0:
            return value
    for path in sorted(ckpt_dir.glob("*.bin")) + sorted(ckpt_dir.glob("llama2c/*.bin")):
        seq_len = _llama2c_seq_len(path)
        if seq_len is not None and _llama2c_matches(path, params):
            return seq_len
    return None


def _llama2c_matches(path: Path, params: dict) -> bool:
    """Whether a llama2.c header describes the same model shape as params (not some unrelated .bin)."""
    with open(path, "rb") as f:
        dim, _hidden, n_layers, n_heads, n_kv_heads, vocab, _seq = struct.unpack("<7i", f.read(28))
    return (dim, n_layers, n_heads, n_kv_heads, abs(vocab)) == (
        params.get("dim"), params.get("n_layers"), params.get("n_heads"),
        params.get("n_kv_heads", params.get("n_heads")), params.get("vocab_size"),
    )


def parameter_count(state_dict: Dict[str, torch.Tensor]) -> int:
    """Distinct parameters (a tied output projection counts once)."""
    seen, total = set(), 0
    for t in state_dict.values():
        key = (t.data_ptr(), t.shape) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def human_count(n: int) -> str:
    """12345678 -> '12.3M'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)

