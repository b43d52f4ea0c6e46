# A fork of Meta's example_text_completion.py with FastGen KV-cache compression (on by default).

import os
from typing import List, Optional

import fire

from adaptive_kv_cache.cli import attach_outputs, kv_config_from_flags, report_outputs
from llama.tokenizer import find_tokenizer
from llama import Llama


def main(
    ckpt_dir: str,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    prompt_file: Optional[str] = None,
    prompt_tokens: int = 320,
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
    Examples to run with the models finetuned for text completion. Prompts are usually in the form of an
    incomplete text prefix that the model can then try to complete.

    `max_gen_len` is needed because pre-trained models usually do not stop completions naturally.

    Args:
        ckpt_dir: native checkpoint directory (consolidated.NN.pth + params.json).
        tokenizer_path: tokenizer file; default: tokenizer.model or tokenizer.gguf inside ckpt_dir.
        prompt_file: complete the first `prompt_tokens` tokens of this text file instead of the built-in prompts.
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

    if prompt_file is not None:
        with open(prompt_file, encoding="utf-8") as f:
            ids = generator.tokenizer.encode(f.read(), bos=False, eos=False)[:prompt_tokens]
        prompts: List[str] = [generator.tokenizer.decode(ids)]
    else:
        prompts = [
            # For these prompts, the expected answer is the natural continuation of the prompt
            "Once upon a time",
            "Lily and Ben went to the park. They saw a big dog",
            "The little bird was sad because",
        ]
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")
    report_outputs(generator, log_dir, image_dir, rank=int(os.environ.get("RANK", 0)))


if __name__ == "__main__":
    fire.Fire(main)
