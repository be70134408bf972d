"""Leakage-free train/val/test splits by provenance.

Inputs that share a real source photo are tied together (a composite made from photos A and B ties A and
B, and everything else made from either), and so is a replay with its parent input; whole connected
components go to one split. Components holding a held-out photo go to test, and when there are any, test
holds nothing else: the evaluation set is exactly the rows of real photos no training input was made from,
and the other components are shared between train and val only. Without held-out photos every split gets its
share. The components are ordered by a hash of their photo ids and dealt out greedily so each split approaches
its target share of rows: deterministic, and no photo ever appears in two splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from graphdistill.errors import GraphdistillError

SPLIT_NAMES = ("train", "val", "test")


class SplitLeakError(GraphdistillError, AssertionError):
    """A photo ended up in two splits (a bug: the splitter guarantees it cannot)."""


@dataclass(frozen=True)
class Item:
    """One input to split: its id, the real photos it was made from, whether it is a held-out input, and
    the ids of other items it must share a split with (a replay's parent input, whatever photos it has)."""

    id: str
    photos: tuple[str, ...]
    heldout: bool = False
    tied_to: tuple[str, ...] = ()


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def components(items: Sequence[Item]) -> list[list[Item]]:
    """Connected components of items sharing a photo or tied together (an item with neither is its own
    component)."""
    uf = _UnionFind()
    for it in items:
        nodes = [f"photo:{p}" for p in it.photos] or [f"item:{it.id}"]
        nodes += [f"item:{t}" for t in it.tied_to]
        for n in nodes[1:]:
            uf.union(nodes[0], n)
        uf.find(nodes[0])
    comps: dict[str, list[Item]] = {}
    for it in items:
        node = f"photo:{it.photos[0]}" if it.photos else f"item:{it.id}"
        comps.setdefault(uf.find(node), []).append(it)
    return list(comps.values())


def _key(comp: Sequence[Item], seed: int) -> str:
    names = sorted({p for it in comp for p in it.photos} or {it.id for it in comp})
    return hashlib.sha256(f"{seed}\0{chr(0).join(names)}".encode()).hexdigest()


def assign_splits(
    items: Sequence[Item],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    *,
    heldout_photos: Iterable[str] = (),
    seed: int = 0,
) -> dict[str, str]:
    """item id -> "train" | "val" | "test". Held-out items (or those using a held-out photo) go to test; when
    there are any, the others go to train and val alone, in the shares of ``fractions[:2]``. Items that share
    a photo (components) stay in one split. With a test share, no held-out item and at least three components,
    test gets at least one component, however small its share: a dataset with nothing to evaluate on is no
    use to ``eval``."""
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    held = set(heldout_photos)
    total = sum(fractions)
    target = {s: f / total for s, f in zip(SPLIT_NAMES, fractions, strict=True)}
    comps = components(items)
    counts = dict.fromkeys(SPLIT_NAMES, 0)
    out: dict[str, str] = {}
    rest = []
    for comp in comps:
        if any(it.heldout or held.intersection(it.photos) for it in comp):
            for it in comp:
                out[it.id] = "test"
            counts["test"] += len(comp)
        else:
            rest.append(comp)
    rest.sort(key=lambda c: _key(c, seed))
    n_total = len(items)
    if counts["test"]:  # the held-out rows are the test split: the rest train and validate
        n_total -= counts["test"]
        counts["test"] = 0
        shares = target["train"] + target["val"]
        target = {
            "train": target["train"] / shares if shares else 1.0,
            "val": target["val"] / shares if shares else 0.0,
            "test": 0.0,
        }
    placed: dict[str, list[list[Item]]] = {s: [] for s in SPLIT_NAMES}
    for comp in rest:
        # the split furthest below its target share (ties: train, val, test)
        split = max(
            (s for s in SPLIT_NAMES if target[s] > 0),
            key=lambda s: (target[s] * n_total - counts[s], -SPLIT_NAMES.index(s)),
        )
        for it in comp:
            out[it.id] = split
        counts[split] += len(comp)
        placed[split].append(comp)
    # a test share with no test row leaves nothing to evaluate on: from three source components on, the
    # smallest component of the split holding the most of them moves to test (that split keeps the rest)
    if target["test"] > 0 and not counts["test"] and len(rest) >= 3:
        donor = max(("train", "val"), key=lambda s: len(placed[s]))
        if len(placed[donor]) >= 2:
            comp = min(placed[donor], key=len)
            for it in comp:
                out[it.id] = "test"
    verify_no_leak(items, out)
    return out


def verify_no_leak(items: Sequence[Item], splits: Mapping[str, str]) -> None:
    """Raise :class:`SplitLeakError` if any photo appears in two splits."""
    seen: dict[str, str] = {}
    for it in items:
        s = splits[it.id]
        for p in it.photos:
            if seen.setdefault(p, s) != s:
                raise SplitLeakError(f"photo {p!r} is in both {seen[p]} and {s}")
