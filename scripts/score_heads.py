"""Scores every KV head of a model on needle retrieval (HeadKV) and saves the scores next to the checkpoint.

    python scripts/score_heads.py --ckpt_dir models/SmolLM2-135M-Instruct            # -> .../head_scores.json
    python example_chat.py --method headkv --budget 0.3 --kv_option scorer=snapkv      # uses them

A fact ("<name>'s secret word is <word>.") is planted at several depths of filler text, the question follows,
and a head's score is the attention its query heads give to the fact's tokens from the queries that produce the
answer, averaged over the trials the model answers right (`adaptive_kv_cache/methods/headkv.py`).
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_dir", required=True)
    p.add_argument("--text", default=None, help="filler text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024], help="prompt lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--trials", type=int, default=2, help="facts per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default: head_scores.json in --ckpt_dir")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from adaptive_kv_cache.methods.headkv import SCORES_FILE, needle_head_scores, needle_items
    from benchmarks import LONG_TEXT
    from benchmarks.quality import bos_prefix, token_stream
    from llama import Llama

    t0 = time.perf_counter()
    llama = Llama.build(args.ckpt_dir, None, max_seq_len=max(args.lengths) + 64, max_batch_size=1, device="cpu")
    text = args.text or str(LONG_TEXT)
    stream = token_stream(llama.tokenizer, text, 4 * max(args.lengths))
    items = needle_items(llama.tokenizer, stream, args.lengths, args.depths, args.trials, random.Random(args.seed),
                         bos_prefix(llama.tokenizer, "auto"))
    result = needle_head_scores(llama, items)
    result.update(model=Path(args.ckpt_dir).resolve().name, lengths=args.lengths, depths=args.depths,
                  trials=args.trials, seed=args.seed, text=text, seconds=round(time.perf_counter() - t0, 1),
                  score="mean attention on the fact's tokens from the answer's queries, over right answers")
    out = Path(args.out) if args.out else Path(args.ckpt_dir) / SCORES_FILE
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{out}: {result['correct']} of {result['items']} answered right; {result['seconds']} s", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
