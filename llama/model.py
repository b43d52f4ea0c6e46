# Copyright (c) adaptive-kv authors. A hand-written fork in the shape of Meta's Llama 2 reference code
# (llama/model.py); this software may be used and distributed according to the terms of the Llama 2
# Community License Agreement where it applies to Llama weights.

from dataclasses import dataclass
from typing import Optional

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from torch import nn

from llama.attention import attend
from llama.kv_cache import KVCache, NoCache


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # defined later by tokenizer
    multiple_of: int = 256  # make SwiGLU hidden layer size multiple of large power of 2
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1+ RoPE scaling (Meta's llama-models `apply_scaling`): params.json says "use_scaled_rope": true.
    # The other four are Meta's constants; 3.2 models use rope_scaling_factor 32, hence a setting.
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192
    # Positions the model was trained on, when a converter could tell (HF max_position_embeddings, llama2.c
    # seq_len, GGUF context_length); only used to warn about a larger max_seq_len.
    context_length: Optional[int] = None

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                     "max_batch_size", "max_seq_len", "rope_old_context_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"{name}={value!r} must be a positive integer")
        if self.context_length is not None and (
            isinstance(self.context_length, bool) or not isinstance(self.context_length, int)
            or self.context_length <= 0
        ):
            problems.append(f"context_length={self.context_length!r} must be a positive integer or null")
        for name in ("norm_eps", "rope_theta", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"{name}={value!r} must be a positive number")
        if not isinstance(self.use_scaled_rope, bool):
            problems.append(f"use_scaled_rope={self.use_scaled_rope!r} must be true or false")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
            elif (self.dim // self.n_heads) % 2:
                problems.append(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
            if self.use_scaled_rope and self.rope_high_freq_factor <= self.rope_low_freq_factor:
                problems.append(f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                                f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if problems:
            raise ValueError("invalid model arguments: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size, computed exactly as Meta's FeedForward does."""
        hidden_dim = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        return self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    @property
    def rope_scaling(self) -> Optional["RopeScaling"]:
        """The Llama 3.1 frequency scaling to apply, or None (plain RoPE)."""
        if not self.use_scaled_rope:
            return None
        return RopeScaling(self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                           self.rope_old_context_len)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE scaling: long wavelengths slowed by `factor`, short ones kept, a linear blend between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context_len: int = 8192


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def apply_scaling(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1 RoPE frequency scaling, the computation of Meta's llama-models `apply_scaling`.

    Wavelengths shorter than old_context_len / high_freq_factor keep their frequency, those longer than
    old_context_len / low_freq_factor are divided by `factor`, and those between blend the two linearly in
    old_context_len / wavelength. The arithmetic follows Meta's float32 expression order, so the rotations are
    bit-identical to the reference.

    Args:
        freqs: (head_dim // 2,) float32 inverse frequencies theta^(-2i/head_dim).
        scaling: the factors.

    Returns:
        torch.Tensor: (head_dim // 2,) float32 scaled frequencies.
    """
    wavelen = 2 * torch.pi / freqs
    low_freq_wavelen = scaling.old_context_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.old_context_len / scaling.high_freq_factor
    smooth = (scaling.old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * freqs / scaling.factor + smooth * freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / scaling.factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, scaled)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, device=None,
                         scaling: Optional[RopeScaling] = None):
    """Complex rotations for RoPE.

    Args:
        dim: head_dim.
        end: number of positions.
        theta: RoPE base.
        device: where to build the table.
        scaling: Llama 3.1 frequency scaling (None: plain RoPE).

    Returns:
        torch.Tensor: (end, dim // 2) complex64, entry [t, i] = exp(1j * t * f_i) with f_i = theta^(-2i/dim),
        scaled by `apply_scaling` when `scaling` is given.
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: (dim // 2)].float() / dim))
    if scaling is not None:
        freqs = apply_scaling(freqs, scaling)
    t = torch.arange(end, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor):
    ndim = x.ndim
    assert 0 <= 1 < ndim
    assert freqs_cis.shape == (x.shape[1], x.shape[-1])
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.n_kv_heads = args.n_kv_heads
        model_parallel_size = fs_init.get_model_parallel_world_size()
        if args.n_kv_heads % model_parallel_size:
            raise ValueError(
                f"n_kv_heads={args.n_kv_heads} cannot be split over {model_parallel_size} model-parallel "
                f"ranks; run with a number of ranks that divides it"
            )
        self.n_local_heads = args.n_heads // model_parallel_size
        self.n_local_kv_heads = self.n_kv_heads // model_parallel_size
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads

        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wk = ColumnParallelLinear(
            args.dim, self.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wv = ColumnParallelLinear(
            args.dim, self.n_kv_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=lambda x: x
        )

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        freqs_cis: torch.Tensor,
        cache: KVCache,
    ):
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)

        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)

        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)

        # The cache stores the new keys/values and says what the queries attend to; attention picks the kernel
        # from that (llama/attention.py); compression, if any, happens after attention ("attend first").
        # GQA never repeats the cache (repeat_kv upstream): a compressed cache keeps different tokens per KV head.
        view = cache.append(self.layer_id, start_pos, xk, xv)
        output, stats = attend(xq, view, cache.stats_request(self.layer_id))
        cache.after_attention(self.layer_id, xq, view, stats)
        return self.wo(output)  # output: (bsz, seqlen, n_local_heads * head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(layer_id, args)
        self.feed_forward = FeedForward(dim=args.dim, hidden_dim=args.hidden_dim)
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor, cache: KVCache):
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, cache)
        out = h + self.feed_forward(self.ffn_norm(h))
        return out


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=lambda x: x)

        self.layers = torch.nn.ModuleList()
        for layer_id in range(params.n_layers):
            self.layers.append(TransformerBlock(layer_id, params))

        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=lambda x: x)

        # A buffer, not an attribute, so that .to(device) moves it; it is derived, so not saved.
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis(params.dim // params.n_heads, params.max_seq_len * 2, params.rope_theta,
                                 scaling=params.rope_scaling),
            persistent=False,
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
                last_logits_only: bool = False):
        """Logits for `tokens` placed at absolute positions start_pos .. start_pos + seqlen - 1.

        Args:
            tokens: (bsz, seqlen) token ids.
            start_pos: absolute position of tokens[:, 0]; the cache holds the positions before it.
            cache: the generation's KV cache; None runs a stand-alone causal pass (start_pos must be 0).
            last_logits_only: compute the logits of the last position only (a prompt's other logits are
                (seqlen x vocab_size) floats nobody reads).

        Returns:
            torch.Tensor: (bsz, seqlen, vocab_size) float32 logits, or (bsz, 1, vocab_size) with last_logits_only.
        """
        _bsz, seqlen = tokens.shape
        if start_pos + seqlen > self.freqs_cis.shape[0]:
            raise ValueError(
                f"positions up to {start_pos + seqlen} exceed the {self.freqs_cis.shape[0]} RoPE positions "
                f"prepared for max_seq_len={self.params.max_seq_len}; build the model with a larger max_seq_len"
            )
        if cache is None:
            cache = NoCache(start_pos)
        cache.begin(tokens, start_pos)
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]

        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, cache)
        if last_logits_only:
            h = h[:, -1:]
        h = self.norm(h)
        output = self.output(h).float()
        cache.end()
        return output
