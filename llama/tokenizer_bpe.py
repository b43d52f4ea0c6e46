"""Byte-level BPE tokenizer (tiktoken backend) for Llama 3 and GGUF vocabularies.

Two on-disk formats are understood by :func:`load_bpe`:

* **Llama 3 ``tokenizer.model``** (tiktoken text format): one ``<base64 token> <rank>``
  line per mergeable token. Special tokens are not stored in the file; as in Meta's
  Llama 3 reference code, 256 specials (``<|begin_of_text|>``, ``<|end_of_text|>``,
  ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` and reserved ones)
  get the ids right after the base vocabulary (``num_base_tokens + i``).
* **GGUF** (a full llama.cpp model file or the tokenizer-only ``tokenizer.gguf``
  written by ``scripts/convert_gguf.py``): GPT-2 style byte-level BPE described by
  ``tokenizer.ggml.tokens`` / ``.merges`` / ``.token_type`` / ``.pre`` and the
  special-token id keys. This is what SmolLM2 uses.

Behaviour shared by both formats (and by the sentencepiece ``Tokenizer``):

* ``encode`` never turns special-token *text* inside the input into a special token
  unless the caller allows it (``allowed_special``); by default ``"<|im_end|>"`` in a
  user string is encoded as ordinary text, so prompts cannot inject control tokens.
* ``decode`` joins token bytes and decodes them as UTF-8 with ``errors="replace"``:
  a sequence that ends in (or contains) an incomplete UTF-8 character - e.g. the
  first half of an emoji during streaming - yields U+FFFD for the broken part.
* Text the vocabulary cannot represent raises ``ValueError`` naming the character
  and its position (``errors="strict"``, the default), or with ``errors="replace"``
  each such character is replaced by U+FFFD before encoding. Two cases exist:
  lone UTF-16 surrogates such as ``"\\ud800"`` (not encodable as UTF-8 at all), and
  characters containing a byte that has no token (SmolLM2's vocabulary lacks 21 of
  the 256 bytes, e.g. ``"\\x04"`` and all of U+40000..U+BFFFF).

Why tiktoken is exact for GGUF merges: tiktoken merges the adjacent pair whose
concatenation has the lowest rank, while HF's BPE merges the pair with the lowest
merge index. Giving the token created by merge ``k`` the rank ``256 + k`` makes the
two agree for BPE-trained vocabularies; this was checked against HF ``tokenizers``
(Digits(individual) + ByteLevel pre-tokenizer, BPE model) on SmolLM2's whole
vocabulary, Shakespeare, Python sources and 300k adversarial token concatenations
with zero differences.
"""

from __future__ import annotations

import base64
import mmap
import re
import struct
from functools import lru_cache
from pathlib import Path
from typing import (
    AbstractSet,
    Any,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Literal,
    Optional,
    Sequence,
    Union,
)

import numpy as np
import tiktoken

__all__ = ["BPETokenizer", "load_bpe", "is_bpe_file", "read_gguf_metadata", "LLAMA3_PAT_STR"]

# Meta's Llama 3 pre-tokenizer (llama/tokenizer.py in the Llama 3 repository).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GPT-2's pre-tokenizer as used by HF's ByteLevel(use_regex=True).
GPT2_PAT_STR = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

# HF applies Digits(individual_digits=True) and then the GPT-2 regex to each
# digit-free segment (llama.cpp: "\p{N}" followed by the GPT-2 expression). The
# single-pass equivalent isolates every digit, and lets a whitespace run that ends
# right before a digit stay whole (the segment ended there, so the GPT-2 lookahead
# `(?!\S)` saw end-of-text): hence `(?![^\s\p{N}])` instead of `(?!\S)`.
DIGITS_GPT2_PAT_STR = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
)

# tokenizer.ggml.pre values (llama.cpp's names) -> regex. Only families whose HF
# pre-tokenizer is exactly reproduced by one of the expressions above are listed.
_GGUF_PRE_PATTERNS: Dict[str, str] = {
    "default": GPT2_PAT_STR,
    "gpt-2": GPT2_PAT_STR,
    "gpt2": GPT2_PAT_STR,
    "mpt": GPT2_PAT_STR,
    "olmo": GPT2_PAT_STR,
    "jais": GPT2_PAT_STR,
    "smollm": DIGITS_GPT2_PAT_STR,
    "starcoder": DIGITS_GPT2_PAT_STR,
    "refact": DIGITS_GPT2_PAT_STR,
    "codeshell": DIGITS_GPT2_PAT_STR,
    "llama-bpe": LLAMA3_PAT_STR,
    "llama3": LLAMA3_PAT_STR,
}

LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS: List[str] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [
    f"<|reserved_special_token_{i}|>"
    for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)
]

# Control-token texts that end an assistant turn in the chat formats we know.
_END_OF_TURN_TEXTS = frozenset(
    {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"}
)

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = (
    1, 2, 3, 4, 5, 6
)

# Meta's limits: tiktoken's regex engine can overflow its stack on very long
# inputs or very long runs of (non-)whitespace, so input is cut into pieces first.
_TIKTOKEN_MAX_ENCODE_CHARS = 400_000
_MAX_NO_WHITESPACES_CHARS = 25_000

_GGUF_MAGIC = b"GGUF"
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")

AllowedSpecial = Union[Literal["all"], AbstractSet[str]]


@lru_cache(maxsize=1)
def _gpt2_unicode_to_byte() -> Dict[str, int]:
    """GPT-2's reversible byte <-> printable-unicode table, inverted.

    Returns:
        Mapping from each of the 256 stand-in characters to its byte value.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class BPETokenizer:
    """Byte-level BPE tokenizer with the interface of ``llama.tokenizer.Tokenizer``.

    Build it with :func:`load_bpe` (or :meth:`from_tiktoken_file` /
    :meth:`from_gguf`) rather than calling the constructor directly.

    Attributes:
        n_words: Vocabulary size (ids are ``0 .. n_words-1``).
        bos_id: Id of the beginning-of-sequence token (-1 if the vocabulary has none).
            For SmolLM2 this is ``<|im_start|>`` (GGUF ``bos_token_id``).
        eos_id: Id of the end-of-sequence token (-1 if none).
        pad_id: Always -1. Meta's ``generate`` uses ``pad_id`` as the "not a prompt
            token" fill value, so it must never equal a real token; SmolLM2's GGUF
            padding id is ``<|im_end|>``, which does occur inside chat prompts.
        special_ids: Ids of control/special tokens (never produced from plain text).
        stop_tokens: Ids that end a turn (eos, eot and the known end-of-turn texts).
        add_bos: Whether the model expects ``bos_id`` in front of a prompt
            (GGUF ``tokenizer.ggml.add_bos_token``; True for Llama 3, False for SmolLM2).
        chat_template: The Jinja chat template stored with the vocabulary, or None.
        pre: Name of the pre-tokenizer (GGUF ``tokenizer.ggml.pre`` or ``"llama3"``).
    """

    def __init__(
        self,
        *,
        name: str,
        pat_str: str,
        mergeable_ranks: Dict[bytes, int],
        special_tokens: Dict[str, int],
        id_to_bytes: List[bytes],
        rank_to_id: Optional[List[int]] = None,
        always_split_tokens: AbstractSet[str] = frozenset(),
        bos_id: int = -1,
        eos_id: int = -1,
        stop_tokens: AbstractSet[int] = frozenset(),
        add_bos: bool = False,
        chat_template: Optional[str] = None,
        pre: str = "",
    ) -> None:
        """Assembles a tokenizer from already-parsed vocabulary data.

        Args:
            name: Label for error messages and ``repr``.
            pat_str: Pre-tokenizer regex (tiktoken / fancy-regex syntax).
            mergeable_ranks: Byte string -> tiktoken rank for every token that BPE
                can produce (all single bytes present plus every merge result).
            special_tokens: Special-token text -> tiktoken rank.
            id_to_bytes: Surface bytes of every token id (``len == n_words``).
            rank_to_id: Maps a tiktoken rank to a token id when they differ (GGUF);
                None when ranks are the ids (Llama 3 files).
            always_split_tokens: Special-token texts that are always matched in the
                input (GGUF user-defined tokens, which HF splits out unconditionally).
            bos_id: Beginning-of-sequence id or -1.
            eos_id: End-of-sequence id or -1.
            stop_tokens: Ids that end generation.
            add_bos: Whether prompts are expected to start with ``bos_id``.
            chat_template: Optional Jinja chat template.
            pre: Pre-tokenizer name, informational.
        """
        self.name = name
        self._rank_to_id = rank_to_id
        if rank_to_id is None:
            self._special_text_to_id = dict(special_tokens)
        else:
            self._special_text_to_id = {t: rank_to_id[r] for t, r in special_tokens.items()}
        self._always_split = frozenset(always_split_tokens)
        self._id_to_bytes = id_to_bytes
        self._model = tiktoken.Encoding(
            name=name,
            pat_str=pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
        )
        present = {bt[0] for bt in mergeable_ranks if len(bt) == 1}
        # Bytes with no token would make tiktoken's Rust core panic; they are
        # detected in Python first so the caller gets a ValueError instead.
        self._present_bytes = bytes(sorted(present))
        self._has_missing_bytes = len(present) < 256
        replacement = "\ufffd".encode("utf-8")
        self._replacement = "\ufffd" if all(b in present for b in replacement) else ""

        self.n_words: int = len(id_to_bytes)
        self.bos_id: int = bos_id
        self.eos_id: int = eos_id
        self.pad_id: int = -1
        self.special_ids: FrozenSet[int] = frozenset(self._special_text_to_id.values()) - {
            self._special_text_to_id[t] for t in self._always_split
        }
        self.stop_tokens: FrozenSet[int] = frozenset(i for i in stop_tokens if i >= 0)
        self.add_bos: bool = add_bos
        self.chat_template: Optional[str] = chat_template
        self.pre: str = pre

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_tiktoken_file(cls, path: Union[str, Path]) -> "BPETokenizer":
        """Loads a Llama 3 ``tokenizer.model`` (``<base64> <rank>`` lines).

        Special tokens follow Meta's Llama 3 code: 256 of them with ids
        ``num_base_tokens + i``; ``<|begin_of_text|>`` is BOS, ``<|end_of_text|>``
        EOS, and ``<|end_of_text|>``/``<|eot_id|>`` stop a turn.

        Args:
            path: Path of the tiktoken-format file.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If a line is malformed or ranks are not ``0..n-1``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        ranks: Dict[bytes, int] = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                if not _TIKTOKEN_LINE.match(line):
                    raise ValueError(
                        f"{path}:{lineno}: expected '<base64 token> <rank>' (Llama 3 "
                        f"tiktoken format), got {line[:60]!r}"
                    )
                token_b64, rank = line.split(b" ")
                token = base64.b64decode(token_b64)
                if token in ranks:
                    raise ValueError(f"{path}:{lineno}: token {token!r} listed twice")
                ranks[token] = int(rank)
        if not ranks:
            raise ValueError(f"{path}: no tokens found")
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(
                f"{path}: ranks must be exactly 0..{len(ranks) - 1} (one per line); "
                "the file is truncated or not a Llama 3 tokenizer.model"
            )
        num_base = len(ranks)
        specials = {tok: num_base + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        id_to_bytes: List[bytes] = [b""] * (num_base + len(specials))
        for tok, r in ranks.items():
            id_to_bytes[r] = tok
        for text, i in specials.items():
            id_to_bytes[i] = text.encode("utf-8")
        return cls(
            name=path.name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=specials,
            id_to_bytes=id_to_bytes,
            bos_id=specials["<|begin_of_text|>"],
            eos_id=specials["<|end_of_text|>"],
            stop_tokens={specials["<|end_of_text|>"], specials["<|eot_id|>"]},
            add_bos=True,
            pre="llama3",
        )

    @classmethod
    def from_gguf(cls, path: Union[str, Path]) -> "BPETokenizer":
        """Loads the byte-level BPE vocabulary embedded in a GGUF file.

        Args:
            path: A llama.cpp GGUF model or a tokenizer-only GGUF.

        Returns:
            The tokenizer. Token ids are the GGUF's ids (``tokenizer.ggml.tokens``
            order); ``CONTROL``/``UNKNOWN``/``UNUSED`` tokens become special tokens.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            ValueError: If the file is not GGUF, has no BPE vocabulary, uses a
                non-byte-level vocabulary (e.g. sentencepiece ``llama``) or an
                unsupported ``tokenizer.ggml.pre``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        meta = read_gguf_metadata(path)

        def get(key: str, default=None):
            return meta.get(key, default)

        model = get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE "
                "('gpt2') vocabularies are supported here (sentencepiece 'llama' "
                "vocabularies need llama.tokenizer.Tokenizer with a .model file)"
            )
        tokens: List[str] = get("tokenizer.ggml.tokens")
        merges: List[str] = get("tokenizer.ggml.merges")
        if not tokens or not merges:
            raise ValueError(
                f"{path}: GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges"
            )
        types: List[int] = get("tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{path}: token_type has {len(types)} entries, tokens {len(tokens)}")
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRE_PATTERNS:
            raise ValueError(
                f"{path}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                f"supported: {sorted(_GGUF_PRE_PATTERNS)}"
            )

        u2b = _gpt2_unicode_to_byte()
        token_to_id: Dict[str, int] = {}
        id_to_bytes: List[bytes] = []
        special_texts: Dict[str, int] = {}  # text -> id
        always_split: List[str] = []
        for i, (tok, tt) in enumerate(zip(tokens, types)):
            token_to_id.setdefault(tok, i)
            if tt in (_TT_CONTROL, _TT_UNKNOWN, _TT_UNUSED, _TT_USER_DEFINED):
                # HF stores added tokens as raw text, not in the byte-level alphabet.
                id_to_bytes.append(tok.encode("utf-8"))
                special_texts.setdefault(tok, i)
                if tt == _TT_USER_DEFINED:
                    always_split.append(tok)
                continue
            try:
                id_to_bytes.append(bytes(u2b[c] for c in tok))
            except KeyError as e:
                raise ValueError(
                    f"{path}: token {i} {tok!r} contains {e.args[0]!r}, which is not "
                    "in GPT-2's byte-level alphabet; not a byte-level BPE vocabulary"
                ) from None

        # Rank space: single bytes 0..255, merge k -> 256 + k, specials after that.
        # Only bytes that have a token are mergeable; the others are reported by
        # encode() before tiktoken sees them.
        ranks: Dict[bytes, int] = {}
        rank_to_id: List[int] = [-1] * (256 + len(merges) + len(special_texts))
        for i, tt in enumerate(types):
            bt = id_to_bytes[i]
            if tt in (_TT_NORMAL, _TT_BYTE) and len(bt) == 1 and bt not in ranks:
                ranks[bt] = bt[0]
                rank_to_id[bt[0]] = i
        for k, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}: malformed merge {k}: {merge!r}")
            merged = parts[0] + parts[1]
            tid = token_to_id.get(merged)
            if tid is None:
                raise ValueError(f"{path}: merge {k} {merge!r} yields a token not in the vocabulary")
            bt = id_to_bytes[tid]
            if bt not in ranks:  # a repeated result keeps its first (highest) priority
                ranks[bt] = 256 + k
                rank_to_id[256 + k] = tid
        special_ranks: Dict[str, int] = {}
        for j, (text, tid) in enumerate(special_texts.items()):
            special_ranks[text] = 256 + len(merges) + j
            rank_to_id[256 + len(merges) + j] = tid

        def opt_id(key: str) -> int:
            v = get(key)
            return int(v) if v is not None and 0 <= int(v) < len(tokens) else -1

        bos_id = opt_id("tokenizer.ggml.bos_token_id")
        eos_id = opt_id("tokenizer.ggml.eos_token_id")
        stops = {eos_id, opt_id("tokenizer.ggml.eot_token_id"), opt_id("tokenizer.ggml.eom_token_id")}
        stops |= {tid for text, tid in special_texts.items() if text in _END_OF_TURN_TEXTS}
        add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        return cls(
            name=path.name,
            pat_str=_GGUF_PRE_PATTERNS[pre],
            mergeable_ranks=ranks,
            special_tokens=special_ranks,
            id_to_bytes=id_to_bytes,
            rank_to_id=rank_to_id,
            always_split_tokens=frozenset(always_split),
            bos_id=bos_id,
            eos_id=eos_id,
            stop_tokens=stops,
            add_bos=add_bos,
            chat_template=get("tokenizer.chat_template"),
            pre=pre,
        )

    # ----------------------------------------------------------------- encoding

    def encode(
        self,
        s: str,
        bos: bool,
        eos: bool,
        allowed_special: AllowedSpecial = frozenset(),
        errors: Literal["strict", "replace"] = "strict",
    ) -> List[int]:
        """Encodes a string into token ids.

        Args:
            s: Text to encode.
            bos: Prepend ``bos_id`` (ValueError if the vocabulary has none).
            eos: Append ``eos_id`` (ValueError if the vocabulary has none).
            allowed_special: Special-token texts that may be recognised in ``s``
                (``"all"`` for every one). Anything else - including special-token
                text not listed here - is encoded as plain text.
            errors: ``"strict"`` raises ValueError for characters the vocabulary
                cannot encode; ``"replace"`` substitutes U+FFFD for them (or drops
                them if U+FFFD itself is unencodable).

        Returns:
            Token ids, length ``n_tokens``.

        Raises:
            TypeError: If ``s`` is not a str.
            ValueError: On unencodable text (strict), unknown ``allowed_special``
                names, or a requested bos/eos the vocabulary lacks.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() expects str, got {type(s).__name__}")
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        if allowed_special == "all":
            allowed = set(self._special_text_to_id)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self._special_text_to_id)
            if unknown:
                raise ValueError(f"not special tokens of this vocabulary: {sorted(unknown)}")
        allowed |= self._always_split
        s = self._check_encodable(s, errors)

        out: List[int] = []
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.name}: vocabulary has no BOS token")
            out.append(self.bos_id)
        for chunk in self._chunks(s):
            ranks = self._model.encode(chunk, allowed_special=allowed, disallowed_special=())
            if self._rank_to_id is None:
                out.extend(ranks)
            else:
                r2i = self._rank_to_id
                out.extend(r2i[r] for r in ranks)
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.name}: vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    def _check_encodable(self, s: str, errors: str) -> str:
        """Finds characters the vocabulary cannot encode.

        Args:
            s: Input text.
            errors: ``"strict"`` or ``"replace"``.

        Returns:
            ``s`` itself, or with offending characters replaced (``"replace"``).

        Raises:
            ValueError: In strict mode, naming the first offending character.
        """
        try:
            data = s.encode("utf-8")
        except UnicodeEncodeError as e:
            if errors == "strict":
                raise ValueError(
                    f"cannot encode lone surrogate U+{ord(s[e.start]):04X} at position "
                    f"{e.start}: not valid Unicode text (pass errors='replace' to "
                    "substitute U+FFFD)"
                ) from None
            s = "".join(
                self._replacement if 0xD800 <= ord(c) <= 0xDFFF else c for c in s
            )
            data = s.encode("utf-8")
        if self._has_missing_bytes and data.translate(None, self._present_bytes):
            present = set(self._present_bytes)
            bad_pos = [
                i for i, c in enumerate(s)
                if any(b not in present for b in c.encode("utf-8"))
            ]
            if errors == "strict":
                c = s[bad_pos[0]]
                raise ValueError(
                    f"cannot encode character {c!r} (U+{ord(c):04X}) at position "
                    f"{bad_pos[0]}: the vocabulary has no token for one of its UTF-8 "
                    "bytes (pass errors='replace' to substitute U+FFFD)"
                )
            chars = list(s)
            for i in bad_pos:
                chars[i] = self._replacement
            s = "".join(chars)
        return s

    @staticmethod
    def _chunks(s: str) -> Iterator[str]:
        """Cuts ``s`` like Meta's Llama 3 code to keep tiktoken's regex stack small.

        Args:
            s: Input text.

        Yields:
            Consecutive substrings whose concatenation is ``s``.
        """
        for i in range(0, max(len(s), 1), _TIKTOKEN_MAX_ENCODE_CHARS):
            piece = s[i : i + _TIKTOKEN_MAX_ENCODE_CHARS]
            if len(piece) <= _MAX_NO_WHITESPACES_CHARS:
                yield piece
                continue
            start = 0
            run = 0
            prev_space = piece[0].isspace() if piece else False
            for j, c in enumerate(piece):
                is_space = c.isspace()
                if is_space != prev_space:
                    run = 1
                    prev_space = is_space
                else:
                    run += 1
                    if run > _MAX_NO_WHITESPACES_CHARS:
                        yield piece[start:j]
                        start = j
                        run = 1
            yield piece[start:]

    def encode_special(self, name: str) -> int:
        """Returns the id of one special token.

        Args:
            name: Its exact text, e.g. ``"<|im_start|>"`` or ``"<|eot_id|>"``.

        Returns:
            The token id.

        Raises:
            ValueError: If ``name`` is not a special token of this vocabulary.
        """
        try:
            return self._special_text_to_id[name]
        except KeyError:
            raise ValueError(f"{name!r} is not a special token of {self.name}") from None

    special_token_id = encode_special

    # ----------------------------------------------------------------- decoding

    def decode(self, t: Sequence[int]) -> str:
        """Decodes token ids to text.

        Bytes of all tokens are concatenated first and decoded once, so
        multi-token characters come out whole; invalid or incomplete UTF-8
        (e.g. a prefix of a multi-byte character) becomes U+FFFD.

        Args:
            t: Token ids, length ``n_tokens``.

        Returns:
            The text. Special tokens appear as their text (e.g. ``"<|im_end|>"``).

        Raises:
            ValueError: If an id is outside ``0 .. n_words-1``.
        """
        return self.decode_bytes(t).decode("utf-8", errors="replace")

    def decode_bytes(self, t: Sequence[int]) -> bytes:
        """Concatenated raw bytes of ``t`` (for streaming detokenisation).

        Args:
            t: Token ids.

        Returns:
            The bytes, not UTF-8 validated.
        """
        ids = [int(i) for i in t]
        n = self.n_words
        for i in ids:
            if not 0 <= i < n:
                _bad(i, n)
        table = self._id_to_bytes
        return b"".join(table[i] for i in ids)

    def piece(self, i: int) -> str:
        """Surface text of one token (its bytes decoded with ``errors="replace"``).

        Args:
            i: Token id.

        Returns:
            The text, e.g. ``" the"`` for SmolLM2's ``"Ġthe"``.
        """
        if not 0 <= int(i) < self.n_words:
            _bad(i, self.n_words)
        return self._id_to_bytes[int(i)].decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (
            f"BPETokenizer({self.name!r}, n_words={self.n_words}, pre={self.pre!r}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )


def _bad(i, n: int) -> None:
    raise ValueError(f"token id {i} out of range 0..{n - 1}")


# GGUF metadata value types (gguf.GGUFValueType) -> struct/numpy format.
_GGUF_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """Reads the key/value metadata of a GGUF file (v2/v3, little-endian).

    ``gguf.GGUFReader`` builds a numpy view per string and takes ~3 s for a
    49k-token vocabulary; this reader only walks the metadata section (~0.1 s).
    Tensor data is never touched. The test suite checks that both agree.

    Args:
        path: GGUF file.

    Returns:
        Key -> value: ints/floats/bools/strs, and lists for arrays.

    Raises:
        ValueError: If the file is not a (supported) GGUF file or is truncated.
    """
    path = Path(path)
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: not a GGUF file (too short)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r})")
        (version,) = struct.unpack_from("<I", mm, 4)
        if version not in (2, 3):
            raise ValueError(
                f"{path}: unsupported GGUF version {version} (only v2/v3 little-endian)"
            )
        _, n_kv = struct.unpack_from("<QQ", mm, 8)
        pos = 24

        def read_str() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", mm, pos)
            pos += 8
            raw = mm[pos : pos + n]
            if len(raw) != n:
                raise ValueError(f"{path}: truncated GGUF metadata")
            pos += n
            return raw.decode("utf-8", errors="replace")

        def read_value(vtype: int) -> Any:
            nonlocal pos
            if vtype == _GGUF_STRING:
                return read_str()
            if vtype == _GGUF_ARRAY:
                etype, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if etype == _GGUF_STRING:
                    return [read_str() for _ in range(count)]
                if etype in _GGUF_SCALAR_FMT:
                    fmt = "<" + _GGUF_SCALAR_FMT[etype]
                    size = struct.calcsize(fmt)
                    # Copy out of the mmap so no numpy view outlives it.
                    raw = mm[pos : pos + size * count]
                    if len(raw) != size * count:
                        raise ValueError(f"{path}: truncated GGUF metadata")
                    pos += size * count
                    return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
                return [read_value(etype) for _ in range(count)]
            fmt = _GGUF_SCALAR_FMT.get(vtype)
            if fmt is None:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")
            (v,) = struct.unpack_from("<" + fmt, mm, pos)
            pos += struct.calcsize(fmt)
            return v

        meta: Dict[str, Any] = {}
        try:
            for _ in range(n_kv):
                key = read_str()
                (vtype,) = struct.unpack_from("<I", mm, pos)
                pos += 4
                meta[key] = read_value(vtype)
        except struct.error as e:
            raise ValueError(f"{path}: truncated or corrupt GGUF metadata ({e})") from None
    return meta



def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _is_tiktoken_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    lines = head.split(b"\n")
    if len(head) == 1 << 16:
        lines = lines[:-1]  # last line may be cut by the read limit
    lines = [ln.strip() for ln in lines if ln.strip()]
    return bool(lines) and all(_TIKTOKEN_LINE.match(ln) for ln in lines)


def is_bpe_file(path: Union[str, Path]) -> bool:
    """Tells a BPE tokenizer file apart from a sentencepiece ``.model`` protobuf.

    Args:
        path: Candidate file.

    Returns:
        True for a GGUF file (assumed to carry a BPE vocabulary; :func:`load_bpe`
        raises ValueError if it does not) or a tiktoken text file (every line of
        its first 64 KiB is ``<base64> <rank>``); False otherwise, including for
        sentencepiece models and missing files.
    """
    path = Path(path)
    if not path.is_file():
        return False
    return _is_gguf(path) or _is_tiktoken_text(path)


def load_bpe(path: Union[str, Path]) -> BPETokenizer:
    """Loads a BPE tokenizer from a GGUF or Llama 3 ``tokenizer.model`` file.

    Args:
        path: The file, or a directory holding ``tokenizer.gguf`` (as written by
            ``scripts/convert_gguf.py``) or ``tokenizer.model``.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: If no tokenizer file exists at ``path``.
        ValueError: If the file is neither GGUF nor tiktoken text (e.g. a
            sentencepiece model: use ``llama.tokenizer.Tokenizer`` for those).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.gguf", "tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"no tokenizer.gguf or tokenizer.model in directory {path}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    if _is_gguf(path):
        return BPETokenizer.from_gguf(path)
    if _is_tiktoken_text(path):
        return BPETokenizer.from_tiktoken_file(path)
    raise ValueError(
        f"{path} is neither a GGUF file nor a tiktoken '<base64> <rank>' file; a "
        "sentencepiece .model is loaded with llama.tokenizer.Tokenizer instead"
    )
