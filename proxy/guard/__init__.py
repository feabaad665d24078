"""Quality guards (issue 17): catch a canary that answers 200 OK in the usual time, but
wrongly. Pure, synchronous and allocation-light, like the route's judge: output drift
(``drift``), delayed feedback (``feedback``), paired disagreement (``disagreement``),
the arithmetic they share (``evidence``), and one route's set of them (``route``). Each
guard reads as a ``proxy.rollout.judge`` judge does: ``observe...``, ``failing``,
``verdict()``, ``not_worse()``.
"""
