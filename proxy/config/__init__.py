"""The configuration: the frozen dataclasses a config file becomes (``model``), the
YAML reader that keeps line numbers (``yamlnodes``), the per-field value parsers
(``values``), the schema of every section (``schema``) and the parser that ties them
together and summarises a config for ``flipback check`` (``parser``). Pure: no
asyncio, no aiohttp, and nothing here imports the serving side.
"""
