"""The RULER-style task generators (benchmarks/tasks.py): determinism, lengths, chat format, planting, scoring."""

import random
import re

import pytest

from benchmarks import tasks
from benchmarks.tasks import NO_DEPTH, TASKS, common_word_entries, fit_length, make_items, manifest, normalize, score

LENGTHS = (480, 1000)


def _depth(task):
    return None if task in NO_DEPTH else 0.5


@pytest.mark.parametrize("task", TASKS)
def test_items_are_deterministic_for_a_seed_and_differ_across_seeds(task_builder, task):
    a = task_builder.item(task, 480, _depth(task), 0, seed=7)
    b = task_builder.item(task, 480, _depth(task), 0, seed=7)
    assert a == b and a.prompt_hash == b.prompt_hash
    c = task_builder.item(task, 480, _depth(task), 0, seed=8)
    d = task_builder.item(task, 480, _depth(task), 1, seed=7)  # another trial of the same cell
    assert c.prompt != a.prompt and d.prompt != a.prompt
    assert c.answers != a.answers and d.answers != a.answers


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fits_its_length_and_ends_with_the_answer_prefix(task_builder, task, length):
    it = task_builder.item(task, length, _depth(task), 0, seed=0)
    # fitted at token granularity: a document or a story loses a token at a time, a word list an entry
    slack = 10 if task == "common_words" else 3
    assert length - slack <= len(it.prompt) <= length, (task, len(it.prompt))
    text = task_builder.text
    suffix = task_builder.chat_format.encode_dialog_prompt([{"role": "user", "content": "x"}])[-3:]
    prefix = text.encode(it.answer_prefix)
    assert list(it.prompt[len(it.prompt) - len(prefix):]) == prefix  # the answer starts in the prompt
    assert list(it.prompt[len(it.prompt) - len(prefix) - 3: len(it.prompt) - len(prefix)]) == suffix
    decoded = text.decode(it.prompt)
    assert it.question in decoded
    for a in it.answers:  # the answer is in the prompt, as a whole word
        assert re.search(rf"\b{a}\b", decoded), (task, a)
    assert it.max_gen_len == tasks.MAX_GEN[task]


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_single_needle_sits_at_its_depth(task_builder, depth):
    it = task_builder.item("single_needle", 1000, depth, 0, seed=3)
    text = task_builder.text.decode(it.prompt)
    doc = text[text.index(tasks.DOC_INSTRUCTION) + len(tasks.DOC_INSTRUCTION): text.rindex(it.question)]
    needle = "The special magic number for"
    at = doc.index(needle) / len(doc)
    assert abs(at - depth) < 0.08, (at, depth)
    assert doc.count(it.answers[0]) == 1


def test_multi_key_and_variable_tracking_plant_their_distractors(task_builder):
    mk = task_builder.item("multi_key", 1000, 0.5, 0, seed=1)
    text = task_builder.text.decode(mk.prompt)
    assert len(mk.distractors) == 3 and len(set(mk.distractors + mk.answers)) == 4
    assert all(text.count(v) == 1 for v in mk.answers + mk.distractors)
    vt = task_builder.item("variable_tracking", 1000, 0.2, 0, seed=1)
    text = task_builder.text.decode(vt.prompt)
    name = re.search(r"number for (\w+)\?", vt.question).group(1)
    alias = re.search(rf"The special magic number for {name} is the same as the special magic number for (\w+)\.",
                      text)
    assert alias, text[-500:]
    # the alias names the holder of the answer, which comes first
    first = text.index(f"The special magic number for {alias.group(1)} is {vt.answers[0]}.")
    assert first < alias.start()
    mv = task_builder.item("multi_value", 1000, 0.5, 0, seed=1)
    assert len(mv.answers) == 2 and all(task_builder.text.decode(mv.prompt).count(v) == 1 for v in mv.answers)


def test_common_words_counts(task_builder):
    it = task_builder.item("common_words", 1000, None, 0, seed=2)
    text = task_builder.text.decode(it.prompt)
    entries = re.findall(r"\d+\. ([a-z]+)", text)
    counts = {w: entries.count(w) for w in set(entries)}
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    assert sorted(top) == sorted(it.answers)
    rest = max(c for w, c in counts.items() if w not in it.answers)
    assert min(counts[w] for w in it.answers) > rest
    assert common_word_entries(["a", "b", "c"], ["x", "y"], 20) == ["a", "b", "c"] * 2 + ["x", "y"] * 7


def test_conversation_states_the_fact_in_a_user_turn_at_its_depth(task_builder):
    for depth, expect_first in ((0.0, True), (1.0, False)):
        it = task_builder.item("conversation", 1000, depth, 0, seed=4)
        text = task_builder.text.decode(it.prompt)
        fact = text.index(f"locker code is {it.answers[0]}")
        stories = [m.start() for m in re.finditer(re.escape(tasks.STORY_REQUESTS[0]), text)]
        assert stories, text[:200]
        # depth 0: in the first user turn, before the first story; depth 1: after every story but the last
        assert (fact < len(text) * 0.2) == expect_first, (depth, fact / len(text))


def test_make_items_and_manifest():
    class Fake:
        def item(self, task, length, depth, trial, seed):
            return tasks.Item(task, length, depth, trial, seed, (1, 2), ("x",), (), "q?", "A:", 4)

    items = make_items(Fake(), [("single_needle", 100), ("common_words", 100)], [0.1, 0.9], 2, seed=5)
    assert [(i.task, i.depth, i.trial) for i in items] == [
        ("single_needle", 0.1, 0), ("single_needle", 0.1, 1), ("single_needle", 0.9, 0), ("single_needle", 0.9, 1),
        ("common_words", None, 0), ("common_words", None, 1), ("common_words", None, 2), ("common_words", None, 3)]
    rows = manifest(items)
    assert rows[0]["prompt_sha256_16"] == items[0].prompt_hash and len(rows[0]["prompt_sha256_16"]) == 16
    assert rows[0]["answers"] == ["x"] and rows[0]["answer_prefix"] == "A:" and rows[0]["prompt_tokens"] == 2


def test_item_rejects_bad_task_and_depth(task_builder):
    with pytest.raises(ValueError, match="unknown task"):
        task_builder.item("nope", 500, 0.5, 0, 0)
    with pytest.raises(ValueError, match="takes no depth"):
        task_builder.item("common_words", 500, 0.5, 0, 0)
    with pytest.raises(ValueError, match="too short"):
        task_builder.item("multi_key", 40, 0.5, 0, 0)


def test_fit_length_finds_the_longest_prompt():
    rng = random.Random(0)
    widths = [rng.choice([1, 2, 3, 4]) for _ in range(5000)]  # uneven tokens per unit

    def build(n):
        return [0] * (17 + sum(widths[:n]))

    for length in (17, 18, 100, 999, 4000):
        n, ids = fit_length(build, length, n0=length // 3)
        assert len(ids) <= length < len(build(n + 1)), (length, n)
    with pytest.raises(ValueError):
        fit_length(build, 16, 0)
    with pytest.raises(RuntimeError, match="stops growing"):  # filler that runs out
        fit_length(lambda n: [0] * (17 + min(n, 50)), 100, 0)


def test_documents_never_run_short(task_builder):
    """Every start is far enough from the end of the text; a text shorter than the prompt repeats."""
    text = task_builder.text
    rng = random.Random(0)
    for n in (100, 4000):
        assert all(len(text.document_tokens(rng, n)) >= n for _ in range(20))
    short = tasks.TaskText.__new__(tasks.TaskText)
    short.tokenizer, short.doc, short.line_starts = text.tokenizer, "Tiny text.\nTwo lines.", [0, 11]
    assert len(short.document_tokens(rng, 50)) >= 50


@pytest.mark.parametrize("reply, answers, distractors, expected", [
    (" 4821937.", ["4821937"], [], 1.0),                       # right
    ("The number is 4821937, I think", ["4821937"], [], 1.0),  # right, inside a sentence
    (" 48219370.", ["4821937"], [], 0.0),                      # wrong: a longer number is not the answer
    (" 1234567.", ["4821937"], ["1234567"], 0.0),               # wrong: the distractor
    (" 1234567, no: 4821937", ["4821937"], ["1234567"], 0.0),   # distractor first: wrong
    (" 4821937 (not 1234567)", ["4821937"], ["1234567"], 1.0),  # answer first, then a distractor: right
    (":\n- 4821937\n- 9999999", ["4821937", "5550001"], [], 0.5),  # partially right
    (":\n1. Teal\n2. kite\n3. drum!", ["kite", "teal", "drum"], [], 1.0),  # case and punctuation
    (" kites, teal", ["kite", "teal", "drum"], [], pytest.approx(1 / 3)),   # whole words only
    ("", ["x"], [], 0.0),
])
def test_score_on_hand_made_answers(reply, answers, distractors, expected):
    assert score(reply, answers, distractors) == expected


def test_normalize():
    assert normalize("Tom's  CODE: 42_7!") == ["tom", "s", "code", "42", "7"]
