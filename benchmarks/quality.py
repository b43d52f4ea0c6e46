"""Quality against KV memory of FastGen and of fixed-policy baselines, measured on the same inputs in one run.

    python -m benchmarks.quality --quick                      # stories260K, under a minute of one core
    python -m benchmarks.quality --threads 1                  # SmolLM2-135M-Instruct: the full run (README)

Writes ``quality.json``, ``quality.csv`` and ``quality.png`` to ``--out`` (default ``benchmarks/results/``) and
prints a table; ``python -m benchmarks.tables`` renders the README's tables from the JSON.

What is measured
----------------
Settings: ``uncompressed`` (the dense cache, ``set_kv_config(None)``), FastGen at each ``--T``, any extra kv
config (``--setting NAME=CONFIG``), every registered method at equal memory and the codecs (below) and the
fixed-policy baselines (below). Every setting sees the same inputs in
the same process; a setting is a named kv config, so a new method adds rows without code here.

* Tasks (`benchmarks.tasks`): RULER-style prompts in the model's chat format (single needle, multi-key,
  multi-value, variable tracking, common words, a fact stated early in a multi-turn conversation) at each of
  ``--lengths`` tokens and ``--depths``, ``--trials`` items per (task, length, depth), from ``--seed``. Each
  setting answers greedily from its own cache (prefill, then decode steps); a reply scores the share of the
  expected values it contains as whole words (0 when a distractor comes first). *Calibration*: the uncompressed
  model runs every (task, length) cell first; the cells where its accuracy is below ``--min_accuracy`` are
  dropped (recorded in ``tasks.calibration`` with the reason) and the other settings run only the kept cells.
  Reported per setting: accuracy (mean score) overall, by task x length, task, length and depth, the share of
  fully correct items, and the KV memory ratio on these prompts; ``tasks.manifest`` lists every item (prompt
  hash, answers) and ``tasks.costs`` the seconds per cell and setting.
* Teacher forcing. ``--n_prompts`` windows from each of ``--texts`` (Shakespeare and TinyStories by default),
  each ``P = --prompt_len`` prompt tokens followed by ``C = --cont_len`` continuation tokens (plus the one they
  predict). The prompt is prefilled, then the C continuation tokens are fed one decode step at a time through
  the setting's cache (the compressed decode path); the logits of the step at position ``pos`` predict token
  ``pos + 1``, so all C scored predictions come from compressed decode steps. Per setting: perplexity over those
  tokens and its ratio to uncompressed, top-1 agreement with and mean KL(uncompressed || setting) against the
  uncompressed next-token distributions, and next-token accuracy against the text. *Intervals*: per-window sums
  are kept (``windows``) and `paired_bootstrap` resamples windows (the same draws for the setting and the
  uncompressed reference, 2,000 draws, seed ``--seed``) for 95% percentile intervals of the perplexity ratio,
  KL and top-1 agreement (``ci``; per text in ``ci_by_text``). Call a row better than another only when the
  intervals say so.
* Memory. ``cache.memory_stats()`` is sampled after every decode step: ``kv_bytes_mean`` / ``kv_bytes_peak`` are
  the allocated K/V buffer bytes per sequence (mean over decode steps, and peak). ``mem_ratio`` divides by the
  uncompressed cache of the same run, i.e. the dense cache as ``Llama.generate`` allocates it (its capacity is
  the whole prompt + continuation from the start, so it is constant); ``mem_ratio_exact`` divides instead by an
  exactly sized uncompressed cache of the tokens held at each step (what FastGen's ``raw_bytes`` counts), so
  slack shows as > 1 at T = 1. ``metadata_bytes_mean`` is the compressed cache's per-slot bookkeeping
  (positions, classes, scores: 13 bytes a slot), not included in kv_bytes; ``mem_ratio_incl_metadata`` adds it.
* ``recovery_mean``: the attention recovery of the chosen policy of every (layer, sequence, KV head), averaged
  (1 for uncompressed); ``policy_mix``: the share of heads per chosen policy.
* Greedy generation agreement (``--gen_len`` > 0; off in the full run, whose tasks are greedy generation):
  greedy tokens from each window's prompt; per setting the tokens identical to uncompressed before the first
  divergence, the share of identical generations and ROUGE-L F1.
* Time: ``timings_s`` (wall) and ``timings_cpu_s`` (this process's CPU seconds, what the run costs one core
  when other jobs share the machine); ``seconds`` / ``cpu_seconds`` per row.

Fixed-policy baselines
----------------------
Every head is forced to one hybrid (``--baselines``, default special+punct+local, special+punct+frequent,
special+punct+frequent+local) through the same FastGen cache: ``FastGenConfig(T=0, candidates=(hybrid,
("full",)), r_l=x, r_f=x)``. The profiler picks the first candidate whose recovery reaches T, and with T = 0
that is the hybrid for every head. Its ratio x (r_l, r_f, or both set to the same value when both are present)
is chosen per FastGen T < 1 so that the baseline's mean allocated KV bytes on the teacher-forcing inputs equal
FastGen's at that T: a safeguarded bisection (alternating regula-falsi and midpoint steps) on x in
[1e-3, 1] for at most ``--bisect_iters`` evaluations on ``--match_windows`` windows (memory only), stopping
within ``--match_tol`` (relative); the best evaluated x is then evaluated on every window and its relative
memory error there reported (``match_rel_error``; ``matched`` false when it is outside the tolerance, e.g. when
FastGen uses less memory than the hybrid's special+punct floor). The curves therefore compare at equal memory.
The tasks run the baselines with the same x (their memory ratio on the task prompts is reported separately).

The comparison of methods (issue 12)
------------------------------------
Every registered method (``--methods``, default all but FastGen, whose rows are its ``--T``; ``--no_methods``)
runs as a row ``NAME b=x`` at each kept share x of ``--budgets`` (0.5 and 0.25: kv config ``{"method": NAME,
"budget": x}``, each (sequence, KV head) keeping floor(x * prompt) tokens) and as ``NAME @T=t`` at FastGen's
operating points: the budget whose mean allocated KV bytes equal FastGen's at each T < 1, found on the matching
windows by `secant_match` (a method's memory is nearly affine in its budget: one or two evaluations), then run
on every window with the baselines' secant correction (``match_rel_error``; ``--no_method_match`` leaves these
out). The mem ratio column is the truth at a budget: methods that evict during decoding hold about x * P, the
others x * P plus the decode tokens. A method that cannot run on the model (HeadKV without the head scores of
scripts/score_heads.py) is left out with the reason (``methods_skipped``). Every method row runs the
teacher-forced windows and the kept task cells, with the same intervals. ``--kv_quant CODEC ...`` (issue 13's
codecs) adds ``CODEC alone`` (FastGen at T = 1, which keeps every token) and the codec combined with each of
``--quant_methods`` (FastGen at each T < 1, the others at every budget), passing ``"kv_quant"`` in the kv
config; a build whose configs do not know kv_quant stops at once with one line saying so.

Prefill replay
--------------
FastGen attends first and compresses afterwards, so a prefill's activations do not depend on the cache. The
uncompressed run records every layer's (xq, xk, xv) of each prefill and the other settings replay them into
their own cache (``begin``, then per layer ``append``/attention/``after_attention``, then ``end``: exactly the calls
``Transformer.forward`` makes), which runs their profiling and compression for real but skips recomputing the
rest of the model. Decode steps always run the model.
``--no_replay`` turns this off; every run checks it on FastGen (``replay_check`` in the JSON: the chosen
policies with and without replay must be equal, and the decode logits equal up to float rounding, since the
recorded prefill ran the uncompressed cache's SDPA kernel and a FastGen prefill the tiled kernel that also
returns statistics) and on each method and codec before its first row (``replay_checks``, `check_replay`).
Replay makes the very cache calls of a real prefill, so methods that need the prompt's attention statistics
(SnapKV's observation-window sums, H2O's column sums, TOVA's last query) get them from the same queries and
keys; what it cannot reproduce is a prefill whose activations depend on the cache (attention over compressed or
quantised keys). A method (or codec) whose check fails runs its own prefill in every row (``replay`` false).
"""

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from benchmarks import (
    DEFAULT_TEXT,
    LONG_TEXT,
    RESULTS_DIR,
    SMOLLM2_DIR,
    STORIES_DIR,
    default_context,
    kv_allocated_bytes,
    kv_metadata_bytes,
    machine_info,
    now_iso,
    progress,
    save_figure,
    write_csv,
    write_json,
)
from llama.attention import attend
from llama.kv_cache import KVCache

from benchmarks.tasks import TASKS, Item, TaskBuilder, TaskText, cells, make_items, manifest, score

DEFAULT_BASELINES = ("special+punct+local", "special+punct+frequent", "special+punct+frequent+local")
DEFAULT_TEXTS = (LONG_TEXT, DEFAULT_TEXT)  # two kinds of text: Shakespeare's plays, children's stories

# --quick: stories260K (context 512), every task cell kept (the tiny model answers none: it checks the pipeline).
QUICK = dict(prompt_len=256, cont_len=32, n_prompts=2, gen_len=16, T=[1.0, 0.95, 0.9], bisect_iters=3,
             match_windows=None, lengths=[320, 480], depths=[0.5], trials=1, min_accuracy=0.0, max_answer=8,
             methods=["streaming_llm", "snapkv"], budgets=[0.5, 0.25], method_T=None,
             baselines=list(DEFAULT_BASELINES))
# The full run (SmolLM2, one thread): sized to fit 90 minutes with every method, see the README's "Budget": the
# methods at half the cache and at FastGen's T = 0.95 memory (T = 0.9's, 0.49-0.51 of the cache, is the 0.5
# budget's within a few %), the fixed baselines (issue 11's table, 37 minutes more) and budget 0.25 on request.
FULL = dict(prompt_len=None, cont_len=64, n_prompts=8, gen_len=0, T=[1.0, 0.95, 0.9], bisect_iters=3,
            match_windows=2, lengths=[1000, 2000], depths=[0.1, 0.5, 0.9], trials=2, min_accuracy=0.7,
            max_answer=None, methods=None, budgets=[0.5], method_T=[0.95], baselines=[])  # methods: every one

REPLAY_TOL = 1e-3  # decode logits with and without prefill replay: float rounding of different kernels
N_BOOT = 2000  # bootstrap draws


# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Setting:
    """One row of the results: a named KV config (None: the dense cache) that every measurement runs.

    New methods add rows as settings built from their kv configs (`config_setting`, ``--setting NAME=CONFIG``).
    """

    name: str
    kind: str  # "uncompressed" | "fastgen" | "fixed" | "config" | "method" | "quant"
    config: object = None  # FastGenConfig, a registered method's config, or None
    T: Optional[float] = None
    policy: Optional[str] = None  # the forced hybrid of a fixed baseline
    ratio: Optional[float] = None  # its r_l / r_f
    match: Dict = field(default_factory=dict)
    method: Optional[str] = None  # registry name of a method row ("fastgen" for a codec alone)
    budget: Optional[float] = None  # its kept share of each prompt
    kv_quant: Optional[str] = None  # the codec of a "quant" row
    replay: bool = True  # False: its prefill runs through the model (see `replay_check`)


def fastgen_setting(base, T: float) -> Setting:
    cfg = base.replace(T=float(T))
    return Setting(f"fastgen T={T:g}", "fastgen", cfg, T=float(T))


def config_setting(name: str, config) -> Setting:
    """A setting from any kv config (a FastGenConfig, a dict of overrides, a JSON file path)."""
    from adaptive_kv_cache.config import resolve_kv_config

    cfg = resolve_kv_config(config)
    if cfg is None:
        raise ValueError(f"setting {name!r}: the config resolves to no compression; use the uncompressed row")
    return Setting(name, "config", cfg, T=getattr(cfg, "T", None))


def method_kv_config(method: str, budget: Optional[float], kv_quant: Optional[str] = None,
                     T: Optional[float] = None, options: Optional[Dict] = None) -> Dict:
    """The kv config (a dict for `resolve_kv_config`) of a registered method keeping `budget` of each prompt,
    with the codec when given; FastGen takes its threshold T instead of a budget; `options` go in as they are."""
    d: Dict = {"method": method, **(options or {})}
    if method == "fastgen":
        d["T"] = 1.0 if T is None else float(T)
    else:
        d["budget"] = float(budget)
    if kv_quant:
        d["kv_quant"] = kv_quant
    return d


def method_setting(method: str, budget: Optional[float], T: Optional[float] = None,
                   kv_quant: Optional[str] = None, options: Optional[Dict] = None) -> Setting:
    """A row of the comparison: a registered method at a kept share of the cache (``b=0.5``), or at the share
    matched to FastGen's memory at T (``@T=0.95``), optionally with a codec (kind "quant").

    Args:
        method: registry name.
        budget: kept share of each prompt (None for FastGen, whose memory follows T).
        T: the FastGen threshold this row is matched to (or FastGen's own T).
        kv_quant: codec name (issue 13), or None for full precision.
        options: more keys of the method's kv config (HeadKV's head_scores).
    """
    from adaptive_kv_cache.config import resolve_kv_config

    cfg = resolve_kv_config(method_kv_config(method, budget, kv_quant, T, options))
    codec = f" {kv_quant}" if kv_quant else ""
    if method == "fastgen" and kv_quant and T is None:
        name = f"{kv_quant} alone"  # FastGen at T = 1 keeps every token: the codec is all that compresses
    elif method == "fastgen":
        name = f"fastgen T={cfg.T:g}{codec}"
    elif T is not None:
        name = f"{method}{codec} @T={T:g}"
    else:
        name = f"{method}{codec} b={budget:g}"
    return Setting(name, "quant" if kv_quant else "method", cfg, T=T, ratio=budget, method=method,
                   budget=budget, kv_quant=kv_quant)


def check_kv_quant(codecs: Sequence[str], methods: Sequence[str]) -> None:
    """Fails with one clear line when the installed kv configs do not know ``kv_quant`` (issue 13's codecs) or
    not this codec, before any model work."""
    from adaptive_kv_cache.config import KVConfigError, resolve_kv_config

    for q in codecs:
        for m in dict.fromkeys(["fastgen", *methods]):
            try:
                resolve_kv_config(method_kv_config(m, 0.5, q))
            except KVConfigError as e:
                if "unknown key 'kv_quant'" in str(e):
                    raise SystemExit(f"--kv_quant {q}: the installed adaptive_kv_cache has no kv_quant option yet "
                                     f"(issue 13's codecs are not merged); run without --kv_quant") from e
                raise SystemExit(f"--kv_quant {q} with method {m}: {e}") from e


def fixed_setting(base, hybrid: str, x: float, T: Optional[float]) -> Setting:
    members = tuple(hybrid.split("+"))
    kw = {}
    if "local" in members:
        kw["r_l"] = x
    if "frequent" in members:
        kw["r_f"] = x
    cfg = base.replace(T=0.0, candidates=(members, ("full",)), **kw)
    name = f"{hybrid} @T={T:g}" if T is not None else f"{hybrid} x={x:.4g}"
    return Setting(name, "fixed", cfg, T=T, policy=hybrid, ratio=x)


# ----------------------------------------------------------------------------------------------------------------
# running one setting over a batch


class PrefillRecorder(KVCache):
    """Passes a prefill through to a dense cache and keeps every layer's (xq, xk, xv) for replay."""

    def __init__(self, inner: KVCache):
        self.inner = inner
        self.layers: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, tokens, start_pos):
        self.inner.begin(tokens, start_pos)

    def append(self, layer_id, start_pos, xk, xv):
        self._kv[layer_id] = (xk, xv)
        return self.inner.append(layer_id, start_pos, xk, xv)

    def stats_request(self, layer_id):
        return self.inner.stats_request(layer_id)

    def after_attention(self, layer_id, xq, view, stats):
        self.layers[layer_id] = (xq,) + self._kv.pop(layer_id)
        self.inner.after_attention(layer_id, xq, view, stats)

    def end(self):
        self.inner.end()

    def memory_stats(self):
        return self.inner.memory_stats()


def replay_prefill(cache: KVCache, tokens: torch.Tensor, layers) -> None:
    """Runs a recorded prefill's cache calls (attention included, as `Attention.forward` makes them) without
    the rest of the model: the cache profiles and compresses exactly as in a real prefill."""
    cache.begin(tokens, 0)
    for layer_id, (xq, xk, xv) in enumerate(layers):
        view = cache.append(layer_id, 0, xk, xv)
        want = cache.stats_request(layer_id)
        stats = attend(xq, view, want)[1] if want is not None else None
        cache.after_attention(layer_id, xq, view, stats)
    cache.end()


def check_replay(llama, setting: Setting, batch: "Batch") -> Dict:
    """Whether replaying the recorded uncompressed prefill into this setting's cache equals running its prefill.

    Replay makes exactly the cache calls `Transformer.forward` makes (append, the attention statistics the method
    asks for, after_attention), so a method that compresses after attending (FastGen's profiling, SnapKV's
    observation-window sums, H2O's and TOVA's attention, Razor's compensation token) sees the same inputs; what
    replay cannot reproduce is a prefill whose activations depend on the cache (attention over already
    compressed or quantised keys). One sequence and 16 decode steps, with and without replay: the chosen
    policies (per-head budgets) and the decode logits must agree; the recorded prefill ran the dense cache's
    SDPA kernel and a compressed prefill the tiled one that also returns statistics, so the logits agree to
    float rounding (`REPLAY_TOL`).

    Args:
        setting: the compressed setting to check.
        batch: a batch whose prefill was recorded (its first sequence is used).

    Returns:
        {setting, identical, same_policies, max_abs_logit_diff, ok, sequences, steps}.
    """
    b = sub_batch(batch, 1, min(batch.steps, 16))
    outs, heads = [], []
    for rp in (True, False):
        got = []
        run = Run(llama, setting, b, replay=rp)
        run.replay = rp  # checked on its own terms, whatever the setting's flag says
        run.teacher_force(lambda i, lg: got.append(lg.clone()))
        outs.append(torch.stack(got))
        heads.append(run.stats["heads"])
    diff = float((outs[0] - outs[1]).abs().max())
    same_policies = [[[h[0] for h in seq] for seq in layer] for layer in heads[0]] == \
        [[[h[0] for h in seq] for seq in layer] for layer in heads[1]]
    return {"setting": setting.name, "identical": bool(torch.equal(outs[0], outs[1])),
            "same_policies": same_policies, "max_abs_logit_diff": diff,
            "ok": same_policies and diff < REPLAY_TOL, "sequences": b.bsz, "steps": b.steps}


@dataclass
class Batch:
    """Sequences that run together: equal prompt lengths, equal numbers of decode steps."""

    tokens: torch.Tensor  # (bsz, P + steps + 1): prompt, the tokens fed at the decode steps, the last target
    prompt_len: int
    steps: int
    score: Optional[torch.Tensor] = None  # (bsz, steps) bool: scored predictions (None: all)
    meta: List = field(default_factory=list)  # per sequence (tasks: the Item)
    rec: Optional[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None  # recorded prefill
    rec_last: Optional[torch.Tensor] = None  # (bsz, V) last prefill logits
    ref_logp: Optional[List[torch.Tensor]] = None  # per step (bsz, V) uncompressed log-probs (float64)
    ref_greedy: Optional[List[List[int]]] = None
    full_prompts: Optional[List[List[int]]] = None  # prompts longer than prompt_len (tasks): the rest is forced

    @property
    def bsz(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompts(self) -> List[List[int]]:
        """The whole prompts (the cache matches chat markers on them)."""
        return self.full_prompts or self.tokens[:, : self.prompt_len].tolist()


def exact_kv_bytes(model, bsz: int, n_tokens: int) -> int:
    """Bytes of an exactly sized uncompressed cache holding n_tokens positions of bsz sequences."""
    p = model.params
    el = model.output.weight.element_size()
    return p.n_layers * 2 * bsz * p.n_kv_heads * n_tokens * (p.dim // p.n_heads) * el


class Run:
    """One pass of one setting over one batch: prefill, then `steps` decode steps; memory sampled per step."""

    def __init__(self, llama, setting: Setting, batch: Batch, replay: bool, record: bool = False):
        self.llama, self.setting, self.batch = llama, setting, batch
        # a method whose replay check failed runs its own prefill everywhere
        self.replay, self.record = replay and setting.replay, record
        self.alloc: List[int] = []
        self.meta_bytes: List[int] = []
        self.exact: List[int] = []
        self.stats: Dict = {}
        self.peak = 0

    @torch.inference_mode()
    def prefill(self):
        llama, b = self.llama, self.batch
        if getattr(llama, "_quality_config", llama) is not self.setting.config:
            # binding a config runs its method's preparation (FastGen's token classes over the vocabulary,
            # Razor's retrieval-head probe): once per setting, not once per batch
            llama.set_kv_config(self.setting.config)
            llama._quality_config = self.setting.config
        self.cache = llama.new_cache(b.prompts, b.prompt_len + b.steps)
        x = b.tokens[:, : b.prompt_len]
        if self.record:
            rec = PrefillRecorder(self.cache)
            last = llama.model.forward(x, 0, rec, last_logits_only=True)[:, -1]
            b.rec = [rec.layers[i] for i in range(len(rec.layers))]
            b.rec_last = last
        elif self.replay and b.rec is not None:
            replay_prefill(self.cache, x, b.rec)
            last = b.rec_last
        else:
            last = llama.model.forward(x, 0, self.cache, last_logits_only=True)[:, -1]
        self._sample(b.prompt_len, decode=False)
        return last

    def _sample(self, n_tokens: int, decode: bool = True):
        st = self.cache.memory_stats()
        a = kv_allocated_bytes(st)
        self.peak = max(self.peak, a, int(st.get("peak_allocated_bytes", 0) or 0))
        if decode:
            self.alloc.append(a)
            self.meta_bytes.append(kv_metadata_bytes(st))
            self.exact.append(exact_kv_bytes(self.llama.model, self.batch.bsz, n_tokens))
        self.stats = st

    @torch.inference_mode()
    def step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        logits = self.llama.model.forward(tok[:, None], pos, self.cache)[:, -1]
        self._sample(pos + 1)
        return logits

    def teacher_force(self, on_logits, bar=None):
        b = self.batch
        self.prefill()
        for i in range(b.steps):
            pos = b.prompt_len + i
            logits = self.step(b.tokens[:, pos], pos)
            on_logits(i, logits)
            if bar is not None:
                bar.update(1)

    def greedy(self, n: int, bar=None) -> List[List[int]]:
        """n greedy tokens per sequence (the first from the prefill logits)."""
        b = self.batch
        logits = self.prefill()
        out = []
        for i in range(n):
            tok = logits.argmax(-1)
            out.append(tok)
            if i + 1 < n:
                logits = self.step(tok, b.prompt_len + i)
            if bar is not None:
                bar.update(1)
        return torch.stack(out, 1).tolist()

    def answer(self, n: int, stop) -> List[List[int]]:
        """Greedy answers of up to n tokens to prompts of uneven lengths (`batch.full_prompts`).

        The shortest prompt is prefilled (the tokens [0, prompt_len) of every sequence), the rest of the longer
        prompts is fed through decode steps (as `Llama.generate` does), then each sequence answers greedily until
        a stop token or n tokens; the batch stops when every sequence has.
        """
        b = self.batch
        prompts = b.prompts
        lens = [len(p) for p in prompts]
        logits = self.prefill()
        out: List[List[int]] = [[] for _ in prompts]
        done = [False] * b.bsz
        for pos in range(b.prompt_len, max(lens) + n):
            pred = logits.argmax(-1).tolist()
            feed = []
            for k, p in enumerate(prompts):
                if pos < lens[k]:
                    feed.append(p[pos])
                    continue
                if not done[k] and len(out[k]) < n:
                    out[k].append(pred[k])
                    done[k] = pred[k] in stop or len(out[k]) == n
                feed.append(pred[k])
            if all(done):
                break
            logits = self.step(torch.tensor(feed, dtype=torch.long, device=b.tokens.device), pos)
        return [cut_at_stop(o, stop) for o in out]

    # --- what the final cache says ---

    def policy_counts(self) -> Dict[str, int]:
        if self.setting.config is None:
            p = self.llama.model.params
            return {"full": p.n_layers * self.batch.bsz * p.n_kv_heads}
        return dict(self.stats["total"]["policies"])

    def recoveries(self) -> List[float]:
        if self.setting.config is None:
            p = self.llama.model.params
            return [1.0] * (p.n_layers * self.batch.bsz * p.n_kv_heads)
        return [r for layer in self.stats["heads"] for seq in layer for (_name, r) in seq if r == r]


class Acc:
    """Sums of one setting's metrics over batches."""

    def __init__(self):
        self.nll = 0.0
        self.n = 0
        self.agree = 0
        self.correct = 0
        self.kl = 0.0
        self.alloc_mean_sum = 0.0  # sum over batches of the mean allocated bytes of the batch
        self.meta_mean_sum = 0.0
        self.exact_mean_sum = 0.0
        self.peak_per_seq = 0.0
        self.n_seq = 0
        self.policies: Dict[str, int] = {}
        self.recovery: List[float] = []

    def add_memory(self, run: Run):
        self.alloc_mean_sum += sum(run.alloc) / len(run.alloc)
        self.meta_mean_sum += sum(run.meta_bytes) / len(run.meta_bytes)
        self.exact_mean_sum += sum(run.exact) / len(run.exact)
        self.peak_per_seq = max(self.peak_per_seq, run.peak / run.batch.bsz)
        self.n_seq += run.batch.bsz
        for k, v in run.policy_counts().items():
            self.policies[k] = self.policies.get(k, 0) + int(v)
        self.recovery.extend(run.recoveries())

    def memory_row(self) -> Dict:
        total = sum(self.policies.values()) or 1
        return {
            "kv_bytes_mean": self.alloc_mean_sum / self.n_seq,
            "kv_bytes_peak": self.peak_per_seq,
            "kv_exact_bytes_mean": self.exact_mean_sum / self.n_seq,
            "metadata_bytes_mean": self.meta_mean_sum / self.n_seq,
            "recovery_mean": sum(self.recovery) / len(self.recovery) if self.recovery else float("nan"),
            "policy_mix": {k: v / total for k, v in self.policies.items() if v},
        }


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.double(), dim=-1)


def teacher_forced(llama, setting: Setting, batches: Sequence[Batch], replay: bool, bar=None) -> Dict:
    """Teacher-forces every batch through the setting's cache; the first (uncompressed) call records refs.

    Besides the means, the row holds per-window sums (``windows``: nll, kl, agree, correct and scored tokens of
    each window, in batch order) for the paired bootstrap against the uncompressed row.
    """
    acc = Acc()
    per_window: Dict[str, List[float]] = {"nll": [], "kl": [], "agree": [], "correct": [], "n": []}
    for b in batches:
        is_ref = setting.config is None and b.ref_logp is None
        if is_ref:
            b.ref_logp = []
        run = Run(llama, setting, b, replay=replay, record=is_ref and replay)
        sums = {k: torch.zeros(b.bsz, dtype=torch.float64) for k in per_window}

        def on_logits(i, logits, b=b, is_ref=is_ref, sums=sums):
            lp = _logp(logits)
            target = b.tokens[:, b.prompt_len + i + 1]
            sums["nll"] -= lp.gather(-1, target[:, None])[:, 0]
            sums["n"] += 1
            pred = lp.argmax(-1)
            sums["correct"] += (pred == target).double()
            if is_ref:
                b.ref_logp.append(lp)
                sums["agree"] += 1
                return
            ref = b.ref_logp[i]
            sums["agree"] += (pred == ref.argmax(-1)).double()
            sums["kl"] += (ref.exp() * (ref - lp)).sum(-1)

        run.teacher_force(on_logits, bar)
        acc.add_memory(run)
        for k in per_window:
            per_window[k] += sums[k].tolist()
    n = sum(per_window["n"])
    row = acc.memory_row()
    row.update(
        nll_mean=sum(per_window["nll"]) / n,
        ppl=math.exp(sum(per_window["nll"]) / n),
        top1_agreement=sum(per_window["agree"]) / n,
        kl_mean=sum(per_window["kl"]) / n,
        next_token_acc=sum(per_window["correct"]) / n,
        scored_tokens=int(n),
        windows=per_window,
    )
    return row


def paired_bootstrap(ref: Dict[str, Sequence[float]], alt: Dict[str, Sequence[float]], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> Dict[str, List[float]]:
    """Percentile bootstrap intervals of a setting's teacher-forced metrics against the uncompressed ones.

    The unit resampled is the window (its tokens are correlated), the same draws for both settings (paired):
    each draw sums nll, kl, agree and n over the drawn windows, then ppl_ratio = exp((nll_alt - nll_ref) / n),
    kl_mean = kl_alt / n and top1_agreement = agree_alt / n. A pure function of its inputs and seed.

    Args:
        ref, alt: per-window sums {"nll", "kl", "agree", "n"}, windows in the same order (n: scored tokens).
        n_boot: bootstrap draws.
        seed: seed of the draws (torch.Generator).
        level: coverage of the interval.

    Returns:
        {"ppl_ratio": [lo, hi], "kl_mean": [lo, hi], "top1_agreement": [lo, hi]}.
    """
    m = len(ref["n"])
    if m == 0 or len(alt["n"]) != m or list(map(float, alt["n"])) != list(map(float, ref["n"])):
        raise ValueError("paired bootstrap: the settings must score the same windows")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, m, (n_boot, m), generator=g)  # (n_boot, m) drawn windows

    def drawn(d, key):  # (n_boot,) sums over the drawn windows
        return torch.tensor(d[key], dtype=torch.float64)[idx].sum(1)

    n = drawn(ref, "n")
    stats = {"ppl_ratio": torch.exp((drawn(alt, "nll") - drawn(ref, "nll")) / n),
             "kl_mean": drawn(alt, "kl") / n, "top1_agreement": drawn(alt, "agree") / n}
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {k: torch.quantile(v, q).tolist() for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------------------------
# greedy agreement


def rouge_l(ref: str, cand: str) -> float:
    """ROUGE-L F1 over whitespace-separated words (longest common subsequence)."""
    a, b = ref.split(), cand.split()
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def cut_at_stop(tokens: List[int], stop) -> List[int]:
    for j, t in enumerate(tokens):
        if t in stop:
            return tokens[:j]
    return tokens


def greedy_agreement(llama, setting: Setting, batches: Sequence[Batch], n: int, replay: bool, stop,
                     bar=None) -> Dict:
    prefix, frac, identical, rouge = [], [], [], []
    for b in batches:
        run = Run(llama, setting, b, replay=replay)
        out = [cut_at_stop(t, stop) for t in run.greedy(n, bar)]
        if setting.config is None and b.ref_greedy is None:
            b.ref_greedy = out
        for ref, got in zip(b.ref_greedy, out):
            k = 0
            while k < min(len(ref), len(got)) and ref[k] == got[k]:
                k += 1
            prefix.append(k)
            frac.append(k / len(ref) if ref else float(not got))
            identical.append(float(ref == got))
            rouge.append(rouge_l(llama.tokenizer.decode(ref), llama.tokenizer.decode(got)))
    m = len(prefix)
    return {
        "greedy_prefix_mean": sum(prefix) / m,
        "greedy_prefix_frac": sum(frac) / m,
        "greedy_identical": sum(identical) / m,
        "rouge_l": sum(rouge) / m,
    }


# ----------------------------------------------------------------------------------------------------------------
# tasks (benchmarks.tasks): greedy answers from each setting's cache, calibrated on the uncompressed model


def task_batches(items: Sequence[Item], max_batch_tokens: int) -> List[Batch]:
    """Items of one cell in batches of at most max_batch_tokens prompt tokens (prompts may differ by a few
    tokens: the shortest is prefilled, the rest forced through decode steps; see `Run.answer`)."""
    if not items:
        return []
    per = max(1, max_batch_tokens // max(len(it.prompt) for it in items))
    out = []
    for i in range(0, len(items), per):
        part = list(items[i: i + per])
        prompts = [list(it.prompt) for it in part]
        width = max(map(len, prompts))
        n = max(it.max_gen_len for it in part)
        rows = [p + [p[-1]] * (width - len(p)) for p in prompts]  # padding is never fed
        short = min(map(len, prompts))
        out.append(Batch(tokens=torch.tensor(rows), prompt_len=short, steps=width + n - short, meta=part,
                         full_prompts=prompts))
    return out


def task_pass(llama, setting: Setting, b: Batch, replay: bool, stop) -> Tuple[List[Dict], Run]:
    """Each item's reply from the setting's cache and its score (`tasks.score`)."""
    record = setting.config is None and b.rec is None and replay
    run = Run(llama, setting, b, replay=replay, record=record)
    replies = run.answer(max(it.max_gen_len for it in b.meta), stop)
    out = []
    for it, ids in zip(b.meta, replies):
        text = llama.tokenizer.decode(ids[: it.max_gen_len])
        s = score(text, it.answers, it.distractors)
        out.append({"task": it.task, "length": it.length, "depth": it.depth, "trial": it.trial, "score": s,
                    "correct": s == 1.0, "reply": text})
    return out, run


def calibrate(results: Sequence[Dict], min_accuracy: float) -> List[Dict]:
    """Per (task, length) cell: the uncompressed accuracy (mean score) and whether the suite keeps the cell.

    Args:
        results: the uncompressed model's item results (task, length, score).
        min_accuracy: a cell is kept when the uncompressed accuracy reaches it.

    Returns:
        rows {task, length, items, uncompressed_accuracy, kept, reason} in first-seen cell order.
    """
    cells: Dict[Tuple[str, int], List[float]] = {}
    for r in results:
        cells.setdefault((r["task"], r["length"]), []).append(r["score"])
    rows = []
    for (task, length), scores in cells.items():
        acc = sum(scores) / len(scores)
        kept = acc >= min_accuracy
        reason = None if kept else f"uncompressed accuracy {acc:.2f} < {min_accuracy:.2f}: the model cannot do it"
        rows.append({"task": task, "length": length, "items": len(scores), "uncompressed_accuracy": acc,
                     "kept": kept, "reason": reason})
    return rows


def _means(results: Sequence[Dict], key) -> Dict[str, float]:
    groups: Dict[str, List[float]] = {}
    for r in results:
        groups.setdefault(key(r), []).append(r["score"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def summarize_tasks(results: Sequence[Dict], acc: Acc, ref_mem: float) -> Dict:
    """A setting's accuracy (mean score, partial credit) overall, by task x length, task, length and depth, the
    share of fully correct items and its KV memory ratio on the task prompts."""
    if not results:
        return {"task_accuracy": None, "task_items": 0}
    return {
        "task_accuracy": sum(r["score"] for r in results) / len(results),
        "task_exact": sum(r["correct"] for r in results) / len(results),
        "task_mem_ratio": acc.memory_row()["kv_bytes_mean"] / ref_mem,
        "task_items": len(results),
        "by_cell": _means(results, lambda r: f"{r['task']}@{r['length']}"),
        "by_task": _means(results, lambda r: r["task"]),
        "by_length": _means(results, lambda r: str(r["length"])),
        "by_depth": _means([r for r in results if r["depth"] is not None], lambda r: f"{r['depth']:g}"),
    }


# ----------------------------------------------------------------------------------------------------------------
# matching the fixed baselines' memory to FastGen's


class Matcher:
    """Finds the ratio x of a fixed hybrid whose mean allocated KV bytes equal a target."""

    LO, HI = 1e-3, 1.0

    def __init__(self, evaluate, iters: int, tol: float):
        self.evaluate = evaluate  # (hybrid, x) -> row with kv_bytes_mean
        self.iters, self.tol = iters, tol
        self.memo: Dict[Tuple[str, float], Dict] = {}

    def f(self, hybrid: str, x: float) -> Dict:
        key = (hybrid, round(x, 6))
        if key not in self.memo:
            self.memo[key] = self.evaluate(hybrid, x)
        return self.memo[key]

    def match(self, hybrid: str, target: float) -> Tuple[float, Dict, Dict]:
        lo, hi = self.LO, self.HI
        tried: List[Tuple[float, Dict]] = []

        def ev(x):
            row = self.f(hybrid, x)
            tried.append((x, row))
            return row["kv_bytes_mean"]

        rel = lambda v: abs(v / target - 1.0)  # noqa: E731
        flo, fhi = ev(lo), ev(hi)
        if lo < hi and flo < target < fhi:
            for it in range(self.iters):
                if min(rel(r["kv_bytes_mean"]) for _, r in tried) <= self.tol:
                    break
                if it % 2 == 0 and fhi > flo:
                    x = lo + (target - flo) * (hi - lo) / (fhi - flo)
                    x = min(max(x, lo + 0.02 * (hi - lo)), hi - 0.02 * (hi - lo))
                else:
                    x = 0.5 * (lo + hi)
                fx = ev(x)
                if fx < target:
                    lo, flo = x, fx
                else:
                    hi, fhi = x, fx
        x, row = min(tried, key=lambda t: (rel(t[1]["kv_bytes_mean"]), t[0]))
        info = {
            "target_bytes": target,
            "rel_error": row["kv_bytes_mean"] / target - 1.0,
            "matched": rel(row["kv_bytes_mean"]) <= self.tol,
            "evaluations": [(xx, r["kv_bytes_mean"]) for xx, r in tried],
        }
        return x, row, info


# ----------------------------------------------------------------------------------------------------------------
# inputs


def token_stream(tokenizer, path, n_needed: int) -> List[int]:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    chars = min(len(text), max(200_000, 8 * n_needed))
    ids = tokenizer.encode(text[:chars], bos=False, eos=False)
    if not ids:
        raise ValueError(f"{path} holds no text")
    return ids


def bos_prefix(tokenizer, mode: str) -> List[int]:
    bos = getattr(tokenizer, "bos_id", -1)
    if mode == "no" or bos is None or bos < 0:
        return []
    if mode == "auto" and not getattr(tokenizer, "add_bos", True):
        return []
    return [bos]


def quality_batches(stream, bos, P, C, N, max_batch_tokens) -> Tuple[List[Batch], bool]:
    """N windows of P + C + 1 tokens (BOS first when used), spread evenly over the stream.

    Returns the batches and whether windows overlap (a short text; their scored tokens stay apart when the
    text holds N * C tokens beyond one window).
    """
    width = P + C + 1 - len(bos)
    overlap = len(stream) < N * width
    if len(stream) < width:
        stream = stream * (width // len(stream) + 1)
    span = len(stream) - width
    offsets = [round(i * span / max(1, N - 1)) if N > 1 else 0 for i in range(N)]
    rows = [bos + stream[o: o + width] for o in offsets]
    per = max(1, max_batch_tokens // (P + C))
    return [Batch(tokens=torch.tensor(rows[i: i + per]), prompt_len=P, steps=C)
            for i in range(0, N, per)], overlap


def sub_batch(b: Batch, k: int, steps: Optional[int] = None) -> Batch:
    """The first k sequences (and steps) of a batch, sharing its recorded prefill and reference."""
    steps = b.steps if steps is None else steps
    return Batch(tokens=b.tokens[:k, : b.prompt_len + steps + 1], prompt_len=b.prompt_len, steps=steps,
                 rec=[tuple(t[:k] for t in layer) for layer in b.rec] if b.rec else None,
                 rec_last=b.rec_last[:k] if b.rec_last is not None else None,
                 ref_logp=[lp[:k] for lp in b.ref_logp[:steps]] if b.ref_logp is not None else None)


def memory_pass(llama, setting: Setting, batches: Sequence[Batch], replay: bool) -> Dict:
    """Mean allocated KV bytes of a setting teacher-forced over the batches (no quality metrics)."""
    acc = Acc()
    for b in batches:
        run = Run(llama, setting, b, replay=replay)
        run.teacher_force(lambda i, lg: None)
        acc.add_memory(run)
    return acc.memory_row()


# ----------------------------------------------------------------------------------------------------------------
# output


COLUMNS = ["name", "kind", "T", "policy", "ratio", "method", "budget", "kv_quant",
           "r_l", "r_f", "kv_bytes_mean", "kv_bytes_peak", "mem_ratio",
           "peak_ratio", "mem_ratio_exact", "metadata_bytes_mean", "mem_ratio_incl_metadata", "ppl", "ppl_ratio",
           "ppl_ratio_lo", "ppl_ratio_hi", "top1_agreement", "top1_agreement_lo", "top1_agreement_hi", "kl_mean",
           "kl_mean_lo", "kl_mean_hi", "next_token_acc", "recovery_mean", "policy_mix", "greedy_prefix_mean",
           "greedy_prefix_frac", "greedy_identical", "rouge_l", "task_accuracy", "task_exact", "task_mem_ratio",
           "task_items", "matched", "match_rel_error", "seconds"]
CI_KEYS = ("ppl_ratio", "kl_mean", "top1_agreement")


def csv_row(row: Dict) -> Dict:
    out = dict(row)
    out["policy_mix"] = ";".join(f"{k}:{v:.4f}" for k, v in row.get("policy_mix", {}).items())
    for k in CI_KEYS:
        lo, hi = (row.get("ci") or {}).get(k, (None, None))
        out[f"{k}_lo"], out[f"{k}_hi"] = lo, hi
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = f"{v:.6g}"
    return out


def _group(r: Dict) -> str:
    """The curve a row belongs to: a method (with its codec) over budgets, FastGen over T, a baseline."""
    if r["kind"] in ("method", "quant"):
        if r.get("method") == "fastgen":  # a codec on FastGen: its own curve over T (alone: at T = 1)
            return f"FastGen {r['kv_quant']}"
        return " ".join(x for x in (r.get("method"), r.get("kv_quant")) if x)
    return {"fastgen": "FastGen", "fixed": r.get("policy"), "uncompressed": "uncompressed"}.get(r["kind"], r["name"])


def plot(result: Dict, path: Path) -> None:
    """Task accuracy and the teacher-forced metrics (95% intervals as error bars) against KV memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["settings"]
    panels = [("task_accuracy", "task_mem_ratio", "task accuracy (kept cells)"),
              ("ppl_ratio", "mem_ratio", "perplexity / uncompressed"),
              ("top1_agreement", "mem_ratio", "top-1 agreement with uncompressed"),
              ("kl_mean", "mem_ratio", "KL(uncompressed || setting)")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(_group(r), []).append(r)
    markers = {"FastGen": "o-", "uncompressed": "k*"}
    for ax, (key, xkey, label) in zip(axes[0], panels):
        for g, rs in groups.items():
            pts = sorted((r[xkey], r[key], (r.get("ci") or {}).get(key), r) for r in rs
                         if r.get(key) is not None and r.get(xkey) is not None)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            err = None
            if all(p[2] for p in pts):
                # max(0, .): a degenerate interval (one window) can sit a rounding error off its point
                err = [[max(0.0, y - p[2][0]) for y, p in zip(ys, pts)], [max(0.0, p[2][1] - y) for y, p in zip(ys, pts)]]
            ax.errorbar(xs, ys, yerr=err, fmt=markers.get(g, "s--"), label=g, capsize=2,
                        markersize=10 if g == "uncompressed" else 5)
            for x, y, _, r in pts:
                if r["kind"] == "fastgen":
                    ax.annotate(f"T={r['T']:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("KV memory / uncompressed (mean allocated)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    texts = ", ".join(Path(t).name for t in result["texts"])
    fig.suptitle(f"{result['model']['name']}: tasks at {result['tasks']['lengths'] if result.get('tasks') else '-'}"
                 f" tokens; teacher forcing P={result['prompt_len']}, C={result['cont_len']}, "
                 f"{result['n_windows']} windows ({texts}); bars: 95% bootstrap intervals", fontsize=9)
    save_figure(fig, path)
    plt.close(fig)


def print_table(rows: List[Dict], file=sys.stdout) -> None:
    head = f"{'setting':44s} {'mem':>6s} {'ppl_r':>7s} {'95% CI':>17s} {'top1':>6s} {'KL':>8s} {'rec':>6s} " \
           f"{'tasks':>6s} {'t_mem':>6s}"
    print(head, file=file)
    for r in rows:
        def g(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        lo, hi = (r.get("ci") or {}).get("ppl_ratio", (None, None))
        ci = f"[{lo:.4f}, {hi:.4f}]" if lo is not None else "-"
        print(f"{r['name'][:44]:44s} {g('mem_ratio', '6.3f')} {g('ppl_ratio', '7.4f')} {ci:>17s} "
              f"{g('top1_agreement', '6.3f')} {g('kl_mean', '8.5f')} {g('recovery_mean', '6.3f')} "
              f"{g('task_accuracy', '6.3f')} {g('task_mem_ratio', '6.3f')}", file=file)


# ----------------------------------------------------------------------------------------------------------------
# main


def _now() -> Tuple[float, float]:
    """(wall, this process's CPU) seconds: on a shared machine the CPU time is what the run costs one core."""
    return time.perf_counter(), time.process_time()


def _since(t0: Tuple[float, float]) -> Tuple[float, float]:
    t = _now()
    return t[0] - t0[0], t[1] - t0[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt_dir", default=None,
                   help=f"native checkpoint (default: {SMOLLM2_DIR.relative_to(SMOLLM2_DIR.parents[1])} when "
                        f"present, else ../shared/models/stories260K; --quick: stories260K)")
    p.add_argument("--tokenizer_path", default=None,
                   help="default: tokenizer.model or tokenizer.gguf in --ckpt_dir")
    p.add_argument("--texts", nargs="+", default=None,
                   help=f"text files of the teacher-forced windows, --n_prompts from each (default: "
                        f"{', '.join(t.name for t in DEFAULT_TEXTS)})")
    p.add_argument("--max_seq_len", type=int, default=None, help="model context (default: from the checkpoint)")
    p.add_argument("--prompt_len", "-P", type=int, default=None,
                   help="prompt tokens (default: min(2048, context / 2); --quick 256)")
    p.add_argument("--cont_len", "-C", type=int, default=None,
                   help=f"teacher-forced tokens per window ({FULL['cont_len']}; --quick {QUICK['cont_len']})")
    p.add_argument("--n_prompts", "-N", type=int, default=None,
                   help=f"windows per text ({FULL['n_prompts']}; --quick {QUICK['n_prompts']})")
    p.add_argument("--gen_len", type=int, default=None,
                   help=f"greedy tokens per window for greedy agreement (0: skip; {FULL['gen_len']}; "
                        f"--quick {QUICK['gen_len']})")
    p.add_argument("--T", type=float, nargs="+", default=None, help=f"FastGen thresholds (default {FULL['T']})")
    p.add_argument("--r_l", type=float, default=None, help="FastGen's locality ratio (default: shipped config)")
    p.add_argument("--r_f", type=float, default=None, help="FastGen's frequency ratio (default: shipped config)")
    p.add_argument("--evict_every", type=int, default=None,
                   help="k: decode steps between evictions, for FastGen and the baselines (default: shipped config)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=CONFIG",
                   help="an extra row: a kv config as a JSON file or inline JSON object (repeatable)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="registered methods of the comparison, each at every --budgets share and at FastGen's "
                        "memory at each T < 1 (default: every registered method; --quick: streaming_llm snapkv); "
                        "fastgen's own rows are its --T")
    p.add_argument("--budgets", type=float, nargs="+", default=None,
                   help=f"kept shares of the cache the methods run at ({FULL['budgets']}; --quick "
                        f"{QUICK['budgets']})")
    p.add_argument("--no_methods", action="store_true", help="no method rows (FastGen and the baselines only)")
    p.add_argument("--method_T", type=float, nargs="*", default=None,
                   help=f"FastGen thresholds (of --T, < 1) whose memory the methods are matched to ({FULL['method_T']};"
                        f" --quick: every T < 1; none: no matched rows)")
    p.add_argument("--no_method_match", action="store_true", help="the same as --method_T with no value")
    p.add_argument("--head_scores", default=None, metavar="JSON",
                   help="HeadKV's head scores (scripts/score_heads.py --out); default: head_scores.json next to the "
                        "checkpoint, without which headkv is left out")
    p.add_argument("--kv_quant", nargs="+", default=[], metavar="CODEC",
                   help="codecs (issue 13: int8, int4): a row for each alone (FastGen at T = 1, which keeps every "
                        "token) and combined with each of --quant_methods at every budget")
    p.add_argument("--quant_methods", nargs="*", default=["fastgen", "snapkv"], metavar="NAME",
                   help="methods combined with each codec (fastgen: at each T < 1; the others at --budgets)")
    p.add_argument("--baselines", nargs="*", default=None,
                   help=f"fixed hybrids matched to FastGen's memory at each T < 1 (none: no baselines; default: none "
                        f"in the full run, {' '.join(DEFAULT_BASELINES)} with --quick)")
    p.add_argument("--match_tol", type=float, default=0.02, help="relative memory tolerance of the matching")
    p.add_argument("--match_windows", type=int, default=None,
                   help=f"windows the matching bisects on, then one evaluation on all ({FULL['match_windows']}; "
                        f"--quick: all)")
    p.add_argument("--max_answer", type=int, default=None,
                   help="cap on the answer tokens of every task (default: each task's own; --quick 8)")
    p.add_argument("--bisect_iters", type=int, default=None,
                   help=f"evaluations per match after the two ends ({FULL['bisect_iters']})")
    p.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS, help="tasks (none: skip them)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help=f"task prompt lengths in tokens ({FULL['lengths']}; --quick {QUICK['lengths']}); "
                        f"lengths beyond the context are left out")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="depths of the planted facts")
    p.add_argument("--trials", type=int, default=None, help=f"items per (task, length, depth) ({FULL['trials']})")
    p.add_argument("--min_accuracy", type=float, default=None,
                   help=f"keep the task cells where the uncompressed accuracy reaches this ({FULL['min_accuracy']}; "
                        f"--quick {QUICK['min_accuracy']})")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend BOS to the teacher-forced windows (auto: when the tokenizer expects it)")
    p.add_argument("--max_batch_tokens", type=int, default=8192,
                   help="prompt tokens per batch (the prefill holds a (batch, heads, L, L) score map)")
    p.add_argument("--no_replay", action="store_true", help="run every setting's prefill through the model")
    p.add_argument("--seed", type=int, default=0, help="seed of the task items and of the bootstrap")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --quick 1)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings that finish in under a minute")
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _opt(args, d: Dict, key: str):
    v = getattr(args, key)
    return d[key] if v is None else v


def _describe(s: Setting) -> Dict:
    cfg = s.config
    return {"name": s.name, "kind": s.kind, "T": s.T, "policy": s.policy, "ratio": s.ratio,
            "method": s.method, "budget": s.budget, "kv_quant": s.kv_quant, "replay": s.replay,
            "r_l": getattr(cfg, "r_l", None), "r_f": getattr(cfg, "r_f", None),
            "config": cfg.to_dict() if cfg is not None else None}


def _extra_settings(specs: Sequence[str]) -> List[Setting]:
    import json

    from adaptive_kv_cache.config import KVConfigError

    out = []
    for spec in specs:
        # an inline object starts at the first "={" (a name may hold "=", e.g. "T=0.9 w64"), a file after the
        # first "="
        at = spec.find("={")
        name, sep, cfg = (spec[:at], "=", spec[at + 1:]) if at >= 0 else spec.partition("=")
        if not sep or not name.strip() or not cfg:
            raise SystemExit(f"--setting {spec!r}: expected NAME=CONFIG (a JSON file or an inline JSON object)")
        try:
            out.append(config_setting(name.strip(), json.loads(cfg) if cfg.lstrip().startswith("{") else cfg))
        except json.JSONDecodeError as e:
            raise SystemExit(f"--setting {name.strip()!r}: malformed JSON ({e.msg} at column {e.colno})")
        except (KVConfigError, FileNotFoundError) as e:
            raise SystemExit(f"--setting {name.strip()!r}: {e}")
    return out


def _check_methods(names: Sequence[str], flag: str, allow_fastgen: bool) -> None:
    from adaptive_kv_cache.registry import METHODS

    bad = [n for n in names if n not in METHODS or (n == "fastgen" and not allow_fastgen)]
    if bad:
        allowed = [m for m in METHODS if allow_fastgen or m != "fastgen"]
        raise SystemExit(f"{flag}: {', '.join(bad)} not allowed; registered methods: {', '.join(allowed)}"
                         + ("" if allow_fastgen else " (fastgen's rows are its thresholds, --T)"))


def _methods(args, d: Dict) -> Tuple[List[str], List[float]]:
    """The methods and budget shares of the comparison, checked."""
    from adaptive_kv_cache.registry import METHODS

    budgets = [float(b) for b in _opt(args, d, "budgets")]
    bad = [b for b in budgets if not 0.0 < b <= 1.0]
    if bad:
        raise SystemExit(f"--budgets: {', '.join(f'{b:g}' for b in bad)} outside (0, 1] (kept shares of the cache)")
    if args.no_methods:
        return [], budgets
    methods = args.methods or d["methods"] or [m for m in METHODS if m != "fastgen"]
    _check_methods(methods, "--methods", allow_fastgen=False)
    return list(dict.fromkeys(methods)), budgets


def _preparable(llama, methods: Sequence[str], opts: Dict[str, Dict]) -> Dict[str, str]:
    """The methods that cannot run on this model, with the reason (HeadKV without its head scores file: run
    scripts/score_heads.py first); the run goes on without them."""
    from adaptive_kv_cache.config import KVConfigError

    skipped = {}
    for m in dict.fromkeys(methods):
        try:
            llama.set_kv_config(method_kv_config(m, 0.5, options=opts.get(m)))
        except KVConfigError as e:
            skipped[m] = str(e)
            print(f"note: method {m} left out: {e}", file=sys.stderr)
    llama.set_kv_config(None)
    llama._quality_config = None  # what `Run.prefill` compares against
    return skipped


def main(argv=None) -> Dict:
    args = parse_args(argv)
    d = QUICK if args.quick else FULL
    t_start = _now()
    timings: Dict[str, float] = {}
    timings_cpu: Dict[str, float] = {}  # this process's CPU seconds: the cost on an unshared core
    threads = args.threads or (1 if args.quick else None)
    if threads:  # a small model runs faster on one thread, and far faster when other jobs share the cores
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    from adaptive_kv_cache.config import resolve_kv_config
    from llama.generation import Llama
    from llama.tokenizer import find_tokenizer

    ckpt = Path(args.ckpt_dir) if args.ckpt_dir else (
        STORIES_DIR if args.quick or not (SMOLLM2_DIR / "params.json").is_file() else SMOLLM2_DIR)
    tok_path = Path(args.tokenizer_path) if args.tokenizer_path else Path(find_tokenizer(str(ckpt)))
    ctx = args.max_seq_len or default_context(ckpt)
    P = args.prompt_len or d["prompt_len"] or min(2048, ctx // 2)
    C, N, G, Ts = _opt(args, d, "cont_len"), _opt(args, d, "n_prompts"), _opt(args, d, "gen_len"), _opt(args, d, "T")
    iters, match_windows = _opt(args, d, "bisect_iters"), _opt(args, d, "match_windows")
    texts = [Path(t) for t in (args.texts or DEFAULT_TEXTS)]
    if P + C > ctx or P + G > ctx:
        raise SystemExit(f"prompt_len {P} + cont_len {C} / gen_len {G} exceed the context {ctx}")
    replay = not args.no_replay
    show = not args.no_progress

    base = resolve_kv_config({})
    over = {k: getattr(args, k) for k in ("r_l", "r_f", "evict_every") if getattr(args, k) is not None}
    if over:
        base = base.replace(**over)
    extra = _extra_settings(args.setting)
    methods, budgets = _methods(args, d)
    args.baselines = _opt(args, d, "baselines")
    method_T = _opt(args, d, "method_T")
    method_T = None if method_T is None else [float(T) for T in method_T if float(T) in Ts or args.method_T]
    bad_T = [T for T in (method_T or []) if T >= 1.0 or T not in Ts]
    if bad_T:
        raise SystemExit(f"--method_T: {', '.join(f'{T:g}' for T in bad_T)} not among the thresholds below 1 of --T "
                         f"({', '.join(f'{T:g}' for T in Ts)})")
    quant_methods = list(dict.fromkeys(args.quant_methods))
    _check_methods(quant_methods, "--quant_methods", allow_fastgen=True)
    if args.kv_quant:
        check_kv_quant(args.kv_quant, quant_methods)

    t0 = _now()
    per_batch = max(1, args.max_batch_tokens // min(P + C, ctx))
    llama = Llama.build(str(ckpt), str(tok_path), max_seq_len=ctx, max_batch_size=max(per_batch, 2 * N, 16),
                        seed=args.seed, device="cpu")
    model = llama.model
    n_params = sum(p.numel() for p in model.parameters())
    timings["load"], timings_cpu["load"] = _since(t0)
    tok = llama.tokenizer
    bos = bos_prefix(tok, args.bos)
    stop = set(tok.stop_tokens) | ({tok.eos_id} if getattr(tok, "eos_id", -1) >= 0 else set())
    opts = {"headkv": {"head_scores": args.head_scores}} if args.head_scores else {}
    methods_skipped = _preparable(llama, methods + [m for m in quant_methods if args.kv_quant], opts)
    methods = [m for m in methods if m not in methods_skipped]
    quant_methods = [m for m in quant_methods if m not in methods_skipped]
    method_settings = [method_setting(m, b, options=opts.get(m)) for m in methods for b in budgets]
    for q in args.kv_quant:
        method_settings.append(method_setting("fastgen", None, kv_quant=q))
        method_settings += [method_setting(m, b, kv_quant=q, options=opts.get(m)) for m in quant_methods
                            if m != "fastgen" for b in budgets]
        if "fastgen" in quant_methods:
            method_settings += [method_setting("fastgen", None, T=T, kv_quant=q) for T in Ts if T < 1.0]

    t0 = _now()
    batches: List[Batch] = []
    window_texts: List[str] = []
    overlap: Dict[str, bool] = {}
    for path in texts:
        stream = token_stream(tok, path, N * (P + C + 1))
        bs, overlap[path.name] = quality_batches(stream, bos, P, C, N, args.max_batch_tokens)
        batches += bs
        window_texts += [path.name] * N
        if overlap[path.name]:
            print(f"note: {path} gives {len(stream)} tokens, fewer than {N} disjoint windows of {P + C + 1}; "
                  f"windows overlap", file=sys.stderr)
    gbatches = [Batch(tokens=b.tokens[:, :P], prompt_len=P, steps=max(G - 1, 0)) for b in batches]
    timings["tokenize"], timings_cpu["tokenize"] = _since(t0)

    rows: List[Dict] = []
    settings: List[Setting] = []
    replay_check: Optional[Dict] = None
    replay_checks: Dict[str, Dict] = {}  # per method (and codec): is the recorded prefill valid for it?
    replay_ok: Dict[Tuple, bool] = {}
    task_out: Optional[Dict] = None

    # warm-up (first calls of some kernels are slow), so that the per-setting seconds are comparable
    with torch.inference_mode():
        model.forward(batches[0].tokens[:1, :16], 0, None)

    def build(stage: str) -> Dict:
        return {
            "benchmark": "quality",
            "complete": stage == "done",
            "stage": stage,
            "created": now_iso(),
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "quick": args.quick,
            "machine": machine_info("cpu"),
            "model": {"name": ckpt.name, "ckpt_dir": str(ckpt), "tokenizer": str(tok_path), "context": ctx,
                      "n_params": n_params, "params": {k: getattr(model.params, k) for k in
                                                       ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")},
                      "dtype": str(model.output.weight.dtype)},
            "texts": [str(t) for t in texts], "window_texts": window_texts, "windows_overlap": overlap,
            "prompt_len": P, "cont_len": C, "n_prompts": N, "n_windows": len(window_texts), "gen_len": G,
            "bos": bos, "bootstrap": {"draws": N_BOOT, "seed": args.seed, "level": 0.95, "unit": "window"},
            "fastgen_base_config": base.to_dict(),
            "replay": replay,
            "replay_check": replay_check,
            "replay_checks": replay_checks,
            "methods": methods, "budgets": budgets, "methods_skipped": methods_skipped,
            "kv_quant": list(args.kv_quant), "quant_methods": quant_methods if args.kv_quant else [],
            "match_tol": args.match_tol, "match_windows": match_windows,
            "settings": rows,
            "tasks": task_out,
            "timings_s": timings, "timings_cpu_s": timings_cpu,
        }

    out = Path(args.out)

    def save(stage: str) -> Dict:
        """Writes what is known so far (a killed long run still leaves its finished stages behind)."""
        result = build(stage)
        write_json(out / "quality.json", result)
        write_csv(out / "quality.csv", [csv_row(r) for r in rows], COLUMNS)
        return result

    # --- teacher forcing: uncompressed, FastGen, extra settings -------------------------------------------------
    steps_per_pass = sum(b.steps for b in batches)
    bar = progress(total=steps_per_pass * (1 + len(Ts) + len(extra) + len(method_settings)),
                   desc="teacher forcing", unit="step", disable=not show)
    t0 = _now()
    ref_setting = Setting("uncompressed", "uncompressed", None)
    fastgen_rows: Dict[float, Dict] = {}
    ref_mem = ref_peak = ref_ppl = ref_windows = None

    def finish(row: Dict) -> Dict:
        row["mem_ratio"] = row["kv_bytes_mean"] / ref_mem
        row["peak_ratio"] = row["kv_bytes_peak"] / ref_peak
        row["mem_ratio_exact"] = row["kv_bytes_mean"] / row["kv_exact_bytes_mean"]
        row["mem_ratio_incl_metadata"] = (row["kv_bytes_mean"] + row["metadata_bytes_mean"]) / ref_mem
        row["ppl_ratio"] = row["ppl"] / ref_ppl
        row["ci"] = paired_bootstrap(ref_windows, row["windows"], N_BOOT, args.seed)
        row["ci_by_text"] = {}
        for name in overlap:
            sel = [i for i, t in enumerate(window_texts) if t == name]
            pick = lambda w: {k: [v[i] for i in sel] for k, v in w.items()}  # noqa: E731
            r, a = pick(ref_windows), pick(row["windows"])
            row["ci_by_text"][name] = {"ppl_ratio": math.exp((sum(a["nll"]) - sum(r["nll"])) / sum(r["n"])),
                                       **{f"{k}_ci": v for k, v in paired_bootstrap(r, a, N_BOOT, args.seed).items()}}
        return row

    def check_method(s: Setting) -> None:
        """Before a method's (and codec's) first row: is the recorded prefill valid for it? If not, every row
        of it runs its own prefill."""
        key = (s.method, s.kv_quant)
        if replay and key not in replay_ok:
            ts = _now()
            chk = check_replay(llama, s, batches[0])
            chk["cpu_seconds"] = _since(ts)[1]
            replay_checks[" ".join(k for k in key if k)] = chk
            replay_ok[key] = chk["ok"]
            if not chk["ok"]:
                print(f"note: replaying the recorded prefill into {s.name} does not equal its own prefill "
                      f"(max |logit diff| {chk['max_abs_logit_diff']:.3g}); its rows run their own prefill",
                      file=sys.stderr)
        s.replay = replay_ok.get(key, True)

    for s in [ref_setting] + [fastgen_setting(base, T) for T in Ts] + extra + method_settings:
        bar.set_postfix_str(s.name)
        if s.method is not None:
            check_method(s)
        ts = _now()
        row = {**_describe(s), **teacher_forced(llama, s, batches, replay, bar)}
        row["seconds"], row["cpu_seconds"] = _since(ts)
        if s.kind == "uncompressed":
            ref_mem, ref_peak, ref_ppl, ref_windows = row["kv_bytes_mean"], row["kv_bytes_peak"], row["ppl"], \
                row["windows"]
        settings.append(s)
        rows.append(finish(row))
        if s.kind == "fastgen":
            fastgen_rows[float(s.T)] = row
    bar.close()
    timings["teacher_forcing"], timings_cpu["teacher_forcing"] = _since(t0)
    save("teacher forcing")

    # --- fixed baselines matched in memory (bisection on a few windows, then one full evaluation) ---------------
    t0 = _now()
    targets = [T for T in Ts if T < 1.0] if args.baselines else []
    sub = match_subset(batches, window_texts, match_windows)
    bar = progress(desc="matching baselines", unit="pass", disable=not show,
                   total=len(args.baselines) * (2 + len(targets) * (iters + 3)) if targets else 0)

    def evaluate(hybrid: str, x: float) -> Dict:
        s = fixed_setting(base, hybrid, x, None)
        bar.set_postfix_str(s.name)
        row = memory_pass(llama, s, sub, replay)
        bar.update(1)
        return row

    method_targets = [] if not methods or args.no_method_match else \
        [T for T in Ts if T < 1.0] if method_T is None else method_T
    sub_target = {T: memory_pass(llama, fastgen_setting(base, T), sub, replay)["kv_bytes_mean"]
                  for T in dict.fromkeys(targets + method_targets)}
    matcher = Matcher(evaluate, iters, args.match_tol)

    def on_all_windows(s: Setting, T: float) -> Tuple[Setting, Dict, float]:
        """Setting s on every window, and its relative memory error against FastGen at T."""
        ts = _now()
        row = {**_describe(s), **teacher_forced(llama, s, batches, replay)}
        row["seconds"], row["cpu_seconds"] = _since(ts)
        bar.update(1)
        return s, row, row["kv_bytes_mean"] / fastgen_rows[float(T)]["kv_bytes_mean"] - 1.0

    def full(hybrid: str, x: float, T: float) -> Tuple[Setting, Dict, float]:
        """The baseline at ratio x on every window."""
        return on_all_windows(fixed_setting(base, hybrid, x, T), T)

    for hybrid in args.baselines:
        for T in targets:
            x, _, info = matcher.match(hybrid, sub_target[T])
            s, row = confirm_match(lambda r, hybrid=hybrid, T=T: full(hybrid, r, T), x, info,
                                   fastgen_rows[float(T)]["kv_bytes_mean"], args.match_tol)
            settings.append(s)
            rows.append(finish(row))
            save(f"baselines ({s.name})")
    bar.close()
    timings["matching_baselines"], timings_cpu["matching_baselines"] = _since(t0)

    # --- methods at FastGen's operating points: the budget whose memory equals FastGen's at each T < 1 --------
    t0 = _now()
    bar = progress(desc="matching methods", unit="pass", disable=not show,
                   total=len(methods) * len(method_targets) * (iters + 3))
    for m in methods:
        for T in method_targets:
            def evaluate(x: float, m=m, T=T) -> float:
                s = method_setting(m, x, T, options=opts.get(m))
                s.replay = replay_ok.get((m, None), True)
                bar.set_postfix_str(s.name)
                bar.update(1)
                return memory_pass(llama, s, sub, replay)["kv_bytes_mean"]

            x, info = secant_match(evaluate, sub_target[T], fastgen_rows[float(T)]["mem_ratio"], iters,
                                   args.match_tol)

            def full_row(x: float, m=m, T=T) -> Tuple[Setting, Dict, float]:
                s = method_setting(m, x, T, options=opts.get(m))
                s.replay = replay_ok.get((m, None), True)
                return on_all_windows(s, T)

            s, row = confirm_match(full_row, x, info, fastgen_rows[float(T)]["kv_bytes_mean"], args.match_tol)
            settings.append(s)
            rows.append(finish(row))
            save(f"methods ({s.name})")
    bar.close()
    timings["matching_methods"], timings_cpu["matching_methods"] = _since(t0)

    # --- replay check -----------------------------------------------------------------------------------------
    t0 = _now()
    check_setting = next((s for s in settings if s.kind == "fastgen" and s.T < 1.0), None)
    if check_setting is not None:
        replay_check = check_replay(llama, check_setting, batches[0])
    timings["replay_check"], timings_cpu["replay_check"] = _since(t0)

    # --- greedy agreement -------------------------------------------------------------------------------------
    t0 = _now()
    for gb, b in zip(gbatches, batches):  # same prompts: replay the recorded prefill
        gb.rec, gb.rec_last = b.rec, b.rec_last
    if G > 0:
        bar = progress(total=G * len(gbatches) * len(settings), desc="greedy", unit="step", disable=not show)
        for s, row in zip(settings, rows):
            bar.set_postfix_str(s.name)
            row.update(greedy_agreement(llama, s, gbatches, G, replay, stop, bar))
        bar.close()
    for b in batches:
        b.rec = b.rec_last = b.ref_logp = None  # free the recorded activations
    gbatches = []
    timings["greedy"], timings_cpu["greedy"] = _since(t0)
    save("greedy")

    # --- tasks ------------------------------------------------------------------------------------------------
    t0 = _now()
    if args.tasks:
        task_out = run_tasks(llama, args, d, ctx, settings, rows, replay, stop, show)
        timings["tasks_build"] = task_out.pop("build_seconds")
    timings["tasks"], timings_cpu["tasks"] = _since(t0)
    timings["total"], timings_cpu["total"] = _since(t_start)

    result = save("done")
    if not args.no_plot:
        plot(result, out / "quality.png")
        if methods or args.kv_quant:  # every method against memory, without the fixed baselines' curves
            from benchmarks.tables import comparison_plot

            comparison_plot(result, out / "quality_methods.png")
    print(f"\nquality: {ckpt.name}, P={P}, C={C}, {len(window_texts)} windows, G={G}; {timings['total']:.1f} s; "
          f"outputs in {out}")
    print_table(rows)
    if replay_check:
        print(f"replay check ({replay_check['setting']}): ok={replay_check['ok']}, "
              f"same policies={replay_check['same_policies']}, identical={replay_check['identical']}, "
              f"max |logit diff|={replay_check['max_abs_logit_diff']:.3g}")
    if task_out:
        cal = task_out["calibration"]
        dropped = ", ".join(f"{c['task']}@{c['length']}" for c in cal if not c["kept"])
        print(f"tasks: {sum(c['kept'] for c in cal)} of {len(cal)} cells kept"
              + (f"; dropped (uncompressed below {task_out['min_accuracy']:g}): {dropped}" if dropped else ""))
    return result


def corrected_ratio(x: float, mem_all: float, target_all: float,
                    evaluations: Sequence[Tuple[float, float]]) -> Optional[float]:
    """One secant step of a fixed hybrid's ratio towards the target memory on all windows.

    The slope of memory in x comes from the matching's evaluations on the subset (x and the evaluated ratio
    nearest to it), scaled to all windows by mem_all / mem_sub(x).

    Args:
        x: the ratio the subset matched.
        mem_all: mean allocated bytes at x on all windows.
        target_all: FastGen's on all windows.
        evaluations: (ratio, mean bytes on the subset) of the matching.

    Returns:
        the next ratio, in [Matcher.LO, Matcher.HI], or None without a usable slope.
    """
    at_x = [m for xx, m in evaluations if xx == x]
    others = sorted((abs(xx - x), xx, m) for xx, m in evaluations if xx != x)
    if not at_x or not others or at_x[0] <= 0:
        return None
    _, x1, m1 = others[0]
    slope = (at_x[0] - m1) / (x - x1) * (mem_all / at_x[0])
    if slope <= 0:
        return None
    return min(max(x + (target_all - mem_all) / slope, Matcher.LO), Matcher.HI)



def confirm_match(run: Callable[[float], Tuple["Setting", Dict, float]], x: float, info: Dict,
                  target_bytes: float, tol: float) -> Tuple["Setting", Dict]:
    """Runs the ratio or budget `x` matched on the subset on all windows; where its memory misses the target by
    more than `tol`, one secant step on all windows (`corrected_ratio`), keeping the closer of the two.

    Args:
        run: x -> (setting, row, relative memory error against the target) on all windows.
        x: the value matched on the subset; info: the subset match's record (with "evaluations").
        target_bytes: the memory to match (FastGen's mean KV bytes at the same T).
        tol: relative error accepted.

    Returns:
        (setting, row), the row recording the match (matched, match_rel_error, match).
    """
    s, row, rel = run(x)
    info = {**info, "rel_error_all_windows_first": rel, "corrected": False}
    x2 = corrected_ratio(x, row["kv_bytes_mean"], target_bytes, info["evaluations"]) if abs(rel) > tol else None
    if x2 is not None:  # the subset misjudged all windows: one secant step on them, keep the better
        s2, row2, rel2 = run(x2)
        if abs(rel2) < abs(rel):
            s, row, rel = s2, row2, rel2
            info["corrected"] = True
    info["rel_error_all_windows"] = rel
    s.match = info
    row.update(matched=abs(rel) <= tol, match_rel_error=rel, match=info)
    return s, row

def secant_match(evaluate, target: float, x0: float, iters: int, tol: float) -> Tuple[float, Dict]:
    """The budget share x of a method whose mean allocated KV bytes equal a target.

    A method's memory is close to affine in its budget (floor(x * prompt) tokens per head, plus the decode
    tokens), so a proportional step from a good first guess and then secant steps converge in one or two
    evaluations, where the baselines' bracketing (`Matcher`) spends two on the ends of [1e-3, 1].

    Args:
        evaluate: x -> mean allocated bytes.
        target: the bytes to match.
        x0: the first guess (FastGen's memory ratio at the target).
        iters: evaluations after the first.
        tol: relative tolerance.

    Returns:
        the best evaluated x and {target_bytes, rel_error, matched, evaluations [(x, bytes)]} (as `Matcher`).
    """
    clamp = lambda x: min(max(x, Matcher.LO), Matcher.HI)  # noqa: E731
    rel = lambda v: abs(v / target - 1.0)  # noqa: E731
    tried: List[Tuple[float, float]] = []
    x = clamp(x0)
    for _ in range(iters + 1):
        m = evaluate(x)
        tried.append((x, m))
        if rel(m) <= tol:
            break
        if len(tried) == 1 or tried[-1][1] == tried[-2][1]:
            nxt = x * target / m if m > 0 else Matcher.HI
        else:
            (x1, m1), (x2, m2) = tried[-2], tried[-1]
            nxt = x2 + (target - m2) * (x2 - x1) / (m2 - m1)
        nxt = clamp(nxt)
        if any(abs(nxt - t) < 1e-9 for t, _ in tried):
            break
        x = nxt
    x, m = min(tried, key=lambda t: (rel(t[1]), t[0]))
    return x, {"target_bytes": target, "rel_error": m / target - 1.0, "matched": rel(m) <= tol,
               "evaluations": tried}


def match_subset(batches: Sequence[Batch], window_texts: Sequence[str], k: Optional[int]) -> List[Batch]:
    """About k windows for the memory matching, taken evenly from each text (sub-batches of the first batch
    of each text, sharing its recorded prefill); None: every window."""
    if k is None:
        return list(batches)
    out, seen, i = [], [], 0
    names = list(dict.fromkeys(window_texts))
    per_text = max(1, k // max(1, len(names)))
    for b in batches:
        name = window_texts[i]
        i += b.bsz
        if name in seen:
            continue
        seen.append(name)
        out.append(sub_batch(b, min(per_text, b.bsz)))
    return out


class TaskRun:
    """The task suite over the settings, cell by cell: the uncompressed model answers a (task, length) cell
    first (calibration); when the cell is kept, every other setting answers the same items (replaying the
    recorded prefill). Keeps per setting the results, memory, seconds, and per (cell, setting) the costs."""

    def __init__(self, llama, settings: Sequence[Setting], replay: bool, stop, min_accuracy: float,
                 max_batch_tokens: int, bar):
        self.llama, self.settings, self.replay, self.stop = llama, settings, replay, stop
        self.min_accuracy, self.max_batch_tokens, self.bar = min_accuracy, max_batch_tokens, bar
        self.results: Dict[str, List[Dict]] = {s.name: [] for s in settings}
        self.accs = {s.name: Acc() for s in settings}
        self.seconds = {s.name: [0.0, 0.0] for s in settings}  # wall, CPU
        self.costs: List[Dict] = []  # per (cell, setting): wall and CPU seconds, items (the basis of the budget)
        self.calibration: List[Dict] = []
        self.calibration_items: List[Dict] = []

    def _answer(self, s: Setting, batches: Sequence[Batch], cell, n: int) -> Tuple[List[Dict], List[Run]]:
        t0 = _now()
        res, runs = [], []
        for b in batches:
            r, run = task_pass(self.llama, s, b, self.replay, self.stop)
            res += r
            runs.append(run)
        wall, cpu = _since(t0)
        self.seconds[s.name][0] += wall
        self.seconds[s.name][1] += cpu
        self.costs.append({"task": cell[0], "length": cell[1], "setting": s.name, "items": n, "seconds": wall,
                           "cpu_seconds": cpu})
        return res, runs

    def cell(self, cell: Tuple[str, int], items: Sequence[Item]) -> None:
        batches = task_batches(items, self.max_batch_tokens)
        for k, s in enumerate(self.settings):
            self.bar.set_postfix_str(f"{cell[0]}@{cell[1]} {s.name}")
            res, runs = self._answer(s, batches, cell, len(items))
            if k == 0:
                self.calibration_items += res
                self.calibration.append(calibrate(res, self.min_accuracy)[0])
                if not self.calibration[-1]["kept"]:
                    self.bar.update(len(self.settings))
                    return
            self.results[s.name] += res
            for run in runs:
                self.accs[s.name].add_memory(run)
            self.bar.update(1)

    def summary(self, rows: Sequence[Dict]) -> Dict[str, Dict]:
        """Per setting: `summarize_tasks` and the items; the flat numbers also go into the setting's row."""
        ref = self.settings[0].name
        ref_mem = self.accs[ref].memory_row()["kv_bytes_mean"] if self.results[ref] else float("nan")
        out = {}
        for s, row in zip(self.settings, rows):
            summ = summarize_tasks(self.results[s.name], self.accs[s.name], ref_mem)
            row.update({k: v for k, v in summ.items() if not isinstance(v, dict)})
            row["task_seconds"], row["task_cpu_seconds"] = self.seconds[s.name]
            out[s.name] = {**summ, "seconds": self.seconds[s.name][0], "cpu_seconds": self.seconds[s.name][1],
                           "items": self.results[s.name]}
        return out


def run_tasks(llama, args, d: Dict, ctx: int, settings: Sequence[Setting], rows: Sequence[Dict], replay: bool,
              stop, show: bool) -> Dict:
    """The task suite (`TaskRun`) on the cells of --tasks x --lengths that fit the context."""
    from benchmarks.tasks import MAX_GEN

    t0 = _now()
    lengths = [L for L in _opt(args, d, "lengths") if L + max(MAX_GEN.values()) <= ctx]
    skipped = [L for L in _opt(args, d, "lengths") if L not in lengths]
    if skipped:
        print(f"note: task lengths {', '.join(map(str, skipped))} leave no room for the answers in the context of "
              f"{ctx} tokens; skipped", file=sys.stderr)
    depths, trials = args.depths or d["depths"], _opt(args, d, "trials")
    builder = TaskBuilder(TaskText(llama.tokenizer), llama.chat_format)
    items = make_items(builder, cells(args.tasks, lengths), depths, trials, args.seed)
    cap = _opt(args, d, "max_answer")
    if cap:
        items = [dataclasses.replace(it, max_gen_len=min(it.max_gen_len, cap)) for it in items]
    build_seconds = _since(t0)[0]
    by_cell: Dict[Tuple[str, int], List[Item]] = {}
    for it in items:
        by_cell.setdefault(it.cell, []).append(it)
    bar = progress(total=len(by_cell) * len(settings), desc="tasks", unit="cell-setting", disable=not show)
    run = TaskRun(llama, settings, replay, stop, _opt(args, d, "min_accuracy"), args.max_batch_tokens, bar)
    for cell, cell_items in by_cell.items():
        run.cell(cell, cell_items)
    bar.close()
    return {"tasks": list(args.tasks), "lengths": lengths, "lengths_beyond_context": skipped, "depths": depths,
            "trials": trials, "seed": args.seed, "min_accuracy": run.min_accuracy, "calibration": run.calibration,
            "kept_cells": [f"{c['task']}@{c['length']}" for c in run.calibration if c["kept"]],
            "calibration_items": run.calibration_items, "manifest": manifest(items),
            "settings": run.summary(rows), "costs": run.costs, "build_seconds": build_seconds}


if __name__ == "__main__":
    main()
