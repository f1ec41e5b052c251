"""dual-vllm: sample from the Chernoff-optimal mixture of two vLLM models.

Nothing happens at import time: build the service with ``app.main.create_app`` and the
library entry point with ``app.coordinator.Coordinator``.
"""

__version__ = "0.1.0"
