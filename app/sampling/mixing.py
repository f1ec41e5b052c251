"""One mixing step: align, temper, diagnose, trust region, α, q (docs/ALGORITHM.md §1–5).

`mix` is the deterministic part (q and the diagnostics, no randomness); `mix_step` adds the
draw (`app.sampling.draw.sample`). The math runs in one compiled kernel
(`app.sampling.kernel.mix_kernel`, numba); this module is its typed Python face: it validates
the options and the logprobs (NaN/+inf never reach the kernel), passes plain floats, ints,
bools and two contiguous arrays (so one compiled signature serves every call), and turns the
kernel's codes back into `Mixture`, reasons and `SamplingError`.

numba is imported and the kernel compiled (or loaded from numba's on-disk cache) on first use,
not at import: call `warm_up()` at start-up so the first request does not pay for it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from app.sampling.draw import sample
from app.sampling.shaping import MAX_BIAS, History, active, shape
from app.sampling.topk import POSITIVE_TOLERANCE
from app.sampling.types import REASONS, MixConfig, Mixture, SamplingError, StepResult, TopK

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
_NO_ALPHA = -1.0  # kernel.NO_ALPHA (kept here so this module imports without numba)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
_INT64 = np.dtype(np.int64)  # dtype objects are singletons: `is` beats `!= np.int64`
_FLOAT64 = np.dtype(np.float64)
_concatenate = np.concatenate
_ERRORS = {
    1: "negative token id in top-K logprobs",  # kernel.NEGATIVE_ID
    2: "duplicate token id in top-K logprobs",  # kernel.DUPLICATE_ID
}
_kernel: Callable[..., Any] | None = None  # kernel.mix_kernel once loaded


def _load_kernel() -> Callable[..., Any]:
    """Import the numba kernel (and numba) on first use."""
    global _kernel
    if _kernel is None:
        from app.sampling.kernel import mix_kernel

        _kernel = mix_kernel
    return _kernel


def warm_up() -> float:
    """Compile the kernel (or load it from numba's cache) now, with a step that goes through
    every compiled function; returns the seconds it took. Call once at start-up (the
    coordinator does) so the first request does not pay for the JIT."""
    start = time.perf_counter()
    base = TopK(ids=np.array([1, 2, 3], np.int64), logprobs=np.log(np.array([0.6, 0.3, 0.05])))
    teacher = TopK(ids=np.array([1, 2, 4], np.int64), logprobs=np.log(np.array([0.2, 0.5, 0.2])))
    config = MixConfig(trust_region_top_p=0.9, stability_check=False, top_k=2, top_p=0.9)
    mix_step(base, teacher, config, first_token=False, rng=np.random.default_rng(0))
    return time.perf_counter() - start


def validate_config(config: MixConfig) -> None:
    """Raise `SamplingError` for option values the math must not run with.

    Written as `not lo <= x <= hi` so NaN fails every check."""
    alpha = config.alpha
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise SamplingError("mixing.alpha must be in [0, 1] or null")
    rho = config.trust_region_top_p
    if rho is not None and not 0.0 < rho <= 1.0:
        raise SamplingError("mixing.trust_region_top_p must be in (0, 1] or null")
    if not 0.0 <= config.js_threshold <= math.inf:
        raise SamplingError("mixing.js_threshold must be >= 0")
    if not 0.0 <= config.overlap_threshold <= 1.0:
        raise SamplingError("mixing.overlap_threshold must be in [0, 1]")
    if not 0.0 <= config.temperature <= MAX_TEMPERATURE:
        raise SamplingError("temperature must be in [0, 2]")
    if not 0.0 < config.top_p <= 1.0:
        raise SamplingError("top_p must be in (0, 1]")
    if isinstance(config.top_k, bool) or not isinstance(config.top_k, int) or config.top_k < -1:
        raise SamplingError("top_k must be -1, 0 (off) or a positive integer")
    if not 0.0 <= config.min_p <= 1.0:
        raise SamplingError("min_p must be in [0, 1]")
    if not -2.0 <= config.presence_penalty <= 2.0:
        raise SamplingError("presence_penalty must be in [-2, 2]")
    if not -2.0 <= config.frequency_penalty <= 2.0:
        raise SamplingError("frequency_penalty must be in [-2, 2]")
    if not 0.0 < config.repetition_penalty < math.inf:
        raise SamplingError("repetition_penalty must be a finite number greater than zero")
    for token_id, bias in config.logit_bias:
        if token_id < 0 or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise SamplingError("logit_bias: ids must be >= 0 and biases in [-100, 100]")


def mix(
    base: TopK,
    teacher: TopK,
    config: MixConfig,
    *,
    first_token: bool,
    alpha_hint: float | None = None,
    history: History | None = None,
) -> Mixture:
    """q and the §6 diagnostics for one step, without drawing (see `Mixture`).

    `history` (the sequence's prompt and generated ids, the ids min_tokens holds back) is
    what §5a's penalties and min_tokens read; without it, or when the request sets none of
    §5a's transforms, the kernel's q is returned as it is.

    Definitions of the reported values:
    - `js`, `overlap_count`, `overlap_mass`: §3, on the tempered p_b, p_t over all of S.
    - `alpha`, `reason`: §4–5; `alpha` is None exactly when `reason == "single_token"`
      (which wins over every §5 rule: the nucleus leaves nothing to mix).
    - `kl_gap` = |KL(q_α‖p_b) − KL(q_α‖p_t)| = |g(α)| at the α used, on the trust-region
      support, before the request's top_p/top_k: ≤ 1e-9 when `reason == "solved"` (except
      where float64 cannot resolve it, see `kernel.solve`); for the other reasons it is the
      same quantity at the α the rule imposed; 0 for `single_token`.
    - `chernoff` = −log Σ p_b^(1−α) p_t^α at the α used, on the same support (0 for
      `single_token`); it is the Chernoff information C of §5 when `reason == "solved"`.
    - `filled_mass`: Σ of the final q over ids that at least one model did not return.
    - `logq`/`q`: after the request's top_k then top_p (vLLM's order), renormalized.
    - T = 0: §3–5 run at T = 1 and `greedy_token` = argmax q (ties: lowest id); `logq` is
      that T = 1 distribution (what OpenAI-style logprobs report for greedy decoding).
    """
    validate_config(config)
    if active(config, history):
        return _shaped(base, teacher, config, first_token, alpha_hint, history or History())
    return _kernel_mix(base, teacher, config, first_token, alpha_hint)


def _kernel_mix(
    base: TopK, teacher: TopK, config: MixConfig, first_token: bool, alpha_hint: float | None
) -> Mixture:
    """§1–5 and the request's top_k / top_p in the compiled kernel."""
    b_ids, b_logprobs = _checked(base, "base")
    t_ids, t_logprobs = _checked(teacher, "teacher")
    # Both models travel as one array (base first): contiguous int64/float64 whatever the
    # caller's views, so the kernel has one compiled signature.
    logprobs = _concatenate((b_logprobs, t_logprobs))
    kb = b_ids.shape[0]
    values: list[float] = logprobs.tolist()
    _check_values(values[:kb], "base")
    _check_values(values[kb:], "teacher")
    rho = config.trust_region_top_p
    alpha = config.alpha
    (status, support, logq, q, greedy_position, alpha, reason, js, overlap_count, overlap_mass,
     kl_gap, chernoff, filled_mass) = (_kernel or _load_kernel())(
        _concatenate((b_ids, t_ids)),
        logprobs,
        kb,
        float(config.temperature),
        1.0 if rho is None else float(rho),
        bool(config.force_first_token),
        bool(first_token),
        _NO_ALPHA if alpha is None else float(alpha),
        bool(config.stability_check),
        float(config.js_threshold),
        float(config.overlap_threshold),
        bool(config.auto_fallback),
        _NO_ALPHA if alpha_hint is None else float(alpha_hint),
        int(config.top_k),
        float(config.top_p),
    )  # fmt: skip
    if status:
        raise SamplingError(_ERRORS[status])
    return Mixture(
        support,
        logq,
        q,
        None if greedy_position < 0 else int(support[greedy_position]),
        None if alpha == _NO_ALPHA else alpha,
        REASONS[reason],
        js,
        overlap_count,
        overlap_mass,
        kl_gap,
        chernoff,
        filled_mass,
    )


def _shaped(
    base: TopK,
    teacher: TopK,
    config: MixConfig,
    first_token: bool,
    alpha_hint: float | None,
    history: History,
) -> Mixture:
    """§1–5 with the request's top_k / top_p held back, then §5a (which applies them after the
    penalties, vLLM's order). When min_tokens or a -100 bias removes every id the trust region
    kept (the teacher's nucleus is only EOS, say), the step is recomputed on all of S, without
    the trust region: those ids get q = 0 and the rest keep their §5 proportions."""
    plain = dataclasses.replace(config, top_k=0, top_p=1.0)
    mixture = _kernel_mix(base, teacher, plain, first_token, alpha_hint)
    try:
        return shape(mixture, config, history)
    except SamplingError:
        if config.trust_region_top_p is None:
            raise
    wide = dataclasses.replace(plain, trust_region_top_p=None)
    return shape(_kernel_mix(base, teacher, wide, first_token, alpha_hint), config, history)


def mix_step(
    base: TopK,
    teacher: TopK,
    config: MixConfig,
    *,
    first_token: bool,
    rng: np.random.Generator,
    alpha_hint: float | None = None,
    history: History | None = None,
) -> StepResult:
    """The full step: `mix` (§1–5) then the draw from q with `rng` (§5, §7).

    `alpha_hint` is the previous step's α of this sequence (a warm start for the solver only).
    The reported `logprob` is log q(token) of the distribution actually sampled from: after
    the trust region and the request's top_p/top_k (for T = 0 see `mix`).
    """
    mixture = mix(
        base, teacher, config, first_token=first_token, alpha_hint=alpha_hint, history=history
    )
    return sample(mixture, rng)


def _checked(topk: TopK, name: str) -> tuple[IntArray, FloatArray]:
    """The arrays of `topk`, checked for shape and dtype (callers may build a `TopK` directly);
    values are checked by `_check_values`, duplicate and negative ids by the alignment."""
    ids = topk.ids
    logprobs = topk.logprobs
    if ids.ndim != 1 or ids.shape != logprobs.shape or ids.shape[0] == 0:
        raise SamplingError(f"{name}: empty top-K or ids/logprobs of different shapes")
    if ids.dtype is not _INT64:
        if ids.dtype.kind not in "iu":
            raise SamplingError(f"{name}: token ids must be integers")
        ids = ids.astype(np.int64)
    if logprobs.dtype is not _FLOAT64:
        logprobs = logprobs.astype(np.float64)
    return ids, logprobs


def _check_values(values: list[float], name: str) -> None:
    """Refuse NaN, +inf and positive logprobs beyond float32 rounding (-inf and anything below
    -9999 are vLLM's clamp, which the kernel applies); builtins are cheaper than numpy on a
    few dozen floats."""
    total = sum(values)  # NaN if any NaN, +inf if any +inf (NaN if +inf and -inf)
    if total != total or total == math.inf:
        raise SamplingError(f"{name}: NaN or +inf logprob")
    top = max(values)
    if top > POSITIVE_TOLERANCE:
        raise SamplingError(f"{name}: positive logprob {top!r}")
