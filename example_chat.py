# A fork of Meta's example_chat_completion.py with FastGen KV-cache compression (on by default).

import os
from typing import List, Optional

import fire

from adaptive_kv_cache.cli import attach_outputs, kv_config_from_flags, report_outputs
from llama.tokenizer import find_tokenizer
from llama import Dialog, Llama


def main(
    ckpt_dir: str = "models/SmolLM2-135M-Instruct",
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    kv_config: Optional[str] = None,
    T: Optional[float] = None,
    r_l: Optional[float] = None,
    r_f: Optional[float] = None,
    compress: bool = True,
    no_compress: bool = False,
    log_dir: str = "logs",
    image_dir: str = "images",
):
    """
    Examples to run with the models finetuned for chat. Prompts correspond of chat turns between the user and
    assistant with the final one always being the user. The chat template (Llama 2 [INST], Llama 3 headers or
    ChatML) follows the tokenizer.

    Args:
        ckpt_dir: native checkpoint directory (consolidated.NN.pth + params.json).
        tokenizer_path: tokenizer file; default: tokenizer.model or tokenizer.gguf inside ckpt_dir.
        kv_config: FastGen config JSON (default adaptive_kv_cache/configs/config.json); --T, --r_l, --r_f
            override it; --no-compress (or --nocompress) runs with the uncompressed cache.
        log_dir, image_dir: where the KV memory logs and (with SAVE_IMAGE=1) attention heatmaps go.
    """
    config = kv_config_from_flags(kv_config, T, r_l, r_f, compress and not no_compress)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path or find_tokenizer(ckpt_dir),
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        kv_config=config,
    )
    attach_outputs(generator, image_dir)

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You are a helpful assistant. Answer in one or two sentences."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [
            {"role": "user", "content": "Tell me a very short story about a cat."},
            {"role": "assistant", "content": "A small cat found a warm spot in the sun and slept all day."},
            {"role": "user", "content": "Now give the cat a name and tell me what it dreams about."},
        ],
    ][:max_batch_size]
    results = generator.chat_completion(
        dialogs,  # type: ignore
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )

    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")
    report_outputs(generator, log_dir, image_dir, rank=int(os.environ.get("RANK", 0)))


if __name__ == "__main__":
    fire.Fire(main)
