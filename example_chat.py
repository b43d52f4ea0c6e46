# A fork of Meta's example_chat_completion.py with FastGen KV-cache compression (on by default).
"""Chat with a model: built-in demo dialogs, your own (--prompt, --dialog_file) or live (--interactive).

Every argument and file is checked before the model loads; a bad one prints one line and exits non-zero.
"""

import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from adaptive_kv_cache.cli import (
    ArgumentParser, Progress, RunRecord, TokenStream, UserError, add_common_arguments, build_generator,
    check_common, rank, run_cli, world_size,
)

PROG = "example_chat.py"

DEMO_DIALOGS = [
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
]


def parse_args(argv: Optional[Sequence[str]]):
    parser = ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Chat completion with FastGen KV-cache compression. The chat template (Llama 2 [INST], "
                    "Llama 3 headers or ChatML) follows the tokenizer.",
        epilog="Without --prompt, --dialog_file or --interactive the three demo dialogs run. Errors are one "
               "line; --debug (or ADAPTIVE_KV_DEBUG=1) shows tracebacks.",
    )
    # 96 tokens per answer keep the demo under a minute on a busy 2-vCPU machine (a decode step of the 3-dialog
    # batch took 0.36 s there); a longer answer is marked as cut, --max_gen_len raises the limit
    add_common_arguments(parser, ckpt_dir="models/SmolLM2-135M-Instruct", max_gen_len=96)
    g = parser.add_argument_group("what to say")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a user message; repeat for several dialogs (one turn each)")
    g.add_argument("--system", metavar="TEXT", help="system message for --prompt and --interactive")
    g.add_argument("--dialog_file", metavar="FILE",
                   help='JSON file: a list of dialogs, each a list of {"role", "content"} messages (or one dialog)')
    g.add_argument("--interactive", action="store_true",
                   help="multi-turn chat on stdin: answers stream as they are generated, the KV table follows "
                        "each; /reset forgets the conversation, /exit or Ctrl-D ends")
    return parser.parse_args(argv)


def load_dialog_file(path: str) -> List[list]:
    """The dialogs of a JSON file, each checked (roles alternate, the last is the user's)."""
    from llama.chat_format import validate_dialog

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--dialog_file {path}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"--dialog_file {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"--dialog_file {path}: not UTF-8 text") from None
    if isinstance(data, list) and data and all(isinstance(m, dict) for m in data):
        data = [data]  # one dialog
    if not isinstance(data, list) or not data:
        raise UserError(f"--dialog_file {path}: expected a non-empty list of dialogs (each a list of "
                        f'{{"role", "content"}} messages)')
    for i, dialog in enumerate(data):
        try:
            validate_dialog(dialog, i)
        except ValueError as e:
            raise UserError(f"--dialog_file {path}: {e}") from None
    return data


def dialogs_from_args(args) -> List[list]:
    if args.interactive:
        if args.prompt or args.dialog_file:
            raise UserError("--interactive reads the conversation from stdin; drop --prompt and --dialog_file")
        return []
    system = [{"role": "system", "content": args.system}] if args.system else []
    dialogs = [system + [{"role": "user", "content": p}] for p in args.prompt]
    if args.dialog_file:
        dialogs += load_dialog_file(args.dialog_file)
    if args.system and not args.prompt:
        raise UserError("--system applies to --prompt and --interactive; put system messages of --dialog_file "
                        "dialogs in the file")
    if not dialogs:
        dialogs = DEMO_DIALOGS
    if any(not p.strip() for p in args.prompt):
        raise UserError("--prompt is empty")
    if args.image_seq >= len(dialogs):
        raise UserError(f"--image_seq {args.image_seq}: there are only {len(dialogs)} dialogs (0-based)")
    return dialogs


def print_dialog(dialog) -> None:
    for msg in dialog:
        print(f"{msg['role'].capitalize()}: {msg['content']}\n")


def cut_note(stopped: bool, args, prompt_len: int) -> str:
    """A visible mark on an answer that ended because the length ran out, not because the model was done."""
    if stopped:
        return ""
    if prompt_len + args.max_gen_len > args.max_seq_len:
        return f" [cut at --max_seq_len {args.max_seq_len}]"
    return f" [cut at --max_gen_len {args.max_gen_len}]"


def run_batches(generator, run: RunRecord, args, dialogs) -> None:
    fmt = generator.chat_format
    prompt_tokens = [fmt.encode_dialog_prompt(d) for d in dialogs]
    for i, t in enumerate(prompt_tokens):  # all of them, before generating anything
        if len(t) >= args.max_seq_len:
            raise UserError(f"dialog {i} has {len(t)} prompt tokens, leaving no room to answer within "
                            f"--max_seq_len {args.max_seq_len}")
    bs = args.max_batch_size
    n_batches = (len(dialogs) + bs - 1) // bs
    if n_batches > 1 and rank() == 0:
        print(f"{len(dialogs)} dialogs, --max_batch_size {bs}: running {n_batches} batches", file=sys.stderr)
    for k in range(n_batches):
        batch, tokens = dialogs[k * bs : (k + 1) * bs], prompt_tokens[k * bs : (k + 1) * bs]
        if len(batch) == 1:
            print_dialog(batch[0])
            print("> Assistant: ", end="", flush=True)
            callback = TokenStream(generator.tokenizer, fmt.stop_tokens)
        else:
            callback = Progress(args.max_gen_len, fmt.stop_tokens, len(batch))
        start = time.time()
        results = generator.chat_completion(batch, temperature=args.temperature, top_p=args.top_p,
                                            max_gen_len=args.max_gen_len, on_token=callback)
        seconds = time.time() - start
        answers = [r["generation"]["content"] for r in results]
        if len(batch) == 1:
            rest = answers[0][len(callback.printed):] if answers[0].startswith(callback.printed) else ""
            print(rest + cut_note(callback.done, args, len(tokens[0])))
            print("\n==================================\n")
            stopped = [callback.done]
        else:
            callback.close()
            for dialog, answer, done, t in zip(batch, answers, callback.stopped, tokens):
                print_dialog(dialog)
                print(f"> Assistant: {answer}{cut_note(done, args, len(t))}")
                print("\n==================================\n")
            stopped = callback.stopped
        label = f"Batch {k + 1} of {n_batches}" if n_batches > 1 else "Batch"
        paths = run.add_batch(batch, tokens, answers, seconds, label=label, cut=[not s for s in stopped])
        run.report(paths, run.images(tokens, k * bs))


def read_line(prompt: str) -> Optional[str]:
    """A line of stdin (None at end of input); under torchrun rank 0 reads and every rank gets it."""
    line = None
    if rank() == 0:
        print(prompt, end="", flush=True)
        line = sys.stdin.readline()
        if line and not sys.stdin.isatty():
            print(line.rstrip("\n"))  # echo piped input so the transcript reads as a chat
        line = line or None
    if world_size() > 1:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def interactive(generator, run: RunRecord, args) -> None:
    fmt = generator.chat_format
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    if rank() == 0:
        print("Type a message and press Enter; /reset forgets the conversation, /exit or Ctrl-D ends.",
              file=sys.stderr)
    turn = 0
    while True:
        line = read_line("User: ")
        if line is None:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        dialog = history + [{"role": "user", "content": text}]
        tokens = fmt.encode_dialog_prompt(dialog)
        dropped = 0
        while len(tokens) >= args.max_seq_len and len(dialog) > len(system) + 1:
            dialog = system + dialog[len(system) + 2 :]  # the oldest user + assistant exchange
            tokens = fmt.encode_dialog_prompt(dialog)
            dropped += 1
        if len(tokens) >= args.max_seq_len:
            print(f"(that message is {len(tokens)} tokens with the template; --max_seq_len is {args.max_seq_len})",
                  file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest exchange(s) to fit --max_seq_len {args.max_seq_len})",
                  file=sys.stderr)
        print("Assistant: ", end="", flush=True)
        stream = TokenStream(generator.tokenizer, fmt.stop_tokens)
        start = time.time()
        result = generator.chat_completion([dialog], temperature=args.temperature, top_p=args.top_p,
                                           max_gen_len=args.max_gen_len, on_token=stream)
        seconds = time.time() - start
        answer = result[0]["generation"]["content"]
        print((answer[len(stream.printed):] if answer.startswith(stream.printed) else "") + cut_note(stream.done, args, len(tokens)))
        print()
        history = dialog + [{"role": "assistant", "content": answer}]
        turn += 1
        paths = run.add_batch([dialog], [tokens], [answer], seconds, label=f"Turn {turn}", cut=[not stream.done])
        run.report(paths, run.images([tokens], run.image_seq, subfolder=f"turn{turn:02d}"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    dialogs = dialogs_from_args(args)
    checked = check_common(args)

    generator, run = build_generator(PROG, args, checked, argv)
    if args.interactive:
        interactive(generator, run, args)
    else:
        run_batches(generator, run, args, dialogs)
    return 0


if __name__ == "__main__":
    run_cli(main, prog=PROG)
