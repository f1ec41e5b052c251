"""pytest plugin: the two real CPU vLLM servers, once per session (owned by issue 2)."""
