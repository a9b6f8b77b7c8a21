"""router.tokenizer: tokenizer choice, parity with mistral-common's chat format, text round trips."""

from pathlib import Path

import pytest
import tokenizers
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from router.tokenizer import ChatMessage, Tokenizer, TokenizerError, load_tokenizer

TEXT = "Grüße, 東京! Mixtral routes each token to 2 of 8 experts."
VOCAB_BY_NAME = {"mistral-v1": 32000, "mistral-v3": 32768}
VALID_NAMES = ("mistral-v1", "mistral-v2", "mistral-v3", "mistral-v7", "tekken", "hf")
CHAT = [
    ChatMessage("system", "Answer briefly."),
    ChatMessage("user", "Grüße, 東京?"),
    ChatMessage("assistant", "こんにちは, Grüße zurück."),
    ChatMessage("user", "Wie weit ist es nach Kyōto?"),
]


def reference(name: str) -> MistralTokenizer:
    """mistral-common's own tokenizer for `name`, built the way its docs show."""
    return MistralTokenizer.v1() if name == "mistral-v1" else MistralTokenizer.v3()


def reference_chat_tokens(name: str) -> list[int]:
    """CHAT encoded by mistral-common directly, with its own message classes."""
    request = ChatCompletionRequest(
        messages=[
            SystemMessage(content=CHAT[0].content),
            UserMessage(content=CHAT[1].content),
            AssistantMessage(content=CHAT[2].content),
            UserMessage(content=CHAT[3].content),
        ]
    )
    return reference(name).encode_chat_completion(request).tokens


@pytest.fixture(scope="module", params=sorted(VOCAB_BY_NAME))
def mistral(request: pytest.FixtureRequest) -> Tokenizer:
    """The auto-chosen tokenizer for Mixtral 8x7B (v1) and 8x22B (v3), no tokenizer.json present."""
    return load_tokenizer(None, VOCAB_BY_NAME[request.param])


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding a small byte-level BPE tokenizer.json trained on a few sentences."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(
        [TEXT, "the gate picks two experts per token", "experts run on remote servers"], trainer
    )
    model_dir = tmp_path_factory.mktemp("model")
    hf.save(str(model_dir / "tokenizer.json"))
    return model_dir


@pytest.mark.parametrize(("vocab_size", "name"), [(32000, "mistral-v1"), (32768, "mistral-v3")])
def test_auto_picks_mistral_tokenizer_from_vocab_size(vocab_size: int, name: str, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tmp_path, vocab_size)
    expected = reference(name).instruct_tokenizer.tokenizer.encode(TEXT, bos=True, eos=False)
    assert (tokenizer.name, tokenizer.vocab_size) == (name, vocab_size)
    assert tokenizer.encode(TEXT) == expected


@pytest.mark.parametrize("model_dir", [None, Path("no-such-model")])
def test_auto_with_unknown_vocab_size_says_how_to_fix(model_dir: Path | None) -> None:
    with pytest.raises(TokenizerError, match="12345") as info:
        load_tokenizer(model_dir, 12345)
    assert "tokenizer.json" in str(info.value)
    assert "mistral-v1" in str(info.value)


def test_chat_matches_mistral_common_exactly(mistral: Tokenizer) -> None:
    tokens = mistral.encode_chat(CHAT)
    assert tokens == reference_chat_tokens(mistral.name)
    assert tokens[0] == mistral.bos_id


def test_text_round_trips_with_bos(mistral: Tokenizer) -> None:
    with_bos = mistral.encode(TEXT)
    without_bos = mistral.encode(TEXT, add_bos=False)
    assert mistral.bos_id is not None and mistral.eos_id is not None
    assert with_bos == [mistral.bos_id, *without_bos]
    assert mistral.bos_id not in without_bos
    assert mistral.decode(with_bos) == TEXT
    assert mistral.decode([*with_bos, mistral.eos_id]) == TEXT


def test_tokenizer_json_is_picked_up_and_round_trips(tokenizer_json: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_json, 32000)
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_json / "tokenizer.json"))
    assert tokenizer.name == "tokenizer.json"
    assert tokenizer.vocab_size == raw.get_vocab_size()
    assert tokenizer.encode(TEXT) == [raw.token_to_id("<s>"), *raw.encode(TEXT).ids]
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert tokenizer.decode(tokenizer.encode("unseen: Ωμέγα 🙂", add_bos=False)) == "unseen: Ωμέγα 🙂"


def test_chat_uses_mistral_format_even_with_tokenizer_json(tokenizer_json: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_json, 32000)
    assert tokenizer.encode_chat(CHAT) == reference_chat_tokens("mistral-v1")


def test_tokenizer_json_larger_than_model_vocab_is_refused(tokenizer_json: Path) -> None:
    size = tokenizers.Tokenizer.from_file(str(tokenizer_json / "tokenizer.json")).get_vocab_size()
    with pytest.raises(TokenizerError, match=f"{size}.*{size - 1}"):
        load_tokenizer(tokenizer_json, size - 1)


def test_unreadable_tokenizer_json_raises_tokenizer_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path, 32000)


def test_hf_name_without_tokenizer_json_raises(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path, 32000, name="hf")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [ChatMessage("user", "hi"), ChatMessage("assistant", "hello")],
        [
            ChatMessage("user", "a"),
            ChatMessage("assistant", "b"),
            ChatMessage("system", "c"),
            ChatMessage("user", "d"),
        ],
        [ChatMessage("tool", "42")],
    ],
    ids=["empty", "ends-with-assistant", "system-after-assistant", "unknown-role"],
)
def test_bad_chat_raises_tokenizer_error(mistral: Tokenizer, messages: list[ChatMessage]) -> None:
    with pytest.raises(TokenizerError):
        mistral.encode_chat(messages)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(TokenizerError, match="mixtral-v9") as info:
        load_tokenizer(None, 32000, name="mixtral-v9")
    assert all(name in str(info.value) for name in VALID_NAMES)


@pytest.mark.parametrize(
    ("name", "vocab_size"), [("mistral-v2", 32768), ("mistral-v7", 32768), ("tekken", 131072)]
)
def test_explicit_name_loads_that_tokenizer(name: str, vocab_size: int) -> None:
    tokenizer = load_tokenizer(None, vocab_size, name=name)
    assert (tokenizer.name, tokenizer.vocab_size) == (name, vocab_size)
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_tokenizer_larger_than_model_vocab_is_refused_by_name() -> None:
    with pytest.raises(TokenizerError, match="131072"):
        load_tokenizer(None, 32000, name="tekken")
