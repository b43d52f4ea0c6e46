"""Quality against KV memory of FastGen and of fixed-policy baselines, measured on the same inputs in one run.

    python -m benchmarks.quality --quick                      # stories260K, a few minutes on 2 CPU cores
    python -m benchmarks.quality --ckpt_dir models/SmolLM2-135M-Instruct --text ../shared/data/tinystories_valid.txt

Writes ``quality.json``, ``quality.csv`` and ``quality.png`` to ``--out`` (default ``benchmarks/results/``) and
prints a table.

What is measured
----------------
Settings: ``uncompressed`` (the dense cache, ``set_kv_config(None)``), FastGen at each ``--T``, and the
fixed-policy baselines (below). Every setting sees the same inputs in the same process.

* Teacher forcing. ``--n_prompts`` windows of the text, each ``P = --prompt_len`` prompt tokens followed by
  ``C = --cont_len`` continuation tokens (plus the one they predict). The prompt is prefilled, then the C
  continuation tokens are fed one decode step at a time through the setting's cache (the compressed decode
  path); the logits of the step at position ``pos`` predict token ``pos + 1``, so all C scored predictions come
  from compressed decode steps. Per setting: perplexity over those C tokens and its ratio to uncompressed, top-1
  agreement with and mean KL(uncompressed || setting) against the uncompressed next-token distributions, and
  next-token accuracy against the text.
* Memory. ``cache.memory_stats()`` is sampled after every decode step: ``kv_bytes_mean`` / ``kv_bytes_peak`` are
  the allocated K/V buffer bytes per sequence (mean over decode steps, and peak). ``mem_ratio`` divides by the
  uncompressed cache of the same run, i.e. the dense cache as ``Llama.generate`` allocates it (its capacity is
  the whole prompt + continuation from the start, so it is constant); ``mem_ratio_exact`` divides instead by an
  exactly sized uncompressed cache of the tokens held at each step (what FastGen's ``raw_bytes`` counts), so
  slack shows as > 1 at T = 1. ``metadata_bytes_mean`` is the compressed cache's per-slot bookkeeping
  (positions, classes, scores: 13 bytes a slot), not included in kv_bytes; ``mem_ratio_incl_metadata`` adds it
  (it matters for small heads: 20% of the K/V bytes at head_dim 8 in float32, 2.5% at head_dim 64).
* ``recovery_mean``: the attention recovery of the chosen policy of every (layer, sequence, KV head), averaged
  (1 for uncompressed); ``policy_mix``: the share of heads per chosen policy.
* Greedy generation agreement: ``--gen_len`` greedy tokens from each prompt; per setting the number of tokens
  identical to uncompressed before the first divergence (mean, and as a share of the uncompressed length),
  the share of fully identical generations and ROUGE-L F1 of the texts (an LCS over whitespace words).
  Generations are cut at the tokenizer's stop tokens.
* Retrieval: a fact ("<name>'s secret word is <word>.") planted at each of ``--retrieval_depths`` (share of the
  filler before it) in prompts of each of ``--retrieval_lengths`` tokens (default: up to the model's context),
  filler from the text. The prompt (the document) is prefilled and profiled; the question ("What is <name>'s
  secret word? <name>'s secret word is") and the answer are then teacher-forced through decode steps, so the
  question is answered from the compressed cache. A trial is correct when every answer token is the top-1
  prediction (what greedy decoding would produce). Reported per setting: accuracy, per depth and per length,
  token accuracy, mean answer log-probability, and the memory ratio on these prompts.

Fixed-policy baselines
----------------------
Every head is forced to one hybrid (``--baselines``, default special+punct+local, special+punct+frequent,
special+punct+frequent+local) through the same FastGen cache: ``FastGenConfig(T=0, candidates=(hybrid,
("full",)), r_l=x, r_f=x)``. The profiler picks the first candidate whose recovery reaches T, and with T = 0
that is the hybrid for every head. Its ratio x (r_l, r_f, or both set to the same value when both are present)
is chosen per FastGen T < 1 so that the baseline's mean allocated KV bytes on the teacher-forcing inputs equal
FastGen's at that T: a safeguarded bisection (alternating regula-falsi and midpoint steps) on x in
[1e-3, 1] for at most ``--bisect_iters`` evaluations, stopping within ``--match_tol`` (relative); the best
evaluated x is kept and its relative error reported (``match_rel_error``; ``matched`` false when it is outside
the tolerance, e.g. when FastGen uses less memory than the hybrid's special+punct floor). The curves therefore
compare at equal memory. Retrieval runs the baselines with the same x.

Prefill replay
--------------
FastGen attends first and compresses afterwards, so a prefill's activations do not depend on the cache. The
uncompressed run records every layer's (xq, xk, xv) of each prefill and the other settings replay them into
their own cache (``begin``, then per layer ``append``/attention/``after_attention``, then ``end``: exactly the calls
``Transformer.forward`` makes), which runs their profiling and compression for real but skips recomputing the
rest of the model. Decode steps always run the model.
``--no_replay`` turns this off; every run checks it on one setting (``replay_check`` in the JSON: the chosen
policies with and without replay must be equal, and the decode logits equal up to float rounding, since the
recorded prefill ran the uncompressed cache's SDPA kernel and a FastGen prefill the tiled kernel that also
returns statistics).
"""

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

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

DEFAULT_BASELINES = ("special+punct+local", "special+punct+frequent", "special+punct+frequent+local")

QUICK = dict(prompt_len=256, cont_len=32, n_prompts=4, gen_len=24, T=[1.0, 0.95, 0.8], bisect_iters=6,
             retrieval_fracs=(0.3, 1.0), retrieval_depths=[0.1, 0.5, 0.9], retrieval_trials=1)
# Sized to finish in about an hour on one CPU core with SmolLM2 (P = 2048, retrieval up to 8k).
FULL = dict(prompt_len=None, cont_len=32, n_prompts=6, gen_len=32, T=[1.0, 0.95, 0.8],
            bisect_iters=4, retrieval_fracs=(0.25, 0.5, 1.0), retrieval_depths=[0.1, 0.5, 0.9],
            retrieval_trials=1)

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Emma"]
WORDS = ["apple", "kite", "frog", "drum", "boat", "hat", "star", "cake", "shoe", "bird", "lamp", "rock", "moon",
         "sock", "bell", "leaf", "train", "horse", "cup", "tree"]
REPLAY_TOL = 1e-3  # decode logits with and without prefill replay: float rounding of different kernels
RETRIEVAL_ROOM = 48  # tokens kept free after a retrieval prompt for the question and the answer


# ----------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Setting:
    name: str
    kind: str  # "uncompressed" | "fastgen" | "fixed"
    config: object = None  # FastGenConfig or None
    T: Optional[float] = None
    policy: Optional[str] = None  # the forced hybrid of a fixed baseline
    ratio: Optional[float] = None  # its r_l / r_f
    match: Dict = field(default_factory=dict)


def fastgen_setting(base, T: float) -> Setting:
    cfg = base.replace(T=float(T))
    return Setting(f"fastgen T={T:g}", "fastgen", cfg, T=float(T))


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


@dataclass
class Batch:
    """Sequences that run together: equal prompt lengths, equal numbers of decode steps."""

    tokens: torch.Tensor  # (bsz, P + steps + 1): prompt, the tokens fed at the decode steps, the last target
    prompt_len: int
    steps: int
    score: Optional[torch.Tensor] = None  # (bsz, steps) bool: scored predictions (None: all)
    meta: List[Dict] = field(default_factory=list)  # per sequence (retrieval: length, depth, ...)
    rec: Optional[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None  # recorded prefill
    rec_last: Optional[torch.Tensor] = None  # (bsz, V) last prefill logits
    ref_logp: Optional[List[torch.Tensor]] = None  # per step (bsz, V) uncompressed log-probs (float64)
    ref_greedy: Optional[List[List[int]]] = None

    @property
    def bsz(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompts(self) -> List[List[int]]:
        return self.tokens[:, : self.prompt_len].tolist()


def exact_kv_bytes(model, bsz: int, n_tokens: int) -> int:
    """Bytes of an exactly sized uncompressed cache holding n_tokens positions of bsz sequences."""
    p = model.params
    el = model.output.weight.element_size()
    return p.n_layers * 2 * bsz * p.n_kv_heads * n_tokens * (p.dim // p.n_heads) * el


class Run:
    """One pass of one setting over one batch: prefill, then `steps` decode steps; memory sampled per step."""

    def __init__(self, llama, setting: Setting, batch: Batch, replay: bool, record: bool = False):
        self.llama, self.setting, self.batch = llama, setting, batch
        self.replay, self.record = replay, record
        self.alloc: List[int] = []
        self.meta_bytes: List[int] = []
        self.exact: List[int] = []
        self.stats: Dict = {}
        self.peak = 0

    @torch.inference_mode()
    def prefill(self):
        llama, b = self.llama, self.batch
        llama.set_kv_config(self.setting.config)
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
    """Teacher-forces every batch through the setting's cache; the first (uncompressed) call records refs."""
    acc = Acc()
    for b in batches:
        is_ref = setting.config is None and b.ref_logp is None
        if is_ref:
            b.ref_logp = []
        run = Run(llama, setting, b, replay=replay, record=is_ref and replay)

        def on_logits(i, logits, b=b, is_ref=is_ref):
            lp = _logp(logits)
            target = b.tokens[:, b.prompt_len + i + 1]
            acc.nll -= float(lp.gather(-1, target[:, None]).sum())
            acc.n += b.bsz
            pred = lp.argmax(-1)
            acc.correct += int((pred == target).sum())
            if is_ref:
                b.ref_logp.append(lp)
                acc.agree += b.bsz
                return
            ref = b.ref_logp[i]
            acc.agree += int((pred == ref.argmax(-1)).sum())
            acc.kl += float((ref.exp() * (ref - lp)).sum())

        run.teacher_force(on_logits, bar)
        acc.add_memory(run)
    row = acc.memory_row()
    row.update(
        nll_mean=acc.nll / acc.n,
        ppl=math.exp(acc.nll / acc.n),
        top1_agreement=acc.agree / acc.n,
        kl_mean=acc.kl / acc.n,
        next_token_acc=acc.correct / acc.n,
        scored_tokens=acc.n,
    )
    return row


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
# retrieval


def retrieval_items(tokenizer, stream: List[int], lengths, depths, trials, rng: random.Random, bos):
    """Prompts with one planted fact each, and the question + answer continuations."""
    items = []
    for L in lengths:
        for d in depths:
            for _ in range(trials):
                name, word = rng.choice(NAMES), rng.choice(WORDS)
                fact = tokenizer.encode(f" {name}'s secret word is {word}. ", bos=False, eos=False)
                q_text = f"\nWhat is {name}'s secret word? {name}'s secret word is"
                q = tokenizer.encode(q_text, bos=False, eos=False)
                qa = tokenizer.encode(f"{q_text} {word}.", bos=False, eos=False)
                if qa[: len(q)] != q:  # the answer merged into the question's last token: keep it whole
                    q = qa[: len(q) - 1]
                n_fill = L - len(bos) - len(fact)
                if n_fill < 1:
                    raise ValueError(f"retrieval length {L} is too short for the fact ({len(fact)} tokens)")
                start = rng.randrange(len(stream))
                fill = [stream[(start + i) % len(stream)] for i in range(n_fill)]
                at = int(round(d * n_fill))
                prompt = bos + fill[:at] + fact + fill[at:]
                answer = qa[len(q):]
                # the answer word: drop a trailing "." piece so that only the word itself is scored
                dot = tokenizer.encode(f"{q_text} {word}", bos=False, eos=False)[len(q):]
                if dot and dot == answer[: len(dot)]:
                    answer = dot
                items.append({"length": L, "depth": d, "name": name, "word": word, "prompt": prompt,
                              "question": q, "answer": answer, "cont": qa[len(q):]})
    return items


def retrieval_batches(items, max_batch_tokens: int) -> List[Batch]:
    by_len: Dict[int, List[Dict]] = {}
    for it in items:
        by_len.setdefault(len(it["prompt"]), []).append(it)
    batches = []
    for L, group in sorted(by_len.items()):
        per = max(1, max_batch_tokens // L)
        for i in range(0, len(group), per):
            part = group[i: i + per]
            conts = [it["question"] + it["cont"] for it in part]
            width = max(len(c) for c in conts)
            rows, score = [], []
            for it, c in zip(part, conts):
                c = c + [c[-1]] * (width - len(c))  # padding after the answer is never scored
                rows.append(it["prompt"] + c)
                # decode step i feeds position L + i and predicts position L + i + 1
                s = [False] * (width - 1)
                for k in range(len(it["answer"])):
                    s[len(it["question"]) + k - 1] = True
                score.append(s)
            batches.append(Batch(tokens=torch.tensor(rows), prompt_len=L, steps=width - 1,
                                 score=torch.tensor(score), meta=part))
    return batches


def retrieval_pass(llama, setting: Setting, b: Batch, replay: bool) -> Tuple[List[Dict], Run]:
    """Per item: correct (all answer tokens top-1), token hits, answer log-probability."""
    record = setting.config is None and b.rec is None and replay
    run = Run(llama, setting, b, replay=replay, record=record)
    hits = torch.zeros(b.bsz, dtype=torch.long)
    logp = torch.zeros(b.bsz, dtype=torch.float64)

    def on_logits(i, logits):
        lp = _logp(logits)
        target = b.tokens[:, b.prompt_len + i + 1]
        s = b.score[:, i]
        hits.add_((lp.argmax(-1) == target) & s)
        logp.add_(lp.gather(-1, target[:, None])[:, 0] * s)

    run.teacher_force(on_logits)
    out = []
    for k, it in enumerate(b.meta):
        n_ans = len(it["answer"])
        out.append({"length": it["length"], "depth": it["depth"], "correct": int(hits[k]) == n_ans,
                    "token_acc": int(hits[k]) / n_ans, "answer_logprob": float(logp[k]) / n_ans})
    return out, run


def summarize_retrieval(results: List[Dict], acc: Acc, ref_mem: float) -> Dict:
    m = len(results)
    by_depth: Dict[str, List[bool]] = {}
    by_len: Dict[str, List[bool]] = {}
    for r in results:
        by_depth.setdefault(f"{r['depth']:g}", []).append(r["correct"])
        by_len.setdefault(str(r["length"]), []).append(r["correct"])
    mem = acc.memory_row()
    return {
        "retrieval_accuracy": sum(r["correct"] for r in results) / m,
        "retrieval_token_accuracy": sum(r["token_acc"] for r in results) / m,
        "retrieval_answer_logprob": sum(r["answer_logprob"] for r in results) / m,
        "retrieval_mem_ratio": mem["kv_bytes_mean"] / ref_mem,
        "retrieval_by_depth": {k: sum(v) / len(v) for k, v in by_depth.items()},
        "retrieval_by_length": {k: sum(v) / len(v) for k, v in by_len.items()},
        "retrieval_trials": m,
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
    """N windows of P + C + 1 tokens (BOS first when used), spread evenly over the stream."""
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


# ----------------------------------------------------------------------------------------------------------------
# output


COLUMNS = ["name", "kind", "T", "policy", "ratio", "r_l", "r_f", "kv_bytes_mean", "kv_bytes_peak", "mem_ratio",
           "peak_ratio", "mem_ratio_exact", "metadata_bytes_mean", "mem_ratio_incl_metadata", "ppl", "ppl_ratio",
           "top1_agreement", "kl_mean", "next_token_acc", "recovery_mean", "policy_mix", "greedy_prefix_mean",
           "greedy_prefix_frac", "greedy_identical", "rouge_l", "retrieval_accuracy", "retrieval_token_accuracy",
           "retrieval_answer_logprob", "retrieval_mem_ratio", "matched", "match_rel_error", "seconds"]


def csv_row(row: Dict) -> Dict:
    out = dict(row)
    out["policy_mix"] = ";".join(f"{k}:{v:.4f}" for k, v in row.get("policy_mix", {}).items())
    for k, v in list(out.items()):
        if isinstance(v, float):
            out[k] = f"{v:.6g}"
    return out


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["settings"]
    panels = [("ppl_ratio", "perplexity / uncompressed"), ("top1_agreement", "top-1 agreement with uncompressed"),
              ("greedy_prefix_frac", "greedy tokens identical before divergence (share)")]
    if any(r.get("retrieval_accuracy") is not None for r in rows):
        panels.append(("retrieval_accuracy", "retrieval accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2))
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        key = "FastGen" if r["kind"] == "fastgen" else (r["policy"] if r["kind"] == "fixed" else "uncompressed")
        groups.setdefault(key, []).append(r)
    markers = {"FastGen": "o-", "uncompressed": "k*"}
    for ax, (key, label) in zip(axes, panels):
        for g, rs in groups.items():
            pts = sorted((r["mem_ratio"], r.get(key)) for r in rs if r.get(key) is not None)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], markers.get(g, "s--"), label=g,
                    markersize=10 if g == "uncompressed" else 5)
            if g == "FastGen":
                for r in rs:
                    if r.get(key) is not None:
                        ax.annotate(f"T={r['T']:g}", (r["mem_ratio"], r[key]), fontsize=7,
                                    textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("KV memory / uncompressed (mean allocated)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']['name']}: P={result['prompt_len']}, C={result['cont_len']}, "
                 f"{result['n_prompts']} prompts ({Path(result['text']).name})", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def print_table(rows: List[Dict], file=sys.stdout) -> None:
    head = f"{'setting':44s} {'mem':>6s} {'peak':>6s} {'ppl':>8s} {'ppl_r':>7s} {'top1':>6s} {'KL':>8s} " \
           f"{'rec':>6s} {'gprefix':>7s} {'rougeL':>6s} {'retr':>5s}"
    print(head, file=file)
    for r in rows:
        def g(k, fmt):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{r['name'][:44]:44s} {g('mem_ratio', '6.3f')} {g('peak_ratio', '6.3f')} {g('ppl', '8.3f')} "
              f"{g('ppl_ratio', '7.4f')} {g('top1_agreement', '6.3f')} {g('kl_mean', '8.5f')} "
              f"{g('recovery_mean', '6.3f')} {g('greedy_prefix_mean', '7.1f')} {g('rouge_l', '6.3f')} "
              f"{g('retrieval_accuracy', '5.2f')}", file=file)


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt_dir", default=None,
                   help=f"native checkpoint (default: {SMOLLM2_DIR.relative_to(SMOLLM2_DIR.parents[1])} when "
                        f"present, else ../shared/models/stories260K; --quick: stories260K)")
    p.add_argument("--tokenizer_path", default=None,
                   help="default: tokenizer.model or tokenizer.gguf in --ckpt_dir")
    p.add_argument("--text", default=None,
                   help=f"text file for prompts and retrieval filler (default: {DEFAULT_TEXT.name} when it holds "
                        f"N disjoint prompt windows, else {LONG_TEXT.name})")
    p.add_argument("--max_seq_len", type=int, default=None, help="model context (default: from the checkpoint)")
    p.add_argument("--prompt_len", "-P", type=int, default=None,
                   help="prompt tokens (default: min(2048, context / 2); --quick 256)")
    p.add_argument("--cont_len", "-C", type=int, default=None, help="teacher-forced tokens (64; --quick 32)")
    p.add_argument("--n_prompts", "-N", type=int, default=None, help="prompts (8; --quick 4)")
    p.add_argument("--gen_len", type=int, default=None, help="greedy tokens per prompt (64; --quick 24)")
    p.add_argument("--T", type=float, nargs="+", default=None,
                   help=f"FastGen thresholds (default {FULL['T']}; --quick {QUICK['T']})")
    p.add_argument("--r_l", type=float, default=None, help="FastGen's locality ratio (default: shipped config)")
    p.add_argument("--r_f", type=float, default=None, help="FastGen's frequency ratio (default: shipped config)")
    p.add_argument("--evict_every", type=int, default=None,
                   help="k: decode steps between evictions, for FastGen and the baselines (default: shipped config)")
    p.add_argument("--baselines", nargs="*", default=list(DEFAULT_BASELINES),
                   help="fixed hybrids matched to FastGen's memory at each T < 1 (none: no baselines)")
    p.add_argument("--match_tol", type=float, default=0.02, help="relative memory tolerance of the matching")
    p.add_argument("--bisect_iters", type=int, default=None, help="evaluations per match after the two ends "
                                                                  "(8; --quick 6)")
    p.add_argument("--retrieval_lengths", type=int, nargs="*", default=None,
                   help="retrieval prompt lengths (default: 1/4, 1/2 and all of the context minus room for "
                        "the question; --quick 0.3 and all)")
    p.add_argument("--retrieval_depths", type=float, nargs="+", default=None,
                   help="where the fact sits, as a share of the filler before it")
    p.add_argument("--retrieval_trials", type=int, default=None, help="trials per (length, depth)")
    p.add_argument("--no_retrieval", action="store_true", help="skip the retrieval task")
    p.add_argument("--retrieval_settings", choices=("all", "fastgen"), default="all",
                   help="settings that run the retrieval task (fastgen: uncompressed and FastGen only; "
                        "profiling long prompts is the costly part)")
    p.add_argument("--no_greedy", action="store_true", help="skip greedy generation agreement")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="prepend BOS to prompts (auto: when the tokenizer expects it)")
    p.add_argument("--max_batch_tokens", type=int, default=8192,
                   help="prompt tokens per batch (the prefill holds a (batch, heads, L, L) score map)")
    p.add_argument("--no_replay", action="store_true", help="run every setting's prefill through the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --quick 1)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings that finish in minutes on 2 CPU cores")
    p.add_argument("--no_plot", action="store_true")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    d = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    timings: Dict[str, float] = {}
    threads = args.threads or (1 if args.quick else None)
    if threads:  # a tiny model runs faster on one thread, and far faster when other jobs share the cores
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
    C = args.cont_len or d["cont_len"]
    N = args.n_prompts or d["n_prompts"]
    G = 0 if args.no_greedy else (args.gen_len or d["gen_len"])
    Ts = args.T if args.T is not None else d["T"]
    iters = args.bisect_iters if args.bisect_iters is not None else d["bisect_iters"]
    if P + C > ctx or P + G > ctx:
        raise SystemExit(f"prompt_len {P} + cont_len {C} / gen_len {G} exceed the context {ctx}")
    replay = not args.no_replay
    show = not args.no_progress

    base = resolve_kv_config({})
    over = {k: getattr(args, k) for k in ("r_l", "r_f", "evict_every") if getattr(args, k) is not None}
    if over:
        base = base.replace(**over)

    t0 = time.perf_counter()
    per_batch = max(1, args.max_batch_tokens // min(P + C, ctx))
    llama = Llama.build(str(ckpt), str(tok_path), max_seq_len=ctx, max_batch_size=max(per_batch, N),
                        seed=args.seed, device="cpu")
    model = llama.model
    n_params = sum(p.numel() for p in model.parameters())
    timings["load"] = time.perf_counter() - t0
    tok = llama.tokenizer
    bos = bos_prefix(tok, args.bos)
    stop = set(tok.stop_tokens) | ({tok.eos_id} if getattr(tok, "eos_id", -1) >= 0 else set())

    t0 = time.perf_counter()
    if args.text is None:  # TinyStories suits the TinyStories model but is too short for long disjoint prompts
        stream = token_stream(tok, DEFAULT_TEXT, N * (P + C + 1))
        args.text = str(DEFAULT_TEXT)
        if len(stream) < N * (P + C + 1):
            args.text = str(LONG_TEXT)
            stream = token_stream(tok, args.text, N * (P + C + 1))
    else:
        stream = token_stream(tok, args.text, N * (P + C + 1))
    batches, overlap = quality_batches(stream, bos, P, C, N, args.max_batch_tokens)
    gbatches = [Batch(tokens=b.tokens[:, :P], prompt_len=P, steps=max(G - 1, 0)) for b in batches]
    if overlap:
        print(f"note: {args.text} gives {len(stream)} tokens, fewer than {N} disjoint windows of {P + C + 1}; "
              f"windows overlap", file=sys.stderr)
    timings["tokenize"] = time.perf_counter() - t0

    rows: List[Dict] = []
    settings: List[Setting] = []
    replay_check: Optional[Dict] = None
    retrieval: Optional[Dict] = None

    def describe(s: Setting) -> Dict:
        cfg = s.config
        return {"name": s.name, "kind": s.kind, "T": s.T, "policy": s.policy, "ratio": s.ratio,
                "r_l": cfg.r_l if cfg else None, "r_f": cfg.r_f if cfg else None,
                "config": cfg.to_dict() if cfg else None}

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
            "text": str(args.text),
            "prompt_len": P, "cont_len": C, "n_prompts": N, "gen_len": G, "bos": bos,
            "windows_overlap": overlap,
            "fastgen_base_config": base.to_dict(),
            "replay": replay,
            "replay_check": replay_check,
            "match_tol": args.match_tol,
            "settings": rows,
            "retrieval": retrieval,
            "timings_s": timings,
        }

    out = Path(args.out)

    def save(stage: str) -> Dict:
        """Writes what is known so far (a killed long run still leaves its finished stages behind)."""
        result = build(stage)
        write_json(out / "quality.json", result)
        write_csv(out / "quality.csv", [csv_row(r) for r in rows], COLUMNS)
        return result

    # --- teacher forcing: uncompressed, FastGen -----------------------------------------------------------------
    steps_per_pass = sum(b.steps for b in batches)
    bar = progress(total=steps_per_pass * (1 + len(Ts)), desc="teacher forcing", unit="step", disable=not show)
    t0 = time.perf_counter()
    ref_setting = Setting("uncompressed", "uncompressed", None)
    ts = time.perf_counter()
    ref = teacher_forced(llama, ref_setting, batches, replay, bar)
    ref["seconds"] = time.perf_counter() - ts
    ref_row = {**describe(ref_setting), **ref}
    settings.append(ref_setting)
    rows.append(ref_row)
    ref_mem, ref_peak, ref_ppl = ref["kv_bytes_mean"], ref["kv_bytes_peak"], ref["ppl"]

    def finish(row: Dict) -> Dict:
        row["mem_ratio"] = row["kv_bytes_mean"] / ref_mem
        row["peak_ratio"] = row["kv_bytes_peak"] / ref_peak
        row["mem_ratio_exact"] = row["kv_bytes_mean"] / row["kv_exact_bytes_mean"]
        row["mem_ratio_incl_metadata"] = (row["kv_bytes_mean"] + row["metadata_bytes_mean"]) / ref_mem
        row["ppl_ratio"] = row["ppl"] / ref_ppl
        return row

    finish(ref_row)
    fastgen_rows: Dict[float, Dict] = {}
    for T in Ts:
        s = fastgen_setting(base, T)
        bar.set_postfix_str(s.name)
        ts = time.perf_counter()
        row = {**describe(s), **teacher_forced(llama, s, batches, replay, bar)}
        row["seconds"] = time.perf_counter() - ts
        settings.append(s)
        rows.append(finish(row))
        fastgen_rows[float(T)] = row
    bar.close()
    timings["teacher_forcing_fastgen"] = time.perf_counter() - t0
    save("teacher forcing")

    # --- fixed baselines matched in memory ------------------------------------------------------------------------
    t0 = time.perf_counter()
    targets = [T for T in Ts if T < 1.0]
    bar = progress(desc="matching baselines", unit="pass", disable=not show,
                   total=len(args.baselines) * (2 + len(targets) * (iters + 1)) if targets else 0)

    def evaluate(hybrid: str, x: float) -> Dict:
        s = fixed_setting(base, hybrid, x, None)
        bar.set_postfix_str(s.name)
        ts = time.perf_counter()
        row = teacher_forced(llama, s, batches, replay)
        row["seconds"] = time.perf_counter() - ts
        bar.update(1)
        return row

    matcher = Matcher(evaluate, iters, args.match_tol)
    for hybrid in args.baselines:
        for T in targets:
            x, row, info = matcher.match(hybrid, fastgen_rows[float(T)]["kv_bytes_mean"])
            s = fixed_setting(base, hybrid, x, T)
            s.match = info
            row = {**describe(s), **row, "matched": info["matched"], "match_rel_error": info["rel_error"],
                   "match": info}
            settings.append(s)
            rows.append(finish(row))
            save(f"baselines ({s.name})")
    bar.close()
    timings["matching_baselines"] = time.perf_counter() - t0

    # --- replay check -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    check_setting = next((s for s in settings if s.kind == "fastgen" and s.T < 1.0), None)
    if check_setting is not None:
        # a sub-batch of at most 2 sequences and 16 steps keeps this cheap on big runs
        b0, k = batches[0], min(2, batches[0].bsz)
        steps = min(b0.steps, 16)
        b = Batch(tokens=b0.tokens[:k, : P + steps + 1], prompt_len=P, steps=steps,
                  rec=[tuple(t[:k] for t in layer) for layer in b0.rec] if b0.rec else None,
                  rec_last=b0.rec_last[:k] if b0.rec_last is not None else None)
        outs, heads = [], []
        for rp in (True, False):
            got = []
            run = Run(llama, check_setting, b, replay=rp)
            run.teacher_force(lambda i, lg: got.append(lg.clone()))
            outs.append(torch.stack(got))
            heads.append(run.stats["heads"])
        diff = float((outs[0] - outs[1]).abs().max())
        # The recorded prefill ran the uncompressed cache's kernel (SDPA), a real FastGen prefill the tiled one
        # that also returns statistics: the activations agree to float rounding, the decisions must be equal.
        same_policies = [[[h[0] for h in seq] for seq in layer] for layer in heads[0]] == \
            [[[h[0] for h in seq] for seq in layer] for layer in heads[1]]
        replay_check = {"setting": check_setting.name, "identical": bool(torch.equal(outs[0], outs[1])),
                        "same_policies": same_policies, "max_abs_logit_diff": diff,
                        "ok": same_policies and diff < REPLAY_TOL, "sequences": k, "steps": steps}
    timings["replay_check"] = time.perf_counter() - t0

    # --- greedy agreement -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    for gb, b in zip(gbatches, batches):  # same prompts: replay the recorded prefill
        gb.rec, gb.rec_last = b.rec, b.rec_last
    if G > 0:
        bar = progress(total=G * len(gbatches) * len(settings), desc="greedy", unit="step",
                       disable=not show)
        for s, row in zip(settings, rows):
            bar.set_postfix_str(s.name)
            row.update(greedy_agreement(llama, s, gbatches, G, replay, stop, bar))
        bar.close()
    timings["greedy"] = time.perf_counter() - t0
    save("greedy")

    # --- retrieval --------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if not args.no_retrieval:
        room = RETRIEVAL_ROOM
        lengths = args.retrieval_lengths or sorted({max(64, int(f * (ctx - room))) for f in d["retrieval_fracs"]})
        lengths = [L for L in lengths if L + room <= ctx] or [ctx - room]
        depths = args.retrieval_depths or d["retrieval_depths"]
        trials = args.retrieval_trials or d["retrieval_trials"]
        items = retrieval_items(tok, stream, lengths, depths, trials, random.Random(args.seed), bos)
        rbatches = retrieval_batches(items, args.max_batch_tokens)
        rsettings = [s for s in settings if args.retrieval_settings == "all" or s.kind != "fixed"]
        results = {s.name: [] for s in rsettings}
        accs = {s.name: Acc() for s in rsettings}
        bar = progress(total=len(rbatches) * len(rsettings), desc="retrieval", unit="pass", disable=not show)
        for b in rbatches:
            for s in rsettings:  # uncompressed first: it records the prefill the others replay
                bar.set_postfix_str(f"L={b.prompt_len} {s.name}")
                res, run = retrieval_pass(llama, s, b, replay)
                results[s.name].extend(res)
                accs[s.name].add_memory(run)
                bar.update(1)
            b.rec = b.rec_last = None  # free the recorded activations
        bar.close()
        ref_rmem = accs["uncompressed"].memory_row()["kv_bytes_mean"]
        retrieval = {"lengths": lengths, "depths": depths, "trials": trials,
                     "fact": "<name>'s secret word is <word>.",
                     "question": "What is <name>'s secret word? <name>'s secret word is", "settings": {}}
        for s, row in zip(settings, rows):
            if s.name not in results:
                continue
            summ = summarize_retrieval(results[s.name], accs[s.name], ref_rmem)
            retrieval["settings"][s.name] = {**summ, "items": results[s.name]}
            row.update({k: v for k, v in summ.items() if not isinstance(v, dict)})
    timings["retrieval"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    result = save("done")
    if not args.no_plot:
        plot(result, out / "quality.png")
    print(f"\nquality: {ckpt.name}, P={P}, C={C}, N={N}, G={G}; {timings['total']:.1f} s; outputs in {out}")
    print_table(rows)
    if replay_check:
        print(f"replay check ({replay_check['setting']}): ok={replay_check['ok']}, "
              f"same policies={replay_check['same_policies']}, identical={replay_check['identical']}, "
              f"max |logit diff|={replay_check['max_abs_logit_diff']:.3g}")
    return result


if __name__ == "__main__":
    main()
