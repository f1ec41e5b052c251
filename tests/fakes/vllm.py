"""A fake vLLM OpenAI-compatible server: the endpoints the gateway uses, with fault knobs.

Shapes follow docs/VLLM_API.md (§1-§4); behaviour is deterministic so tests can
assert on values. Used in-process (`FakeVLLM.app` under `httpx.ASGITransport`, or
`pair_transport` for both upstreams behind one transport) and over real HTTP (`serve`,
`serve_pair`: a real uvicorn on a free 127.0.0.1 port in a background thread).

The tokenizer is byte-level: token id = UTF-8 byte + 3, after three special tokens
(0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>` = EOS, as in SmolLM2-Instruct). Special
token strings inside text are parsed as the special ids (as Hugging Face tokenizers do), and
multi-byte characters span several tokens, so partial UTF-8 shows up when decoding prefixes
(decoded as "\\ufffd", like vLLM's byte-fallback tokenizers).

Next-token distributions depend only on the prompt ids and the instance's role: "base" and
"teacher" share a component and each adds its own, so they overlap but differ. Letters and
spaces dominate (readable text), 2- and 3-byte characters (é, €) appear sometimes and are
always completed, and EOS becomes likely a few tokens after the last newline/special token
(`eos_after`), so generations end on their own.

Fault knobs live in `FakeVLLM.faults` (mutable at any time, also while serving in a thread):
latency, an error status from the N-th completion call on for M calls (an upstream dying
mid-generation, or recovering for retry tests), malformed bodies, K+1 entries, null entries,
/health status, a missing /tokenizer_info, a shifted tokenizer, and vLLM 0.32's
`logprob_token_ids` batch bug (`ids_batch_bug`, on by default as in the real server: a top-K
request that overlaps in time with a `logprob_token_ids` request is answered
`{sampled: lp, "token_id:0": -9999.0}`; `spoiled` counts them). Counters: `calls` per path,
`completions_started`, `completions_finished`, `completions_cancelled`, `in_flight` (requests),
`prompts_served` and `prompts_in_flight` (a batched request counts each of its prompts), and
the last request bodies in `requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np
import numpy.typing as npt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

# --- the tokenizer -------------------------------------------------------------------------

ENDOFTEXT_ID = 0
IM_START_ID = 1
IM_END_ID = 2
EOS_ID = IM_END_ID
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: dict[str, int] = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
SPECIAL_BY_ID: dict[int, str] = {v: k for k, v in SPECIAL_TOKENS.items()}
BYTE_OFFSET = 3
VOCAB_SIZE = BYTE_OFFSET + 256
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's, vllm/sampling_params.py


def encode(text: str, *, shift: int = 0) -> list[int]:
    """Text -> ids: special token strings become their ids, everything else UTF-8 bytes."""
    ids: list[int] = []
    i = 0
    while i < len(text):
        for token, token_id in SPECIAL_TOKENS.items():
            if text.startswith(token, i):
                ids.append(token_id)
                i += len(token)
                break
        else:
            ids.extend(b + BYTE_OFFSET + shift for b in text[i].encode("utf-8"))
            i += 1
    return ids


def decode(ids: Sequence[int]) -> str:
    """Ids -> text; incomplete UTF-8 sequences decode to "\\ufffd" (special tokens kept)."""
    out: list[str] = []
    buf = bytearray()
    for token_id in ids:
        if token_id in SPECIAL_BY_ID:
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            out.append(SPECIAL_BY_ID[token_id])
        else:
            buf.append(token_id - BYTE_OFFSET)
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def apply_chat_template(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    *,
    continue_final_message: bool = False,
    enable_thinking: bool = True,
) -> str:
    """ChatML, as SmolLM2-Instruct's template renders it (without the default system turn);
    a message `name` as `role name`; `enable_thinking: false` adds Qwen3's empty think block
    after the generation prompt; `continue_final_message` leaves the last turn open."""
    text = "".join(
        f"<|im_start|>{m['role']}{' ' + m['name'] if m.get('name') else ''}\n{m['content']}"
        "<|im_end|>\n"
        for m in messages
    )
    if continue_final_message:
        text = text.removesuffix("<|im_end|>\n")
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
        if not enable_thinking:
            text += "<think>\n\n</think>\n\n"
    return text


# --- next-token distributions --------------------------------------------------------------

# A distribution override: prompt ids -> logits over the vocabulary, or None for the default.
Distribution = Callable[[Sequence[int]], npt.NDArray[np.float64] | None]

_NEWLINE_ID = ord("\n") + BYTE_OFFSET


def _bias() -> npt.NDArray[np.float64]:
    bias = np.full(VOCAB_SIZE, -4.0)
    for ch in "abcdefghijklmnopqrstuvwxyz ":
        bias[ord(ch) + BYTE_OFFSET] = 4.0
    for ch in ".,!?":
        bias[ord(ch) + BYTE_OFFSET] = 1.5
    for ch in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        bias[ord(ch) + BYTE_OFFSET] = 0.5
    bias[_NEWLINE_ID] = -6.0
    bias[BYTE_OFFSET + 0x80 :] = -12.0  # stray continuation / lead bytes: rare
    bias[BYTE_OFFSET + 0xC3] = 0.5  # é and friends start here
    bias[BYTE_OFFSET + 0xE2] = -0.5  # € starts here
    bias[ENDOFTEXT_ID] = -15.0
    bias[IM_START_ID] = -15.0
    return bias


_BIAS = _bias()
# Forced continuations of multi-byte characters: (prefix bytes) -> next byte.
_UTF8_NEXT: dict[tuple[int, ...], tuple[int, ...]] = {
    (0xC3,): (0xA9, 0xA8, 0xA0),  # é è à
    (0xE2,): (0x82,),
    (0xE2, 0x82): (0xAC,),  # €
}


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def default_logits(
    prompt: Sequence[int], role: str, eos_after: int | None
) -> npt.NDArray[np.float64]:
    """The fake model: logits over the vocabulary for the next token after `prompt`."""
    tail = tuple(prompt[-3:])
    shared = np.random.default_rng(_seed("shared", tail)).normal(0.0, 1.5, VOCAB_SIZE)
    own = np.random.default_rng(_seed(role, tail)).normal(0.0, 1.0, VOCAB_SIZE)
    logits = _BIAS + shared + own
    # Finish a multi-byte character that was started.
    last_bytes = tuple(t - BYTE_OFFSET for t in prompt[-2:] if t >= BYTE_OFFSET)
    for width in (2, 1):
        key = last_bytes[-width:] if len(last_bytes) >= width else None
        if key is not None and key in _UTF8_NEXT:
            forced = np.full(VOCAB_SIZE, -25.0) + own * 0.1
            for b in _UTF8_NEXT[key]:
                forced[b + BYTE_OFFSET] = 5.0 + shared[b + BYTE_OFFSET]
            return forced
    # EOS grows with the number of tokens since the last newline or special token.
    since = 0
    for token_id in reversed(prompt):
        if token_id == _NEWLINE_ID or token_id < BYTE_OFFSET:
            break
        since += 1
    if eos_after is None:
        logits[EOS_ID] = -30.0
    else:
        logits[EOS_ID] = -8.0 + 1.5 * max(0, since - eos_after)
    return logits


def scripted(script: Sequence[int], *, then: int = EOS_ID) -> Distribution:
    """A distribution that continues with `script` (near-certainly), then `then`.

    The generated part is the longest suffix of the prompt that is a prefix of `script`, so
    choose prompts that do not end with script[0]. Near-certain = logprob ~0 for the scripted
    token and -30 for every other id.
    """
    script = list(script)

    def logits(prompt: Sequence[int]) -> npt.NDArray[np.float64]:
        done = 0
        for k in range(min(len(script), len(prompt)), 0, -1):
            if list(prompt[-k:]) == script[:k]:
                done = k
                break
        target = script[done] if done < len(script) else then
        out = np.full(VOCAB_SIZE, -30.0)
        out[target] = 10.0
        return out

    return logits


def log_softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = logits - np.max(logits)
    result: npt.NDArray[np.float64] = shifted - np.log(np.sum(np.exp(shifted)))
    return result


# --- fault knobs ---------------------------------------------------------------------------

Malformed = Literal["not_json", "no_choices", "no_logprobs", "bad_key", "bad_value"]


@dataclass
class Faults:
    """Mutable knobs; every field may be changed while the fake serves."""

    latency: float = 0.0  # seconds added to every /v1/completions call
    token_latency: float = 0.0  # seconds between a streamed completion's chunks
    stream_status: int | None = None  # streamed /v1/completions answer this status
    status: int | None = None  # /v1/completions answers this status (vLLM error body) ...
    status_after: int = 0  # ... from the call with this 0-based index on ...
    status_count: int | None = None  # ... for this many calls (None: forever)
    status_message: str = "injected failure"
    malformed: Malformed | None = None  # /v1/completions answers 200 with a broken body
    k_plus_one: bool = False  # prepend the (K+1)-th ranked id (vLLM's sampled-token-first)
    null_top_logprobs: bool = False  # top_logprobs: [null] (newer vLLM on odd positions)
    health_status: int = 200
    tokenizer_info: bool = True  # False: /tokenizer_info is 404 (endpoint not enabled)
    tokenize_shift: int = 0  # /tokenize ids shifted: this instance's tokenizer "differs"
    models_status: int = 200  # /v1/models status
    # A random fraction of /v1/completions calls fails (seeded by `fail_seed`): with a 500, or
    # with a reset connection (in process: httpx.ReadError; over uvicorn the app raises, so the
    # client sees a 500), or either ("mixed").
    fail_fraction: float = 0.0
    fail_kind: Literal["500", "reset", "mixed"] = "500"
    down: bool = False  # every endpoint refuses the connection (a killed replica)
    ids_batch_bug: bool = True  # vLLM 0.32: a top-K answer overlapping an ids request is spoiled


class ConnectionReset(Exception):
    """Raised by a fake to drop the connection (`pair_transport` maps it to httpx.ReadError)."""


class ConnectionRefused(Exception):
    """Raised by a fake that is `down` (`pair_transport` maps it to httpx.ConnectError)."""


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """vLLM's error body (§4.1): `code` is the int status."""
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    if status == 503:
        kind = "ServiceUnavailableError"
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class FakeVLLM:
    """One fake vLLM server; `app` is its ASGI application."""

    def __init__(
        self,
        role: str = "teacher",
        *,
        model: str | None = None,
        max_model_len: int = 2048,
        max_logprobs: int = 20,
        eos_after: int | None = 6,
        distribution: Distribution | None = None,
    ) -> None:
        self.role = role
        self.model = model or f"fake-{role}"
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.eos_after = eos_after
        self.distribution = distribution
        self.faults = Faults()
        self.calls: Counter[str] = Counter()
        self.completions_started = 0
        self.completions_finished = 0
        self.completions_cancelled = 0
        self.prompts_served = 0  # prompts over all /v1/completions calls (batches count each)
        self.prompts_in_flight = 0  # prompts of the /v1/completions calls in flight
        self.max_prompts_in_flight = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: deque[dict[str, Any]] = deque(maxlen=1000)
        self.chat_tokenize_bodies: deque[dict[str, Any]] = deque(maxlen=100)
        self.failures_injected = 0
        self.ids_in_flight = 0  # /v1/completions calls with logprob_token_ids in flight
        self.ids_started = 0
        self.spoiled = 0  # top-K answers spoiled by the ids batch bug
        self._random = random.Random(0)
        self.routes: ASGIApp = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/detokenize", self._detokenize, methods=["POST"]),
                Route("/tokenizer_info", self._tokenizer_info, methods=["GET"]),
            ]
        )

        self.app: ASGIApp = _Switch(self)  # the fake's ASGI application

    def seed_failures(self, seed: int) -> None:
        self._random = random.Random(seed)

    # --- the model ---------------------------------------------------------------------------

    def logprobs(self, prompt: Sequence[int]) -> npt.NDArray[np.float64]:
        """Full next-token log-probabilities (for tests that check the mixture)."""
        logits = self.distribution(prompt) if self.distribution is not None else None
        if logits is None:
            logits = default_logits(prompt, self.role, self.eos_after)
        return log_softmax(logits)

    def topk(self, prompt: Sequence[int], k: int) -> list[tuple[int, float]]:
        """Top-k (id, logprob), highest first, ties by lower id (what /v1/completions returns
        at temperature 0, before fault knobs)."""
        lp = self.logprobs(prompt)
        order = np.lexsort((np.arange(VOCAB_SIZE), -lp))[:k]
        return [(int(i), float(lp[i])) for i in order]

    # --- endpoints ---------------------------------------------------------------------------

    async def _health(self, request: Request) -> Response:
        self.calls["/health"] += 1
        return Response(status_code=self.faults.health_status)

    async def _models(self, request: Request) -> Response:
        self.calls["/v1/models"] += 1
        if self.faults.models_status != 200:
            return _error(self.faults.models_status, "injected /v1/models failure")
        card = {
            "id": self.model,
            "object": "model",
            "created": 0,
            "owned_by": "vllm",
            "root": f"/models/{self.model}",
            "parent": None,
            "max_model_len": self.max_model_len,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def _tokenizer_info(self, request: Request) -> Response:
        self.calls["/tokenizer_info"] += 1
        if not self.faults.tokenizer_info:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse(
            {
                "tokenizer_class": "FakeByteTokenizer",
                "eos_token": EOS_TOKEN,
                "bos_token": "<|im_start|>",
                "model_max_length": self.max_model_len,
                "added_tokens_decoder": {
                    str(i): {"content": s, "special": True} for i, s in SPECIAL_BY_ID.items()
                },
            }
        )

    async def _tokenize(self, request: Request) -> Response:
        self.calls["/tokenize"] += 1
        body = await request.json()
        if "messages" in body:
            self.chat_tokenize_bodies.append(body)
            if body.get("continue_final_message") and body.get("add_generation_prompt", True):
                return _error(
                    400,
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                )
            kwargs = body.get("chat_template_kwargs") or {}
            text = apply_chat_template(
                body["messages"],
                body.get("add_generation_prompt", True),
                continue_final_message=bool(body.get("continue_final_message")),
                enable_thinking=kwargs.get("enable_thinking", True),
            )
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return _error(400, "1 validation error: prompt must be a string")
        tokens = encode(text, shift=self.faults.tokenize_shift)
        return JSONResponse(
            {
                "count": len(tokens),
                "max_model_len": self.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    async def _detokenize(self, request: Request) -> Response:
        self.calls["/detokenize"] += 1
        body = await request.json()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return _error(400, "1 validation error: tokens must be a list of ints")
        if any(t < 0 or t >= VOCAB_SIZE for t in tokens):
            return _error(400, f"Token id out of vocabulary (size {VOCAB_SIZE})")
        return JSONResponse({"prompt": decode(tokens)})

    async def _completions(self, request: Request) -> Response:
        self.calls["/v1/completions"] += 1
        index = self.completions_started
        self.completions_started += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        prompts = 0
        with_ids = False
        try:
            body = await request.json()
            self.requests.append(body)
            prompts = len(batch_prompts(body))
            self.prompts_in_flight += prompts
            self.max_prompts_in_flight = max(self.max_prompts_in_flight, self.prompts_in_flight)
            with_ids = bool(body.get("logprob_token_ids"))
            if with_ids:
                self.ids_in_flight += 1
                self.ids_started += 1
            overlapped, ids_started = self.ids_in_flight > 0, self.ids_started
            if self.faults.latency > 0:
                await asyncio.sleep(self.faults.latency)
            overlapped = overlapped or self.ids_started != ids_started
            f = self.faults
            if f.fail_fraction > 0 and self._random.random() < f.fail_fraction:
                self.failures_injected += 1
                kind = f.fail_kind
                if kind == "mixed":
                    kind = self._random.choice(("500", "reset"))
                if kind == "reset":
                    raise ConnectionReset(f"fake {self.role} dropped the connection")
                return _error(500, "injected random failure")
            if body.get("stream") and f.stream_status is not None:
                return _error(f.stream_status, "injected stream failure")
            spoil = overlapped and not with_ids and self.faults.ids_batch_bug
            spoil = spoil and body.get("logprobs") is not None
            response = self._complete(body, index, spoil=spoil)
            self.completions_finished += 1
            if body.get("stream") and isinstance(response, JSONResponse):
                return self._stream(response)
            return response
        except asyncio.CancelledError:
            self.completions_cancelled += 1
            raise
        finally:
            self.in_flight -= 1
            self.prompts_in_flight -= prompts
            self.ids_in_flight -= with_ids

    def _stream(self, response: JSONResponse) -> Response:
        """vLLM's streamed completion: one SSE chunk per generated token (its id, logprob
        entries and text), a last chunk with the finish reason, then [DONE]."""
        completion = json.loads(bytes(response.body))
        choice = completion["choices"][0]
        logprobs = choice["logprobs"]

        async def frames() -> Any:
            ids = choice.pop("token_ids", None) or []
            count = len(logprobs["tokens"]) if logprobs else len(ids)
            for i in range(count):
                part: Any = None
                if logprobs is not None:
                    part = {
                        "text_offset": [i],
                        "token_logprobs": [logprobs["token_logprobs"][i]],
                        "tokens": [logprobs["tokens"][i]],
                        "top_logprobs": [logprobs["top_logprobs"][i]],
                    }
                chunk = {
                    "id": completion["id"],
                    "object": "text_completion",
                    "created": completion["created"],
                    "model": completion["model"],
                    "choices": [{"index": 0, "text": "", "logprobs": part, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(self.faults.token_latency)
            last = {
                "id": completion["id"],
                "object": "text_completion",
                "created": completion["created"],
                "model": completion["model"],
                "choices": [
                    {
                        "index": 0,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": choice["finish_reason"],
                        "stop_reason": choice["stop_reason"],
                    }
                ],
            }
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    def _complete(self, body: dict[str, Any], index: int, *, spoil: bool = False) -> Response:
        f = self.faults
        status, start, count = f.status, f.status_after, f.status_count
        if status is not None and start <= index and (count is None or index < start + count):
            return _error(status, f.status_message)
        if body.get("model") not in (None, "", self.model):
            return _error(404, f"The model `{body['model']}` does not exist.", "model")
        ids = body.get("logprob_token_ids")
        if ids and body.get("logprobs") is None:  # CompletionRequest.check_logprobs
            return _error(
                400,
                "when using `logprob_token_ids`, `logprobs` must be set. "
                "(parameter=logprob_token_ids)",
                "logprob_token_ids",
            )
        prompts = batch_prompts(body)
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                prompts[i] = prompt = encode(prompt)
            if not isinstance(prompt, list) or not prompt:
                return _error(400, "The decoder prompt cannot be empty")
            if not all(isinstance(t, int) for t in prompt):
                return _error(400, "1 validation error: prompt must be token ids or a string")
            if any(t < 0 for t in prompt):
                return _error(400, "1 validation error: Input should be greater than or equal to 0")
            if any(t >= VOCAB_SIZE for t in prompt):
                bad = next(t for t in prompt if t >= VOCAB_SIZE)
                return _error(400, f"Token id {bad} is out of vocabulary")
            if len(prompt) >= self.max_model_len:
                return _error(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your prompt contains {len(prompt)} input tokens, which exceeds "
                    "this limit even without any output tokens. Please reduce the length of the "
                    f"input prompt. (parameter=input_tokens, value={len(prompt)})",
                    "input_tokens",
                )
        # SamplingParams._validate_logprobs: with logprob_token_ids, `logprobs` is not passed on
        # (so not checked); -1 means the vocabulary size, on either side.
        k = None if ids else body.get("logprobs")
        limit = VOCAB_SIZE if self.max_logprobs == -1 else self.max_logprobs
        asked = VOCAB_SIZE if k == -1 else k
        if asked is not None and asked > limit:
            return _error(
                400,
                f"Requested sample logprobs of {asked}, which is greater than max allowed: "
                f"{limit} (parameter=logprobs, value={asked})",
                "logprobs",
            )
        if ids:
            if len(ids) > MAX_LOGPROB_TOKEN_IDS:
                return _error(
                    400,
                    f"Requested logprob_token_ids of length {len(ids)}, which is greater than "
                    f"max allowed: {MAX_LOGPROB_TOKEN_IDS} (parameter=logprob_token_ids, "
                    f"value={len(ids)})",
                    "logprob_token_ids",
                )
            invalid = [i for i in ids if i < 0 or i >= VOCAB_SIZE]
            if invalid:
                return _error(
                    400,
                    f"token_id(s) {invalid} in logprob_token_ids contain out-of-vocab token ids. "
                    f"Vocabulary size: {VOCAB_SIZE} (parameter=logprob_token_ids, "
                    f"value={invalid})",
                    "logprob_token_ids",
                )
        self.prompts_served += len(prompts)
        if f.malformed == "not_json":
            return PlainTextResponse("<html>502 Bad Gateway</html>", status_code=200)
        if spoil:
            self.spoiled += 1
        choices = [self._choice(body, prompt, i, spoil=spoil) for i, prompt in enumerate(prompts)]
        completion_tokens = sum(len(c.pop("_ids")) for c in choices)
        response = {
            "id": f"cmpl-fake-{self.completions_started}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [] if f.malformed == "no_choices" else choices,
            "system_fingerprint": "vllm-fake",
            "usage": {
                "prompt_tokens": sum(len(p) for p in prompts),
                "completion_tokens": completion_tokens,
                "total_tokens": sum(len(p) for p in prompts) + completion_tokens,
                "prompt_tokens_details": None,
            },
        }
        return JSONResponse(response)

    def _choice(
        self, body: dict[str, Any], prompt: list[int], index: int, *, spoil: bool = False
    ) -> dict[str, Any]:
        """One prompt's completion choice (the fake's generation loop). With
        `logprob_token_ids` each position holds the sampled id, then exactly those ids (vLLM
        0.32: they replace the top K; `logprobs` only has to be set)."""
        f = self.faults
        k = body.get("logprobs")
        ids = [int(i) for i in body.get("logprob_token_ids") or []]
        if k == -1:
            k = VOCAB_SIZE
        max_tokens = int(body.get("max_tokens") or 16)
        max_tokens = min(max_tokens, self.max_model_len - len(prompt))
        temperature = float(body.get("temperature", 1.0))
        top_k = body.get("top_k")
        rng = np.random.default_rng(body.get("seed"))
        stop_ids = set(body.get("stop_token_ids") or [])
        if not body.get("ignore_eos"):
            stop_ids.add(EOS_ID)
        context = list(prompt)
        out_ids: list[int] = []
        top_list: list[dict[str, float] | None] = []
        token_lps: list[float | None] = []
        finish = "length"
        stop_reason: int | None = None
        for _ in range(max_tokens):
            lp = self.logprobs(context)
            if temperature < 1e-5:
                chosen = int(np.lexsort((np.arange(VOCAB_SIZE), -lp))[0])
            else:
                scaled = lp / temperature
                if top_k is not None and 0 < top_k < VOCAB_SIZE:  # vLLM: ties at the cut kept
                    scaled = np.where(lp >= np.sort(lp)[-top_k], scaled, -np.inf)
                p = np.exp(log_softmax(scaled))
                chosen = int(rng.choice(VOCAB_SIZE, p=p))
            entries: dict[str, float] = {}
            if k is not None:
                order = [int(i) for i in np.lexsort((np.arange(VOCAB_SIZE), -lp))[: k + 1]]
                top = order[:k]
                first = chosen
                if f.k_plus_one:
                    first = order[k]
                entries[f"token_id:{first}"] = max(float(lp[first]), -9999.0)
                if spoil:  # vLLM's batch bug: the top K replaced by padding, id 0 at -inf
                    entries.setdefault("token_id:0", -9999.0)
                for i in [] if spoil else ids or top:
                    entries.setdefault(f"token_id:{i}", max(float(lp[i]), -9999.0))
            top_list.append(None if f.null_top_logprobs else entries)
            token_lps.append(None if f.null_top_logprobs else float(lp[chosen]))
            out_ids.append(chosen)
            context.append(chosen)
            if chosen in stop_ids:
                finish = "stop"
                stop_reason = None if chosen == EOS_ID else chosen
                break
        logprobs: Any = None
        if k is not None:
            logprobs = {
                "text_offset": list(range(len(out_ids))),
                "token_logprobs": token_lps,
                "tokens": [f"token_id:{i}" for i in out_ids],
                "top_logprobs": top_list,
            }
            if f.malformed == "no_logprobs":
                logprobs = None
            elif f.malformed == "bad_key" and top_list and top_list[0]:
                top_list[0] = {"the": -0.5, **top_list[0]}
            elif f.malformed == "bad_value" and top_list and top_list[0]:
                key = next(iter(top_list[0]))
                top_list[0][key] = "nan?"  # type: ignore[assignment]
        return {
            "index": index,
            "text": decode([i for i in out_ids if i != EOS_ID]),
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop_reason,
            "token_ids": out_ids if body.get("return_token_ids") else None,
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "_ids": out_ids,  # popped by the caller: the usage count
        }


class _Switch:
    """A fake's ASGI application: its routes, unless the fake is `down` (every connection is
    refused). A class with an async `__call__`, so uvicorn sees an ASGI 3 application."""

    def __init__(self, fake: FakeVLLM) -> None:
        self._fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._fake.faults.down:
            raise ConnectionRefused(f"fake {self._fake.role} is down")
        await self._fake.routes(scope, receive, send)


def batch_prompts(body: Mapping[str, Any]) -> list[Any]:
    """The prompts of a completions body: vLLM's batch form (a list of token-id lists or of
    strings) is one prompt each, answered by one choice each (index = position); one bad prompt
    fails the whole request. Anything else is one prompt."""
    raw = body.get("prompt")
    if isinstance(raw, list) and raw and isinstance(raw[0], list | str):
        return list(raw)
    return [raw]


def contexts(body: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """The token-id prompts of a completions body (batched or not), as tuples."""
    return [tuple(p) for p in batch_prompts(body) if isinstance(p, list)]


def fake_pair(**kwargs: Any) -> tuple[FakeVLLM, FakeVLLM]:
    """(base, teacher) fakes with the same tokenizer and different distributions."""
    return FakeVLLM("base", **kwargs), FakeVLLM("teacher", **kwargs)


# --- serving -------------------------------------------------------------------------------

BASE_URL = "http://base.fake"
TEACHER_URL = "http://teacher.fake"


def pair_transport(
    apps: Mapping[str, ASGIApp] | None = None,
    *,
    base: FakeVLLM | None = None,
    teacher: FakeVLLM | None = None,
) -> httpx.AsyncBaseTransport:
    """One in-process transport routing by origin: `{"http://base.fake": app, ...}`, or
    `base=`/`teacher=` fakes at BASE_URL/TEACHER_URL. Unknown origins get a ConnectError
    (an unreachable upstream)."""
    routes: dict[str, ASGIApp] = dict(apps or {})
    if base is not None:
        routes[BASE_URL] = base.app
    if teacher is not None:
        routes[TEACHER_URL] = teacher.app
    return _RoutingTransport(routes)


class _RoutingTransport(httpx.AsyncBaseTransport):
    def __init__(self, routes: Mapping[str, ASGIApp]) -> None:
        self._transports = {
            origin.rstrip("/"): httpx.ASGITransport(app=app) for origin, app in routes.items()
        }

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        transport = self._transports.get(origin)
        if transport is None:
            raise httpx.ConnectError(f"no fake at {origin}", request=request)
        try:
            return await transport.handle_async_request(request)
        except ConnectionReset as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
        except ConnectionRefused as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc


@contextlib.contextmanager
def serve(
    app: ASGIApp,
    *,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    lifespan: Literal["on", "off"] = "off",
    port: int = 0,
) -> Iterator[str]:
    """Serve `app` with a real uvicorn on a free port (or `port`) in a background thread;
    yields its URL. `lifespan="on"` for the gateway (its clients are built in the lifespan)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"fake-uvicorn-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@contextlib.contextmanager
def serve_pair(
    base: FakeVLLM | None = None, teacher: FakeVLLM | None = None
) -> Iterator[tuple[str, str, FakeVLLM, FakeVLLM]]:
    """Both fakes on real ports: yields (base_url, teacher_url, base, teacher)."""
    if base is None or teacher is None:
        default_base, default_teacher = fake_pair()
        base = base or default_base
        teacher = teacher or default_teacher
    with serve(base.app) as base_url, serve(teacher.app) as teacher_url:
        yield base_url, teacher_url, base, teacher


def dump(body: object) -> bytes:
    """JSON bytes as vLLM sends them (for respx-based tests that want realistic bodies)."""
    return json.dumps(body).encode()
