"""RULER-style tasks in the model's own chat format, generated from the text the project ships.

Every item is a dialog in the model's chat format (ChatML for SmolLM2, Llama 2 ``[INST]`` or Llama 3 headers for
those tokenizers, as `llama.chat_format.chat_format_for` picks it), encoded to prompt token ids that end inside
the assistant's turn with the start of the answer (RULER's answer prefix, e.g. "The special magic number for
Ella is": without it a 135M model comments on the text instead of answering), plus the answers a reply must
contain. Answering is greedy generation from the setting's (compressed) cache; `score` reads the generated
text.

Tasks (after NVIDIA's RULER, sized for small models):

* ``single_needle``: one "The special magic number for <name> is <7 digits>." line planted at a depth of a
  document (tinyshakespeare lines); the question asks for it.
* ``multi_key``: the same with three distractor lines for other names at random depths; naming a distractor's
  number before the right one scores 0.
* ``multi_value``: two "One of the special magic numbers for <name> is ..." lines; the reply must name both
  (half a point for one).
* ``variable_tracking``: "The special magic number for <A> is <v>." then, later, "The special magic number for
  <B> is the same as the special magic number for <A>.", and a distractor line for a third name; the question
  asks for B's number (one hop of RULER's assignment chains, in words).
* ``common_words``: a numbered list of words (RULER's CWE) in which each of three words makes a tenth of the
  entries and every other word appears once (twice in lists longer than the word list); the question asks for
  the three most common (a third of a point each). No depth.
* ``conversation``: a multi-turn chat in which the user asks for stories (the assistant's turns are TinyStories
  sentences); at a depth of the conversation one user turn also says "Please remember this: <name>'s locker
  code is <4 digits>."; the last turn asks for the code.

Lengths are prompt tokens: each item's prompt is the longest that fits the requested length (the filler is cut
at token granularity; `fit_length`), so prompts of one length differ by a few tokens at most (``common_words``
by up to one list entry). Depth is the share of the filler before the planted fact (the target's, for tasks
with several). Items are a pure function of (task, length, depth, trial, seed): `make_items` is deterministic,
and `manifest` lists what a run used (task, length, depth, seed, prompt hash, expected answers).
"""

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import LONG_TEXT, SHARED

STORIES_TEXT = SHARED / "data" / "tinystories_valid.txt"

TASKS = ("single_needle", "multi_key", "multi_value", "variable_tracking", "common_words", "conversation")
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
NO_DEPTH = ("common_words",)  # tasks whose items have no depth (one cell per length, `trials` x depths items)

#: Greedy tokens per answer after the prefix: " 3741918." is 9 SmolLM2 tokens (one a digit); lists need more.
MAX_GEN = {"single_needle": 12, "multi_key": 12, "multi_value": 24, "variable_tracking": 12, "common_words": 16,
           "conversation": 8}

NAMES = ("Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Emma", "Jack", "Lucy", "Leo", "Nora", "Finn", "Ella",
         "Owen", "Ruby", "Hugo", "Ivy", "Theo", "Zoe", "Oscar", "Grace", "Felix", "Clara", "Adam", "Maya", "Noah",
         "Alice", "Henry", "Rosa")
STORY_REQUESTS = ("Can you tell me a story?", "Please tell me another story.", "Thank you! One more story, please.",
                  "That was nice. Tell me a different story.", "Another story, please.",
                  "I liked that. Can you tell me one more?")
DOC_INSTRUCTION = "Read the text below and answer the question after it."


@dataclass(frozen=True)
class Item:
    """One task prompt and what its answer must contain.

    Attributes:
        task: one of TASKS.
        length: the requested prompt length (tokens); len(prompt) <= length.
        depth: share of the filler before the planted fact (None for tasks without one).
        trial: index among the items of the same (task, length, depth).
        seed: the suite's seed (the item's own generator is seeded from it and the fields above).
        prompt: chat-format token ids ending where the assistant answers.
        answers: strings the reply must contain (each one is a share of the score).
        distractors: strings whose appearance before the first answer makes the reply wrong.
        question: the last user message.
        answer_prefix: the start of the assistant's answer, part of the prompt (RULER's answer prefix: it makes
            a small model answer instead of commenting on the text).
        max_gen_len: greedy tokens generated for the answer.
    """

    task: str
    length: int
    depth: Optional[float]
    trial: int
    seed: int
    prompt: Tuple[int, ...]
    answers: Tuple[str, ...]
    distractors: Tuple[str, ...]
    question: str
    answer_prefix: str
    max_gen_len: int

    @property
    def prompt_hash(self) -> str:
        """sha256 of the prompt ids (comma-separated decimal), first 16 hex digits."""
        return hashlib.sha256(",".join(map(str, self.prompt)).encode()).hexdigest()[:16]

    @property
    def cell(self) -> Tuple[str, int]:
        return self.task, self.length

    def manifest_row(self) -> Dict:
        return {"task": self.task, "length": self.length, "prompt_tokens": len(self.prompt), "depth": self.depth,
                "trial": self.trial, "seed": self.seed, "prompt_sha256_16": self.prompt_hash,
                "answers": list(self.answers), "distractors": list(self.distractors), "question": self.question,
                "answer_prefix": self.answer_prefix, "max_gen_len": self.max_gen_len}


@dataclass(frozen=True)
class Spec:
    """What a task generator returns (`TaskBuilder.item` adds the identifying fields)."""

    prompt: List[int]
    answers: Sequence[str]
    distractors: Sequence[str]
    question: str
    prefix: str


# ----------------------------------------------------------------------------------------------------------------
# scoring


def normalize(text: str) -> List[str]:
    """Lower-case words of a text: Unicode NFKC, every run of characters other than letters and digits a break."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[^\w]|_", " ", text).split()


def _find(words: Sequence[str], phrase: Sequence[str]) -> int:
    """Index of the first occurrence of `phrase` as whole words in `words`, or -1."""
    n = len(phrase)
    for i in range(len(words) - n + 1):
        if list(words[i: i + n]) == list(phrase):
            return i
    return -1


def score(reply: str, answers: Sequence[str], distractors: Sequence[str] = ()) -> float:
    """The share of `answers` the reply contains, 0 when a distractor comes first.

    Matching is on normalised whole words (`normalize`): "4821" does not match "48210", "Teal." matches "teal".
    A reply that names a distractor before its first correct answer scores 0 (naming the right value after
    a wrong one is not an answer); distractors after it are ignored (a model that answers and then goes on
    listing the document is still right).

    Args:
        reply: the generated text.
        answers: required strings; each found one is worth 1 / len(answers).
        distractors: wrong values the prompt also holds.

    Returns:
        float in [0, 1]; an item is correct when it is 1.
    """
    words = normalize(reply)
    found = [i for i in (_find(words, normalize(a)) for a in answers) if i >= 0]
    if not found:
        return 0.0
    first = min(found)
    for d in distractors:
        i = _find(words, normalize(d))
        if 0 <= i < first:
            return 0.0
    return len(found) / len(answers)


# ----------------------------------------------------------------------------------------------------------------
# the text the tasks are made of


def unique_paragraphs(text: str, min_chars: int = 200) -> str:
    """The text without repeats of paragraphs longer than `min_chars` (compared case-insensitively).

    The shipped TinyStories sample repeats some stories word for word; a repeat inside one prompt would let a
    model copy instead of predict. Short lines (Shakespeare's speaker names) are left alone.
    """
    seen, out = set(), []
    for para in text.split("\n"):
        key = para.strip().lower()
        if len(key) > min_chars:
            if key in seen:
                continue
            seen.add(key)
        out.append(para)
    return "\n".join(out)


class TaskText:
    """What the generators draw from, prepared once per tokenizer.

    Args:
        tokenizer: the model's tokenizer (encode(s, bos, eos) / decode(ids)).
        documents: text of the documents the needles are planted in (default tinyshakespeare.txt).
        stories: text of the assistant's stories in conversations and of the word lists (default
            tinystories_valid.txt, repeated paragraphs removed).
    """

    def __init__(self, tokenizer, documents: Path = LONG_TEXT, stories: Path = STORIES_TEXT):
        self.tokenizer = tokenizer
        self.doc = Path(documents).read_text(encoding="utf-8", errors="replace")
        # a document starts at a line start, at most 2 MB in (enough for many 8k-token documents)
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", self.doc[:2_000_000])]
        text = unique_paragraphs(Path(stories).read_text(encoding="utf-8", errors="replace"))
        self.sentences = [s for s in re.split(r"(?<=[.!?\"])\s+", text.replace("\n", " ")) if s.strip()]
        self.sentence_tokens = [len(tokenizer.encode(" " + s, bos=False, eos=False)) for s in self.sentences]
        self.words = sorted({w for w in re.findall(r"[a-z]+", text.lower()) if 3 <= len(w) <= 8})

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def document_tokens(self, rng: random.Random, n: int) -> List[int]:
        """At least n tokens of the document text from a random line start (wrapping to the text's start)."""
        chars = 8 * n + 64  # generous: a token is 3-4 characters of this text
        fits = [s for s in self.line_starts if s + chars <= len(self.doc)] or [0]
        start = rng.choice(fits)
        text = self.doc[start: start + chars]
        ids = self.encode(text)
        while len(ids) < n:  # a text shorter than the prompt: repeat it
            text += "\n" + self.doc[: chars]
            ids = self.encode(text)
        return ids

    def story(self, rng: random.Random, n_tokens: int) -> str:
        """Consecutive whole sentences from a random one, about n_tokens long (at least one sentence)."""
        i = rng.randrange(len(self.sentences))
        out, total = [], 0
        while not out or total + self.sentence_tokens[i] <= n_tokens:
            out.append(self.sentences[i])
            total += self.sentence_tokens[i]
            i = (i + 1) % len(self.sentences)
        return " ".join(out)


# ----------------------------------------------------------------------------------------------------------------
# fitting a prompt to a length


def fit_length(build: Callable[[int], List[int]], length: int, n0: int) -> Tuple[int, List[int]]:
    """An n with len(build(n)) <= length < len(build(n + 1)), and its prompt.

    `build(n)` makes a prompt whose filler has n units (tokens, list entries); its length grows with n by about
    a fixed number of tokens a unit (not exactly: re-encoding decoded text may merge tokens at the seams).
    Secant steps on the measured tokens per unit get within a unit or two, then single steps finish, so a
    prompt costs a handful of encodings.

    Args:
        build: n -> prompt ids.
        length: the most prompt tokens.
        n0: a first guess.

    Raises:
        ValueError: even n = 0 gives a prompt longer than `length`.
    """
    cache: Dict[int, List[int]] = {}

    def f(n):
        if n not in cache:
            cache[n] = build(n)
        return len(cache[n])

    if f(0) > length:
        raise ValueError(f"a prompt of {length} tokens is too short for this task ({f(0)} tokens without filler)")
    n = max(0, n0)
    for _ in range(20):
        d = length - f(n)
        rate = max((f(n) - f(0)) / n, 0.25) if n > 0 else 1.0  # tokens per unit
        if 0 <= d < max(2.0, 2 * rate):
            break
        step = int(d / rate)
        n = max(0, n + (step or (1 if d > 0 else -1)))
    while n > 0 and f(n) > length:
        n -= 1
    while f(n + 1) <= length:
        n += 1
        if n > 4 * length + 16:  # every unit adds at least a quarter token: the filler ran out
            raise RuntimeError(f"fit_length: the prompt stops growing at {f(n)} tokens, short of {length}")
    return n, cache[n]


def _plant(text: str, facts: Sequence[Tuple[float, str]]) -> str:
    """Inserts each fact as a line of its own at a share `depth` of the text (at the next line start)."""
    cuts = []
    for depth, fact in facts:
        at = int(depth * len(text))
        nl = text.find("\n", at)
        cuts.append((len(text) if nl < 0 or depth >= 1.0 else (0 if depth <= 0 else nl + 1), fact))
    out, last = [], 0
    for at, fact in sorted(cuts, key=lambda c: c[0]):
        out.append(text[last:at])
        if at > 0 and not text[:at].endswith("\n"):
            out.append("\n")
        out.append(fact + "\n")
        last = at
    out.append(text[last:])
    return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# generators


class TaskBuilder:
    """Makes the items of every task for one tokenizer and chat format.

    Args:
        text: TaskText of the tokenizer.
        chat_format: the model's chat format (encode_dialog_prompt(dialog) -> ids).
    """

    def __init__(self, text: TaskText, chat_format):
        self.text = text
        self.chat_format = chat_format

    def item(self, task: str, length: int, depth: Optional[float], trial: int, seed: int) -> Item:
        """One item, a pure function of its arguments."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        if (depth is None) != (task in NO_DEPTH):
            raise ValueError(f"task {task!r} takes {'no depth' if task in NO_DEPTH else 'a depth in [0, 1]'}, "
                             f"got {depth!r}")
        rng = random.Random(f"{seed}/{task}/{length}/{depth}/{trial}")
        spec = getattr(self, "_" + task)(rng, length, depth)
        return Item(task, length, depth, trial, seed, tuple(spec.prompt), tuple(spec.answers),
                    tuple(spec.distractors), spec.question, spec.prefix, MAX_GEN[task])

    # --- shared pieces ---

    def _prompt(self, dialog: List[Dict[str, str]], prefix: str) -> List[int]:
        """The dialog in the chat format, then the start of the assistant's answer (RULER's answer prefix)."""
        return self.chat_format.encode_dialog_prompt(dialog) + self.text.encode(prefix)

    @staticmethod
    def _numbers(rng: random.Random, k: int, digits: int) -> List[str]:
        out: List[str] = []
        while len(out) < k:
            v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
            if v not in out:
                out.append(v)
        return out

    def _document(self, rng: random.Random, length: int, facts: Sequence[Tuple[float, str]], question: str,
                  prefix: str) -> List[int]:
        """A user turn (instruction, a document with `facts` planted at their depths, the question), fitted to
        `length` tokens with the answer prefix."""
        ids = self.text.document_tokens(rng, length)

        def build(n):
            doc = _plant(self.text.decode(ids[:n]), facts)
            content = f"{DOC_INSTRUCTION}\n\n{doc.strip()}\n\n{question}"
            return self._prompt([{"role": "user", "content": content}], prefix)

        return fit_length(build, length, length - 80)[1]

    # --- the tasks ---

    def _single_needle(self, rng, length, depth):
        name, (v,) = rng.choice(NAMES), self._numbers(rng, 1, 7)
        q, prefix = f"What is the special magic number for {name}?", f"The special magic number for {name} is"
        facts = [(depth, f"The special magic number for {name} is {v}.")]
        return Spec(self._document(rng, length, facts, q, prefix), [v], [], q, prefix)

    def _multi_key(self, rng, length, depth):
        names, vals = rng.sample(NAMES, 4), self._numbers(rng, 4, 7)
        q, prefix = f"What is the special magic number for {names[0]}?", f"The special magic number for {names[0]} is"
        depths = [depth] + [rng.random() for _ in names[1:]]
        facts = [(d, f"The special magic number for {k} is {v}.") for d, k, v in zip(depths, names, vals)]
        return Spec(self._document(rng, length, facts, q, prefix), vals[:1], vals[1:], q, prefix)

    def _multi_value(self, rng, length, depth):
        name, vals = rng.choice(NAMES), self._numbers(rng, 2, 7)
        q, prefix = f"What are all the special magic numbers for {name}?", \
            f"The special magic numbers for {name} are"
        depths = [depth, rng.random()]
        facts = [(d, f"One of the special magic numbers for {name} is {v}.") for d, v in zip(depths, vals)]
        return Spec(self._document(rng, length, facts, q, prefix), vals, [], q, prefix)

    def _variable_tracking(self, rng, length, depth):
        a, b, c = rng.sample(NAMES, 3)
        v, w = self._numbers(rng, 2, 7)
        q, prefix = f"What is the special magic number for {b}?", f"The special magic number for {b} is"
        later = depth + (1.0 - depth) * rng.uniform(0.2, 0.8)
        facts = [(depth, f"The special magic number for {a} is {v}."),
                 (later, f"The special magic number for {b} is the same as the special magic number for {a}."),
                 (rng.random(), f"The special magic number for {c} is {w}.")]
        return Spec(self._document(rng, length, facts, q, prefix), [v], [w], q, prefix)

    def _common_words(self, rng, length, depth):
        words = self.text.words
        common = rng.sample(words, 3)
        pool = rng.sample([w for w in words if w not in common], len(words) - 3)
        q = "What are the 3 most common words in the list above?"
        prefix = "The 3 most common words in the list are:"
        shuffle_seed = rng.random()

        def build(n):
            entries = common_word_entries(common, pool, n)
            random.Random(f"{shuffle_seed}/{n}").shuffle(entries)
            body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
            content = (f"Below is a numbered list of words. In these words, some appear more often than others. "
                       f"Memorize the ones that appear most often.\n\n{body}\n\n{q}")
            return self._prompt([{"role": "user", "content": content}], prefix)

        return Spec(fit_length(build, length, length // 5)[1], common, [], q, prefix)

    def _conversation(self, rng, length, depth):
        name, (code,) = rng.choice(NAMES), self._numbers(rng, 1, 4)
        fact = f"Please remember this: {name}'s locker code is {code}."
        q, prefix = f"What is {name}'s locker code?", f"{name}'s locker code is"
        per_turn = min(240, length // 5)  # tokens of a story turn (shorter in short prompts: at least 2 turns)
        n_turns = max(2, round(length / (per_turn + 24)))
        requests = [STORY_REQUESTS[0]] + [rng.choice(STORY_REQUESTS[1:]) for _ in range(n_turns - 1)]
        stories = [self.text.story(rng, per_turn) for _ in range(n_turns)]
        # the first story is cut to fit the length exactly (token granularity); the others end with a sentence
        first = self.text.encode(self.text.story(rng, 2 * length))
        while True:
            at = round(depth * (n_turns - 1))

            def build(n):
                dialog = []
                for t in range(n_turns):
                    ask = f"{fact} {requests[t]}" if t == at else requests[t]
                    story = self.text.decode(first[:n]) if t == 0 else stories[t]
                    dialog += [{"role": "user", "content": ask}, {"role": "assistant", "content": story}]
                dialog.append({"role": "user", "content": q})
                return self._prompt(dialog, prefix)

            if n_turns == 2 or len(build(0)) <= length:  # fewer turns where the tokenizer spends more tokens
                return Spec(fit_length(build, length, per_turn)[1], [code], [], q, prefix)
            n_turns -= 1


def common_word_entries(common: Sequence[str], pool: Sequence[str], n: int) -> List[str]:
    """n list entries (unshuffled): each common word a tenth of them (at least once), then the pool's words
    once each in order (again from the start when n exceeds the pool)."""
    k = max(1, round(0.1 * n))
    out = list(common) * k + [pool[i % len(pool)] for i in range(max(0, n - 3 * k))]
    return out[:n]


def cells(tasks: Sequence[str], lengths: Sequence[int]) -> List[Tuple[str, int]]:
    return [(t, n) for t in tasks for n in lengths]


def make_items(builder: TaskBuilder, cells_: Sequence[Tuple[str, int]], depths: Sequence[float], trials: int,
               seed: int) -> List[Item]:
    """Items of every (task, length) cell: `trials` per depth (tasks without depth: trials x len(depths))."""
    items = []
    for task, length in cells_:
        if task in NO_DEPTH:
            items += [builder.item(task, length, None, k, seed) for k in range(trials * len(depths))]
        else:
            items += [builder.item(task, length, d, k, seed) for d in depths for k in range(trials)]
    return items


def manifest(items: Sequence[Item]) -> List[Dict]:
    """What a run asked: one row per item (task, length, depth, trial, seed, prompt hash, answers, ...)."""
    return [it.manifest_row() for it in items]
