"""API.md's `mixing.preset` values and the mixing options a request or a job may set.

One table for the HTTP API and the batch job. Presets hold full values, so a preset means the
same thing on every deployment whatever the server's defaults; explicit options override it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Final, Literal

Preset = Literal["balanced", "conservative", "explore"]

# The MixConfig fields set through `mixing` (ALGORITHM.md §3-5).
MIX_OPTIONS: Final = (
    "alpha",
    "force_first_token",
    "trust_region_top_p",
    "stability_check",
    "js_threshold",
    "overlap_threshold",
    "auto_fallback",
)

_BALANCED: Final[dict[str, Any]] = {
    "force_first_token": True,
    "trust_region_top_p": 0.95,
    "stability_check": True,
    "js_threshold": 0.5,
    "overlap_threshold": 0.1,
    "auto_fallback": True,
}

# balanced = the recommended defaults; conservative leans on the teacher; explore turns off
# first-token forcing, the trust region and the stability check. A preset never sets alpha.
PRESETS: Final[MappingProxyType[str, MappingProxyType[str, Any]]] = MappingProxyType(
    {
        "balanced": MappingProxyType(_BALANCED),
        "conservative": MappingProxyType(
            {
                **_BALANCED,
                "trust_region_top_p": 0.90,
                "js_threshold": 0.4,
                "overlap_threshold": 0.15,
            }
        ),
        "explore": MappingProxyType(
            {
                **_BALANCED,
                "force_first_token": False,
                "trust_region_top_p": None,
                "stability_check": False,
            }
        ),
    }
)
