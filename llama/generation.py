# A hand-written fork in the shape of Meta's Llama 2 llama/generation.py, with a pluggable KV cache.

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypedDict

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_rank,
    get_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)

from llama.chat_format import UNSAFE_ERROR, Dialog, Message, chat_format_for, validate_dialog
from llama.kv_cache import DenseKVCache
from llama.model import ModelArgs, Transformer
from llama.tokenizer import find_tokenizer, load_tokenizer

__all__ = ["Llama", "Dialog", "Message", "CompletionPrediction", "ChatPrediction", "load_params"]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


#: Prompt tokens per forward pass in `generate`: long prompts are fed in chunks so that the activations and
#: logits stay bounded; as long as SmolLM2's context, so the benchmarks' prompts run in one pass.
DEFAULT_PREFILL_CHUNK = 8192

PARAM_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
              "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_low_freq_factor",
              "rope_high_freq_factor", "rope_old_context_len", "context_length"}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_params(ckpt_dir: Path) -> dict:
    """Reads and checks `params.json` (the model's hyper-parameters) from a checkpoint directory.

    Meta's Llama 2 and Llama 3.x keys are understood, including Llama 3.1's `use_scaled_rope` and llama-models'
    `rope_scaling_factor` / `rope_high_freq_factor`; see `ModelArgs` for the rest.
    """
    path = Path(ckpt_dir) / "params.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a native checkpoint directory holds params.json next to consolidated.NN.pth "
            f"(a Hugging Face folder holds config.json; convert other formats with scripts/convert_llama2c.py "
            f"or scripts/convert_gguf.py)"
        )
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or "
                         f"regenerate it") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object of model hyper-parameters, got {type(params).__name__}")
    unknown = set(params) - PARAM_KEYS
    missing = {"dim", "n_layers", "n_heads"} - set(params)
    if unknown or missing:
        raise ValueError(
            f"{path}: " + "; ".join(
                ([f"unknown keys {sorted(unknown)}"] if unknown else [])
                + ([f"missing keys {sorted(missing)}"] if missing else [])
            ) + f" (allowed keys: {sorted(PARAM_KEYS)})"
        )
    return params


def resolve_device(device=None) -> torch.device:
    """The device a model runs on: 'cpu', 'cuda' or 'cuda:N' (None: CUDA when available, else CPU).

    Raises:
        ValueError: not a CPU or CUDA device, or CUDA requested where torch has none (checked here so that the
            caller gets this sentence rather than an error from deep inside torch).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None
                   else "torch sees no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ValueError(f"device {device!r} was requested but {why}; run with --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    return d


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The parameter (and KV cache) dtype: 'float32' | 'bfloat16' | 'float16' (or bf16, fp16, fp32, or a
    torch.dtype). None: bfloat16 on CUDA where supported, else float16; float32 on CPU.

    Raises:
        ValueError: another dtype, or bfloat16 on a GPU without it.
    """
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of float32, bfloat16, float16")
        dtype = DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported; choose one of float32, bfloat16, float16")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("bfloat16 was requested but this GPU does not support it; use --dtype float16")
    return dtype


def _init_distributed(backend: Optional[str] = None) -> None:
    """Joins the torchrun process group, or makes a one-process group when run without torchrun.

    Args:
        backend: 'gloo' (CPU tensors) or 'nccl' (CUDA tensors); None: nccl when CUDA is available.
    """
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        # Plain `python` (tests, notebooks): a single-rank group on a free local port.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)


def setup_model_parallel(model_parallel_size: Optional[int] = None, backend: Optional[str] = None) -> None:
    """Joins (or makes) the process group and sets up fairscale's model-parallel groups once."""
    _init_distributed(backend)
    if not model_parallel_is_initialized():
        if model_parallel_size is None:
            model_parallel_size = int(os.environ.get("WORLD_SIZE", 1))
        initialize_model_parallel(model_parallel_size)


def build_transformer(model_args: ModelArgs, dtype: torch.dtype) -> Transformer:
    """A Transformer whose parameters are created in `dtype` (the caller's default dtype is left as it was)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Transformer(model_args)
    finally:
        torch.set_default_dtype(default_dtype)


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str],
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        kv_config=None,
        device: Optional[str] = None,
        dtype=None,
    ) -> "Llama":
        """
        Build a Llama instance by initializing and loading a model checkpoint.

        Args:
            ckpt_dir (str): a native checkpoint (params.json + consolidated.NN.pth) or a Hugging Face Llama folder
                (config.json + model.safetensors or sharded model-0000N-of-0000M.safetensors), loaded directly
                (one model-parallel rank; convert with scripts/convert_hf.py to shard it).
            tokenizer_path (str): Path to the tokenizer file (tokenizer.model, tokenizer.gguf or tokenizer.json);
                None: the one in ckpt_dir.
            max_seq_len (int): Maximum sequence length for input text.
            max_batch_size (int): Maximum batch size for inference.
            model_parallel_size (Optional[int], optional): Number of model parallel processes.
                If not provided, it's determined from the environment. Defaults to None.
            seed (int): random seed, the same on every rank.
            kv_config: KV-cache compression: None (uncompressed), a config object, a dict {"method": NAME,
                ...options} over the method's shipped adaptive_kv_cache/configs/NAME.json (without "method":
                FastGen's overrides of configs/config.json), or a path to a config JSON file.
            device: 'cpu', 'cuda' or 'cuda:N'; default CUDA when available. Under torchrun 'cuda' means the
                rank's local GPU.
            dtype: parameters and KV cache: 'float32', 'bfloat16' or 'float16' (or a torch.dtype); default
                bfloat16 on CUDA (float16 without bf16 support) and float32 on CPU.

        Returns:
            Llama: An instance of the Llama class with the loaded model and tokenizer.

        Raises:
            FileNotFoundError, ValueError: bad paths or settings, before any weights are read.
        """
        # Settings first: a bad config, device or dtype must fail before any model work.
        from llama.checkpoint import (
            check_hf_folder, find_native_shards, human_count, is_hf_folder, load_hf_folder,
            parameter_count, trained_context,
        )

        if kv_config is not None:  # uncompressed runs never import adaptive_kv_cache
            from adaptive_kv_cache.config import resolve_kv_config

            kv_config = resolve_kv_config(kv_config)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        ckpt = Path(ckpt_dir)
        if not ckpt.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {ckpt_dir} not found; pass --ckpt_dir pointing at a folder with "
                f"params.json and consolidated.NN.pth (or a Hugging Face folder with config.json and safetensors)"
            )
        checkpoints: List[Path] = []
        if is_hf_folder(ckpt):
            params = check_hf_folder(ckpt)
        else:
            checkpoints = find_native_shards(ckpt)
            if not checkpoints:
                raise FileNotFoundError(
                    f"no checkpoint files (*.pth) in {ckpt_dir}; a native checkpoint holds consolidated.00.pth "
                    f"(one file per model-parallel rank) and params.json, a Hugging Face folder config.json and "
                    f"*.safetensors"
                )
            params = load_params(ckpt)
        if tokenizer_path is None:
            tokenizer_path = find_tokenizer(str(ckpt))
        elif not Path(tokenizer_path).is_file():
            raise FileNotFoundError(f"tokenizer file {tokenizer_path} not found; pass --tokenizer_path pointing at "
                                    f"the model's tokenizer file")

        setup_model_parallel(model_parallel_size, backend="nccl" if device.type == "cuda" else "gloo")
        world = get_model_parallel_world_size()
        if checkpoints and len(checkpoints) != world:
            raise ValueError(
                f"{ckpt_dir} holds {len(checkpoints)} checkpoint shards but the run has "
                f"{world} model-parallel ranks; run "
                f"`torchrun --nproc_per_node {len(checkpoints)} ...` (or re-shard with scripts/shard_checkpoint.py)"
            )
        if not checkpoints and world != 1:
            raise ValueError(
                f"{ckpt_dir} is a Hugging Face folder, which loads on one rank; for {world} ranks convert it "
                f"(scripts/convert_hf.py) and shard it (scripts/shard_checkpoint.py)"
            )
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)

        # seed must be the same in all processes
        torch.manual_seed(seed)

        if local_rank > 0:
            sys.stdout = open(os.devnull, "w")

        start_time = time.time()
        tokenizer = load_tokenizer(tokenizer_path)
        tie = params.pop("tie_word_embeddings", None)
        model_args: ModelArgs = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        if model_args.vocab_size == -1:  # Meta's Llama 2 params.json leaves it to the tokenizer
            model_args.vocab_size = tokenizer.n_words
        if tokenizer.n_words != model_args.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the model in {ckpt_dir} has "
                f"vocab_size={model_args.vocab_size}; pass the tokenizer that belongs to this checkpoint"
            )
        context = trained_context(ckpt, {**params, "tie_word_embeddings": tie})
        if context is not None and max_seq_len > context and get_model_parallel_rank() == 0:
            print(f"warning: max_seq_len={max_seq_len} exceeds the {context} positions {ckpt.name} was trained "
                  f"on; text past position {context} is unreliable", file=sys.stderr)
        if checkpoints:
            source = checkpoints[get_model_parallel_rank()]
            checkpoint = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        else:
            source = ckpt
            _params, checkpoint = load_hf_folder(ckpt, dtype=dtype)
        n_params = parameter_count(checkpoint)
        model = build_transformer(model_args, dtype)
        try:
            model.load_state_dict(checkpoint, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{source} does not match the model's settings in {ckpt_dir}: {e}") from None
        del checkpoint
        model.to(device)
        parallel = f", {world} model-parallel ranks" if world > 1 else ""
        print(f"Loaded {ckpt.name} ({human_count(n_params)} parameters{' per rank' if world > 1 else ''}) from "
              f"{ckpt_dir} in {time.time() - start_time:.2f} s: device {device}, dtype "
              f"{str(dtype).replace('torch.', '')}, {torch.get_num_threads()} CPU thread(s){parallel}",
              file=sys.stderr)

        llama = Llama(model, tokenizer, kv_config=kv_config)
        llama.ckpt_dir = str(ckpt_dir)
        llama.tokenizer_path = str(tokenizer_path)
        llama.trained_context = context
        return llama

    def __init__(self, model: Transformer, tokenizer, kv_config=None):
        self.model = model
        self.tokenizer = tokenizer
        self.chat_format = chat_format_for(tokenizer)
        self.set_kv_config(kv_config)
        self.kv_stats: Optional[Dict] = None  # memory statistics of the last generation
        self.prefill_chunk: Optional[int] = DEFAULT_PREFILL_CHUNK  # tokens per prompt pass (None: one pass)
        self.ckpt_dir: Optional[str] = None  # where Llama.build read the model (for logs)
        self.tokenizer_path: Optional[str] = None
        self.trained_context: Optional[int] = None  # positions the model was trained on, where known
        self.attention_observer = None  # callable(layer_id, maps, policies); see adaptive_kv_cache.images

    def set_kv_config(self, kv_config) -> None:
        """Switches KV compression for later generations: None, a config object, a dict ({"method": NAME,
        ...options}; without "method", FastGen's overrides) or a path to a config JSON."""
        self.kv_config = None
        self.token_classes = None  # FastGen's special/punctuation classes of the vocabulary
        self.kv_method = None  # the config bound to this model (adaptive_kv_cache.registry.Prepared)
        if kv_config is None:
            return  # uncompressed: nothing of adaptive_kv_cache is imported
        from adaptive_kv_cache.config import resolve_kv_config
        from adaptive_kv_cache.registry import Prepared

        self.kv_config = resolve_kv_config(kv_config)
        self.kv_method = Prepared(self.kv_config, self)
        if self.kv_method.name == "fastgen":
            self.token_classes = self.kv_method.context

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, which the KV cache follows."""
        return self.model.output.weight.dtype

    def new_cache(self, prompt_tokens: List[List[int]], total_len: int):
        """The KV cache for one generation over these prompts (compressed when kv_config is set)."""
        params = self.model.params
        if self.kv_config is None:
            return DenseKVCache(params.n_layers, params.max_seq_len, capacity=total_len)
        return self.kv_method.new_cache(params.n_layers, prompt_tokens, params.max_seq_len,
                                        observer=self.attention_observer)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_tokens: Optional[frozenset] = None,
        on_token: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """
        Generate text sequences based on provided prompts using the language generation model.

        Args:
            prompt_tokens (List[List[int]]): List of tokenized prompts, where each prompt is represented as a list of integers.
            max_gen_len (int): Maximum length of the generated text sequence.
            temperature (float, optional): Temperature value for controlling randomness in sampling (0 = greedy).
            top_p (float, optional): Top-p probability threshold for nucleus sampling. Defaults to 0.9.
            logprobs (bool, optional): Flag indicating whether to compute token log probabilities. Defaults to False.
            echo (bool, optional): Flag indicating whether to include prompt tokens in the generated output. Defaults to False.
            stop_tokens: token ids that end a sequence (default: the tokenizer's EOS and end-of-turn tokens).
            on_token: called after each decoding step as on_token(cur_pos, next_token (bsz,), generated (bsz,)
                bool), generated marking the sequences past their prompt and not stopped before this step
                (their new token may be a stop token); for streaming and progress.

        Returns:
            Tuple[List[List[int]], Optional[List[List[float]]]]: A tuple containing generated token sequences and, if logprobs is True, corresponding token log probabilities.

        Note:
            Each sequence stops at its first stop token; the batch stops when all have. The memory statistics
            of the generation's KV cache are left in `self.kv_stats`.
        """
        params = self.model.params
        bsz = len(prompt_tokens)
        if bsz == 0:
            raise ValueError("no prompts given")
        if bsz > params.max_batch_size:
            raise ValueError(
                f"{bsz} prompts exceed max_batch_size={params.max_batch_size}; build with a larger "
                f"--max_batch_size or pass fewer prompts"
            )
        if not 0.0 <= top_p <= 1.0 or temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in [0, 1]")
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len={max_gen_len} must be >= 0")

        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        if min_prompt_len == 0:
            raise ValueError(f"prompt {[len(t) for t in prompt_tokens].index(0)} is empty after tokenization")
        if max_prompt_len > params.max_seq_len:
            raise ValueError(
                f"prompt {[len(t) for t in prompt_tokens].index(max_prompt_len)} has {max_prompt_len} tokens, "
                f"more than max_seq_len={params.max_seq_len}; shorten it or build with a larger --max_seq_len"
            )
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
        if stop_tokens is None:
            stop_tokens = self.tokenizer.stop_tokens | {self.tokenizer.eos_id}

        device = self.device
        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        input_text_mask = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            input_text_mask[k, : len(t)] = True
        if logprobs:
            token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
        stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)

        cache = self.new_cache(prompt_tokens, total_len)
        prev_pos = 0
        eos_reached = torch.tensor([False] * bsz, device=device)
        if min_prompt_len == total_len:
            logits = self.model.forward(tokens, prev_pos, cache)
            if logprobs:
                token_logprobs[:, 1:] = -F.cross_entropy(
                    input=logits[:, :-1].transpose(1, 2), target=tokens[:, 1:], reduction="none"
                )

        for cur_pos in range(min_prompt_len, total_len):
            logits, prev_pos = self._forward(tokens, prev_pos, cur_pos, cache, token_logprobs if logprobs else None)
            if temperature > 0:
                probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p)
            else:
                next_token = torch.argmax(logits[:, -1], dim=-1)

            next_token = next_token.reshape(-1)
            # only replace token if prompt has already been generated
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if on_token is not None:
                on_token(cur_pos, next_token, ~input_text_mask[:, cur_pos] & ~eos_reached)
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    input=logits.transpose(1, 2),
                    target=tokens[:, prev_pos + 1 : cur_pos + 1],
                    reduction="none",
                )
            eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stop)
            prev_pos = cur_pos
            if all(eos_reached):
                break
        self.kv_stats = cache.memory_stats()

        if logprobs:
            token_logprobs = token_logprobs.tolist()
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            # cut to max gen len
            start = 0 if echo else len(prompt_tokens[i])
            toks = toks[start : len(prompt_tokens[i]) + max_gen_len]
            probs = None
            if logprobs:
                probs = token_logprobs[i][start : len(prompt_tokens[i]) + max_gen_len]
            # cut to the first stop token, if any
            for j, tok in enumerate(toks):
                if tok in stop_tokens and (echo is False or j >= len(prompt_tokens[i])):
                    toks = toks[:j]
                    probs = probs[:j] if logprobs else None
                    break
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return (out_tokens, out_logprobs if logprobs else None)

    def _forward(self, tokens: torch.Tensor, start: int, end: int, cache, token_logprobs=None):
        """Feeds tokens[:, start:end] in passes of at most `prefill_chunk` tokens.

        A long prompt's activations, attention tiles and logits stay bounded by the chunk, not the prompt.

        Args:
            tokens: (bsz, total_len) token ids.
            token_logprobs: (bsz, total_len) filled for every pass but the last (whose targets may not be known
                yet), or None (then only the last position's logits are computed).

        Returns:
            (logits of the last pass: (bsz, its length, vocab), or (bsz, 1, vocab) without logprobs;
             the start position of the last pass).
        """
        chunk = self.prefill_chunk or (end - start)
        starts = list(range(start, end, chunk))
        for s in starts:
            e = min(end, s + chunk)
            logits = self.model.forward(tokens[:, s:e], s, cache, last_logits_only=token_logprobs is None)
            if token_logprobs is not None and s != starts[-1]:
                token_logprobs[:, s + 1 : e + 1] = -F.cross_entropy(
                    input=logits.transpose(1, 2), target=tokens[:, s + 1 : e + 1], reduction="none"
                )
        return logits, starts[-1]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        on_token: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    ) -> List[CompletionPrediction]:
        """
        Perform text completion for a list of prompts using the language generation model.

        Args:
            prompts (List[str]): List of text prompts for completion.
            temperature (float, optional): Temperature value for controlling randomness in sampling. Defaults to 0.6.
            top_p (float, optional): Top-p probability threshold for nucleus sampling. Defaults to 0.9.
            max_gen_len (Optional[int], optional): Maximum length of the generated completion sequence.
                If not provided, it's set to the model's maximum sequence length minus 1.
            logprobs (bool, optional): Flag indicating whether to compute token log probabilities. Defaults to False.
            echo (bool, optional): Flag indicating whether to include prompt tokens in the generated output. Defaults to False.
            on_token: streaming callback, see `generate`.

        Returns:
            List[CompletionPrediction]: List of completion predictions, each containing the generated text completion.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        # SmolLM2-style vocabularies reuse their BOS id as a chat marker and expect no BOS in front of text.
        prompt_tokens = [self.tokenizer.encode(x, bos=self.tokenizer.add_bos, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
            echo=echo,
            on_token=on_token,
        )
        if logprobs:
            return [
                {
                    "generation": self.tokenizer.decode(t),
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": logprobs_i,
                }
                for t, logprobs_i in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        on_token: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    ) -> List[ChatPrediction]:
        """
        Generate assistant responses for a list of conversational dialogs using the language generation model.

        Args:
            dialogs (List[Dialog]): List of conversational dialogs, where each dialog is a list of messages.
            temperature (float, optional): Temperature value for controlling randomness in sampling. Defaults to 0.6.
            top_p (float, optional): Top-p probability threshold for nucleus sampling. Defaults to 0.9.
            max_gen_len (Optional[int], optional): Maximum length of the generated response sequence.
                If not provided, it's set to the model's maximum sequence length minus 1.
            logprobs (bool, optional): Flag indicating whether to compute token log probabilities. Defaults to False.
            on_token: streaming callback, see `generate`.

        Returns:
            List[ChatPrediction]: List of chat predictions, each containing the assistant's generated response.

        Raises:
            ValueError: a dialog is malformed (roles must be an optional 'system', then 'user' and
                'assistant' alternating, ending with 'user').

        Note:
            The template (Llama 2 [INST], Llama 3 headers or ChatML) follows the tokenizer; generation stops at
            the template's end-of-turn tokens.
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        for i, dialog in enumerate(dialogs):
            validate_dialog(dialog, i)
        unsafe_requests = [self.chat_format.unsafe(dialog) for dialog in dialogs]
        prompt_tokens = [self.chat_format.encode_dialog_prompt(dialog) for dialog in dialogs]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
            stop_tokens=self.chat_format.stop_tokens,
            on_token=on_token,
        )
        if logprobs:
            return [
                {
                    "generation": {
                        "role": "assistant",
                        "content": self.tokenizer.decode(t) if not unsafe else UNSAFE_ERROR,
                    },
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": logprobs_i,
                }
                for t, logprobs_i, unsafe in zip(generation_tokens, generation_logprobs, unsafe_requests)
            ]
        return [
            {
                "generation": {
                    "role": "assistant",
                    "content": self.tokenizer.decode(t) if not unsafe else UNSAFE_ERROR,
                }
            }
            for t, unsafe in zip(generation_tokens, unsafe_requests)
        ]


def sample_top_p(probs, p):
    """
    Perform top-p (nucleus) sampling on a probability distribution.

    Args:
        probs (torch.Tensor): Probability distribution tensor.
        p (float): Probability threshold for top-p sampling.

    Returns:
        torch.Tensor: Sampled token indices.

    Note:
        Top-p sampling selects the smallest set of tokens whose cumulative probability mass
        exceeds the threshold p. The distribution is renormalized based on the selected tokens.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)
