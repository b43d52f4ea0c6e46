"""Decode speed of the uncompressed cache and of FastGen against context length, measured in one run.

    python -m benchmarks.speed --quick      # tiny random model and stories260K at 256 and 512 tokens
    python -m benchmarks.speed              # SmolLM2-135M-Instruct and Llama-2-7B layer shapes, 1k to 8k tokens

Writes ``speed.json``, ``speed.csv`` and ``speed.png`` to ``--out`` (default ``benchmarks/results/``) and prints a
table.

Models (``--models``):

* ``smollm2``: the checkpoint in ``models/SmolLM2-135M-Instruct`` (skipped with a note when absent);
  ``stories260K``: ``../shared/models/stories260K``. Prompts are real text (``--text``), so that FastGen's
  profiler sees real attention; tokens are repeated when the text is shorter than the context.
* ``llama2-7b-shapes``: a randomly initialised model with Llama-2-7B layer shapes (dim 4096, 32 heads, 32 KV
  heads, SwiGLU hidden 11008, vocab 32000, Llama 2 tokenizer) and ``--layers`` layers (default 2), float32;
  ``tiny-random``: the same construction at dim 256, 8 heads, 4 KV heads (stories260K tokenizer). Weights are
  N(0, ``--init_std``); prompts are random tokens. Random weights give nearly uniform attention, so FastGen's
  profiler tends to keep everything (see the policy mix): these rows measure its overhead rather than its
  savings. ``--T`` takes several thresholds.

For each model and context length n (``--contexts``), every cache in turn (uncompressed first, then FastGen at
each ``--T``; the order repeats ``--repeats`` times): prefill n tokens (in chunks of ``--prefill_chunk``, the
same for both caches), then ``--warmup`` + ``--steps`` single-token decode steps on the same fixed tokens; each
step is timed with ``time.perf_counter`` (synchronised on CUDA). Reported per row: prefill seconds (median over
repeats), decode step latency (median, p10, p90 over the timed steps of all repeats), tokens/s (1 / median
latency, batch 1), the latency ratio to the uncompressed cache in the same run (1 exactly for it), the KV memory
after the last step and its ratio, the policy mix and mean recovery. ``profiling_share`` = (FastGen prefill -
uncompressed prefill) / uncompressed prefill: FastGen's prefill does the model's work plus the profiling
(attention statistics, the policy choice and the compaction), so this is the profiling cost as a share of
prefill time. It is the difference of two timings, so on a noisy machine it carries their noise;
``profiling_share_timed`` = ``profiling_s`` / uncompressed prefill, where ``profiling_s`` is the time the
cache itself measured in the work only profiling needs (statistics while prompts are pending, the policy
choice, the first compaction; ``FastGenCache.profiling_seconds``), is the steadier of the two.
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks import (
    DEFAULT_TEXT,
    LLAMA2_TOKENIZER,
    RESULTS_DIR,
    SMOLLM2_DIR,
    STORIES_DIR,
    kv_allocated_bytes,
    machine_info,
    now_iso,
    progress,
    save_figure,
    write_csv,
    write_json,
)

RANDOM_SHAPES = {
    "llama2-7b-shapes": dict(dim=4096, n_heads=32, n_kv_heads=32, vocab_size=32000, multiple_of=256,
                             tokenizer=LLAMA2_TOKENIZER),
    "tiny-random": dict(dim=256, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32,
                        tokenizer=STORIES_DIR / "tokenizer.model"),
}
CHECKPOINTS = {"smollm2": SMOLLM2_DIR, "stories260K": STORIES_DIR}

QUICK = dict(models=["tiny-random", "stories260K"], contexts=[256, 512], steps=16, warmup=2, repeats=2)
FULL = dict(models=["smollm2", "llama2-7b-shapes"], contexts=[1024, 2048, 4096, 8192], steps=16, warmup=2,
            repeats=1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(name: str, args, max_seq_len: int):
    """A Llama (model + tokenizer) and a description of it; None when a checkpoint is missing."""
    from llama.generation import Llama
    from llama.tokenizer import find_tokenizer, load_tokenizer

    device = args.device
    if name in CHECKPOINTS or Path(name).is_dir():
        ckpt = Path(CHECKPOINTS.get(name, name))
        if not (ckpt / "params.json").is_file():
            return None, {"name": name, "skipped": f"no checkpoint at {ckpt}"}
        llama = Llama.build(str(ckpt), find_tokenizer(str(ckpt)), max_seq_len=max_seq_len, max_batch_size=1,
                            seed=args.seed, device=device)
        info = {"name": name, "kind": "checkpoint", "ckpt_dir": str(ckpt)}
    elif name in RANDOM_SHAPES:
        from llama.generation import build_transformer, setup_model_parallel
        from llama.model import ModelArgs

        shape = dict(RANDOM_SHAPES[name])
        tok_path = shape.pop("tokenizer")
        setup_model_parallel()
        torch.manual_seed(args.seed)
        margs = ModelArgs(n_layers=args.layers, max_seq_len=max_seq_len, max_batch_size=1, **shape)
        model = build_transformer(margs, torch.float32 if device == "cpu" else torch.bfloat16)
        with torch.no_grad():
            for p_name, p in model.named_parameters():
                if p.dim() >= 2:  # linear and embedding weights (the layers leave them uninitialised)
                    p.normal_(0.0, args.init_std)
        model.to(device)
        llama = Llama(model, load_tokenizer(str(tok_path)))
        info = {"name": name, "kind": "random", "init_std": args.init_std, "tokenizer": str(tok_path)}
    else:
        raise SystemExit(f"unknown model {name!r}: use one of {sorted(CHECKPOINTS) + sorted(RANDOM_SHAPES)} "
                         f"or a checkpoint directory")
    p = llama.model.params
    info.update(params={k: getattr(p, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")},
                hidden_dim=p.hidden_dim, n_params=sum(t.numel() for t in llama.model.parameters()),
                dtype=str(llama.model.output.weight.dtype))
    return llama, info


def prompt_tokens(llama, info: Dict, n: int, text: str, seed: int) -> List[int]:
    """n prompt tokens followed by the decode tokens: real text for checkpoints, random tokens otherwise."""
    tok = llama.tokenizer
    bos = [tok.bos_id] if getattr(tok, "bos_id", -1) >= 0 and getattr(tok, "add_bos", True) else []
    if info["kind"] == "checkpoint":
        body = Path(text).read_text(encoding="utf-8", errors="replace")
        ids = tok.encode(body[: max(200_000, 8 * n)], bos=False, eos=False)
        ids = (ids * (n // max(1, len(ids)) + 1))[: n - len(bos)]
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, llama.model.params.vocab_size, (n - len(bos),), generator=g).tolist()
    return bos + ids


@torch.inference_mode()
def measure(llama, cfg, tokens: List[int], ctx: int, n_steps: int, chunk: int, device: str) -> Dict:
    """Prefill ctx tokens, then n_steps decode steps over the following tokens; wall-clock times."""
    llama.set_kv_config(cfg)
    x = torch.tensor([tokens], device=device)
    cache = llama.new_cache([tokens[:ctx]], ctx + n_steps)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, ctx, chunk):
        llama.model.forward(x[:, s: min(ctx, s + chunk)], s, cache)
    _sync(device)
    prefill = time.perf_counter() - t0
    steps = []
    for i in range(n_steps):
        pos = ctx + i
        t = time.perf_counter()
        llama.model.forward(x[:, pos: pos + 1], pos, cache)
        _sync(device)
        steps.append(time.perf_counter() - t)
    stats = cache.memory_stats()
    out = {"prefill_s": prefill, "steps_s": steps, "kv_bytes": kv_allocated_bytes(stats)}
    if cfg is not None:
        total = sum(stats["total"]["policies"].values()) or 1
        out["policy_mix"] = {k: v / total for k, v in stats["total"]["policies"].items() if v}
        recs = [r for layer in stats["heads"] for seq in layer for (_n, r) in seq if r == r]
        out["recovery_mean"] = sum(recs) / len(recs) if recs else float("nan")
        out["profiling_s"] = cache.profiling_seconds
    else:
        out["policy_mix"] = {"full": 1.0}
        out["recovery_mean"] = 1.0
    del cache
    return out


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(len(xs) - 1, int(k) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for mi, m in enumerate(models):
        color = f"C{mi}"
        settings = list(dict.fromkeys(r["setting"] for r in rows if r["model"] == m))
        for si, s in enumerate(settings):
            rs = sorted((r for r in rows if r["model"] == m and r["setting"] == s), key=lambda r: r["context"])
            ctx = [r["context"] for r in rs]
            style = "-" if s == "uncompressed" else ["--", ":", "-."][(si - 1) % 3]
            axes[0].plot(ctx, [r["step_ms_median"] for r in rs], style, color=color, marker="o",
                         label=f"{m} {s}")
            if s != "uncompressed":
                axes[1].plot(ctx, [r["latency_ratio"] for r in rs], style, color=color, marker="o",
                             label=f"{m} {s}")
                axes[2].plot(ctx, [100 * r["profiling_share_timed"] for r in rs], style, color=color,
                             marker="o", label=f"{m} {s} (timed in the cache)")
                axes[2].plot(ctx, [100 * r["profiling_share"] for r in rs], style, color=color, marker="x",
                             alpha=0.5, label=f"{m} {s} (prefill difference)")
    axes[0].set_ylabel("decode step latency (ms, median)")
    axes[1].set_ylabel("FastGen / uncompressed step latency")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[2].set_ylabel("profiling time, % of uncompressed prefill")
    ticks = sorted({r["context"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    mach = result["machine"]
    fig.suptitle(f"decode speed, batch 1, {mach['device']} ({mach['cpu_model']}, {mach['torch_threads']} threads, "
                 f"torch {mach['torch']})", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def print_table(rows: List[Dict], file=sys.stdout) -> None:
    print(f"{'model':18s} {'ctx':>6s} {'setting':16s} {'prefill_s':>9s} {'prof%':>6s} {'timed%':>6s} "
          f"{'step_ms':>8s} "
          f"{'tok/s':>7s} {'lat_ratio':>9s} {'mem_ratio':>9s}  policies", file=file)
    for r in rows:
        mix = ",".join(f"{k}:{v:.2f}" for k, v in r["policy_mix"].items())
        print(f"{r['model'][:18]:18s} {r['context']:6d} {r['setting'][:16]:16s} {r['prefill_s']:9.3f} "
              f"{100 * r['profiling_share']:6.1f} {100 * r['profiling_share_timed']:6.1f} "
              f"{r['step_ms_median']:8.2f} {r['tokens_per_s']:7.1f} "
              f"{r['latency_ratio']:9.3f} {r['mem_ratio']:9.3f}  {mix}", file=file)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"from {sorted(CHECKPOINTS) + sorted(RANDOM_SHAPES)} or checkpoint folders "
                        f"(default {FULL['models']}; --quick {QUICK['models']})")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help=f"prompt lengths (default {FULL['contexts']}; --quick {QUICK['contexts']})")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (16)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps first (2)")
    p.add_argument("--repeats", type=int, default=None, help="measurements per cache and context (1; --quick 2)")
    p.add_argument("--T", type=float, nargs="+", default=[0.95], help="FastGen thresholds")
    p.add_argument("--layers", type=int, default=2, help="layers of the random models")
    p.add_argument("--init_std", type=float, default=0.02, help="std of the random models' weights")
    p.add_argument("--prefill_chunk", type=int, default=1024, help="prefill tokens per forward pass")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="prompt text for checkpoint models")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings that finish in a minute or two")
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    d = QUICK if args.quick else FULL
    models = args.models or d["models"]
    contexts = sorted(args.contexts or d["contexts"])
    n_steps = args.steps or d["steps"]
    warmup = d["warmup"] if args.warmup is None else args.warmup
    repeats = args.repeats or d["repeats"]
    threads = args.threads or (1 if args.quick else None)
    if threads:  # tiny models run faster on one thread, and far faster when other jobs share the cores
        torch.set_num_threads(threads)
    from adaptive_kv_cache.config import resolve_kv_config

    base = resolve_kv_config({})
    caches = [("uncompressed", None)] + [(f"fastgen T={T:g}", base.replace(T=float(T))) for T in args.T]
    t_start = time.perf_counter()
    machine = machine_info(args.device)
    rows: List[Dict] = []
    model_infos: List[Dict] = []
    max_seq_len = max(contexts) + warmup + n_steps + 1
    bar = progress(total=len(models) * len(contexts) * len(caches) * repeats, desc="speed", unit="run",
                   disable=args.no_progress)
    out = Path(args.out)

    def save(complete: bool) -> Dict:
        """Writes what has been measured so far (a long run that is stopped keeps its finished rows)."""
        result = {
            "benchmark": "speed",
            "complete": complete,
            "created": now_iso(),
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "quick": args.quick,
            "machine": {**machine, "load_avg_1m_end": machine_info(args.device).get("load_avg_1m")},
            "models": model_infos,
            "contexts": contexts, "steps": n_steps, "warmup": warmup, "repeats": repeats, "batch": 1,
            "prefill_chunk": args.prefill_chunk,
            "fastgen_base_config": base.to_dict(),
            "rows": rows,
            "total_s": time.perf_counter() - t_start,
        }
        write_json(out / "speed.json", result)
        csv_rows = []
        for r in rows:
            c = {k: v for k, v in r.items() if k != "prefill_s_all"}
            c["policy_mix"] = ";".join(f"{k}:{v:.4f}" for k, v in r["policy_mix"].items())
            csv_rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in c.items()})
        write_csv(out / "speed.csv", csv_rows)
        return result

    for name in models:
        t0 = time.perf_counter()
        llama, info = build_model(name, args, max_seq_len)
        model_infos.append(info)
        if llama is None:
            print(f"note: {info['skipped']}; skipping {name}", file=sys.stderr)
            bar.update(len(contexts) * len(caches) * repeats)
            continue
        info["build_s"] = time.perf_counter() - t0
        tokens = prompt_tokens(llama, info, max_seq_len, args.text, args.seed)
        with torch.inference_mode():  # warm-up
            llama.model.forward(torch.tensor([tokens[:32]], device=args.device), 0, None)
        for ctx in contexts:
            meas: Dict[str, List[Dict]] = {s: [] for s, _ in caches}
            for _ in range(repeats):
                for s, cfg in caches:
                    bar.set_postfix_str(f"{name} n={ctx} {s}")
                    meas[s].append(measure(llama, cfg, tokens, ctx, warmup + n_steps, args.prefill_chunk,
                                           args.device))
                    bar.update(1)
                    gc.collect()
            ref = None
            for s, _cfg in caches:
                ms = meas[s]
                steps = [t for m in ms for t in m["steps_s"][warmup:]]
                row = {
                    "model": name, "context": ctx, "setting": s,
                    "prefill_s": statistics.median(m["prefill_s"] for m in ms),
                    "step_ms_median": 1e3 * statistics.median(steps),
                    "step_ms_p10": 1e3 * _pct(steps, 0.1),
                    "step_ms_p90": 1e3 * _pct(steps, 0.9),
                    "timed_steps": len(steps),
                    "kv_bytes": ms[-1]["kv_bytes"],
                    "policy_mix": ms[-1]["policy_mix"],
                    "recovery_mean": ms[-1]["recovery_mean"],
                    "profiling_s": statistics.median(m.get("profiling_s", 0.0) for m in ms),
                }
                row["tokens_per_s"] = 1e3 / row["step_ms_median"]
                if ref is None:
                    ref = row
                row["latency_ratio"] = row["step_ms_median"] / ref["step_ms_median"]
                row["throughput_ratio"] = row["tokens_per_s"] / ref["tokens_per_s"]
                row["prefill_ratio"] = row["prefill_s"] / ref["prefill_s"]
                row["profiling_share"] = (row["prefill_s"] - ref["prefill_s"]) / ref["prefill_s"]
                row["profiling_share_timed"] = row["profiling_s"] / ref["prefill_s"]
                row["mem_ratio"] = row["kv_bytes"] / ref["kv_bytes"]
                row["prefill_s_all"] = [m["prefill_s"] for m in ms]
                rows.append(row)
            save(complete=False)
        del llama
        gc.collect()
    bar.close()
    result = save(complete=True)
    total = result["total_s"]
    if rows and not args.no_plot:
        plot(result, out / "speed.png")
    m = result["machine"]
    print(f"\nspeed: {m['platform']}, {m['cpu_model']}, {m['cpus_usable']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads), device {m['device']}; {total:.1f} s; outputs in {out}")
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
