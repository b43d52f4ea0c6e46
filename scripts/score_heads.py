"""Scores every KV head of a model on needle retrieval (HeadKV) and saves the scores next to the checkpoint.

    python scripts/score_heads.py --ckpt_dir models/SmolLM2-135M-Instruct            # -> .../head_scores.json
    python example_chat.py --method headkv --budget 0.3 --kv_option scorer=snapkv      # uses them

The prompts are the needle tasks of the quality harness (`benchmarks/tasks.py`: single_needle and multi_key, in
the model's chat format, ending with the answer's prefix) at several lengths and depths, with a seed of their
own (not the harness's, so the heads are not scored on the items they are evaluated on). A head's score is the
attention its query heads give to the planted fact's tokens from the queries that produce the answer, averaged
over the items the model answers right (`adaptive_kv_cache/methods/headkv.py`).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def needle_item(tok, item):
    """The dict `needle_head_scores` takes for one task item: prompt, answer ids, the fact's token span."""
    from adaptive_kv_cache.methods.headkv import token_span

    value = item.answers[0]
    head = tok.encode(item.answer_prefix, bos=False, eos=False)
    full = tok.encode(f"{item.answer_prefix} {value}", bos=False, eos=False)
    answer = full[len(head):] if full[: len(head)] == head else tok.encode(f" {value}", bos=False, eos=False)
    span = token_span(tok, list(item.prompt), f"{item.answer_prefix} {value}.")
    return {"prompt": list(item.prompt), "answer": answer, "span": span}


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--tokenizer_path", default=None, help="default: tokenizer.model or tokenizer.gguf in --ckpt_dir")
    p.add_argument("--tasks", nargs="+", default=["single_needle", "multi_key"], choices=["single_needle", "multi_key"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=1, help="items per (task, length, depth)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the items (the quality harness uses 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: head_scores.json in --ckpt_dir")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from adaptive_kv_cache.methods.headkv import SCORES_FILE, needle_head_scores
    from benchmarks.tasks import TaskBuilder, TaskText, cells, make_items
    from llama import Llama

    t0 = time.perf_counter()
    llama = Llama.build(args.ckpt_dir, args.tokenizer_path, max_seq_len=max(args.lengths) + 64, max_batch_size=1,
                        device="cpu")
    tok = llama.tokenizer
    builder = TaskBuilder(TaskText(tok), llama.chat_format)
    items = make_items(builder, cells(args.tasks, args.lengths), args.depths, args.trials, args.seed)
    from tqdm import tqdm

    bar = lambda xs: tqdm(xs, desc="scoring heads", unit="prompt", file=sys.stderr)  # noqa: E731
    result = needle_head_scores(llama, [needle_item(tok, it) for it in items], progress=bar)
    result.update(model=Path(args.ckpt_dir).resolve().name, tasks=args.tasks, lengths=args.lengths,
                  depths=args.depths, trials=args.trials, seed=args.seed, seconds=round(time.perf_counter() - t0, 1),
                  score="mean attention on the fact's tokens from the answer's queries, over right answers")
    out = Path(args.out) if args.out else Path(args.ckpt_dir) / SCORES_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)  # nothing half-written on failure
    print(f"{out}: {result['correct']} of {result['items']} answered right; {result['seconds']} s", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
