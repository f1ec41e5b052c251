"""`dual-vllm generate --help`: every default stated once (the parser appends defaults itself)."""

from __future__ import annotations

import pytest

from app.cli import main as cli_main


def _help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> list[str]:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: a help text is never wrapped
    with pytest.raises(SystemExit) as exited:
        cli_main(["generate", "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out.splitlines()


def test_help_states_each_default_at_most_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _help(monkeypatch, capsys)
    doubled = [line for line in lines if line.count("(default") > 1]
    assert not doubled
    assert not [line for line in lines if "(default: None)" in line]
    # The help texts that name their default keep their own wording.
    assert any("file format (default: from the suffix)" in line for line in lines)
    assert any(line.endswith("samples are recorded as failed (default: exit 1)") for line in lines)


def test_help_shows_the_defaults_of_generation_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "\n".join(_help(monkeypatch, capsys))
    for default in ("(default: 256)", "(default: 8)", "(default: 3)", "(default: 32)"):
        assert default in text
