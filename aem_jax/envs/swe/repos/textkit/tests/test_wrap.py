import pytest

from textkit.wrap import indent, truncate, wrap


def test_truncate_short_text_unchanged():
    assert truncate("hello", 5) == "hello"


def test_truncate_long_text():
    assert truncate("hello world", 8) == "hello..."


def test_truncate_tiny_limit():
    assert truncate("hello world", 2) == ".."


def test_wrap_lines():
    assert wrap("the quick brown fox jumps", 10) == ["the quick", "brown fox", "jumps"]


def test_wrap_exact_width():
    assert wrap("ab cd", 5) == ["ab cd"]


def test_wrap_long_word():
    assert wrap("a abcdefghij b", 4) == ["a", "abcdefghij", "b"]


def test_wrap_bad_width():
    with pytest.raises(ValueError):
        wrap("x", 0)


def test_indent():
    assert indent(["a", "b"]) == ["    a", "    b"]


def test_indent_skip_first():
    assert indent(["a", "b"], prefix="> ", skip_first=True) == ["a", "> b"]
