"""`dual-vllm generate --help` and `run-batch --help`: every option explained, every default
stated once (the parser appends defaults itself) and none that says nothing."""

from __future__ import annotations

import pytest

from app.cli import main as cli_main


def _help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str = "generate"
) -> list[str]:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: a help text is never wrapped
    with pytest.raises(SystemExit) as exited:
        cli_main([command, "--help"])
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


@pytest.mark.parametrize("command", ["generate", "run-batch"])
def test_every_option_has_a_help_text_and_no_empty_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    lines = _help(monkeypatch, capsys, command)
    # An option's help follows it on its line ("  --flag X   help") or on the next,
    # indented further; an option line with neither is an option without a help text.
    bare = [
        line
        for line, after in zip(lines, [*lines[1:], ""], strict=True)
        if line.startswith("  -")
        and "  " not in line.strip()
        and not (after.startswith("     ") and after.strip())
    ]
    assert not bare
    for noise in ("(default: None)", "(default: False)", "(default: [])", "SUPPRESS"):
        assert not [line for line in lines if noise in line]
    assert not [line for line in lines if line.count("(default") > 1]
