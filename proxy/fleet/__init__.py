"""Replicas sharing state through Redis: the link that owns the client and the
rollout sync (``link``), the shared sticky-pin table (``pins``), the key names and
record formats (``state``) and the background writer that batches writes
(``writer``).
"""
