"""app/textrelease.py: UTF-8 hold-back and the stop-string scan, without any upstream."""

from __future__ import annotations

import pytest

from app.textrelease import TextRelease, held_back


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("hello", ("lo!",), 2),
        ("hello", ("xyz",), 0),
        ("hello w", ("w", " wor"), 2),
        ("ab", ("abc", "b"), 2),
        ("", ("abc",), 0),
        ("abc", ("abc",), 0),  # a whole stop string is found, not held back
    ],
)
def test_held_back_is_the_longest_suffix_that_starts_a_stop(
    text: str, stops: tuple[str, ...], expected: int
) -> None:
    assert held_back(text, stops) == expected


def test_an_incomplete_character_is_held_back_until_it_completes() -> None:
    release = TextRelease()
    assert release.release("caf") == "caf"
    assert release.release("caf\ufffd") == ""  # the first byte of "é"
    assert release.release("café") == "é"
    assert release.flush("café!") == "!"
    assert release.released == len("café!")


def test_a_possible_stop_prefix_is_held_back_and_released_when_it_is_not_one() -> None:
    release = TextRelease(["END"])
    assert release.find_stop("abc E") is None
    assert release.release("abc E") == "abc "
    assert release.find_stop("abc EN") is None
    assert release.release("abc EN") == ""
    assert release.find_stop("abc ENx") is None
    assert release.release("abc ENx") == "ENx"


def test_a_stop_string_cuts_the_text_before_it() -> None:
    release = TextRelease(["END"])
    release.release("abc E")
    assert release.find_stop("abc END and more") == (4, "END")
    assert release.flush("abc END and more"[:4]) == ""  # "abc " was released already


def test_include_stop_str_keeps_the_stop_and_holds_nothing_back() -> None:
    release = TextRelease(["END"], include_stop=True)
    assert release.release("abc EN") == "abc EN"
    assert release.find_stop("abc END!") == (7, "END")


def test_the_earliest_stop_wins_and_the_scan_covers_a_stop_split_over_tokens() -> None:
    release = TextRelease(["xyz", "b c"])
    assert release.find_stop("a b") is None
    assert release.find_stop("a b cxyz") == (2, "b c")


def test_a_cut_never_takes_back_released_text() -> None:
    # With include_stop the text is released as it comes; a stop found later cuts after it.
    release = TextRelease(["lo"], include_stop=False)
    release.release("hel")
    assert release.find_stop("hello") == (3, "lo")
    release = TextRelease(["ab"], include_stop=False)
    release.released = 5  # as if more had been released than the cut
    assert release.find_stop("xxxab") == (5, "ab")


def test_empty_stop_strings_are_ignored() -> None:
    release = TextRelease(["", "end"])
    assert release.stops == ("end",)
    assert release.release("the en") == "the "
