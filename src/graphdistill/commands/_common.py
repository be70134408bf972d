"""Shared helpers for CLI commands: errors shown without a traceback, JSON output, a console."""

from __future__ import annotations

import json
import sys
from typing import Any


class CommandError(RuntimeError):
    """An error the CLI prints as one clear line (exit code 2), naming the input at fault."""


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)
