"""The peer the speed benchmark measures beside us: Hugging Face transformers on the same weights.

`hf_from_native` builds a `LlamaForCausalLM` (SDPA attention, DynamicCache) that shares our model's tensors
(only wq and wk are re-ordered into transformers' rotary layout), so both run the same checkpoint in the same
process. transformers is an optional benchmark dependency: `available()` says whether it is installed.
"""

import inspect
from typing import Optional

import torch


def available() -> Optional[str]:
    """transformers' version, or None when it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's rotary layout (pairs of adjacent rows) -> transformers' (the two halves of each head)."""
    head_dim = w.shape[0] // n_heads
    return w.view(n_heads, head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_from_native(model) -> "torch.nn.Module":
    """A transformers LlamaForCausalLM with our (single-rank) Transformer's weights.

    Args:
        model: llama.model.Transformer (model-parallel size 1).

    Returns:
        LlamaForCausalLM in eval mode, on the model's device and dtype, with SDPA attention.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    p = model.params
    sd = model.state_dict()
    weight = model.output.weight
    config = LlamaConfig(
        hidden_size=p.dim, intermediate_size=p.hidden_dim, num_hidden_layers=p.n_layers,
        num_attention_heads=p.n_heads, num_key_value_heads=p.n_kv_heads, head_dim=p.dim // p.n_heads,
        vocab_size=p.vocab_size, rms_norm_eps=p.norm_eps, rope_theta=p.rope_theta,
        max_position_embeddings=p.max_seq_len, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa",
    )
    hsd = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    names = {"attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(p.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        hsd[theirs + "self_attn.q_proj.weight"] = _to_hf_rotary(sd[ours + "attention.wq.weight"], p.n_heads)
        hsd[theirs + "self_attn.k_proj.weight"] = _to_hf_rotary(sd[ours + "attention.wk.weight"], p.n_kv_heads)
        for a, b in names.items():
            hsd[theirs + b + ".weight"] = sd[ours + a + ".weight"]
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(hsd, assign=True, strict=True)
    # buffers (the rotary frequencies) are not in the state dict: make them for real on the right device
    for module_name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = hf.get_submodule(module_name.rsplit(".", 1)[0]) if "." in module_name else hf
            rebuilt = type(module)(config=config)  # on the CPU; moved with the model below
            setattr(parent, module_name.rsplit(".", 1)[-1], rebuilt)
    return hf.to(device=weight.device, dtype=weight.dtype).eval()


class HFRunner:
    """Prefill and one-token decode steps of a transformers model with its DynamicCache."""

    def __init__(self, hf):
        from transformers import DynamicCache

        self.hf = hf
        self.cache = DynamicCache(config=hf.config)
        params = inspect.signature(hf.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits of the last position, (bsz, 1, vocab); `start_pos` only documents the call."""
        out = self.hf(tokens, use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits

    def kv_bytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
