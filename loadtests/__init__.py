"""Load-test harness for flipback (not part of the installed package)."""
