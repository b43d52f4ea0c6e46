"""HeadKV (Fu et al., 2024) as budgets for any scoring method: heads that retrieve get more of the cache.

Two parts. `needle_head_scores` (run by `scripts/score_heads.py`, once per model) plants a fact in filler text,
asks for it, and scores every KV head by the attention its query heads (mean over the group) give to the
fact's tokens from the queries that produce the answer, averaged over the trials answered right (all trials
when none is: a model too small to retrieve); the scores go to `head_scores.json` next to the checkpoint.
`{"method": "headkv", "scorer": NAME, ...}` is NAME's config with `budgets: headkv`: the model's whole budget
(layers x KV heads x budget) is split as floor(alpha x budget) per head plus the rest in proportion to the
head's score (`adaptive_kv_cache/budgets.py`, `headkv_budgets`).
"""

import json
import math
import random
from pathlib import Path
from typing import Dict, List, Optional

import torch

from adaptive_kv_cache.config import KVConfigError
from adaptive_kv_cache.methods.base import BudgetWrapper

SCORES_FILE = "head_scores.json"


class HeadKV(BudgetWrapper):
    """Not a method of its own: `config_from_dict` returns the scorer's config with headkv budgets."""

    allocation = "headkv"


def load_head_scores(config, ckpt_dir: Optional[str]) -> torch.Tensor:
    """(n_layers, n_kv_heads) scores from config.head_scores or <ckpt_dir>/head_scores.json."""
    path = Path(config.head_scores) if config.head_scores else (Path(ckpt_dir or ".") / SCORES_FILE)
    if not path.is_file():
        raise KVConfigError(f"kv config: budgets=headkv needs head scores, and {path} does not exist; run "
                            f"`python scripts/score_heads.py --ckpt_dir {ckpt_dir or 'CKPT'}` first or set "
                            f"head_scores to a file")
    return torch.tensor(json.loads(path.read_text())["scores"], dtype=torch.float64)


class _NeedleProbe:
    """A dense cache wrapper that, in its second pass, records each KV head's attention mass on a span of
    positions from a set of query rows."""

    def __init__(self, inner, span, rows):
        self.inner, self.span, self.rows = inner, span, rows
        self.record = False
        self.mass: List[torch.Tensor] = []

    def begin(self, tokens, start_pos):
        self.inner.begin(tokens, start_pos)

    def append(self, layer_id, start_pos, xk, xv):
        return self.inner.append(layer_id, start_pos, xk, xv)

    def stats_request(self, layer_id):
        return None

    def after_attention(self, layer_id, xq, view, stats):
        if not self.record:
            return
        q = xq[0, self.rows].double().transpose(0, 1)  # (n_heads, r, hd)
        n_kv = view.keys.shape[1]
        k = view.keys[0].double().repeat_interleave(q.shape[0] // n_kv, 0)  # (n_heads, S, hd)
        s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
        qpos = view.start_pos + torch.tensor(self.rows)
        s = s.masked_fill(torch.arange(s.shape[-1])[None, :] > qpos[:, None], float("-inf"))
        p = torch.softmax(s, -1)[..., self.span[0]: self.span[1]].sum(-1).mean(-1)  # (n_heads,)
        self.mass.append(p.view(n_kv, -1).mean(1))

    def end(self):
        self.inner.end()


def _find(seq: List[int], sub: List[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i: i + len(sub)] == sub:
            return i
    return -1


#: Names and words of the planted facts ("<name>'s secret word is <word>.").
NEEDLE_NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Sam", "Anna", "Tim", "Lucy", "Jack", "Emma"]
NEEDLE_WORDS = ["apple", "kite", "frog", "drum", "boat", "hat", "star", "cake", "shoe", "bird", "lamp", "rock",
                "moon", "sock", "bell", "leaf", "train", "horse", "cup", "tree"]


def needle_items(tokenizer, stream: List[int], lengths, depths, trials: int, rng: random.Random,
                 bos: List[int]) -> List[Dict]:
    """Prompts with one planted fact each, and the question + answer continuations (what `needle_head_scores`
    scores on; moved here from benchmarks/quality.py, whose retrieval rows became the tasks of issue 11).

    Args:
        tokenizer: the model's tokenizer.
        stream: filler tokens, read from a random start (wrapping around).
        lengths: prompt lengths in tokens; depths: where the fact sits, as a share of the filler, per length.
        trials: facts per (length, depth).
        rng: picks names, words and filler starts.
        bos: tokens that open every prompt.

    Returns:
        one dict per prompt: length, depth, name, word, prompt, question, answer (the word's tokens), cont.
    """
    items = []
    for L in lengths:
        for d in depths:
            for _ in range(trials):
                name, word = rng.choice(NEEDLE_NAMES), rng.choice(NEEDLE_WORDS)
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


@torch.inference_mode()
def needle_head_scores(llama, items: List[Dict]) -> Dict:
    """Scores every KV head on needle retrieval (items as `needle_items` makes them).

    Returns:
        {"scores": (n_layers x n_kv_heads) nested list, "correct": answered right, "items": tried}.
    """
    from llama.kv_cache import DenseKVCache

    model, tok = llama.model, llama.tokenizer
    per_item, right = [], []
    for it in items:
        fact = tok.encode(f" {it['name']}'s secret word is {it['word']}. ", bos=False, eos=False)
        at = _find(it["prompt"], fact)
        L = len(it["prompt"])
        cont = it["question"] + it["answer"]
        rows = list(range(len(it["question"]) - 1, len(cont) - 1))  # the queries that predict the answer
        probe = _NeedleProbe(DenseKVCache(model.params.n_layers, model.params.max_seq_len), (at, at + len(fact)),
                             rows)
        model.forward(torch.tensor([it["prompt"]], device=llama.device), 0, probe, last_logits_only=True)
        probe.record = True
        logits = model.forward(torch.tensor([cont], device=llama.device), L, probe)[0]
        right.append(logits[rows].argmax(-1).tolist() == it["answer"])
        per_item.append(torch.stack([m.cpu() for m in probe.mass]))
    use = [m for m, r in zip(per_item, right) if r] or per_item
    scores = torch.stack(use).mean(0)
    return {"scores": scores.tolist(), "correct": sum(right), "items": len(items)}
