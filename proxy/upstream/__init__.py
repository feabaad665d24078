"""Talking to model servers: the lean HTTP/1.1 keep-alive pool of one upstream
(``pool``), its connections on asyncio protocols (``conn``) and the active health
probes that run through the pool (``health``).
"""
