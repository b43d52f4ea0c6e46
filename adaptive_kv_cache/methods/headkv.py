"""HeadKV (Fu et al., 2024) as budgets for any scoring method: heads that retrieve get more of the cache.

Two parts. `needle_head_scores` (run by `scripts/score_heads.py`, once per model, on the needle tasks of
`benchmarks/tasks.py` in the model's chat format) takes prompts with a planted fact that end where the answer
starts, and scores every KV head by the attention its query heads (mean over the group) give to the
fact's tokens from the queries that produce the answer, averaged over the trials answered right (all trials
when none is: a model too small to retrieve); the scores go to `head_scores.json` next to the checkpoint.
`{"method": "headkv", "scorer": NAME, ...}` is NAME's config with `budgets: headkv`: the model's whole budget
(layers x KV heads x budget) is split as floor(alpha x budget) per head plus the rest in proportion to the
head's score (`adaptive_kv_cache/budgets.py`, `headkv_budgets`).
"""

import bisect
import itertools
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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


def token_span(tokenizer, ids: List[int], phrase: str) -> Tuple[int, int]:
    """[start, end) of the tokens of `ids` whose decoded text holds the first occurrence of `phrase`.

    Located through the decoded pieces' character offsets, not by encoding `phrase` alone: inside a prompt
    its tokens can merge with their neighbours. Whitespace is left out of the comparison (a SentencePiece
    piece decoded alone loses its leading space).

    Raises:
        ValueError: `phrase` is not in the decoded prompt.
    """
    pieces = ["".join(tokenizer.decode([i]).split()) for i in ids]
    text, phrase = "".join(pieces), "".join(phrase.split())
    at = text.find(phrase)
    if at < 0:
        raise ValueError(f"{phrase!r} is not in the prompt")
    ends = list(itertools.accumulate(len(x) for x in pieces))  # ends[i]: characters up to token i included
    first = bisect.bisect_right(ends, at)
    last = bisect.bisect_left(ends, at + len(phrase))
    return first, last + 1


@torch.inference_mode()
def needle_head_scores(llama, items: List[Dict], progress: Callable = iter) -> Dict:
    """Scores every KV head on needle retrieval.

    Args:
        llama: the model (`Llama`).
        items: one dict per prompt: "prompt" (ids ending where the answer starts), "answer" (the answer's
            ids), "span" ((start, end) of the fact's tokens in the prompt).
        progress: wraps the items' iteration (e.g. tqdm).

    Returns:
        {"scores": (n_layers x n_kv_heads) nested list, "correct": answered right, "items": tried}: a head's
        score is its query heads' mean attention on the span from the queries that predict the answer,
        averaged over the items answered right (all items when none is).
    """
    from llama.kv_cache import DenseKVCache

    model = llama.model
    per_item, right = [], []
    for it in progress(items):
        prompt, answer = list(it["prompt"]), list(it["answer"])
        cont = prompt[-1:] + answer  # the last prompt token and the answer: their queries predict the answer
        rows = list(range(len(answer)))
        probe = _NeedleProbe(DenseKVCache(model.params.n_layers, model.params.max_seq_len), tuple(it["span"]),
                             rows)
        model.forward(torch.tensor([prompt[:-1]], device=llama.device), 0, probe, last_logits_only=True)
        probe.record = True
        logits = model.forward(torch.tensor([cont], device=llama.device), len(prompt) - 1, probe)[0]
        right.append(logits[rows].argmax(-1).tolist() == answer)
        per_item.append(torch.stack([m.cpu() for m in probe.mass]))
    use = [m for m, r in zip(per_item, right) if r] or per_item
    scores = torch.stack(use).mean(0)
    return {"scores": scores.tolist(), "correct": sum(right), "items": len(items)}
