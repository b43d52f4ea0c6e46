"""Hugging Face `tokenizer.json` through the `tokenizers` library, with the interface of our other tokenizers.

BOS / EOS and whether prompts start with BOS come from the files next to tokenizer.json when present
(tokenizer_config.json: bos_token, eos_token, add_bos_token; config.json / generation_config.json:
bos_token_id, eos_token_id, which may be a list of end-of-turn ids), otherwise from what the tokenizer's own
post-processor adds in front of a text.

Special-token text typed in a prompt ("<|eot_id|>") is encoded as plain text, as our sentencepiece and
tiktoken tokenizers do: only the chat formats insert control tokens, by id.
"""

import json
from pathlib import Path
from typing import FrozenSet, List, Optional, Sequence

__all__ = ["HFTokenizer"]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> List[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json.

    Attributes (as on the sentencepiece and BPE tokenizers): n_words, bos_id, eos_id, pad_id (-1 if none),
    special_ids, stop_tokens (ids that end generation), add_bos (whether prompts start with BOS).
    """

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a plain Exception for malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        # Special-token text inside user text stays text; control tokens are inserted by id only.
        self._tok.encode_special_tokens = True
        self.path = path
        self.n_words: int = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        self._special_text_to_id = {tok.content: i for i, tok in added.items() if tok.special}
        self.special_ids: FrozenSet[int] = frozenset(self._special_text_to_id.values())

        folder = path.parent
        tok_config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        gen_config = _read_json(folder / "generation_config.json")

        def by_text(key: str) -> Optional[int]:
            text = _token_text(tok_config.get(key))
            return self._tok.token_to_id(text) if text is not None else None

        bos = by_text("bos_token")
        if bos is None:
            bos = next(iter(_ids(gen_config.get("bos_token_id")) + _ids(model_config.get("bos_token_id"))), None)
        eos_ids = _ids(gen_config.get("eos_token_id")) or _ids(model_config.get("eos_token_id"))
        eos = by_text("eos_token")
        if eos is None:
            eos = eos_ids[0] if eos_ids else None
        # What the post-processor puts in front of a text: Llama 2/3 tokenizer.json files add BOS there.
        probe = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        leading = probe[0] if len(probe) > len(plain) and probe[-len(plain):] == plain else None
        if bos is None:
            bos = leading
        if "add_bos_token" in tok_config:
            self.add_bos = bool(tok_config["add_bos_token"])
        else:
            self.add_bos = leading is not None and leading == bos
        self.bos_id: int = -1 if bos is None else int(bos)
        self.eos_id: int = -1 if eos is None else int(eos)
        pad = by_text("pad_token")
        self.pad_id: int = -1 if pad is None else int(pad)
        self.stop_tokens: FrozenSet[int] = frozenset(i for i in [self.eos_id, *eos_ids] if 0 <= i < self.n_words)
        self._pieces: Optional[List[str]] = None

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of `s` (special-token text encoded as text), with BOS / EOS added on request.

        Raises:
            ValueError: bos or eos requested but the vocabulary has none.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() expects str, got {type(s).__name__}")
        ids = self._tok.encode(s, add_special_tokens=False).ids
        if bos:
            if self.bos_id < 0:
                raise ValueError(f"{self.path}: the tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id < 0:
                raise ValueError(f"{self.path}: the tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def decode(self, t: Sequence[int]) -> str:
        """Text of token ids; special tokens appear as their text."""
        return self._tok.decode([int(i) for i in t], skip_special_tokens=False)

    def piece(self, i: int) -> str:
        """Surface text of token i (decoded alone), for the punctuation classes."""
        if self._pieces is None:
            # One batched call instead of n_words single decodes (128k for Llama 3).
            self._pieces = self._tok.decode_batch([[j] for j in range(self.n_words)], skip_special_tokens=False)
        return self._pieces[int(i)]

    def special_token_id(self, text: str) -> int:
        """Id of a special token given its exact text (e.g. "<|eot_id|>")."""
        try:
            return self._special_text_to_id[text]
        except KeyError:
            raise ValueError(f"{text!r} is not a special token of {self.path}") from None

    encode_special = special_token_id

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, n_words={self.n_words}, bos_id={self.bos_id}, eos_id={self.eos_id})"
