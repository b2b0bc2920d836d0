"""`hybrid-engine chat` reads whatever is typed: bytes that are not valid UTF-8 become U+FFFD, said once on
stderr, never a UnicodeDecodeError."""

from __future__ import annotations

import io

import pytest
from demo_models import save_demo_llama

from hybrid_engine.commands.chat import chat_loop, read_line
from hybrid_engine.commands.main import main

NOTE = "not valid utf-8"


def stdin(data: bytes) -> io.TextIOWrapper:
    """A UTF-8 text stream over `data`, as sys.stdin is over a terminal or a pipe."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_demo_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_read_line_replaces_undecodable_bytes_and_says_so():
    stream = stdin(b"caf\xe9 au lait\nna\xc3\xafve\n")
    assert read_line(stream) == ("caf\ufffd au lait\n", True)
    assert read_line(stream) == ("na\u00efve\n", False)  # valid UTF-8 is read as it is
    assert read_line(stream) == ("", False)
    assert read_line(io.StringIO("text\n")) == ("text\n", False)  # a text stream has nothing to decode


def test_the_loop_answers_lines_with_bad_bytes_and_notes_it_once(capsys):
    seen = []

    def respond(messages):
        seen.append(messages[-1]["content"])
        return "ok"

    assert chat_loop(respond, False, stdin(b"a\xff b\nfine\n\xfe\xfe\nexit\n")) == 0
    assert seen == ["a\ufffd b", "fine", "\ufffd\ufffd"]
    captured = capsys.readouterr()
    assert captured.out.split() == ["ok", "ok", "ok"]
    assert captured.err.lower().count(NOTE) == 1 and "U+FFFD" in captured.err


def test_chat_answers_a_non_utf8_line(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", stdin(b"tell me about a \xff fox\n\xc3\x28\n"))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert len([line for line in captured.out.splitlines() if line.strip()]) == 2
    assert captured.err.lower().count(NOTE) == 1
