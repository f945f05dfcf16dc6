"""The OpenAI-compatible server: HTTP API (`app`), request parsing (`protocol`), chat
templates (`chat`), continuous batching (`scheduler`, `engine`), metrics, `lightlong serve`
(`server`). Needs the `serve` extra."""
