"""``flipback run --workers N``: N processes on one listener (SO_REUSEPORT) under one
parent. The parent (``supervisor``) starts and restarts the workers, watches the config,
drains, and serves the one admin API (``admin``, merging with ``merge``). Route state and
sticky pins follow one ordered stream of actions: through Redis when ``state.redis`` is
set (the fleet link, as between replicas), otherwise through the parent's ``hub``, which
keeps them the way Redis would, reached by each worker's ``link`` over a local
``channel``.
"""
