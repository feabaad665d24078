"""flipback: a reverse proxy that makes shipping a new model version safe."""

__version__ = "0.1.0"
