"""Composition root: the ``sohoa`` command line and the one-machine demo (imports edge and central)."""
