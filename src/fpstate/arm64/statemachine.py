"""Small building blocks for the arm64 host and KVM models: immutable maps and lifecycles.

Rules of this file
------------------
* Every model state is immutable; an event is a function from a state to a new state.  An
  event that the modelled code could never see (a guest instruction while the vCPU is not
  running, an FP trap while the guest already owns the registers) raises `IllegalEvent`
  naming the lifecycle, the state and the event; because states are immutable the caller's
  state is unchanged by construction (tests assert both).
* A lifecycle is a `TransitionTable`: a frozen mapping (state, event) -> next state.  A pair
  that is absent from the table is illegal.  The tables are data, so tests and the checker
  can enumerate them.
* Errno returns of ioctls are *not* illegal events: the kernel answers them, and the model
  returns them as values (``-errno``), exactly like the kernel function it models.
* A new state is an old one with some fields changed: `replace` is ``dataclasses.replace``
  for the model's frozen slotted dataclasses without its per-call introspection (the checker
  takes a dozen such copies per transition).  An update that changes nothing (every new
  value *is* the old one) returns the object itself, here and in `FrozenMap.set`/`update`:
  states are immutable values, so sharing is invisible to the model, and the checker's
  memos, keyed by identity, keep hitting.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fpstate.errors import FpstateError

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


def replace(obj: D, /, **changes: Any) -> D:
    """``dataclasses.replace(obj, **changes)``: a copy of the dataclass instance ``obj`` with
    ``changes`` applied (TypeError for a name that is not a field), or ``obj`` itself when
    every change is the value the field already holds (see `replacer`)."""
    return _REPLACERS[type(obj)](obj, **changes)


class _Replacers(dict):  # type: ignore[type-arg]
    def __missing__(self, cls: type) -> Callable[..., Any]:
        fn = self[cls] = _replacer(cls)
        return fn


_REPLACERS = _Replacers()
_UNSET = object()


def replacer(cls: type[D]) -> Callable[..., D]:
    """The function `replace` uses for instances of the dataclass ``cls``: called as
    ``fn(obj, field=value, ...)``, for hot paths that know the class."""
    return _REPLACERS[cls]  # type: ignore[no-any-return]


def _replacer(cls: type) -> Callable[..., Any]:
    """Generated once per class: returns ``o`` if every given value *is* the field's, else
    a new instance with each slot set (frozen slotted classes without ``__post_init__`` or
    init-less fields; any other class goes through ``dataclasses.replace``)."""
    fields = dataclasses.fields(cls)
    plain = (not hasattr(cls, "__post_init__")
             and all(f.init and f._field_type is dataclasses._FIELD for f in fields)  # type: ignore[attr-defined]
             and all(isinstance(cls.__dict__.get(f.name), types.MemberDescriptorType)
                     for f in fields))
    names = [f.name for f in fields]
    same = " and ".join(f"({n} is _UNSET or {n} is o.{n})" for n in names) or "True"
    src = [f"def replace(o, /, *, {', '.join(f'{n}=_UNSET' for n in names)}):",
           f"    if {same}:",
           "        return o"]
    if plain:
        src.append("    x = _new(_cls)")
        src += [f"    _set_{n}(x, o.{n} if {n} is _UNSET else {n})" for n in names]
        src.append("    return x")
    else:
        given = ", ".join(f"**({{}} if {n} is _UNSET else {{{n!r}: {n}}})" for n in names)
        src.append(f"    return _dc_replace(o, {given})")
    ns: dict[str, Any] = {"_UNSET": _UNSET, "_new": object.__new__, "_cls": cls,
                          "_dc_replace": dataclasses.replace}
    if plain:
        ns.update({f"_set_{n}": cls.__dict__[n].__set__ for n in names})
    exec(compile("\n".join(src) + "\n", f"<replace {cls.__qualname__}>", "exec"), ns)
    return ns["replace"]  # type: ignore[no-any-return]


class IllegalEvent(FpstateError):
    """An event the modelled code can never receive in the current state (a model misuse)."""

    def __init__(self, lifecycle: str, state: str, event: str, why: str = "") -> None:
        self.lifecycle, self.state, self.event, self.why = lifecycle, state, event, why
        extra = f": {why}" if why else ""
        super().__init__(f"{lifecycle}: event {event!r} is illegal in state {state!r}{extra}")

    def __reduce__(self) -> tuple[type[IllegalEvent], tuple[str, str, str, str]]:
        """Picklable by its fields (an explorer worker's exception reaches the parent)."""
        return (type(self), (self.lifecycle, self.state, self.event, self.why))


class FrozenMap(Mapping[K, V], Generic[K, V]):
    """An immutable, hashable mapping; `set` and `remove` return a new map."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._d: dict[K, V] = dict(items)
        self._h: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    # The read side straight from the dict (Mapping's mixins go through __getitem__ in
    # Python, once per item): the checker reads these maps at every step.
    def __contains__(self, key: object) -> bool:
        return key in self._d

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        return self._d.get(key, default)

    def keys(self) -> KeysView[K]:
        return self._d.keys()

    def values(self) -> ValuesView[V]:
        return self._d.values()

    def items(self) -> ItemsView[K, V]:
        return self._d.items()

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(frozenset(self._d.items()))
        return self._h

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return self._d == other._d
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def set(self, key: K, value: V) -> FrozenMap[K, V]:
        if self._d.get(key, _UNSET) is value:
            return self
        d = dict(self._d)
        d[key] = value
        return _wrap(d)

    def update(self, items: Mapping[K, V]) -> FrozenMap[K, V]:
        get = self._d.get
        for k, v in items.items():
            if get(k, _UNSET) is not v:
                break
        else:
            return self
        d = dict(self._d)
        d.update(items)
        return _wrap(d)

    def remove(self, key: K) -> FrozenMap[K, V]:
        d = dict(self._d)
        del d[key]
        return _wrap(d)


def _wrap(d: dict[K, V]) -> FrozenMap[K, V]:
    """A FrozenMap owning ``d`` (a fresh dict nobody else holds), without copying it."""
    m: FrozenMap[K, V] = object.__new__(FrozenMap)
    m._d = d
    m._h = None
    return m


@dataclass(frozen=True, slots=True)
class TransitionTable:
    """A lifecycle: ``step(state, event)`` is the next state, or `IllegalEvent`."""

    name: str
    table: FrozenMap[tuple[str, str], str]

    @classmethod
    def of(cls, name: str, rows: Iterable[tuple[str, str, str]]) -> TransitionTable:
        table: dict[tuple[str, str], str] = {}
        for state, event, nxt in rows:
            assert (state, event) not in table, f"{name}: duplicate row {(state, event)}"
            table[(state, event)] = nxt
        return cls(name, FrozenMap(table))

    @property
    def states(self) -> frozenset[str]:
        return frozenset(s for s, _ in self.table) | frozenset(self.table.values())

    @property
    def events(self) -> frozenset[str]:
        return frozenset(e for _, e in self.table)

    def allows(self, state: str, event: str) -> bool:
        return (state, event) in self.table

    def step(self, state: str, event: str, why: str = "") -> str:
        try:
            return self.table[(state, event)]
        except KeyError:
            raise IllegalEvent(self.name, state, event, why) from None
