"""Canonical state keys of KVM/arm64 worlds for the explorer's state hashing.

The arm64 model's states are immutable dataclasses and FrozenMaps shared from one state to the
next; the key is their content (without the last event's observations) with each register
token's generation replaced by its rank among the generations of the same writer (see
fpstate.check.statekey for the x86 twin and why ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

from fpstate.arm64.regs import Tok as ArmTok
from fpstate.arm64.statemachine import FrozenMap

_SKIP = frozenset({"obs", "caps", "config", "profile", "gen"})
_FIELDS: dict[type, tuple[str, ...]] = {}
#: id(object) -> (object, structure, tokens): immutable arm64 model objects are shared from
#: one state to the next, so each is canonicalised once.
_ARM_MEMO: dict[int, tuple[Any, Any, tuple[tuple[str, int], ...]]] = {}


def _arm_canon(x: Any) -> tuple[Any, tuple[tuple[str, int], ...]]:
    """(structure with tokens as ("T", writer), the (writer, gen) of those tokens in order)."""
    if isinstance(x, ArmTok):
        return (("T", x.writer), ((x.writer, x.gen),)) if x.writer else (("A", x.gen), ())
    if isinstance(x, (str, int, float, bool, type(None))):
        return x, ()
    hit = _ARM_MEMO.get(id(x))
    if hit is not None and hit[0] is x:
        return hit[1], hit[2]
    toks: list[tuple[str, int]] = []
    parts: list[Any] = []
    if isinstance(x, FrozenMap):
        for k, v in sorted(x.items(), key=lambda kv: repr(kv[0])):
            sv, tv = _arm_canon(v)
            parts.append((k, sv))
            toks.extend(tv)
        struct: Any = tuple(parts)
    elif isinstance(x, (tuple, list)):
        for y in x:
            sv, tv = _arm_canon(y)
            parts.append(sv)
            toks.extend(tv)
        struct = tuple(parts)
    elif isinstance(x, (frozenset, set)):
        struct = tuple(sorted(map(repr, x)))
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        names = _FIELDS.get(type(x))
        if names is None:
            names = _FIELDS[type(x)] = tuple(f.name for f in dataclasses.fields(x)
                                             if f.name not in _SKIP)
        parts.append(type(x).__name__)
        for n in names:
            sv, tv = _arm_canon(getattr(x, n))
            parts.append(sv)
            toks.extend(tv)
        struct = tuple(parts)
    else:
        struct = repr(x)
    out = tuple(toks)
    if len(_ARM_MEMO) > 200_000:
        _ARM_MEMO.clear()
    _ARM_MEMO[id(x)] = (x, struct, out)
    return struct, out


def arm64_key(kw: Any) -> Hashable:
    """The canonical key of a KVM/arm64 world (immutable dataclasses and FrozenMaps): its
    content without the last event's observations, with token generations replaced by their
    rank per writer (the structure and the pattern of ranks, in traversal order)."""
    struct, toks = _arm_canon(kw)
    gens: dict[str, set[int]] = {}
    for w, g in toks:
        gens.setdefault(w, set()).add(g)
    ranks = {w: {g: n for n, g in enumerate(sorted(v))} for w, v in gens.items()}
    return (struct, tuple(ranks[w][g] for w, g in toks))


__all__ = ["arm64_key"]
