"""One version everywhere: pyproject.toml, `dual-vllm --version`, `GET /version`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

import app
from app.cli import main
from app.main import create_app
from app.settings import Settings
from app.version import version

ROOT = Path(__file__).resolve().parent.parent


def pyproject_version() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: str = project["version"]
    return found


def test_the_fallback_version_is_pyproject_version() -> None:
    # app.__version__ is what a source tree that is not installed reports.
    assert app.__version__ == pyproject_version()
    assert version() == pyproject_version()


def test_version_falls_back_without_installed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import PackageNotFoundError

    import app.version

    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr(app.version, "distribution_version", missing)
    assert app.version.version() == app.__version__


def test_cli_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"dual-vllm {pyproject_version()}\n"


def test_python_m_app_prints_the_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"dual-vllm {pyproject_version()}\n"


async def test_get_version_needs_no_key_and_no_upstream() -> None:
    # No lifespan: nothing reaches an upstream, and /version still answers.
    settings = Settings(
        base_url=["http://127.0.0.1:9"], teacher_url=["http://127.0.0.1:9"], api_keys=["k"]
    )
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/version")
        assert response.status_code == 200
        assert response.json() == {"version": pyproject_version()}
        # The API key still guards /v1/* (the route did not open anything else).
        assert (await client.get("/v1/models")).status_code == 401
