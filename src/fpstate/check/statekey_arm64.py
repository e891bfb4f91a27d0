"""Canonical state keys of KVM/arm64 worlds for the explorer's state hashing.

The arm64 model's states are immutable dataclasses and FrozenMaps shared from one state to the
next; the key is their content (without the last event's observations) with each register
token's generation replaced by its rank among the generations of the same writer (see
fpstate.check.statekey for the x86 twin and why ranks).

Theory of operation (speed)
---------------------------
A step of the model rebuilds only the objects on the path to what it changed (a handful of
dataclasses); every other object is shared with the state before.  So each object is
canonicalised once and memoised by identity (`_MEMO`, which keeps the object alive so that its
id cannot be reused while the entry stands).  A dataclass is read by a function generated for
its class (`_compile`) that handles leaves (tokens, strings, ints, bools, None) inline and
looks composite fields up in the memo before recursing.  A FrozenMap's entries are sorted by
the repr of their keys, and the sorted order of a key set is memoised (the map of expected
values changes at every write, its key set almost never).  The world and its host are new
at every step, so they are read afresh, never memoised; the ranks of a world's token list are
memoised by that list, and the last world's are kept for its event key.  Keys equal value for
value those of a plain recursive walk (the same tuples, repr included: tests/arm64/
test_statekey.py holds that walk and compares).

`arm64_event_key` is what the checker's memo by state key adds to the key for the invariants
(fpstate.check.world): the observations of the last event, which the key leaves out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

from fpstate.arm64.regs import Tok as ArmTok
from fpstate.arm64.statemachine import FrozenMap

_SKIP = frozenset({"obs", "caps", "config", "profile", "gen"})
_PLAIN = frozenset({str, int, float, bool, type(None)})
#: Field annotations whose values are leaves kept as they are.
_PLAIN_ANNOTATIONS = frozenset({"str", "int", "bool", "float", "str | None", "int | None"})
_NO_TOKS: tuple[tuple[str, int], ...] = ()

Toks = list[tuple[str, int]]


class _Interned(dict):  # type: ignore[type-arg]
    """A token's structure by writer (``("T", writer)``) or by value (``("A", value)``)."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def __missing__(self, k: Any) -> tuple[str, Any]:
        s = self[k] = (self.tag, k)
        return s


_WRITTEN = _Interned("T")
_ARCH = _Interned("A")
#: id(object) -> (object, structure, tokens).  Two generations: when `_MEMO` is full its
#: entries move to `_OLD` (entries found there move back).  A step makes about five objects
#: the key has not seen and reads the rest from the step before, so a memo of the last few
#: dozen steps is enough; a small one matters, as every entry keeps its object alive and a
#: memo that outgrows the data cache slows the model as well (callgrind, cache simulated:
#: 128 entries per generation gave the fewest instructions and D1 misses of 32..4096).
_MEMO: dict[int, tuple[Any, Any, tuple[tuple[str, int], ...]]] = {}
_OLD: dict[int, tuple[Any, Any, tuple[tuple[str, int], ...]]] = {}
_MEMO_MAX = 128
#: the keys of a FrozenMap in insertion order -> the same keys sorted by repr.
_ORDER: dict[tuple[Any, ...], tuple[Any, ...]] = {}
#: dataclass type -> its generated canonicaliser (see `_compile`).
_CANON: dict[type, Callable[[Any, Toks], tuple[Any, ...]]] = {}
#: Classes of which every step makes a new instance (the world, the host): not memoised.
_FRESH_NAMES = frozenset({"KvmWorld", "Host"})
_FRESH: dict[type, Callable[[Any, Toks], tuple[Any, ...]]] = {}


def _tok(v: ArmTok, toks: Toks) -> tuple[str, Any]:
    """The structure of a token; a written one's (writer, gen) goes to ``toks``."""
    w = v.writer
    if w:
        toks.append((w, v.gen))
        return _WRITTEN[w]
    return _ARCH[v.gen]


def _value(v: Any, toks: Toks) -> Any:
    """The structure of any field value or element."""
    t = type(v)
    if t is ArmTok:
        return _tok(v, toks)
    if t in _PLAIN:
        return v
    sv, st = _canon(v)
    if st:
        toks.extend(st)
    return sv


_TOK_FIELD = """    v = x.{f}
    if v.writer:
        toks.append((v.writer, v.gen))
        a{i} = _WRITTEN[v.writer]
    else:
        a{i} = _ARCH[v.gen]"""
_ANY_FIELD = """    v = x.{f}
    if type(v) in _PLAIN:
        a{i} = v
    else:
        h = _get(id(v))
        if h is not None and h[0] is v:
            a{i} = h[1]
            if h[2]:
                toks.extend(h[2])
        else:
            a{i} = _value(v, toks)"""


def _compile(t: type) -> Callable[[Any, Toks], tuple[Any, ...]]:
    """A function building the structure of a ``t`` instance, ``(type name, field, ...)``
    without the `_SKIP` fields: fields annotated ``Tok`` as tokens, plain ones as they are,
    any other looked up in the memo or canonicalised (`_value`)."""
    lines = ["def canon(x, toks):"]
    n = 0
    for f in dataclasses.fields(t):
        if f.name in _SKIP:
            continue
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if ann == "Tok" and t.__module__.startswith("fpstate."):
            lines.append(_TOK_FIELD.format(f=f.name, i=n))
        elif ann in _PLAIN_ANNOTATIONS:
            lines.append(f"    a{n} = x.{f.name}")
        else:
            lines.append(_ANY_FIELD.format(f=f.name, i=n))
        n += 1
    lines.append(f"    return ({t.__name__!r}, {''.join(f'a{i}, ' for i in range(n))})")
    ns: dict[str, Any] = {"_WRITTEN": _WRITTEN, "_ARCH": _ARCH, "_PLAIN": _PLAIN,
                          "_get": _MEMO.get, "_value": _value}
    exec(compile("\n".join(lines) + "\n", f"<statekey_arm64 {t.__name__}>", "exec"), ns)
    return ns["canon"]


def _canon(x: Any) -> tuple[Any, tuple[tuple[str, int], ...]]:
    """(structure with written tokens as ("T", writer) and architectural values as
    ("A", value), the (writer, gen) of the written tokens in traversal order)."""
    t = type(x)
    if t is ArmTok:
        toks: Toks = []
        return _tok(x, toks), tuple(toks)
    if t in _PLAIN:
        return x, _NO_TOKS
    fresh = _FRESH.get(t)
    if fresh is not None:
        toks = []
        return fresh(x, toks), tuple(toks)
    hit = _MEMO.get(id(x))
    if hit is not None and hit[0] is x:
        return hit[1], hit[2]
    hit = _OLD.get(id(x))
    if hit is not None and hit[0] is x:
        _MEMO[id(x)] = hit
        return hit[1], hit[2]
    toks = []
    fn = _CANON.get(t)
    if fn is not None:
        struct: Any = fn(x, toks)
    elif t is FrozenMap:
        d = x._d
        keys = tuple(d)
        order = _ORDER.get(keys)
        if order is None:
            order = _ORDER[keys] = tuple(sorted(keys, key=repr))
        parts = []
        for k in order:
            v = d[k]
            if type(v) is ArmTok:  # the map of expected values holds only tokens
                if v.writer:
                    toks.append((v.writer, v.gen))
                    parts.append((k, _WRITTEN[v.writer]))
                else:
                    parts.append((k, _ARCH[v.gen]))
            else:
                h = _MEMO.get(id(v))
                if h is not None and h[0] is v:
                    parts.append((k, h[1]))
                    if h[2]:
                        toks.extend(h[2])
                else:
                    parts.append((k, _value(v, toks)))
        struct = tuple(parts)
    elif t is tuple or t is list:
        parts = []
        for v in x:
            h = _MEMO.get(id(v))
            if h is not None and h[0] is v:
                parts.append(h[1])
                if h[2]:
                    toks.extend(h[2])
            else:
                parts.append(_value(v, toks))
        struct = tuple(parts)
    elif t is frozenset or t is set:
        struct = tuple(sorted(map(repr, x)))
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        fn = _compile(t)
        if t.__name__ in _FRESH_NAMES:
            _FRESH[t] = fn
            return fn(x, toks), tuple(toks)
        _CANON[t] = fn
        struct = fn(x, toks)
    else:
        struct = repr(x)
    out = tuple(toks) if toks else _NO_TOKS
    if len(_MEMO) >= _MEMO_MAX:
        _OLD.clear()
        _OLD.update(_MEMO)
        _MEMO.clear()
    _MEMO[id(x)] = (x, struct, out)
    return struct, out


def _ranks(kw: Any) -> tuple[Any, tuple[int, ...], dict[tuple[str, int], int]]:
    """(structure, ranks in traversal order, rank of each (writer, gen)) of a world (the
    last world's are kept: its key and its event key are asked for one after the other)."""
    if _LAST[0] is kw:
        return _LAST[1]
    struct, toks = _canon(kw)
    got = _RANKS.get(toks)
    if got is None:
        rank: dict[tuple[str, int], int] = {}
        prev, n = None, 0
        for w, g in sorted(set(toks)):
            if w != prev:
                prev, n = w, 0
            rank[(w, g)] = n
            n += 1
        got = (tuple(map(rank.__getitem__, toks)), rank)
        if len(_RANKS) >= _MEMO_MAX:
            _RANKS.clear()
        _RANKS[toks] = got
    out = (struct, got[0], got[1])
    _LAST[:] = [kw, out]
    return out


_LAST: list[Any] = [None, None]


#: the tokens of a world in traversal order -> (their ranks, the rank of each): walks from
#: one initial state meet the same generations again and again.
_RANKS: dict[tuple[tuple[str, int], ...], tuple[tuple[int, ...], dict[tuple[str, int], int]]] = {}


def arm64_key(kw: Any) -> Hashable:
    """The canonical key of a KVM/arm64 world (immutable dataclasses and FrozenMaps): its
    content without the last event's observations, with token generations replaced by their
    rank per writer (the structure and the pattern of ranks, in traversal order)."""
    struct, ranks, _ = _ranks(kw)
    return (struct, ranks)


def arm64_event_key(kw: Any) -> Hashable:
    """What the last event let contexts observe (``Host.obs``, which `arm64_key` leaves out),
    in the key's terms: a written token as its writer and the rank of its generation among
    the state's generations of that writer (None if the state no longer holds it, so it
    equals no value the state holds); ``()`` when nothing was observed.  With the key it
    determines every invariant: the observation rules compare an observed token with the
    context's latest value (in the state) and its writer with the context."""
    obs = kw.host.obs
    if not obs:
        return ()
    rank = _ranks(kw)[2]
    out = []
    for o in obs:
        v = o.value
        if type(v) is ArmTok:
            v = ("T", v.writer, rank.get((v.writer, v.gen))) if v.writer else ("A", v.gen)
        out.append((o.who, o.what, o.feature, o.action, v))
    return tuple(out)


__all__ = ["arm64_event_key", "arm64_key"]
