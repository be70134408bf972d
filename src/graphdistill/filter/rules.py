"""User rules: ``fn(trace) -> bool | float``; a group is kept when the rule's value on the trace whose answer
was chosen is ``>= threshold`` (True counts as 1, False as 0).

``graphdistill filter --rule SPEC`` accepts:

- ``NAME``: a rule registered with :func:`register_rule` in this process, or, in a fresh process (the CLI),
  found by name through
  - the ``graphdistill.rules`` entry-point group of an installed package
    (``[project.entry-points."graphdistill.rules"] NAME = "pkg.module:fn"``), or
  - the modules / ``.py`` files listed, comma-separated, in ``$GRAPHDISTILL_RULES``: each is imported, and
    ``NAME`` is a rule one of them registered or a function (or :class:`Rule`) one of them defines;
- ``package.module:attr`` or ``path/to/file.py:attr``: that function directly.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

from graphdistill._user_code import import_user_module
from graphdistill.errors import GraphdistillError
from graphdistill.trace import Trace

ENTRY_POINT_GROUP = "graphdistill.rules"
ENV_RULE_MODULES = "GRAPHDISTILL_RULES"

RuleFn = Callable[[Trace], "bool | float"]


class RuleError(GraphdistillError, ValueError):
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
    """A rule by name (registered, an entry point, or from ``$GRAPHDISTILL_RULES``), or a function from
    ``module:attr`` / ``file.py:attr`` (see the module docstring).

    A loaded module may itself call :func:`register_rule`; then ``module:NAME`` finds the rule by name."""
    if spec in _REGISTRY:
        return _with_threshold(_REGISTRY[spec], threshold)
    if ":" not in spec:
        found = _discover(spec)
        if found is not None:
            return _with_threshold(found, threshold)
        raise RuleError(_not_found(spec))
    target, _, attr = spec.rpartition(":")
    module = import_user_module(target, f"rule {spec!r}", RuleError)
    fn = getattr(module, attr, None)
    if fn is None and attr in _REGISTRY:
        return _with_threshold(_REGISTRY[attr], threshold)
    if isinstance(fn, Rule):
        return _with_threshold(fn, threshold)
    if not callable(fn):
        raise RuleError(f"rule {spec!r}: {target} has no callable {attr!r}")
    return Rule(spec, fn, 0.5 if threshold is None else threshold)


def _with_threshold(rule: Rule, threshold: float | None) -> Rule:
    return rule if threshold is None else Rule(rule.name, rule.fn, threshold)


def _as_rule(name: str, obj: object, where: str) -> Rule:
    if isinstance(obj, Rule):
        return obj
    if not callable(obj):
        raise RuleError(f"rule {name!r}: {where} is not callable (got {type(obj).__name__})")
    return Rule(name, obj)


def _env_modules() -> list[str]:
    return [t.strip() for t in os.environ.get(ENV_RULE_MODULES, "").split(",") if t.strip()]


def _discover(name: str) -> Rule | None:
    """``name`` from an installed package's entry point, else from the ``$GRAPHDISTILL_RULES`` modules."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                obj = ep.load()
            except Exception as exc:
                raise RuleError(f"rule {name!r}: loading entry point {ep.value!r} failed: {exc}") from exc
            return _as_rule(name, obj, f"entry point {ep.value!r}")
    for target in _env_modules():
        module = import_user_module(target, f"${ENV_RULE_MODULES} entry {target!r}", RuleError)
        if name in _REGISTRY:
            return _REGISTRY[name]
        obj = getattr(module, name, None)
        if obj is not None:
            return _as_rule(name, obj, f"{target}:{name}")
    return None


def _not_found(spec: str) -> str:
    names = sorted(
        set(_REGISTRY) | {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    )
    env = _env_modules()
    msg = (
        f"rule {spec!r}: no such rule. --rule accepts a rule name (known here: {', '.join(names) or 'none'}; "
        f"a name is found among the '{ENTRY_POINT_GROUP}' entry points of installed packages and in the "
        f"modules or .py files listed comma-separated in ${ENV_RULE_MODULES} "
        f"({', '.join(env) if env else 'not set'})), 'package.module:function' or 'path/to/file.py:function'"
    )
    from graphdistill.filter.checks import CHECKS

    if spec in {c.name for c in CHECKS}:
        msg += f". {spec!r} is a built-in check: checks always run (skip one with --disable-check {spec})"
    return msg
