# A hand-written fork of Meta's Llama reference implementation with a pluggable, compressible KV cache.

from llama.generation import Dialog, Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Dialog", "Llama", "ModelArgs", "Transformer", "Tokenizer", "load_tokenizer"]
