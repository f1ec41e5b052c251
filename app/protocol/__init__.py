"""The OpenAI wire format, named as OpenAI / vLLM name it, and our extensions beside it.

`requests`: the request models, their shape checks and their mapping to the engine's
`GenerationParams` (checks against the settings are app/plan.py's). `responses`: the response
models (bodies and stream chunks); app/render/ fills them. Everything is re-exported here, so
callers write `protocol.CompletionRequest`, `protocol.CompletionResponse`.
"""

from app.protocol.requests import (
    MAX_LOGPROBS,
    MAX_STOP_STRINGS,
    ChatCompletionContentPartText,
    ChatCompletionMessageParam,
    ChatCompletionRequest,
    CompletionRequest,
    MixingOptions,
    OpenAIBaseModel,
    PromptInput,
    StreamOptions,
    TokenId,
    prompt_count,
)
from app.protocol.responses import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    DeltaMessage,
    Diagnostics,
    DiagnosticsSummary,
    ModelCard,
    ModelList,
    UsageInfo,
)

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STOP_STRINGS",
    "ChatCompletionContentPartText",
    "ChatCompletionLogProb",
    "ChatCompletionLogProbs",
    "ChatCompletionLogProbsContent",
    "ChatCompletionMessageParam",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionResponseChoice",
    "ChatCompletionResponseStreamChoice",
    "ChatCompletionStreamResponse",
    "ChatMessage",
    "CompletionLogProbs",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionResponseChoice",
    "CompletionStreamResponse",
    "DeltaMessage",
    "Diagnostics",
    "DiagnosticsSummary",
    "MixingOptions",
    "ModelCard",
    "ModelList",
    "OpenAIBaseModel",
    "PromptInput",
    "StreamOptions",
    "TokenId",
    "UsageInfo",
    "prompt_count",
]
