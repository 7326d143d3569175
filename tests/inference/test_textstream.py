"""TokenStream: text deltas, split characters and stop-string hold-back."""

from __future__ import annotations

from inferledger.inference.textstream import TokenStream


def byte_decode(ids: list[int]) -> str:
    """Each id is one byte, like a byte-level BPE in the worst case."""
    return bytes(ids).decode("utf-8", errors="replace")


def word_decoder(words: list[str]):
    return lambda ids: "".join(words[i] for i in ids)


def run(stream: TokenStream, ids: list[int]) -> list[tuple[int, str]]:
    out = []
    for token_id in ids:
        out += [(t.token_id, t.text) for t in stream.push(token_id)]
        if stream.stopped:
            return out
    return out + [(t.token_id, t.text) for t in stream.finish()]


def test_plain_tokens_pass_through_one_to_one():
    words = ["Hello", ",", " world", "!"]
    stream = TokenStream(word_decoder(words))
    assert stream.push(0)[0].text == "Hello"
    assert [t.text for t in stream.push(1)] == [","]
    assert run(stream, [2, 3]) == [(2, " world"), (3, "!")]


def test_multibyte_character_split_over_tokens_is_settled_on_the_last_byte():
    ids = list("a😀b".encode())  # 1 + 4 + 1 bytes
    stream = TokenStream(byte_decode)
    assert stream.push(ids[0])[0].text == "a"
    for byte in ids[1:4]:
        assert stream.push(byte) == []  # half a character: held
    released = stream.push(ids[4])
    assert [t.text for t in released] == ["", "", "", "😀"]
    assert [t.token_id for t in released] == ids[1:5]
    assert run(stream, ids[5:]) == [(ids[5], "b")]


def test_incomplete_character_at_the_end_is_flushed_with_the_last_token():
    ids = list("x😀".encode())[:-1]
    events = run(TokenStream(byte_decode), ids)
    assert [i for i, _ in events] == ids
    assert "".join(t for _, t in events) == byte_decode(ids)


def test_stop_string_spanning_tokens_is_held_then_dropped():
    words = ["Hi", " there", "\n", "\n", "never"]
    stream = TokenStream(word_decoder(words), stop=["\n\n"])
    assert [t.text for t in stream.push(0)] == ["Hi"]
    assert [t.text for t in stream.push(1)] == [" there"]
    assert stream.push(2) == []  # "\n" might start "\n\n"
    released = stream.push(3)
    assert stream.stopped
    assert [(t.token_id, t.text) for t in released] == [(2, ""), (3, "")]
    assert stream.finish() == []


def test_false_alarm_prefix_is_released_when_disproved():
    words = ["a", "\n", "b"]
    events = run(TokenStream(word_decoder(words), stop=["\n\n"]), [0, 1, 2])
    assert events == [(0, "a"), (1, "\n"), (2, "b")]


def test_stop_inside_a_token_keeps_the_text_before_it():
    words = ["The answer", " is 4. Done", " more"]
    events = run(TokenStream(word_decoder(words), stop=[". "]), [0, 1, 2])
    assert events == [(0, "The answer"), (1, " is 4")]


def test_earliest_of_several_stop_strings_wins():
    words = ["one two three"]
    events = run(TokenStream(word_decoder(words), stop=["three", "two"]), [0])
    assert events == [(0, "one ")]


def test_held_prefix_is_released_at_finish():
    words = ["x", "EN"]
    events = run(TokenStream(word_decoder(words), stop=["END"]), [0, 1])
    assert events == [(0, "x"), (1, "EN")]
