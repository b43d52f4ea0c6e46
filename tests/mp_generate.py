"""Greedy generation from a (possibly sharded) checkpoint, printed as one JSON line on rank 0.

Run under torchrun, one rank per checkpoint shard:

    python -m torch.distributed.run --nproc_per_node 2 tests/mp_generate.py --ckpt_dir DIR \
        --prompt "Once upon a time" --prompt "The cat" [--kv_compress]

Output (rank 0 only): {"tokens": [[...], ...], "kv_total": {...} or null, "world_size": N}, where kv_total is
`llama.kv_stats["total"]` of a FastGen-compressed run (`--kv_compress`, i.e. kv_config={}), summed over ranks.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama.generation import Llama  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True, help="checkpoint directory (one shard per rank)")
    parser.add_argument("--tokenizer_path", default=None, help="default: CKPT_DIR/tokenizer.model")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max_gen_len", type=int, default=24)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--kv_compress", action="store_true", help="FastGen compression with the shipped config")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny models; ranks share the cores
    llama = Llama.build(
        args.ckpt_dir,
        args.tokenizer_path or str(Path(args.ckpt_dir) / "tokenizer.model"),
        max_seq_len=args.max_seq_len,
        max_batch_size=len(args.prompt),
        kv_config={} if args.kv_compress else None,
        device="cpu",
    )
    prompt_tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in args.prompt]
    tokens, _ = llama.generate(prompt_tokens, max_gen_len=args.max_gen_len, temperature=0.0)
    if torch.distributed.get_rank() == 0:
        result = {
            "tokens": tokens,
            "kv_total": llama.kv_stats["total"] if args.kv_compress else None,
            "world_size": torch.distributed.get_world_size(),
        }
        # Llama.build silences stdout on ranks > 0 only; write to the real stdout all the same
        print(json.dumps(result), file=sys.__stdout__, flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
