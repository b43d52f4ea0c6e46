# A hand-written fork in the shape of Meta's Llama 2 llama/tokenizer.py.

import os
from logging import getLogger
from pathlib import Path
from typing import List

from sentencepiece import SentencePieceProcessor

logger = getLogger()


class Tokenizer:
    """tokenizing and encoding/decoding text using SentencePiece."""

    def __init__(self, model_path: str):
        """
        Initializes the Tokenizer with a SentencePiece model.

        Args:
            model_path (str): The path to the SentencePiece model file.
        """
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer file {model_path} not found; pass --tokenizer_path pointing at the model's "
                f"tokenizer.model"
            )
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a sentencepiece tokenizer model: {e}") from None
        logger.info(f"Reloaded SentencePiece model from {model_path}")

        # BOS / EOS token IDs
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.special_ids = frozenset(
            i for i in range(self.n_words) if self.sp_model.is_control(i) or self.sp_model.is_unknown(i)
        )
        # Tokens that end an assistant turn; Llama 2 chat ends turns with EOS.
        self.stop_tokens = frozenset({self.eos_id})
        self.add_bos = True  # Llama 2 prompts start with BOS
        logger.info(f"#words: {self.n_words} - BOS ID: {self.bos_id} - EOS ID: {self.eos_id}")
        assert self.sp_model.vocab_size() == self.sp_model.get_piece_size()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """
        Encodes a string into a list of token IDs.

        Args:
            s (str): The input string to be encoded.
            bos (bool): Whether to prepend the beginning-of-sequence token.
            eos (bool): Whether to append the end-of-sequence token.

        Returns:
            List[int]: A list of token IDs.
        """
        assert type(s) is str
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        """
        Decodes a list of token IDs into a string.

        Args:
            t (List[int]): The list of token IDs to be decoded.

        Returns:
            str: The decoded string.
        """
        return self.sp_model.decode(t)

    def piece(self, i: int) -> str:
        """The raw sentencepiece piece of token i (e.g. '▁the', '<0x0A>')."""
        return self.sp_model.id_to_piece(i)


TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.gguf", "tokenizer.json")


def find_tokenizer(ckpt_dir: str) -> str:
    """The tokenizer file shipped in a checkpoint directory: tokenizer.model, tokenizer.gguf or (Hugging Face
    folders) tokenizer.json, in that order."""
    for name in TOKENIZER_NAMES:
        if (Path(ckpt_dir) / name).is_file():
            return str(Path(ckpt_dir) / name)
    raise FileNotFoundError(
        f"no tokenizer ({', '.join(TOKENIZER_NAMES)}) in {ckpt_dir}; pass --tokenizer_path explicitly"
    )


def load_tokenizer(path: str):
    """A tokenizer for `path`: Hugging Face tokenizer.json (`tokenizers`), sentencepiece, or byte-level BPE for
    tiktoken / GGUF vocabularies."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found; pass --tokenizer_path pointing at the model's tokenizer file"
        )
    if Path(path).suffix == ".json":
        from llama.tokenizer_hf import HFTokenizer

        return HFTokenizer(path)
    try:
        return Tokenizer(path)
    except ValueError:
        pass  # not sentencepiece: a byte-level BPE vocabulary (tiktoken or GGUF), or neither
    from llama.tokenizer_bpe import load_bpe

    return load_bpe(path)
