"""The OpenAI-compatible API (/v1): the protocol's models, and the routes that serve them."""
