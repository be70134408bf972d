"""User code named on the command line or in a config: ``package.module`` or ``path/to/file.py``.

One loader for every place that takes such a name (graph specs, filter rules), so both accept the same
forms and fail with the same clear messages.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from graphdistill.errors import GraphdistillError


def looks_like_file(target: str) -> bool:
    """A path (ends in .py or holds a separator) rather than a dotted module name."""
    return target.endswith(".py") or "/" in target or "\\" in target


def import_user_module(target: str, what: str, error: type[GraphdistillError]) -> ModuleType:
    """The module ``target`` names: a dotted module name, or a Python file imported once per process (a
    second call returns the same module, so what it registers at import is registered once). Any failure is
    ``error`` with a message that starts with ``what`` (e.g. ``"graph spec 'x.py:g'"``) and says why."""
    if looks_like_file(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise error(f"{what}: no such file {path}")
        name = "graphdistill_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise error(f"{what}: cannot import {path} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise error(f"{what}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        raise error(f"{what}: no module named {target!r} ({exc})") from exc
    except Exception as exc:
        raise error(f"{what}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
