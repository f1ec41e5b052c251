"""The math of docs/ALGORITHM.md: no I/O, no imports from the rest of app. The deterministic core
of a step is one numba kernel (app.sampling.kernel), compiled on first use: `warm_up()`."""

from app.sampling.certify import model_logprob, uncertain_mass
from app.sampling.draw import make_generators, sample, top_logprobs
from app.sampling.mixing import mix, mix_step, validate_config, warm_up
from app.sampling.topk import topk_from_mapping
from app.sampling.types import (
    REASONS,
    MixConfig,
    Mixture,
    Reason,
    SamplingError,
    StepResult,
    TopK,
)

__all__ = [
    "REASONS",
    "MixConfig",
    "Mixture",
    "Reason",
    "SamplingError",
    "StepResult",
    "TopK",
    "make_generators",
    "mix",
    "mix_step",
    "model_logprob",
    "sample",
    "top_logprobs",
    "topk_from_mapping",
    "uncertain_mass",
    "validate_config",
    "warm_up",
]
