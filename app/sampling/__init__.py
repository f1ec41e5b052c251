"""Pure numpy math of ALGORITHM.md: no I/O, no imports from the rest of app."""

from app.sampling.types import REASONS, MixConfig, Reason, SamplingError, StepResult, TopK

__all__ = ["REASONS", "MixConfig", "Reason", "SamplingError", "StepResult", "TopK"]
