"""router.detokenizer.Detokenizer with the real mistral-v1 tokenizer (Mixtral 8x7B's SentencePiece vocabulary).

The contract: deltas (add, then flush) concatenate to decode(all ids); a character spread over byte-fallback
tokens arrives whole; a stop string cuts the text exactly where it starts, and nothing at or after that
point is ever released, even when the stop string spans tokens; text held back as a possible start of a
stop string is released by flush when no stop string completes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.detokenizer import REPLACEMENT, Detokenizer
from router.tokenizer import Tokenizer, load_tokenizer

BYTE_TOKENS = range(3, 259)  # <0x00> ... <0xFF>
SPACE = 28705  # "▁" alone


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(None, 32000)


def stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], str, Detokenizer]:
    """Feed ids one by one: the deltas of add(), the flush() text, and the detokenizer."""
    detok = Detokenizer(tokenizer, stop)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False)


def test_deltas_concatenate_to_the_decoded_text(tokenizer: Tokenizer) -> None:
    ids = encode(tokenizer, "Mixtral routes each token to two of its eight experts, then sums their outputs.")
    deltas, tail, detok = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == detok.text
    assert tail == ""  # nothing is held back without stop strings or an incomplete character
    assert sum(bool(d) for d in deltas) >= len(ids) - 1  # streamed as it comes, not at the end


@pytest.mark.parametrize("text", ["🤖🦀", "鬱 and 龘", "music 𝄞 notes", "Tokyo 東京 🙂 ok", "naïve café ✓"])
def test_multi_byte_characters_arrive_whole(tokenizer: Tokenizer, text: str) -> None:
    ids = encode(tokenizer, text)
    if any(ch in text for ch in "🤖鬱𝄞"):  # these go through byte-fallback tokens, several per character
        assert sum(i in BYTE_TOKENS for i in ids) >= 3
    deltas, tail, _ = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert all(REPLACEMENT not in d for d in [*deltas, tail]), deltas
    assert REPLACEMENT not in tokenizer.decode(ids)


def test_a_four_byte_character_is_released_with_its_last_byte(tokenizer: Tokenizer) -> None:
    ids = encode(tokenizer, "a🤖")
    first_byte = next(k for k, i in enumerate(ids) if i in BYTE_TOKENS)
    deltas, _, _ = stream(tokenizer, ids)
    # Nothing while the bytes of 🤖 arrive, then the whole character with the fourth byte.
    assert deltas[first_byte:first_byte + 3] == ["", "", ""]
    assert deltas[first_byte + 3].endswith("🤖")


def test_invalid_bytes_stay_replacement_characters_where_the_whole_decode_has_them(tokenizer: Tokenizer) -> None:
    # A lone lead byte and a lone continuation byte, between words: the decoder shows U+FFFD for each,
    # and the deltas show them at the same places (not earlier, not more).
    ids = [*encode(tokenizer, "ab"), 3 + 0xE6, *encode(tokenizer, "cd"), 3 + 0x9D, *encode(tokenizer, "ef")]
    deltas, tail, _ = stream(tokenizer, ids)
    decoded = tokenizer.decode(ids)
    assert REPLACEMENT in decoded
    assert "".join(deltas) + tail == decoded


def test_an_incomplete_character_at_the_end_is_released_by_flush(tokenizer: Tokenizer) -> None:
    ids = [*encode(tokenizer, "x"), 3 + 0xF0, 3 + 0x9F]  # the first two bytes of a 4-byte character
    deltas, tail, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "x"
    assert tail == tokenizer.decode(ids)[1:] and REPLACEMENT in tail


@pytest.mark.parametrize(("text", "stop", "cut"), [
    ("Hello world, stop here please", ("stop",), "Hello world, "),
    ("Hello world, stop here please", ("lo wo",), "Hel"),  # across the boundary of "Hello" and "▁world"
    ("Hello world, stop here please", ("ld, st",), "Hello wor"),
    ("Hello world, stop here please", ("please", "world"), "Hello "),  # the earliest of several
    ("one 🤖 two", ("🤖",), "one "),  # a stop string made of byte-fallback tokens
    ("one 🤖 two", ("🤖 t",), "one "),
    ("aaab", ("aab",), "a"),  # overlapping prefixes of the stop string
    ("Hello world", ("",), "Hello world"),  # an empty stop string is ignored
])
def test_stop_strings_cut_exactly_and_nothing_inside_or_after_is_released(tokenizer: Tokenizer, text: str,
                                                                        stop: tuple[str, ...], cut: str) -> None:
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids) == text
    detok = Detokenizer(tokenizer, stop)
    released = ""
    for token in ids:
        released += detok.add(token)
        assert cut.startswith(released), (released, cut)  # never a character at or after the stop string
        assert detok.text == released
    released += detok.flush()
    assert released == cut
    assert detok.stopped == any(s and s in text for s in stop)


def test_after_a_stop_nothing_more_is_released(tokenizer: Tokenizer) -> None:
    detok = Detokenizer(tokenizer, ("world",))
    released = "".join(detok.add(i) for i in encode(tokenizer, "Hello world"))
    assert detok.stopped and released == "Hello "
    more = encode(tokenizer, " and more text")
    assert [detok.add(i) for i in more] == [""] * len(more)
    assert detok.flush() == "" and detok.text == "Hello "


def test_flush_releases_text_held_back_as_a_possible_stop_string_start(tokenizer: Tokenizer) -> None:
    ids = encode(tokenizer, "the last word is sto")
    deltas, tail, detok = stream(tokenizer, ids, ("stop",))
    assert "".join(deltas) == "the last word is "  # "sto" may begin "stop": held back
    assert tail == "sto" and not detok.stopped
    assert detok.text == "the last word is sto"


def test_held_back_text_is_released_as_soon_as_it_cannot_start_the_stop_string(tokenizer: Tokenizer) -> None:
    ids = encode(tokenizer, "sto sta")
    detok = Detokenizer(tokenizer, ("stop",))
    first = detok.add(ids[0])  # "sto"
    assert first == ""
    rest = "".join(detok.add(i) for i in ids[1:])
    assert rest == "sto sta" and detok.flush() == ""  # "sta" cannot begin "stop"


# --- properties over random token ids and texts ----------------------------------------------------------

CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters=REPLACEMENT)
TOKEN = st.one_of(st.sampled_from(BYTE_TOKENS), st.integers(259, 31999), st.just(SPACE), st.sampled_from([0, 1, 2]))


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(TOKEN, max_size=40))
def test_any_token_ids_stream_to_their_decoded_text(tokenizer: Tokenizer, ids: list[int]) -> None:
    deltas, tail, detok = stream(tokenizer, ids)
    decoded = tokenizer.decode(ids)
    assert "".join(deltas) + tail == decoded == detok.text
    # A delta never ends inside a character (a U+FFFD at its end could be a character still arriving);
    # any U+FFFD inside is one the whole text has at that place, since the deltas add up to it.
    assert not any(d.endswith(REPLACEMENT) for d in deltas)


@settings(max_examples=150, deadline=None)
@given(text=st.text(CHARACTERS, max_size=40),
       data=st.data())
def test_any_text_streams_without_split_characters_and_stops_at_the_first_completed_stop_string(
        tokenizer: Tokenizer, text: str, data: st.DataObject) -> None:
    ids = encode(tokenizer, text)
    decoded = tokenizer.decode(ids)
    # Stop strings: pieces of the decoded text (so they occur) and arbitrary short strings.
    pieces = st.builds(lambda a, n: decoded[a:a + n], st.integers(0, max(0, len(decoded) - 1)), st.integers(1, 6))
    stop = tuple(data.draw(st.lists(pieces | st.text(CHARACTERS, max_size=3), max_size=3)))
    # The text ends where the first stop string to complete (token by token, whole characters only) begins.
    cut, hits = decoded, []
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k])
        if prefix.endswith(REPLACEMENT):
            continue  # a character still arriving: the client never sees this prefix
        hits = [prefix.find(s) for s in stop if s and s in prefix]
        if hits:
            cut = prefix[:min(hits)]
            break
    detok = Detokenizer(tokenizer, stop)
    released = ""
    for token in ids:
        delta = detok.add(token)
        assert REPLACEMENT not in delta or REPLACEMENT in decoded
        released += delta
        assert cut.startswith(released)
    released += detok.flush()
    assert released == cut
    assert detok.stopped == bool(hits)
