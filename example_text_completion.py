# A fork of Meta's example_text_completion.py with FastGen KV-cache compression (on by default).
"""Text completion: built-in prompts, your own (--prompt, repeatable) or the start of a file (--prompt_file).

`max_gen_len` is needed because pre-trained models usually do not stop completions naturally. Every argument
and file is checked before the model loads; a bad one prints one line and exits non-zero.
"""

import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from adaptive_kv_cache.cli import (
    ArgumentParser, Progress, TokenStream, UserError, add_common_arguments, build_generator,
    check_common, rank, run_cli,
)

PROG = "example_text_completion.py"

DEMO_PROMPTS = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "Once upon a time",
    "Lily and Ben went to the park. They saw a big dog",
    "The little bird was sad because",
]


def parse_args(argv: Optional[Sequence[str]]):
    parser = ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Text completion with FastGen KV-cache compression.",
        epilog="Without --prompt or --prompt_file three TinyStories-style prompts run. Errors are one line; "
               "--debug (or ADAPTIVE_KV_DEBUG=1) shows tracebacks.",
    )
    add_common_arguments(parser, ckpt_dir=None, max_gen_len=64)
    g = parser.add_argument_group("what to complete")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a text to complete; repeat for several (run together, up to --max_batch_size at a time)")
    g.add_argument("--prompt_file", metavar="FILE", help="complete the first --prompt_tokens tokens of this file")
    g.add_argument("--prompt_tokens", type=int, default=320,
                   help="tokens of --prompt_file to use (default 320)")
    return parser.parse_args(argv)


def read_prompt_file(args) -> Optional[str]:
    if args.prompt_file is None:
        return None
    if args.prompt_tokens < 1:
        raise UserError(f"--prompt_tokens {args.prompt_tokens} must be >= 1")
    path = Path(args.prompt_file)
    if not path.is_file():
        raise UserError(f"--prompt_file {args.prompt_file}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--prompt_file {args.prompt_file}: not UTF-8 text") from None
    if not text.strip():
        raise UserError(f"--prompt_file {args.prompt_file} is empty")
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if any(not p.strip() for p in args.prompt):
        raise UserError("--prompt is empty")
    file_text = read_prompt_file(args)
    n_prompts = len(args.prompt) + (file_text is not None) or len(DEMO_PROMPTS)
    if args.image_seq >= n_prompts:
        raise UserError(f"--image_seq {args.image_seq}: there are only {n_prompts} prompts (0-based)")
    checked = check_common(args)

    generator, run = build_generator(PROG, args, checked, argv)
    tok = generator.tokenizer

    prompts: List[str] = list(args.prompt)
    if file_text is not None:
        ids = tok.encode(file_text, bos=False, eos=False)[: args.prompt_tokens]
        prompts.append(tok.decode(ids))
    if not prompts:
        prompts = DEMO_PROMPTS
    prompt_tokens = [tok.encode(p, bos=tok.add_bos, eos=False) for p in prompts]  # as text_completion does
    for i, t in enumerate(prompt_tokens):
        if len(t) >= args.max_seq_len:
            raise UserError(f"prompt {i} has {len(t)} tokens, leaving no room to generate within --max_seq_len "
                            f"{args.max_seq_len}")

    bs = args.max_batch_size
    n_batches = (len(prompts) + bs - 1) // bs
    if n_batches > 1 and rank() == 0:
        print(f"{len(prompts)} prompts, --max_batch_size {bs}: running {n_batches} batches", file=sys.stderr)
    for k in range(n_batches):
        batch, tokens = prompts[k * bs : (k + 1) * bs], prompt_tokens[k * bs : (k + 1) * bs]
        if len(batch) == 1:
            print(batch[0])
            print("> ", end="", flush=True)
            callback = TokenStream(tok, tok.stop_tokens | {tok.eos_id})
        else:
            callback = Progress(args.max_gen_len)
        start = time.time()
        results = generator.text_completion(batch, max_gen_len=args.max_gen_len, temperature=args.temperature,
                                            top_p=args.top_p, on_token=callback)
        seconds = time.time() - start
        outputs = [r["generation"] for r in results]
        if len(batch) == 1:
            print(outputs[0][len(callback.printed):] if outputs[0].startswith(callback.printed) else "")
            print("\n==================================\n")
        else:
            callback.close()
            for prompt, out in zip(batch, outputs):
                print(prompt)
                print(f"> {out}")
                print("\n==================================\n")
        label = f"Batch {k + 1} of {n_batches}" if n_batches > 1 else "Batch"
        paths = run.add_batch(batch, tokens, outputs, seconds, label=label)
        run.report(paths, run.images(tokens, k * bs))
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
