"""``flipback demo``: a self-contained run against toy model servers that shows a bad
canary being flipped back. ``main`` is the entry point, ``script`` the acts,
``models`` the toy servers and load, ``probes`` and ``watch`` what it observes,
``report``, ``view`` and ``screen`` what it prints. Not used when serving.
"""
