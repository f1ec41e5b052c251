"""Shared fixtures. The real-vLLM fixtures live in tests/real_vllm.py (a pytest plugin)."""

pytest_plugins = ["tests.real_vllm"]
