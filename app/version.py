"""The version of the running dual-vllm: one source for `dual-vllm --version`, `GET /version`
and the `dual_vllm_build_info` metric.

The installed distribution's metadata wins (what `pip install` recorded from pyproject.toml);
a source tree that is only on the path (no install) falls back to `app.__version__`, which a
test keeps equal to pyproject's version.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version

DISTRIBUTION = "dual-vllm"


def version() -> str:
    """The dual-vllm version, e.g. "0.1.0"."""
    try:
        return distribution_version(DISTRIBUTION)
    except PackageNotFoundError:
        from app import __version__

        return __version__
