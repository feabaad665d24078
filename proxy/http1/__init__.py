"""The data-plane HTTP/1.1 server on asyncio protocols and llhttp (httptools), no
framework: one client connection's bytes, limits, timers and pipelining (``protocol``),
the lean request and its flow-controlled body (``request``), the response bytes
(``response``) and the listening socket with the drain (``listener``). The admin API
stays on aiohttp.
"""
