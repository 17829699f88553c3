"""Generator role: a vLLM engine behind HTTP (token-level generation, OpenAI-compatible API, weight updates)."""
