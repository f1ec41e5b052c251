"""All configuration, from environment variables prefixed ``DUAL_VLLM_`` (see README.md).

One class, validated once at start. The mixing defaults are flat fields (``DUAL_VLLM_ALPHA``,
``DUAL_VLLM_TRUST_REGION_TOP_P``, ...) because README.md names them that way; ``mixing_defaults()``
groups them for the math.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.generation import Speculative
from app.options import DEFAULTS, SpeculativeOptions
from app.sampling.types import MixConfig


def _split_csv(value: object) -> object:
    """`a, b,c` -> ["a", "b", "c"]; lists pass through (tests build Settings directly)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUAL_VLLM_", extra="ignore", frozen=True)

    # --- upstreams -------------------------------------------------------------------------
    base_url: Annotated[list[str], NoDecode] = Field(
        description="base-model vLLM server(s); several = replicas of the same model"
    )
    teacher_url: Annotated[list[str], NoDecode] = Field(description="teacher vLLM server(s)")
    base_model: str | None = Field(None, description="served model name; None = /v1/models")
    teacher_model: str | None = None
    top_k: int = Field(20, ge=1, le=1024, description="logprobs K asked of each upstream")
    tokenizer: str | None = Field(
        None,
        description="the teacher's tokenizer.json (or its model folder) for decoding text in "
        "process; None = the teacher's /detokenize",
    )
    eos_token_ids: Annotated[list[int] | None, NoDecode] = Field(
        None, description="teacher EOS ids; None = discovered from the teacher at start"
    )

    # --- the gateway -----------------------------------------------------------------------
    model_name: str = "dual-vllm"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_concurrent_requests: int = Field(64, ge=1, description="beyond this: the wait queue")
    queue_timeout: float = Field(
        5.0, ge=0, description="seconds a request may wait for a slot before its 429"
    )
    max_queued_requests: int = Field(256, ge=0, description="requests waiting at most")
    docs_enabled: bool = Field(True, description="serve /docs, /redoc and /openapi.json")
    max_concurrent_sequences: int = Field(
        64, ge=1, description="sequences generating at once across all requests"
    )
    max_n: int = Field(64, ge=1, description="largest n (x prompts) one request may ask for")
    stream_keepalive_seconds: float = Field(15.0, gt=0)
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="largest request body; beyond it: 413"
    )
    shutdown_grace: float = Field(
        100.0,
        ge=0,
        description="seconds in-flight requests may take to finish after SIGTERM (the k8s "
        "manifests' terminationGracePeriodSeconds is 120)",
    )
    startup_timeout: float | None = Field(
        None,
        ge=0,
        description="seconds to wait for the upstreams to answer at start; None = forever",
    )

    # --- upstream HTTP ---------------------------------------------------------------------
    upstream_connect_timeout: float = Field(5.0, gt=0)
    upstream_read_timeout: float = Field(60.0, gt=0)
    upstream_max_connections: int = Field(256, ge=1)
    upstream_retries: int = Field(
        2, ge=0, le=10, description="retries per upstream call (5xx, resets, timeouts)"
    )
    upstream_retry_deadline: float = Field(
        30.0, gt=0, description="no retry starts later than this after the call began (s)"
    )
    replica_eject_seconds: float = Field(
        1.0, gt=0, description="first ejection of a failing replica (doubles per failure)"
    )
    replica_eject_max_seconds: float = Field(30.0, gt=0, description="longest ejection")
    upstream_batch_probes: bool = Field(
        True, description="coalesce concurrent probes to one replica into one request"
    )
    upstream_max_batch: int = Field(128, ge=1, description="most prompts in one batched probe")

    # --- the base model's rendering of chat messages (no chat template of its own) ----------
    base_system_format: str = "{content}\n\n"
    base_user_format: str = "Question: {content}\nAnswer:"
    base_assistant_format: str = " {content}\n\n"

    # --- defaults of every mixing option (README.md `mixing.*`, docs/ALGORITHM.md) ---------
    # (the values themselves are MixConfig's defaults, app/options.py)
    alpha: float | None = Field(DEFAULTS.alpha, ge=0.0, le=1.0)
    force_first_token: bool = DEFAULTS.force_first_token
    trust_region_top_p: float | None = Field(DEFAULTS.trust_region_top_p, gt=0.0, le=1.0)
    stability_check: bool = DEFAULTS.stability_check
    js_threshold: float = Field(DEFAULTS.js_threshold, ge=0.0)
    overlap_threshold: float = Field(DEFAULTS.overlap_threshold, ge=0.0, le=1.0)
    auto_fallback: bool = DEFAULTS.auto_fallback
    speculative: SpeculativeOptions | None = Field(
        None,
        description='speculative rounds by default (JSON, e.g. {"k": "auto", "drafter": '
        '"auto"}); None = token by token',
    )
    max_uncertain_mass: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="default of mixing.max_uncertain_mass (docs/ALGORITHM.md §9); None = off",
    )
    diagnostics: bool = False

    @field_validator("base_url", "teacher_url", "api_keys", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # compose passes unset variables as ""

    @field_validator("eos_token_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            return [int(part) for part in value.split(",") if part.strip()] or None
        return value

    @field_validator("base_url", "teacher_url")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one URL is required")
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return [url.rstrip("/") for url in value]

    @model_validator(mode="after")
    def _formats(self) -> Settings:
        for name in ("base_system_format", "base_user_format", "base_assistant_format"):
            template = getattr(self, name)
            try:
                template.format(content="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{name} must use only the {{content}} field: {exc}") from exc
        return self

    def speculative_default(self) -> Speculative | None:
        """The server-wide default of `mixing.speculative`."""
        return None if self.speculative is None else self.speculative.params()

    def mixing_defaults(self) -> MixConfig:
        """The server-wide defaults of the per-request `mixing` options."""
        return MixConfig(
            alpha=self.alpha,
            force_first_token=self.force_first_token,
            trust_region_top_p=self.trust_region_top_p,
            stability_check=self.stability_check,
            js_threshold=self.js_threshold,
            overlap_threshold=self.overlap_threshold,
            auto_fallback=self.auto_fallback,
        )
