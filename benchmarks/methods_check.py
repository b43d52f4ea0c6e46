"""Faithfulness of the registered methods against kvpress's published rows (issue 12), on the inputs
`benchmarks/quality.py` uses: SmolLM2-135M-Instruct, six 2,048-token windows of tinyshakespeare, 32
teacher-forced tokens each, prefill-only compression (kvpress compresses the prompt, then appends).

    python -m benchmarks.methods_check --windows 0 1          # SnapKV and StreamingLLM at 0.57 / 0.50, windows 0-1
    python -m benchmarks.methods_check --windows 2 3 && python -m benchmarks.methods_check --windows 4 5

Each call runs the given windows (a few minutes each on one busy core) and keeps their rows in
benchmarks/results/methods_check/window_<i>.json; once all six are there the table is printed and written to
benchmarks/results/methods_check/summary.json (`--windows` with no number: just the table).

Per setting: the perplexity ratio to the uncompressed cache over the 6 x 32 scored tokens, with a 95% interval
from the spread of the six windows (paired: each window's log-perplexity difference; t with 5 degrees of
freedom), top-1 agreement and mean KL; and whether kvpress's number lies inside the interval. It reuses
quality.py's inputs, runs and metrics (`quality_batches`, `teacher_forced`, prefill replay) and changes nothing
there.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks import LONG_TEXT, RESULTS_DIR, SMOLLM2_DIR, default_context, write_text
from benchmarks.quality import Setting, bos_prefix, quality_batches, teacher_forced, token_stream

#: kvpress 0.5.5 on the same windows (issue 12): kept share -> perplexity ratio. Its TOVA averages a layer's
#: heads, so TOVA does not compare like for like; ObservedAttention is H2O without a recent window, ranking by
#: attention per query that saw the token (`--kv_option recent=0 --kv_option normalize=true`).
KVPRESS = {"snapkv": {0.57: 1.059, 0.50: 1.075}, "streaming_llm": {0.57: 1.140, 0.50: 1.149},
           "tova": {0.57: 1.096, 0.50: 1.124},
           "adakv": {0.57: 1.025, 0.50: 1.051},  # kvpress AdaKV(SnapKV), docs/landscape.md (masked, not freed)
           "h2o": {0.57: 1.025, 0.50: 1.036}}  # ObservedAttention: our h2o with recent=0 and normalize=true
T_975_DF5 = 2.571  # Student's t, 95% two-sided, 5 degrees of freedom (six windows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.methods_check", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_dir", default=str(SMOLLM2_DIR))
    p.add_argument("--text", default=str(LONG_TEXT))
    p.add_argument("--methods", nargs="+", default=["snapkv", "streaming_llm"])
    p.add_argument("--keep", type=float, nargs="+", default=[0.57, 0.50], help="kept shares (budget)")
    p.add_argument("--kv_option", action="append", default=[], metavar="KEY=VALUE", help="for every method")
    p.add_argument("--prompt_len", type=int, default=2048)
    p.add_argument("--cont_len", type=int, default=32)
    p.add_argument("--n_prompts", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, nargs="*", default=None, help="which of the windows to run (default all)")
    p.add_argument("--out", default=str(RESULTS_DIR / "methods_check"))
    return p.parse_args(argv)


def summarise(rows, ref_rows):
    d = [r["nll_mean"] - q["nll_mean"] for r, q in zip(rows, ref_rows)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    tokens = sum(r["scored_tokens"] for r in rows)
    return {"ppl_ratio": math.exp(mean), "ci95": [math.exp(mean - T_975_DF5 * se), math.exp(mean + T_975_DF5 * se)],
            "top1_agreement": sum(r["top1_agreement"] * r["scored_tokens"] for r in rows) / tokens,
            "kl_mean": sum(r["kl_mean"] * r["scored_tokens"] for r in rows) / tokens,
            "mem_ratio": sum(r["kv_bytes_mean"] / q["kv_bytes_mean"] for r, q in zip(rows, ref_rows)) / n,
            "seconds": sum(r["seconds"] for r in rows)}


def run_window(llama, batch, names, keeps, extra):
    """{setting name: teacher-forced row} of one window, the uncompressed one first (it records the prefill)."""
    from adaptive_kv_cache.registry import load_method_config

    t0 = time.perf_counter()
    rows = {"uncompressed": teacher_forced(llama, Setting("uncompressed", "uncompressed"), [batch], replay=True)}
    rows["uncompressed"]["seconds"] = time.perf_counter() - t0
    for name in names:
        for keep in keeps:
            cfg = load_method_config({"method": name, "budget": keep, "decode": False, **extra})
            t0 = time.perf_counter()
            row = teacher_forced(llama, Setting(f"{name} {keep:g}", "method", cfg), [batch], replay=True)
            rows[f"{name} {keep:g}"] = {**row, "seconds": time.perf_counter() - t0, "config": cfg.to_dict()}
    return rows


def table(out: Path, n: int, names, keeps) -> None:
    windows = [json.loads((out / f"window_{i}.json").read_text()) for i in range(n)]
    ref = [w["uncompressed"] for w in windows]
    summary = {"uncompressed_ppl": math.exp(sum(r["nll_mean"] for r in ref) / n), "settings": []}
    print("| method | kept share | ppl ratio | 95% interval | top-1 | KL | KV bytes / dense | kvpress | inside |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        for keep in keeps:
            row = summarise([w[f"{name} {keep:g}"] for w in windows], ref)
            kv = KVPRESS.get(name, {}).get(round(keep, 2))
            row.update(method=name, keep=keep, kvpress=kv,
                       inside=None if kv is None else row["ci95"][0] <= kv <= row["ci95"][1])
            summary["settings"].append(row)
            print(f"| {name} | {keep:g} | {row['ppl_ratio']:.3f} | {row['ci95'][0]:.3f}-{row['ci95'][1]:.3f} | "
                  f"{row['top1_agreement']:.3f} | {row['kl_mean']:.3f} | {row['mem_ratio']:.3f} | "
                  f"{kv if kv is not None else '-'} | {'-' if kv is None else row['inside']} |")
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from adaptive_kv_cache.cli import _option
    from llama.generation import Llama

    P, C, N = args.prompt_len, args.cont_len, args.n_prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = list(range(N)) if args.windows is None else args.windows
    if todo:
        llama = Llama.build(args.ckpt_dir, None, max_seq_len=default_context(Path(args.ckpt_dir)),
                            max_batch_size=1, device="cpu")
        bos = bos_prefix(llama.tokenizer, "auto")
        stream = token_stream(llama.tokenizer, args.text, N * (P + C + 1))
        batches, _ = quality_batches(stream, bos, P, C, N, max_batch_tokens=P + C)  # one window per batch
        extra = dict(_option(o) for o in args.kv_option)
        for i in todo:
            rows = run_window(llama, batches[i], args.methods, args.keep, extra)
            # atomic: a window file that exists is whole (the table is made once all six exist)
            write_text(out / f"window_{i}.json", json.dumps(rows, indent=1) + "\n")
            print(f"window {i}: " + ", ".join(f"{k} {math.exp(r['nll_mean']):.3f} ({r['seconds']:.0f} s)"
                                               for k, r in rows.items()), flush=True)
    if all((out / f"window_{i}.json").is_file() for i in range(N)):
        table(out, N, args.methods, args.keep)


if __name__ == "__main__":
    main()
