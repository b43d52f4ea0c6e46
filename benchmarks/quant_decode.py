"""Decode step with quantised KV codes against the full-precision compressed cache (issue 13).

    python -m benchmarks.quant_decode --context 8192 --steps 20

SmolLM2-135M-Instruct (real weights, float32, 1 thread by default) decodes one token at a time over a compressed
cache that already holds `--context` positions, of which each (layer, KV head) keeps a random share around
`--keep` (0.35 to 0.65 across heads, so a layer has several groups, as under FastGen). The caches are built
directly (random keys and values, then one compaction and, for a codec, sealing), so no 8k prefill is needed:
attention costs the same for any values. Settings: full precision, int8 and int4 codes, each with and without
decode-time statistics (FastGen's frequent heads ask for column sums every step, which takes the full-precision
cache off SDPA onto the explicit kernel). Steps are interleaved across settings (the order reversed every other step) so that machine
load falls on all alike; reported: the median and mean wall time of a step, the median CPU time of the thread (what a step
costs when the shared machine preempts it), and the allocated KV bytes.
"""

import argparse
import statistics
import time

import torch

from adaptive_kv_cache.codecs import make_codec
from adaptive_kv_cache.compressed import CompressedCache, CompressionMethod
from adaptive_kv_cache.store import PackedStore
from benchmarks import SMOLLM2_DIR
from llama.attention import StatsRequest


class KeepAll(CompressionMethod):
    """Keeps everything; asks for column sums every step when `stats` (as FastGen's frequent heads do)."""

    def __init__(self, stats: bool):
        self.stats = stats

    def stats_request(self, cache, layer_id):
        return StatsRequest() if self.stats else None


def synthetic_cache(model, context: int, keep: float, quant: str, stats: bool, seed: int) -> CompressedCache:
    """A cache after `context` positions whose segments keep about `keep` of them (sealed when quantised)."""
    p = model.params
    n_kv, head_dim = p.n_kv_heads or p.n_heads, p.dim // p.n_heads
    codec = make_codec(quant)
    cache = CompressedCache(KeepAll(stats), p.n_layers, [[0] * context], p.max_seq_len, evict_every=10 ** 9,
                            codec=codec)
    cache.n_kv_heads, cache.head_dim, cache.kv_dtype = n_kv, head_dim, model.output.weight.dtype
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(keep - 0.15, keep + 0.15, n_kv)
    for layer in range(p.n_layers):
        store = PackedStore(n_kv, {})
        k = torch.randn(n_kv * context, head_dim, generator=g)
        store.append({"k": k, "v": torch.randn_like(k), "pos": torch.arange(context, dtype=torch.int32).repeat(n_kv)},
                     min_free=64)
        store.compact([torch.rand(n_kv, context, generator=g) < rates[:, None]], min_free=64)
        codec.seal(layer, store, context)
        cache.stores[layer] = store
    cache.length, cache.pending = context, [False]
    return cache


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quant", nargs="+", default=["none", "int8", "int4"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llama import Llama

    llama = Llama.build(str(SMOLLM2_DIR), None, max_seq_len=args.context + args.warmup + args.steps + 1,
                        max_batch_size=1, device="cpu")
    settings = [(q, s) for q in args.quant for s in (False, True)]
    caches = {k: synthetic_cache(llama.model, args.context, args.keep, *k, seed=0) for k in settings}
    times = {k: [] for k in settings}
    cpu = {k: [] for k in settings}
    with torch.inference_mode():
        for step in range(args.warmup + args.steps):
            pos = args.context + step
            for k in settings if step % 2 else settings[::-1]:  # alternate the order: no setting always first
                t0, c0 = time.perf_counter(), time.thread_time()
                llama.model.forward(torch.tensor([[42 + step]]), pos, caches[k])
                if step >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.thread_time() - c0)
    base = {s: statistics.median(times[("none", s)]) for s in (False, True)}
    base_cpu = {s: statistics.median(cpu[("none", s)]) for s in (False, True)}
    print(f"SmolLM2-135M, float32, {args.threads} thread(s), context {args.context}, keep ~{args.keep}, "
          f"{args.steps} steps after {args.warmup} warm-up, interleaved")
    print("| codes | decode stats | step ms (median) | mean | vs full precision | CPU ms (median) | vs full precision "
          "| KV MB allocated |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in settings:
        t, c = statistics.median(times[k]), statistics.median(cpu[k])
        mb = caches[k].memory_stats()["total"]["allocated_bytes"] / 2 ** 20
        print(f"| {k[0]} | {'colsum' if k[1] else 'none'} | {1e3 * t:.1f} | {1e3 * statistics.mean(times[k]):.1f} | "
              f"{t / base[k[1]]:.3f} | {1e3 * c:.1f} | {c / base_cpu[k[1]]:.3f} | {mb:.1f} |")


if __name__ == "__main__":
    main()
