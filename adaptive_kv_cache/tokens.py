"""Token classes for FastGen's ``special`` and ``punct`` policies.

Derived once per tokenizer from its vocabulary (shared/docs/fastgen.md, "Punctuation and
special sets"). The tokenizer object needs:

- ``n_words``: vocabulary size
- ``bos_id``, ``eos_id``, ``pad_id`` (``pad_id`` may be -1), optionally ``unk_id``
- ``special_ids``: iterable of control-token ids
- ``piece(i) -> str``: the sentencepiece piece ("▁the", "<0x0A>") or, for byte-level BPE
  tokenizers, the decoded surface text (" the", "\\n")
- ``encode(s, bos=False, eos=False) -> list[int]``
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "TokenClasses",
    "is_punct_piece",
    "marker_sequences",
    "punct_mask",
    "special_mask",
    "token_classes",
]

WORD_BOUNDARY = "\u2581"  # sentencepiece's "▁"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def is_punct_piece(piece: str) -> bool:
    """Punctuation rule of fastgen.md.

    A piece is punctuation when, after removing U+2581 and whitespace, it is non-empty and every
    character is in a Unicode punctuation category (P*). Newlines count too: the byte piece
    ``<0x0A>`` and byte-level pieces made only of newlines ("\\n", "\\n\\n"). Other byte pieces
    ``<0xNN>`` are judged by their byte when it is ASCII (``<0x2E>`` is "."); non-ASCII bytes
    are fragments of a multi-byte character and never punctuation.
    """
    m = _BYTE_PIECE.match(piece)
    if m is not None:
        b = int(m.group(1), 16)
        if b >= 0x80:
            return False
        piece = chr(b)
    text = piece.replace(WORD_BOUNDARY, "")
    if text and set(text) == {"\n"}:
        return True
    text = "".join(ch for ch in text if not ch.isspace())
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


@dataclass(frozen=True, eq=False)
class TokenClasses:
    """Per-vocabulary class tables.

    special  (vocab,) bool: control tokens (BOS/EOS/pad/unk and the tokenizer's special ids)
    punct    (vocab,) bool: punctuation pieces (see :func:`is_punct_piece`)
    markers  token-id sequences of the configured special strings (several variants per string,
             as the string tokenizes in different contexts); matched as sub-sequences
    """

    special: torch.Tensor
    punct: torch.Tensor
    markers: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.special.dtype != torch.bool or self.punct.dtype != torch.bool:
            raise TypeError("TokenClasses: special and punct must be bool tensors")
        if self.special.dim() != 1 or self.special.shape != self.punct.shape:
            raise ValueError(
                f"TokenClasses: special {tuple(self.special.shape)} and punct "
                f"{tuple(self.punct.shape)} must be 1-D tensors of the same length"
            )
        object.__setattr__(self, "markers", tuple(tuple(int(t) for t in m) for m in self.markers if len(m)))

    @property
    def vocab_size(self) -> int:
        return int(self.special.shape[0])

    def to(self, device: torch.device | str) -> "TokenClasses":
        """Copy of the tables on ``device`` (do this once, not per decode step)."""
        return TokenClasses(self.special.to(device), self.punct.to(device), self.markers)


def _encode(tokenizer, s: str) -> list[int]:
    return list(tokenizer.encode(s, bos=False, eos=False))


def marker_sequences(tokenizer, special_strings: Iterable[str]) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences under which each special string can appear in a prompt.

    A string's tokens depend on what precedes it (sentencepiece adds a word-boundary "▁" at the
    start of the text and after spaces; byte-level BPE glues a leading space to the first token).
    For each string ``s`` we encode ``head + tail`` for a few contexts and keep what follows the
    tokens of ``head`` (only when ``encode(head + tail)`` starts with ``encode(head)``, i.e. the
    context did not merge into the string):

    - ("", s): at the start of the text, e.g. "[INST] ..." (sentencepiece: same as after a space)
    - (" ", s): after a space (sentencepiece: drops the lone "▁" that encode(" " + s) starts with)
    - ("a", " " + s): after a word and a space, e.g. "Hi [/INST]" (byte-level: " [" token)
    - ("a", s), ("\\n", s): glued to a word or after a newline, e.g. "\\n<</SYS>>"

    Empty results are skipped; duplicates are removed, order is kept.
    """
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    contexts = (("", ""), (" ", ""), ("a", " "), ("a", ""), ("\n", ""))
    for s in special_strings:
        for head, sep in contexts:
            head_ids = _encode(tokenizer, head) if head else []
            full = _encode(tokenizer, head + sep + s)
            if full[: len(head_ids)] != head_ids:
                continue
            seq = tuple(int(t) for t in full[len(head_ids):])
            if seq and seq not in seen:
                seen.add(seq)
                out.append(seq)
    return tuple(out)


def token_classes(tokenizer, special_strings: Sequence[str] = ()) -> TokenClasses:
    """Build the special / punct tables and the special-string markers for ``tokenizer``."""
    n = int(tokenizer.n_words)
    if n <= 0:
        raise ValueError(f"token_classes: tokenizer.n_words={n} must be positive")

    special = torch.zeros(n, dtype=torch.bool)
    ids = set(int(i) for i in getattr(tokenizer, "special_ids", ()) or ())
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            ids.add(int(v))
    for i in ids:
        if i < 0:  # pad_id = -1 means "no pad token"
            continue
        if i >= n:
            raise ValueError(f"token_classes: special id {i} is outside the vocabulary [0, {n})")
        special[i] = True

    punct = torch.tensor([is_punct_piece(tokenizer.piece(i)) for i in range(n)], dtype=torch.bool)
    punct &= ~special  # a control token is never punctuation (e.g. a control piece spelled "<pad>")

    return TokenClasses(special=special, punct=punct, markers=marker_sequences(tokenizer, special_strings))


def _lookup(table: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """table[token_ids] where ids outside [0, vocab) (e.g. -1 padding) give False."""
    table = table.to(token_ids.device)
    v = table.shape[0]
    valid = (token_ids >= 0) & (token_ids < v)
    return table[token_ids.clamp(0, v - 1)] & valid


def _as_ids(token_ids) -> torch.Tensor:
    t = torch.as_tensor(token_ids)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"token ids must be an integer tensor, got {t.dtype}")
    return t.long()


def punct_mask(token_ids: torch.Tensor, classes: TokenClasses) -> torch.Tensor:
    """(..., n) bool: True where the token is punctuation."""
    return _lookup(classes.punct, _as_ids(token_ids))


def special_mask(token_ids: torch.Tensor, classes: TokenClasses) -> torch.Tensor:
    """(..., n) bool: True where the token is special or lies inside an occurrence of a marker.

    Markers are matched along the last dimension only, so in a 2-D (batch, n) tensor a marker
    never spans two rows. Vectorised per marker length: one ``unfold`` per length, then each
    match is spread over the ``m`` positions it covers.
    """
    ids = _as_ids(token_ids)
    out = _lookup(classes.special, ids)
    n = ids.shape[-1] if ids.dim() else 0
    if n == 0 or not classes.markers:
        return out
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for m in classes.markers:
        by_len.setdefault(len(m), []).append(m)
    for m_len, seqs in by_len.items():
        if m_len > n:
            continue
        pats = torch.tensor(seqs, dtype=ids.dtype, device=ids.device)  # (k, m)
        windows = ids.unfold(-1, m_len, 1)  # (..., n - m + 1, m)
        hit = (windows.unsqueeze(-2) == pats).all(-1).any(-1)  # (..., n - m + 1)
        width = n - m_len + 1
        for off in range(m_len):
            out[..., off : off + width] |= hit
    return out
