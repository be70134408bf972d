"""User rules: ``fn(trace) -> bool | float``; a group is kept when the rule's value on the trace whose answer
was chosen is ``>= threshold`` (True counts as 1, False as 0).

Register in code with :func:`register_rule`, then select by name (``graphdistill filter --rule NAME``), or
name a function directly as ``package.module:attr`` or ``path/to/file.py:attr``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graphdistill.trace import Trace

RuleFn = Callable[[Trace], "bool | float"]


class RuleError(ValueError):
    """A rule name or spec that cannot be resolved; the message names it."""


@dataclass(frozen=True)
class Rule:
    name: str
    fn: RuleFn
    threshold: float = 0.5

    def keeps(self, trace: Trace) -> tuple[bool, float]:
        value = self.fn(trace)
        score = float(value)
        return score >= self.threshold, score


_REGISTRY: dict[str, Rule] = {}


def register_rule(name: str, fn: RuleFn, threshold: float = 0.5) -> Rule:
    """Register ``fn`` under ``name`` (replacing any earlier rule of that name)."""
    if not name or not callable(fn):
        raise RuleError(f"register_rule needs a name and a callable, got {name!r}, {fn!r}")
    rule = Rule(name, fn, threshold)
    _REGISTRY[name] = rule
    return rule


def registered_rules() -> dict[str, Rule]:
    return dict(_REGISTRY)


def unregister_rule(name: str) -> None:
    _REGISTRY.pop(name, None)


def load_rule(spec: str, threshold: float | None = None) -> Rule:
    """A registered rule by name, or a function from ``module:attr`` / ``file.py:attr``.

    A loaded module may itself call :func:`register_rule`; then ``module:NAME`` finds the rule by name."""
    if spec in _REGISTRY:
        rule = _REGISTRY[spec]
        return rule if threshold is None else Rule(rule.name, rule.fn, threshold)
    if ":" not in spec:
        known = ", ".join(sorted(_REGISTRY)) or "none registered"
        raise RuleError(
            f"rule {spec!r}: not a registered rule ({known}) and not a 'module:attr' or 'file.py:attr' spec"
        )
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise RuleError(f"rule {spec!r}: no such file {path}")
        mod_name = f"_graphdistill_rule_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise RuleError(f"rule {spec!r}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise RuleError(f"rule {spec!r}: importing {path} failed: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise RuleError(f"rule {spec!r}: cannot import module {target!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None and attr in _REGISTRY:
        rule = _REGISTRY[attr]
        return rule if threshold is None else Rule(rule.name, rule.fn, threshold)
    if isinstance(fn, Rule):
        return fn if threshold is None else Rule(fn.name, fn.fn, threshold)
    if not callable(fn):
        raise RuleError(f"rule {spec!r}: {target} has no callable {attr!r}")
    return Rule(spec, fn, 0.5 if threshold is None else threshold)
