"""A route's rollout: the state machine that owns its live state (``machine``), the
immutable values of that state (``state``) and the pure functions that carry it over a
reload, a restart and the fleet (``carry``); the pick of an upstream for a request
(``pick``, with ``sticky`` session keys and ``pins``); and what each request records
(``lanes``, ``windows``) and is judged by (``rules``)."""
