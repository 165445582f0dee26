"""Reading Ollama's NDJSON lines: tokens, tool calls, the final counters, and what is not a part."""

from __future__ import annotations

import pytest

from chat_svc.parts import LineError, Part, ToolCallPart, parse_line


def test_a_token_line_is_a_part_without_counters() -> None:
    line = b'{"model":"m","message":{"role":"assistant","content":" hi"},"done":false}\n'
    assert parse_line(line) == Part(content=" hi")
    assert parse_line(b"  \n") is None


def test_the_final_line_carries_the_counters_and_ignores_nonsense_in_them() -> None:
    line = (
        b'{"message":{"content":""},"done":true,"done_reason":"length","prompt_eval_count":12,'
        b'"eval_count":4,"eval_duration":5,"total_duration":true,"load_duration":-3}'
    )
    assert parse_line(line) == Part(
        done=True, done_reason="length", prompt_eval_count=12, eval_count=4, eval_duration=5
    )


def test_tool_calls_with_object_or_string_arguments() -> None:
    line = (
        b'{"message":{"content":"","tool_calls":['
        b'{"function":{"index":0,"name":"query","arguments":{"q":"up"}}},'
        b'{"function":{"name":"list","arguments":"{\\"limit\\": 5}"}},'
        b'{"function":{"name":"bad","arguments":"not json"}},'
        b'{"nofunction":1}, 7]},"done":false}'
    )
    part = parse_line(line)
    assert part is not None
    assert part.tool_calls == (
        ToolCallPart("query", {"q": "up"}),
        ToolCallPart("list", {"limit": 5}),
        ToolCallPart("bad", {}),
    )
    assert parse_line(b'{"message":{"tool_calls":"x"}}') == Part()


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b'{"error":"CUDA out of memory"}', "CUDA out of memory"),
        (b"{not json", "malformed line"),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_what_is_not_a_part_is_an_error_naming_it(line: bytes, words: str) -> None:
    with pytest.raises(LineError) as caught:
        parse_line(line)
    assert words in caught.value.message


def test_a_message_that_is_not_an_object_carries_nothing() -> None:
    assert parse_line(b'{"message":"hi","done":false}') == Part()
