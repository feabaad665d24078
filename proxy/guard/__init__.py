"""Quality guards (issue 17): catch a canary that answers 200 OK in the usual time, but
wrongly. Pure, synchronous and allocation-light, like the route's judge: output drift
(``drift``), delayed feedback (``feedback``), paired disagreement (``disagreement``),
and the arithmetic they share (``evidence``). Each reads as a ``proxy.rollout.judge``
judge does: ``observe...``, ``failing``, ``verdict()``, ``not_worse()``.
"""
