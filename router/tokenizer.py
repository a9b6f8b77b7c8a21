"""The model's tokenizer: text and chat requests to token ids and back, for the gating service.

Two backends sit behind one `Tokenizer`: a Hugging Face `tokenizer.json` (via `tokenizers`) or a tokenizer
shipped inside `mistral-common`. Chat requests are always formatted by mistral-common's instruct tokenizer,
so prompts match what Mistral's reference inference feeds the model.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

import mistral_common
import tokenizers
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import Tokenizer as MistralTextTokenizer
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

logger = logging.getLogger(__name__)

_Mistral: TypeAlias = MistralTokenizer[Any, Any, Any, Any, Any]

# Files inside mistral_common/data/, so loading never touches the network.
_MISTRAL_FILES: Mapping[str, str] = MappingProxyType(
    {
        "mistral-v1": "tokenizer.model.v1",
        "mistral-v2": "mistral_instruct_tokenizer_240216.model.v2",
        "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",
        "mistral-v7": "mistral_instruct_tokenizer_241114.model.v7",
        "tekken": "tekken_240911.json",
    }
)
# Mixtral 8x7B uses the v1 SentencePiece vocabulary, Mixtral 8x22B the v3 one.
_MISTRAL_BY_VOCAB: Mapping[int, str] = MappingProxyType({32000: "mistral-v1", 32768: "mistral-v3"})
_HF_NAME = "hf"
_HF_FILE = "tokenizer.json"
_VALID_NAMES = (*_MISTRAL_FILES, _HF_NAME)
_CHAT_ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """A tokenizer could not be loaded or a request could not be tokenized because of its input."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a chat request; `role` is "system", "user" or "assistant"."""

    role: str
    content: str


class Tokenizer:
    """Text <-> token ids for one model; chat requests go through mistral-common's instruct format."""

    def __init__(self, name: str, chat: _Mistral | None, hf: tokenizers.Tokenizer | None = None) -> None:
        """Wrap `hf` for plain text if given, else `chat`; `chat` (if any) formats chat requests."""
        if hf is None and chat is None:
            raise ValueError("Tokenizer needs a tokenizer.json or a mistral-common tokenizer")
        self._name = name
        self._chat = chat
        self._hf = hf

    @property
    def name(self) -> str:
        """Which tokenizer this is: "tokenizer.json" or a mistral-common name such as "mistral-v1"."""
        return self._name

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, special tokens included."""
        if self._hf is not None:
            return self._hf.get_vocab_size(with_added_tokens=True)
        return self._mistral_text().n_words

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None if the tokenizer has none."""
        if self._hf is not None:
            return self._hf.token_to_id("<s>")
        return self._mistral_text().bos_id

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None if the tokenizer has none."""
        if self._hf is not None:
            return self._hf.token_to_id("</s>")
        return self._mistral_text().eos_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of plain `text`, starting with BOS when `add_bos` and the tokenizer has one."""
        if self._hf is None:
            return list(self._mistral_text().encode(text, bos=add_bos, eos=False))
        ids = self._hf.encode(text, add_special_tokens=False).ids
        bos_id = self.bos_id
        return [bos_id, *ids] if add_bos and bos_id is not None else ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, leaving out special tokens such as BOS and EOS."""
        if self._hf is not None:
            return self._hf.decode(list(token_ids), skip_special_tokens=True)
        return self._mistral_text().decode(list(token_ids))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Token ids of a chat prompt, exactly as mistral-common's `encode_chat_completion` makes them."""
        if self._chat is None:
            raise TokenizerError(
                f"no chat format is known for tokenizer {self._name!r}: chat needs a model vocabulary of "
                f"{' or '.join(map(str, _MISTRAL_BY_VOCAB))} tokens (Mixtral 8x7B or 8x22B)"
            )
        request = ChatCompletionRequest(messages=[_to_mistral_message(m) for m in messages])
        try:
            return list(self._chat.encode_chat_completion(request).tokens)
        except MistralCommonException as exc:
            raise TokenizerError(
                f"mistral-common rejected the chat request: {exc}. Send at least one message, start with "
                "a system or user message and end with a user message"
            ) from exc

    def _mistral_text(self) -> MistralTextTokenizer:
        """The raw mistral-common tokenizer (SentencePiece or Tekken) used for plain text."""
        assert self._chat is not None  # __init__ guarantees one backend
        return self._chat.instruct_tokenizer.tokenizer


def load_tokenizer(model_dir: Path | None, vocab_size: int, name: str | None = None) -> Tokenizer:
    """Load the tokenizer for a model with `vocab_size` embeddings; `name` None picks one automatically.

    Auto: `model_dir/tokenizer.json` if present, else mistral-common's v1 (32000) or v3 (32768) tokenizer.
    """
    hf_path = model_dir / _HF_FILE if model_dir is not None else None
    if name is None:
        has_hf = hf_path is not None and hf_path.is_file()
        name = _HF_NAME if has_hf else _mistral_name_for_vocab(vocab_size)
    if name == _HF_NAME:
        tokenizer = _load_hf(hf_path, vocab_size)
    elif name in _MISTRAL_FILES:
        tokenizer = Tokenizer(name, _load_mistral(name))
    else:
        raise TokenizerError(f"unknown tokenizer name {name!r}; valid names: {', '.join(_VALID_NAMES)}")
    _check_fits_model(tokenizer, vocab_size)
    logger.info(
        "loaded tokenizer %s (%d tokens) for a model with %d",
        tokenizer.name,
        tokenizer.vocab_size,
        vocab_size,
    )
    return tokenizer


def _mistral_name_for_vocab(vocab_size: int) -> str:
    """The mistral-common tokenizer of the Mixtral model with this vocabulary size."""
    if vocab_size not in _MISTRAL_BY_VOCAB:
        raise TokenizerError(
            f"no built-in tokenizer matches vocab_size {vocab_size} (known: 32000 for Mixtral 8x7B, 32768 "
            f"for 8x22B): put the model's {_HF_FILE} in the model directory or pass a tokenizer name, "
            f"one of {', '.join(_VALID_NAMES)}"
        )
    return _MISTRAL_BY_VOCAB[vocab_size]


def _load_mistral(name: str) -> _Mistral:
    """One of the tokenizers that ship inside the installed mistral-common package."""
    path = Path(mistral_common.__file__).parent / "data" / _MISTRAL_FILES[name]
    return MistralTokenizer.from_file(path, mode=ValidationMode.test)


def _load_hf(path: Path | None, vocab_size: int) -> Tokenizer:
    """A tokenizer.json for plain text, with the matching mistral-common tokenizer (if any) for chat."""
    if path is None or not path.is_file():
        raise TokenizerError(f"tokenizer 'hf' needs {_HF_FILE} in the model directory, not found: {path}")
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises bare Exception for every parse failure
        raise TokenizerError(
            f"cannot read {path} ({exc}): replace it with the model's own {_HF_FILE}"
        ) from exc
    chat_name = _MISTRAL_BY_VOCAB.get(vocab_size)
    return Tokenizer(_HF_FILE, _load_mistral(chat_name) if chat_name else None, hf)


def _check_fits_model(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer that can emit ids beyond the model's embedding table."""
    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}: use the tokenizer that belongs to this model"
        )


def _to_mistral_message(message: ChatMessage) -> SystemMessage | UserMessage | AssistantMessage:
    """mistral-common's message object for one chat turn."""
    match message.role:
        case "system":
            return SystemMessage(content=message.content)
        case "user":
            return UserMessage(content=message.content)
        case "assistant":
            return AssistantMessage(content=message.content)
    raise TokenizerError(f"unknown chat role {message.role!r}; use one of {', '.join(_CHAT_ROLES)}")
