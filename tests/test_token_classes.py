import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow plain `pytest` without an installed package
    sys.path.insert(0, str(REPO))

from adaptive_kv_cache.config import FastGenConfig  # noqa: E402
from adaptive_kv_cache.tokens import (  # noqa: E402
    TokenClasses,
    is_punct_piece,
    marker_sequences,
    punct_mask,
    special_mask,
    token_classes,
)

spm = pytest.importorskip("sentencepiece")

SHARED = REPO.parent / "shared"
LLAMA2 = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
STORIES = SHARED / "models" / "stories260K" / "tokenizer.model"
SPECIAL_STRINGS = FastGenConfig().special_strings


class SPTokenizer:
    """Minimal adapter around SentencePieceProcessor with the interface tokens.py expects."""

    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.unk_id = self.sp.unk_id()
        ids = {i for i in (self.bos_id, self.eos_id, self.pad_id, self.unk_id) if i >= 0}
        ids |= {i for i in range(self.n_words) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids = frozenset(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None


_CACHE: dict[Path, tuple[SPTokenizer, TokenClasses]] = {}


def _load(path: Path):
    if not path.is_file():
        pytest.skip(f"tokenizer not found: {path}")
    if path not in _CACHE:
        tok = SPTokenizer(path)
        _CACHE[path] = (tok, token_classes(tok, SPECIAL_STRINGS))
    return _CACHE[path]


@pytest.fixture(params=[LLAMA2, STORIES], ids=["llama2", "stories260K"])
def tok_classes(request):
    return _load(request.param)


@pytest.fixture
def llama2():
    return _load(LLAMA2)


def _ids_for(tok: SPTokenizer, sym: str) -> list[int]:
    """All ids whose piece is `sym` or `▁sym` (plus the byte piece for newline)."""
    names = ["<0x0A>"] if sym == "\n" else [sym, "\u2581" + sym]
    return [i for i in (tok.piece_id(n) for n in names) if i is not None]


# ------------------------------------------------------------------ punctuation rule


def test_is_punct_piece_rule():
    for p in [".", "\u2581.", ",", "?", "!", ":", "\u2581...", "\u00bf", "\u3002", "<0x0A>", "<0x2E>", "<0x21>", "\n", "\n\n", " .", " \u2581,"]:
        assert is_punct_piece(p), p
    for p in ["\u2581the", "the", " the", "\u2581a", "\u2581", "", " ", "\t", "<0x20>", "<0x41>", "<0xE2>", "<0x09>", "+", "$", "a.", "\u2581.a", "<s>", "<unk>", "\r\n"]:
        assert not is_punct_piece(p), p


def test_punct_members_and_non_members(tok_classes):
    tok, cls = tok_classes
    assert cls.special.shape == cls.punct.shape == (tok.n_words,)
    assert cls.special.dtype == cls.punct.dtype == torch.bool
    for sym in [".", ",", "?", "!", ":", "\n"]:
        ids = _ids_for(tok, sym)
        assert ids, f"no piece for {sym!r}"
        for i in ids:
            assert cls.punct[i], (sym, i, tok.piece(i))
        # and the symbol as the tokenizer actually encodes it inside text
        enc = tok.encode(f"Hi{sym}")
        assert cls.punct[enc[-1]], (sym, enc, [tok.piece(i) for i in enc])
    for piece in ["\u2581the", "\u2581a", "the", "\u2581"]:
        i = tok.piece_id(piece)
        if i is not None:
            assert not cls.punct[i], piece
    assert tok.piece_id("\u2581the") is not None and tok.piece_id("\u2581a") is not None
    # ASCII punctuation byte pieces count; letters, space and non-ASCII bytes do not
    assert cls.punct[tok.piece_id("<0x2E>")] and cls.punct[tok.piece_id("<0x3F>")]
    assert not cls.punct[tok.piece_id("<0x41>")] and not cls.punct[tok.piece_id("<0x20>")]
    assert not cls.punct[tok.piece_id("<0xE2>")]
    # punct_mask is the table lookup
    ids = torch.tensor(tok.encode("Hello, world!\nHi."))
    assert torch.equal(punct_mask(ids, cls), cls.punct[ids])
    pieces = [tok.piece(i) for i in ids.tolist()]
    assert [p for p, m in zip(pieces, punct_mask(ids, cls).tolist()) if m][-4:] == [
        tok.piece(tok.encode("Hello,")[-1]),
        tok.piece(tok.encode("world!")[-1]),
        "<0x0A>",
        tok.piece(tok.encode("Hi.")[-1]),
    ]


def test_special_ids(tok_classes):
    tok, cls = tok_classes
    assert cls.special[tok.bos_id] and cls.special[tok.eos_id] and cls.special[tok.unk_id]
    assert int(cls.special.sum()) == len(tok.special_ids)
    assert not (cls.special & cls.punct).any()
    ids = torch.tensor(tok.encode("Once upon a time", bos=True, eos=True))
    m = special_mask(ids, cls)
    assert m[0] and m[-1] and not m[1:-1].any()


# ------------------------------------------------------------------ markers


def test_llama2_markers(llama2):
    tok, cls = llama2
    assert tuple(tok.encode("[INST]")) in cls.markers
    assert tuple(tok.encode("[/INST]")) in cls.markers
    # "<</SYS>>" after a newline tokenizes without the word-boundary marker
    nl = tok.encode("\n")
    glued = tuple(tok.encode("\n<</SYS>>")[len(nl):])
    assert glued != tuple(tok.encode("<</SYS>>")) and glued in cls.markers
    assert all(len(m) > 0 for m in cls.markers)
    assert len(set(cls.markers)) == len(cls.markers)
    assert marker_sequences(tok, []) == ()


def test_llama2_chat_marker_positions(llama2):
    tok, cls = llama2
    ids = tok.encode("[INST] Hi [/INST]")
    pieces = [tok.piece(i) for i in ids]
    hi = [k for k, p in enumerate(pieces) if p in ("\u2581Hi", "Hi")]
    assert hi == [3], pieces
    m = special_mask(torch.tensor(ids), cls).tolist()
    assert m == [k not in hi for k in range(len(ids))], list(zip(pieces, m))


def test_llama2_full_chat_template(llama2):
    tok, cls = llama2
    prompt = "[INST] <<SYS>>\nYou are nice.\n<</SYS>>\n\nHi [/INST]"
    ids = tok.encode(prompt, bos=True)
    m = special_mask(torch.tensor(ids), cls)
    expect = torch.zeros(len(ids), dtype=torch.bool)
    expect[0] = True  # BOS
    for s in SPECIAL_STRINGS:  # mark where each special string's characters are
        start = prompt.index(s)
        before = tok.encode(prompt[:start].rstrip(" "))
        inside = tok.encode(prompt[: start + len(s)])
        expect[1 + len(before) : 1 + len(inside)] = True
    pieces = [tok.piece(i) for i in ids]
    assert m.tolist() == expect.tolist(), list(zip(pieces, m.tolist(), expect.tolist()))
    for word in ("You", "\u2581are", "\u2581nice", "Hi"):
        assert not m[pieces.index(word)]


def test_stories_chat_markers(tok_classes):
    tok, cls = tok_classes
    ids = tok.encode("[INST] Hi [/INST]")
    pieces = [tok.piece(i) for i in ids]
    m = special_mask(torch.tensor(ids), cls).tolist()
    text = [p for p, f in zip(pieces, m) if not f]
    assert "".join(text).replace("\u2581", "") == "Hi", list(zip(pieces, m))
    # the string alone, as the tokenizer encodes it at the start of a text, is fully covered
    for s in SPECIAL_STRINGS:
        assert all(special_mask(torch.tensor(tok.encode(s)), cls).tolist()), s


def test_special_mask_batched_matches_rows(tok_classes):
    tok, cls = tok_classes
    texts = ["[INST] Hi [/INST] Hello.", "Once upon a time [/INST] the end", "[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nGo [/INST]"]
    rows = [tok.encode(t, bos=True) for t in texts]
    n = max(len(r) for r in rows)
    batch = torch.full((len(rows), n), -1, dtype=torch.long)  # -1 padding, as Meta's generate()
    for b, r in enumerate(rows):
        batch[b, : len(r)] = torch.tensor(r)
    sm = special_mask(batch, cls)
    pm = punct_mask(batch, cls)
    assert sm.shape == pm.shape == batch.shape and sm.dtype == torch.bool
    for b, r in enumerate(rows):
        row = torch.tensor(r)
        assert torch.equal(sm[b, : len(r)], special_mask(row, cls))
        assert torch.equal(pm[b, : len(r)], punct_mask(row, cls))
        assert not sm[b, len(r):].any() and not pm[b, len(r):].any()  # padding is never a member
    # int32 input and list input work too
    assert torch.equal(special_mask(batch.int(), cls), sm)
    assert torch.equal(special_mask(rows[0], cls), sm[0, : len(rows[0])])
    # 3-D works along the last dimension
    assert torch.equal(special_mask(batch.view(1, *batch.shape), cls)[0], sm)


def test_marker_split_across_rows_is_not_matched(tok_classes):
    tok, cls = tok_classes
    marker = list(max(cls.markers, key=len))
    word = [i for i in tok.encode(" time") if not cls.special[i] and not cls.punct[i]]
    filler = word * 32
    w = len(marker) + 3
    half = len(marker) // 2
    row0 = filler[: w - half] + marker[:half]  # row 0 ends with the marker's first half
    row1 = marker[half:] + filler[: w - (len(marker) - half)]  # row 1 starts with the rest
    assert len(row0) == len(row1) == w
    batch = torch.tensor([row0, row1])
    assert not special_mask(batch, cls).any()
    # positive control: the same tokens as one row do contain the marker
    flat = special_mask(batch.reshape(-1), cls)
    assert flat.sum() >= len(marker)


def test_edge_shapes(tok_classes):
    tok, cls = tok_classes
    empty = torch.zeros(0, dtype=torch.long)
    assert special_mask(empty, cls).shape == (0,)
    assert special_mask(torch.zeros(3, 0, dtype=torch.long), cls).shape == (3, 0)
    short = torch.tensor([tok.bos_id])
    assert special_mask(short, cls).tolist() == [True]
    with pytest.raises(TypeError):
        special_mask(torch.zeros(3), cls)


def test_to_device_and_vocab_size(tok_classes):
    tok, cls = tok_classes
    c2 = cls.to("cpu")
    assert c2.vocab_size == tok.n_words and c2.markers == cls.markers


# ------------------------------------------------------------------ byte-level tokenizer


class ByteLevelToy:
    """A toy byte-level BPE tokenizer: pieces are decoded surface text, greedy longest match."""

    def __init__(self):
        self.vocab = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", " the", "the", " a", ".", ",", "?", "!", ":",
                      "\n", "\n\n", " [", "[", "/", "INST", "]", " Hi", "Hi", " ", "a", "...", " .", "'s", "$"]
        self.n_words = len(self.vocab)
        self.bos_id, self.eos_id, self.pad_id = 0, 1, -1
        self.special_ids = frozenset({0, 1, 2})

    def piece(self, i):
        return self.vocab[i]

    def encode(self, s, bos=False, eos=False):
        out, k = [], 0
        normal = sorted(range(3, self.n_words), key=lambda i: -len(self.vocab[i]))
        while k < len(s):
            i = next(i for i in normal if s.startswith(self.vocab[i], k))
            out.append(i)
            k += len(self.vocab[i])
        return ([self.bos_id] if bos else []) + out + ([self.eos_id] if eos else [])


def test_byte_level_tokenizer():
    tok = ByteLevelToy()
    cls = token_classes(tok, ["[INST]", "[/INST]"])
    members = {tok.vocab[i] for i in range(tok.n_words) if cls.punct[i]}
    assert members == {".", ",", "?", "!", ":", "\n", "\n\n", " [", "[", "/", "]", "...", " ."}
    assert {tok.vocab[i] for i in range(tok.n_words) if cls.special[i]} == {"<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"}
    # "[/INST]" after a space is " [", "/", "INST", "]" for a byte-level tokenizer
    assert tuple(tok.encode(" [/INST]")) in cls.markers
    ids = tok.encode("[INST] Hi [/INST]", bos=True)
    m = special_mask(torch.tensor(ids), cls).tolist()
    assert [tok.vocab[i] for i, f in zip(ids, m) if not f] == [" Hi"]
