"""LLM telemetry (issue 18), pure and synchronous: the reader that follows one OpenAI-style
response as it streams to the client (``reader``), the per-lane sliding figures it feeds
(``window``) and the rollback rules judged on them (``rules``). No I/O here: the handler
feeds bytes and timestamps, the rollout machine reads figures and acts on trips.
"""
