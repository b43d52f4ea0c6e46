"""Chat templates, chosen from the tokenizer: Llama 2 `[INST]`, Llama 3 header tokens, ChatML.

Each format turns a dialog into prompt token ids and names the tokens that end an assistant turn.
"""

from dataclasses import dataclass
from typing import FrozenSet, List, Literal, Optional, Sequence, TypedDict

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def validate_dialog(dialog, index: int = 0) -> None:
    """Raises ValueError naming the dialog and message at fault.

    A dialog is an optional system message, then user and assistant messages alternating, starting and
    ending with a user message.
    """
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} messages, got {dialog!r}")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"}:
            raise ValueError(f"{where}, message {i}: expected a dict with exactly 'role' and 'content', got {msg!r}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise ValueError(
                f"{where}, message {i}: role {msg['role']!r} is not one of 'system', 'user', 'assistant'"
            )
        if not isinstance(msg["content"], str):
            raise ValueError(f"{where}, message {i}: content must be a string, got {type(msg['content']).__name__}")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where}: a system message must be followed by a user message")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            offset = len(dialog) - len(turns)
            raise ValueError(
                f"{where}, message {i + offset}: expected role {expected!r} (only the first message may be "
                f"'system'; then 'user' and 'assistant' alternate), got {msg['role']!r}"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must come from the user, got {turns[-1]['role']!r}")


@dataclass(frozen=True)
class Llama2ChatFormat:
    """Meta's Llama 2 chat template: `<s>[INST] <<SYS>>...<</SYS>> user [/INST] answer </s>` per turn."""

    tokenizer: object

    @property
    def stop_tokens(self) -> FrozenSet[int]:
        return frozenset({self.tokenizer.eos_id})

    def unsafe(self, dialog: Dialog) -> bool:
        return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        if dialog[0]["role"] == "system":
            dialog = [
                {
                    "role": dialog[1]["role"],
                    "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
                }
            ] + list(dialog[2:])
        tokens: List[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            tokens += self.tokenizer.encode(
                f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} ",
                bos=True,
                eos=True,
            )
        tokens += self.tokenizer.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}", bos=True, eos=False)
        return tokens


@dataclass(frozen=True)
class HeaderChatFormat:
    """Templates built from special tokens: ChatML (SmolLM2, Qwen) and Llama 3.

    ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n`; Llama 3:
    `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`.
    """

    tokenizer: object
    begin: Sequence[str]  # special tokens opening the prompt
    start_header: str
    end_header: str  # text after the role: a newline (ChatML) or a special token (Llama 3)
    end_of_turn: str
    after_header: str
    after_turn: str
    stops: Sequence[str]

    @property
    def stop_tokens(self) -> FrozenSet[int]:
        return frozenset(self.tokenizer.special_token_id(s) for s in self.stops)

    def unsafe(self, dialog: Dialog) -> bool:
        # Special-token text in content is encoded as plain text, so it cannot inject turns.
        return False

    def _text(self, s: str) -> List[int]:
        return self.tokenizer.encode(s, bos=False, eos=False)

    def _special(self, s: str) -> List[int]:
        return [self.tokenizer.special_token_id(s)]

    def _header(self, role: str) -> List[int]:
        tokens = self._special(self.start_header) + self._text(role)
        if self.end_header.startswith("<|"):
            return tokens + self._special(self.end_header) + self._text(self.after_header)
        return tokens + self._text(self.end_header)

    def encode_dialog_prompt(self, dialog: Dialog) -> List[int]:
        tokens: List[int] = []
        for name in self.begin:
            tokens += self._special(name)
        for msg in dialog:
            tokens += self._header(msg["role"]) + self._text(msg["content"].strip())
            tokens += self._special(self.end_of_turn) + self._text(self.after_turn)
        return tokens + self._header("assistant")


def chatml_format(tokenizer) -> HeaderChatFormat:
    return HeaderChatFormat(
        tokenizer, begin=(), start_header="<|im_start|>", end_header="\n", end_of_turn="<|im_end|>",
        after_header="", after_turn="\n", stops=("<|im_end|>",),
    )


def llama3_format(tokenizer) -> HeaderChatFormat:
    return HeaderChatFormat(
        tokenizer, begin=("<|begin_of_text|>",), start_header="<|start_header_id|>",
        end_header="<|end_header_id|>", end_of_turn="<|eot_id|>", after_header="\n\n", after_turn="",
        stops=("<|eot_id|>", "<|end_of_text|>"),
    )


def chat_format_for(tokenizer, name: Optional[str] = None):
    """The chat format a tokenizer's vocabulary implies (or `name`: 'llama2', 'llama3', 'chatml')."""
    formats = {"llama2": Llama2ChatFormat, "llama3": llama3_format, "chatml": chatml_format}
    if name is not None:
        if name not in formats:
            raise ValueError(f"unknown chat format {name!r}; choose one of {sorted(formats)}")
        return formats[name](tokenizer)
    special = getattr(tokenizer, "special_token_id", None)
    for marker, fmt in (("<|im_start|>", chatml_format), ("<|start_header_id|>", llama3_format)):
        if special is not None and _has_special(tokenizer, marker):
            return fmt(tokenizer)
    return Llama2ChatFormat(tokenizer)


def _has_special(tokenizer, text: str) -> bool:
    try:
        tokenizer.special_token_id(text)
    except (KeyError, ValueError):
        return False
    return True
