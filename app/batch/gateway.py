"""`generate --gateway URL`: the samples through a deployed gateway over HTTP.

Instead of talking to the two vLLM servers (app.coordinator), each sample is one
non-streaming request to the gateway: `/v1/chat/completions` with the teacher's messages, or
`/v1/completions` with the teacher's text (`--teacher-template`), and in both cases the base
text as `base_prompt`. The body carries everything the in-process job would use: the
sample's seed, max_tokens, stop strings and ids, ignore_eos, temperature/top_p/top_k, and
every mixing option fully resolved (plus `top_k`, the K asked of each upstream), so the
gateway's own defaults play no part and the same job gives the same tokens either way.
`mixing.diagnostics: true`, `return_token_ids` and log q per token (`logprobs`) are always
asked: they rebuild the per-step values the record's summary (and `--diagnostics`) need.

What HTTP does not carry: the prompt token ids (`prompt_token_ids` is null, and
`usage.base_prompt_tokens` is null), each step's support size (null in `diagnostics`) and the
per-token released text (`token_text` is left out). `models` names the gateway's model.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from app.batch.job import PromptSpec
from app.batch.records import SampleOutput
from app.errors import UpstreamError
from app.generation import GenerationParams
from app.options import MIX_OPTIONS
from app.sampling.types import DRAFT_NAMES, StepResult
from app.upstream import StartupError

_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_EMPTY_LOGQ = np.zeros(0, dtype=np.float64)


class GatewayAnswerError(UpstreamError):
    """The gateway answered with an error: its status and message, as they came."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message, upstream="gateway", param=param)
        self._status = status

    @property
    def status(self) -> int:
        return self._status


def request_body(spec: PromptSpec, params: GenerationParams) -> tuple[str, dict[str, Any]]:
    """(path, body) of one sample's request: what the in-process job would generate with."""
    mix = params.mixing
    mixing: dict[str, Any] = {name: getattr(mix, name) for name in MIX_OPTIONS}
    if params.top_k_upstream is not None:
        mixing["top_k"] = params.top_k_upstream
    mixing["diagnostics"] = True
    mixing["max_uncertain_mass"] = params.max_uncertain_mass
    rounds = params.speculative
    mixing["speculative"] = (
        None if rounds is None else {"k": rounds.k or "auto", "drafter": rounds.drafter}
    )
    body: dict[str, Any] = {
        "max_tokens": params.max_tokens,
        "n": 1,
        "seed": params.seed,
        "temperature": mix.temperature,
        "top_p": mix.top_p,
        "top_k": mix.top_k,
        "ignore_eos": params.ignore_eos,
        "return_token_ids": True,
        "mixing": mixing,
        "base_prompt": spec.base_text,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if spec.teacher_messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in spec.teacher_messages]
        body.update(logprobs=True, top_logprobs=0)
        return "/v1/chat/completions", body
    body.update(prompt=spec.teacher_text or "", logprobs=0)
    return "/v1/completions", body


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _steps(choice: dict[str, Any], chat: bool) -> list[StepResult]:
    diag = choice["diagnostics"]
    logprobs = choice.get("logprobs") or {}
    if chat:
        values = [entry["logprob"] for entry in logprobs.get("content") or []]
    else:
        values = list(logprobs.get("token_logprobs") or [])
    ids = diag["token_ids"]
    values = (values + [None] * len(ids))[: len(ids)]
    return [
        StepResult(
            token_id=int(ids[i]),
            logprob=_float(values[i]),
            alpha=diag["alpha"][i],
            reason=diag["reason"][i],
            js=_float(diag["js"][i]),
            overlap_count=int(diag["overlap_count"][i]),
            overlap_mass=_float(diag["overlap_mass"][i]),
            kl_gap=_float(diag["kl_gap"][i]),
            chernoff=_float(diag["chernoff"][i]),
            support_size=-1,  # not in the API's diagnostics: the record shows null
            filled_mass=_float(diag["filled_mass"][i]),
            support=_EMPTY_IDS,
            logq=_EMPTY_LOGQ,
            draft=DRAFT_NAMES.index(_column(diag, "draft", i)),
            uncertain_mass=_column(diag, "uncertain_mass", i),
            base_logprob=_column(diag, "base_logprob", i),
            teacher_logprob=_column(diag, "teacher_logprob", i),
            base_exact=_column(diag, "base_logprob_exact", i),
            teacher_exact=_column(diag, "teacher_logprob_exact", i),
            certified=_column(diag, "certified", i),
            refetches=_column(diag, "refetches", i) or 0,
        )
        for i in range(len(ids))
    ]


def _column(diag: dict[str, Any], name: str, i: int) -> Any:
    """A per-token diagnostics value a gateway may not send (an older one): None then."""
    values = diag.get(name)
    return values[i] if values is not None else None


def parse_response(answer: dict[str, Any], chat: bool) -> SampleOutput:
    (choice,) = answer["choices"]
    usage = answer.get("usage") or {}
    steps = _steps(choice, chat)
    return SampleOutput(
        text=choice["message"]["content"] if chat else choice["text"],
        token_ids=list(choice.get("token_ids") or [s.token_id for s in steps]),
        finish_reason=choice["finish_reason"],
        stop_reason=choice.get("stop_reason"),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", len(steps))),
        steps=steps,
        support_known=False,
    )


def _error(response: httpx.Response) -> GatewayAnswerError:
    try:
        error = response.json()["error"]
        message, param = str(error["message"]), error.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = response.text[:500] or response.reason_phrase, None
    return GatewayAnswerError(response.status_code, f"gateway: {message}", param=param)


class GatewayBackend:
    """`async with GatewayBackend(url, api_key) as gateway: await gateway.sample(...)`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )
        self.model_names: dict[str, str | None] = {"gateway": None}

    async def __aenter__(self) -> GatewayBackend:
        """Checks the gateway answers and accepts the key (GET /v1/models)."""
        try:
            response = await self._client.get("/v1/models")
        except httpx.HTTPError as exc:
            await self._client.aclose()
            raise StartupError(f"the gateway at {self.url} does not answer: {exc!r}") from exc
        if response.status_code != 200:
            await self._client.aclose()
            hint = (
                " (pass --api-key or set DUAL_VLLM_API_KEY)" if response.status_code == 401 else ""
            )
            raise StartupError(
                f"the gateway at {self.url} answered GET /v1/models with "
                f"{response.status_code}: {_error(response).message}{hint}"
            )
        data = response.json().get("data") or [{}]
        self.model_names["gateway"] = data[0].get("id")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def sample(self, spec: PromptSpec, params: GenerationParams) -> SampleOutput:
        path, body = request_body(spec, params)
        response = await self._client.post(path, json=body)
        if response.status_code != 200:
            raise _error(response)
        try:
            return parse_response(response.json(), chat=path.endswith("chat/completions"))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise GatewayAnswerError(502, f"gateway: unexpected response body ({exc!r})") from exc
