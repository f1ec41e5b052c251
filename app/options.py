"""The mixing options: their defaults, the presets, and how a request or a job resolves them.

One owner for the HTTP API, the batch job and library callers:

- the defaults are `MixConfig`'s own field defaults (app/sampling/types.py), written once;
  `Settings` (the server's defaults, `DUAL_VLLM_*`) and the "balanced" preset read them here;
- `resolve_mixing()` applies, in order, the server's defaults, the preset, the explicitly set
  options and the request's OpenAI sampling fields.

Presets hold full values, so a preset means the same thing on every deployment whatever the
server's defaults; explicit options override it. A preset never sets alpha.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from app.generation import MAX_DRAFT_TOKENS, Drafter, Speculative
from app.sampling.types import MixConfig

Preset = Literal["balanced", "conservative", "explore", "fast"]

# The MixConfig fields set through `mixing` (docs/ALGORITHM.md §3-5).
MIX_OPTIONS: Final = (
    "alpha",
    "force_first_token",
    "trust_region_top_p",
    "stability_check",
    "js_threshold",
    "overlap_threshold",
    "auto_fallback",
)

DEFAULTS: Final = MixConfig()

_BALANCED: Final[dict[str, Any]] = {
    name: getattr(DEFAULTS, name) for name in MIX_OPTIONS if name != "alpha"
}

# balanced = the recommended defaults; conservative leans on the teacher; explore turns off
# first-token forcing, the trust region and the stability check.
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
        # balanced's law, drawn in speculative rounds (SPECULATIVE_PRESETS): same output
        # distribution, fewer upstream round trips per token.
        "fast": MappingProxyType(_BALANCED),
    }
)

# What a preset says about speculative rounds (docs/ALGORITHM.md §8). Rounds never change the
# output law, only its cost, so the other presets keep the server's setting.
SPECULATIVE_PRESETS: Final[MappingProxyType[str, Speculative]] = MappingProxyType(
    {"fast": Speculative(k=None, drafter="auto")}
)


class SpeculativeOptions(BaseModel):
    """`mixing.speculative` (and DUAL_VLLM_SPECULATIVE, as JSON): `k` drafted tokens per round
    or "auto" (adapted to the acceptance), and the drafter ("auto": the model closer to q)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k: Annotated[StrictInt, Field(ge=1, le=MAX_DRAFT_TOKENS)] | Literal["auto"] = Field(
        "auto", description="drafted tokens per round, or auto"
    )
    drafter: Drafter = "auto"

    def params(self) -> Speculative:
        return Speculative(k=None if self.k == "auto" else self.k, drafter=self.drafter)


def resolve_speculative(
    default: Speculative | None,
    preset: str | None,
    explicit: SpeculativeOptions | None,
    is_set: bool,
) -> Speculative | None:
    """The server's setting, then the preset's, then the request's (an explicit null: off)."""
    if is_set:
        return None if explicit is None else explicit.params()
    if preset is not None and preset in SPECULATIVE_PRESETS:
        return SPECULATIVE_PRESETS[preset]
    return default


def resolve_mixing(
    defaults: MixConfig,
    preset: str | None,
    explicit: Mapping[str, Any],
    **sampling: Any,
) -> MixConfig:
    """`defaults` (the server's), then the preset, then the `explicit` mixing options (only
    the names in MIX_OPTIONS are read), then the OpenAI sampling fields (`temperature`,
    `top_p`, `top_k`)."""
    values: dict[str, Any] = dict(PRESETS[preset]) if preset is not None else {}
    values.update({name: value for name, value in explicit.items() if name in MIX_OPTIONS})
    values.update(sampling)
    return dataclasses.replace(defaults, **values)
