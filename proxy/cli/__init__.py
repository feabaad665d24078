"""The ``flipback`` command: argument parsing and dispatch (``main``, the only place
exit codes come from), the client of the admin API (``admin_client``), the
``flipback status`` table and watch view (``status_table``) and the bodies of the
admin verbs (``commands``).
"""

from proxy.cli.main import main

__all__ = ["main"]  # the console script: flipback = "proxy.cli:main"
