"""Test doubles: a fake vLLM OpenAI server (ASGI) and helpers to serve it."""

from tests.fakes.vllm import (
    EOS_ID,
    EOS_TOKEN,
    IM_END_ID,
    IM_START_ID,
    VOCAB_SIZE,
    FakeVLLM,
    Faults,
    apply_chat_template,
    decode,
    encode,
    fake_pair,
    pair_transport,
    scripted,
    serve,
    serve_pair,
)

__all__ = [
    "EOS_ID",
    "EOS_TOKEN",
    "IM_END_ID",
    "IM_START_ID",
    "VOCAB_SIZE",
    "FakeVLLM",
    "Faults",
    "apply_chat_template",
    "decode",
    "encode",
    "fake_pair",
    "pair_transport",
    "scripted",
    "serve",
    "serve_pair",
]
