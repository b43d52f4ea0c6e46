"""Prefill and decode speed of our dense cache, FastGen and Hugging Face transformers, measured in one run.

    python -m benchmarks.speed --quick      # tiny random model and stories260K at 256 and 512 tokens
    python -m benchmarks.speed              # SmolLM2-135M-Instruct and one Llama-2-7B-shaped layer, 1k to 8k tokens

Writes ``speed.json``, ``speed.csv`` and ``speed.png`` to ``--out`` (default ``benchmarks/results/``) and prints a
table.

Models (``--models``):

* ``smollm2``: the checkpoint in ``models/SmolLM2-135M-Instruct`` (skipped with a note when absent);
  ``stories260K``: ``../shared/models/stories260K``. Prompts are real text (``--text``), so that FastGen's
  profiler sees real attention; tokens are repeated when the text is shorter than the context.
* ``llama2-7b-shapes``: a randomly initialised model with Llama-2-7B layer shapes (dim 4096, 32 heads, 32 KV
  heads, SwiGLU hidden 11008, vocab 32000, Llama 2 tokenizer) and ``--layers`` layers (default 1), float32;
  ``tiny-random``: the same construction at dim 256, 8 heads, 4 KV heads (stories260K tokenizer). Weights are
  N(0, ``--init_std``); prompts are random tokens. Random weights give nearly uniform attention, so FastGen's
  profiler keeps everything (see the policy mix): these rows measure its overhead and the memory bound of the
  prefill, not its savings.

Settings: ``uncompressed`` (our dense cache), FastGen at each ``--T`` (``--evict_every`` k, default the shipped
config's), and ``transformers`` (``LlamaForCausalLM`` with SDPA attention and its DynamicCache on the same
weights, built by ``benchmarks.peers``; skipped with a note when transformers is not installed or with
``--no_peer``).

For each model and context length n (``--contexts``), every setting in turn prefills n tokens in one forward pass
(logits of the last position only, for every setting); then ``--warmup`` + ``--steps`` one-token decode steps on
the same tokens are run *interleaved* (one step of each setting, then the next), so that the load of the machine
falls on all settings alike. Reported per row: prefill seconds and its peak memory growth (resident set size on
CPU, via the high-water mark that /proc/self/clear_refs resets; ``max_memory_allocated`` on CUDA); what that
growth holds beyond the KV cache (``prefill_extra_mb``: the prefill's transient memory); decode step latency
(mean over the timed steps, which amortises FastGen's eviction every k steps; median, p10, p90 beside it);
tokens/s (1 / mean); the ratios of prefill time and step latency to our uncompressed cache and to transformers
(``*_vs_peer``) in the same run; KV memory after the last step and its ratio; FastGen's policy mix and mean
recovery. Everything repeats ``--repeats`` times, the order of the settings reversed every other time (prefill:
the best of the repeats, since noise only adds time; decode: all timed steps pooled). A first, short prefill and
two steps of every setting warm up the process before anything is timed.
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
    peak_memory_growth,
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
FULL = dict(models=["smollm2", "llama2-7b-shapes"], contexts=[1024, 2048, 4096, 8192], steps=32, warmup=4,
            repeats=2)


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


class OurRunner:
    """Our model with one cache: the uncompressed DenseKVCache (cfg None) or FastGen with `cfg`."""

    def __init__(self, llama, cfg, prompt: List[int], total_len: int):
        llama.set_kv_config(cfg)
        self.model = llama.model
        self.cache = llama.new_cache([prompt], total_len)
        self.cfg = cfg

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.model.forward(x, start_pos, self.cache, last_logits_only=True)

    def kv_bytes(self) -> int:
        return kv_allocated_bytes(self.cache.memory_stats())

    def describe(self) -> Dict:
        if self.cfg is None:
            return {"policy_mix": {"full": 1.0}, "recovery_mean": 1.0, "choice_s": 0.0}
        stats = self.cache.memory_stats()
        total = sum(stats["total"]["policies"].values()) or 1
        recs = [r for layer in stats["heads"] for seq in layer for (_n, r) in seq if r == r]
        return {"policy_mix": {k: v / total for k, v in stats["total"]["policies"].items() if v},
                "recovery_mean": sum(recs) / len(recs) if recs else float("nan"),
                "choice_s": self.cache.method.profiling_seconds}


class PeerRunner:
    """transformers on the same weights (benchmarks.peers)."""

    def __init__(self, hf):
        from benchmarks.peers import HFRunner

        self.runner = HFRunner(hf)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.runner.forward(x, start_pos)

    def kv_bytes(self) -> int:
        return self.runner.kv_bytes()

    def describe(self) -> Dict:
        return {"policy_mix": {"full": 1.0}, "recovery_mean": 1.0, "choice_s": 0.0}


@torch.inference_mode()
def measure(make_runners, tokens: List[int], ctx: int, warmup: int, n_steps: int, device: str) -> Dict[str, Dict]:
    """Prefills every setting in turn, then runs their decode steps interleaved. Returns raw timings per setting."""
    x = torch.tensor([tokens], device=device)
    runners, out = {}, {}
    for name, make in make_runners:
        runner = make()
        gc.collect()
        _sync(device)
        box = {}

        def prefill():
            t0 = time.perf_counter()
            runner.forward(x[:, :ctx], 0)
            _sync(device)
            box["s"] = time.perf_counter() - t0

        growth = peak_memory_growth(prefill, device)
        runners[name] = runner
        out[name] = {"prefill_s": box["s"], "prefill_growth": growth, "kv_after_prefill": runner.kv_bytes(),
                     "steps_s": []}
    for i in range(warmup + n_steps):
        pos = ctx + i
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.forward(x[:, pos : pos + 1], pos)
            _sync(device)
            if i >= warmup:
                out[name]["steps_s"].append(time.perf_counter() - t0)
    for name, runner in runners.items():
        out[name].update(kv_bytes=runner.kv_bytes(), **runner.describe())
    return out


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(len(xs) - 1, int(k) + 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(model: str, ctx: int, meas: Dict[str, List[Dict]], vocab: int) -> List[Dict]:
    """One row per setting; ratios to our uncompressed cache and to the peer measured in the same run."""
    MB = 2 ** 20
    rows = []
    for name, ms in meas.items():
        steps = [t for m in ms for t in m["steps_s"]]
        growth = [m["prefill_growth"] for m in ms if m["prefill_growth"] is not None]
        peak = statistics.median(growth) if growth else None
        kv_pre = ms[-1]["kv_after_prefill"]
        rows.append({
            "model": model, "context": ctx, "setting": name,
            "prefill_s": min(m["prefill_s"] for m in ms),  # best of the repeats: noise only ever adds time
            "prefill_peak_mb": None if peak is None else peak / MB,
            # what the prefill held beyond the KV cache it leaves and the logits it returns
            "prefill_extra_mb": None if peak is None else (peak - kv_pre - 4 * vocab) / MB,
            "step_ms_mean": 1e3 * statistics.fmean(steps),
            "step_ms_median": 1e3 * statistics.median(steps),
            "step_ms_p10": 1e3 * _pct(steps, 0.1),
            "step_ms_p90": 1e3 * _pct(steps, 0.9),
            "timed_steps": len(steps),
            "kv_bytes": ms[-1]["kv_bytes"],
            "policy_mix": ms[-1]["policy_mix"],
            "recovery_mean": ms[-1]["recovery_mean"],
            "choice_s": statistics.median(m["choice_s"] for m in ms),
            "prefill_s_all": [m["prefill_s"] for m in ms],
        })
    ref = rows[0]
    peer = next((r for r in rows if r["setting"] == "transformers"), None)
    for r in rows:
        r["tokens_per_s"] = 1e3 / r["step_ms_mean"]
        r["latency_ratio"] = r["step_ms_mean"] / ref["step_ms_mean"]
        r["latency_ratio_median"] = r["step_ms_median"] / ref["step_ms_median"]
        r["prefill_ratio"] = r["prefill_s"] / ref["prefill_s"]
        r["mem_ratio"] = r["kv_bytes"] / ref["kv_bytes"]
        r["step_vs_peer"] = r["step_ms_mean"] / peer["step_ms_mean"] if peer else None
        r["prefill_vs_peer"] = r["prefill_s"] / peer["prefill_s"] if peer else None
    return rows


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
            style = ["-", "--", ":", "-."][si % 4]
            label = f"{m} {s}"
            axes[0].plot(ctx, [r["step_ms_mean"] for r in rs], style, color=color, marker="o", label=label)
            axes[1].plot(ctx, [r["prefill_s"] for r in rs], style, color=color, marker="o", label=label)
            if rs[0]["prefill_extra_mb"] is not None:
                axes[2].plot(ctx, [r["prefill_extra_mb"] for r in rs], style, color=color, marker="o", label=label)
    axes[0].set_ylabel("decode step latency (ms, mean)")
    axes[1].set_ylabel("prefill (s)")
    axes[2].set_ylabel("prefill memory beyond the KV cache (MB)")
    ticks = sorted({r["context"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    mach = result["machine"]
    fig.suptitle(f"batch 1, {mach['device']} ({mach['cpu_model']}, {mach['torch_threads']} threads, "
                 f"torch {mach['torch']})", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def print_table(rows: List[Dict], file=sys.stdout) -> None:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    print(f"{'model':17s} {'ctx':>5s} {'setting':16s} {'prefill_s':>9s} {'pre/ours':>8s} {'pre/peer':>8s} "
          f"{'extraMB':>8s} {'step_ms':>8s} {'step/ours':>9s} {'step/peer':>9s} {'mem':>6s}  policies", file=file)
    for r in rows:
        mix = ",".join(f"{k}:{v:.2f}" for k, v in r["policy_mix"].items())
        print(f"{r['model'][:17]:17s} {r['context']:5d} {r['setting'][:16]:16s} {r['prefill_s']:9.3f} "
              f"{r['prefill_ratio']:8.3f} {f(r['prefill_vs_peer'], '8.3f'):>8s} "
              f"{f(r['prefill_extra_mb'], '8.1f'):>8s} {r['step_ms_mean']:8.2f} {r['latency_ratio']:9.3f} "
              f"{f(r['step_vs_peer'], '9.3f'):>9s} {r['mem_ratio']:6.3f}  {mix}", file=file)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=None,
                   help=f"from {sorted(CHECKPOINTS) + sorted(RANDOM_SHAPES)} or checkpoint folders "
                        f"(default {FULL['models']}; --quick {QUICK['models']})")
    p.add_argument("--contexts", type=int, nargs="+", default=None,
                   help=f"prompt lengths (default {FULL['contexts']}; --quick {QUICK['contexts']})")
    p.add_argument("--steps", type=int, default=None, help=f"timed decode steps ({FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed decode steps first ({FULL['warmup']})")
    p.add_argument("--repeats", type=int, default=None, help="measurements per setting and context (2)")
    p.add_argument("--T", type=float, nargs="+", default=[0.95], help="FastGen thresholds")
    p.add_argument("--evict_every", type=int, default=None, help="FastGen's k (default: the shipped config's)")
    p.add_argument("--no_peer", action="store_true", help="leave out the transformers row")
    p.add_argument("--layers", type=int, default=1, help="layers of the random models")
    p.add_argument("--init_std", type=float, default=0.02, help="std of the random models' weights")
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
    from benchmarks import peers

    base = resolve_kv_config({})
    if args.evict_every is not None:
        base = base.replace(evict_every=args.evict_every)
    caches = [("uncompressed", None)] + [(f"fastgen T={T:g}", base.replace(T=float(T))) for T in args.T]
    peer_version = None if args.no_peer else peers.available()
    notes = []
    if not args.no_peer and peer_version is None:
        notes.append("transformers is not installed: no peer row (pip install transformers)")
        print(f"note: {notes[-1]}", file=sys.stderr)
    n_settings = len(caches) + (peer_version is not None)
    t_start = time.perf_counter()
    machine = machine_info(args.device)
    rows: List[Dict] = []
    model_infos: List[Dict] = []
    max_seq_len = max(contexts) + warmup + n_steps + 1
    bar = progress(total=len(models) * len(contexts) * repeats, desc="speed", unit="run", disable=args.no_progress)
    out = Path(args.out)

    def save(complete: bool) -> Dict:
        """Writes what has been measured so far (a long run that is stopped keeps its finished rows)."""
        result = {
            "benchmark": "speed", "complete": complete, "created": now_iso(),
            "argv": list(argv) if argv is not None else sys.argv[1:], "quick": args.quick,
            "machine": {**machine, "load_avg_1m_end": machine_info(args.device).get("load_avg_1m")},
            "models": model_infos, "contexts": contexts, "steps": n_steps, "warmup": warmup, "repeats": repeats,
            "batch": 1, "fastgen_base_config": base.to_dict(), "peer": {"transformers": peer_version},
            "notes": notes, "rows": rows, "total_s": time.perf_counter() - t_start,
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
            notes.append(f"{info['skipped']}: {name} skipped")
            bar.update(len(contexts) * repeats)
            continue
        hf = peers.hf_from_native(llama.model) if peer_version else None
        info["build_s"] = time.perf_counter() - t0
        tokens = prompt_tokens(llama, info, max_seq_len, args.text, args.seed)
        for ctx in contexts:
            total = ctx + warmup + n_steps  # what Llama.generate allocates for this prompt and these steps
            makers = [(s, (lambda cfg=cfg, ctx=ctx, total=total: OurRunner(llama, cfg, tokens[:ctx], total)))
                      for s, cfg in caches]
            if hf is not None:
                makers.append(("transformers", lambda: PeerRunner(hf)))
            meas: Dict[str, List[Dict]] = {s: [] for s, _ in makers}
            if ctx == contexts[0]:  # warm-up: the first prefill of a process also pays for the allocator's growth
                measure(makers, tokens, min(ctx, 256), 0, 2, args.device)
            for rep in range(repeats):
                bar.set_postfix_str(f"{name} n={ctx}")
                order = makers if rep % 2 == 0 else makers[::-1]  # no setting always goes first
                for s, m in measure(order, tokens, ctx, warmup, n_steps, args.device).items():
                    meas[s].append(m)
                bar.update(1)
                gc.collect()
            rows.extend(summarise(name, ctx, meas, llama.model.params.vocab_size))
            save(complete=False)
        llama = hf = None  # frees this model before the next is built (the makers above close over these names)
        gc.collect()
    bar.close()
    result = save(complete=True)
    if rows and not args.no_plot:
        plot(result, out / "speed.png")
    m = result["machine"]
    print(f"\nspeed: {m['platform']}, {m['cpu_model']}, {m['cpus_usable']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads), device {m['device']}, {n_settings} settings; {result['total_s']:.1f} s; "
          f"outputs in {out}")
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
