"""The one base of every error graphdistill raises on purpose.

Each stage has its own class (``ImageError``, ``StoreError``, ``DatasetError``, ``BundleError``, ...), and
each also derives from the built-in it has always been (``ValueError`` for bad input, ``RuntimeError`` for a
state that went wrong), so ``except ValueError`` keeps working. Their messages name the input at fault and
what is wrong with it. ``except GraphdistillError`` catches them all: the command line does, once, and prints
the message in one line with exit code 2.
"""

from __future__ import annotations


class GraphdistillError(Exception):
    """An error graphdistill raises on purpose; the message names the input and what is wrong."""
