"""Results memoised by the identity of a mutable object, valid while a witness still holds.

The checker reads the same buffers, register files and dicts of expected values at step after
step, and most of them have not changed since the last step. Hashing their content to find a
memoised result costs as much as the result; comparing them with a snapshot taken when the
result was made (the *witness*) costs far less. An `IdentityMemo` maps ``id(obj)`` to
``(obj, witness, result)``: holding ``obj`` keeps its id from being reused, so a hit is the
same object, and the result is valid when the witness the caller gives now equals the stored
one (a tuple of what the result depends on: a copy of the bytes or the dict, a system, ...).
"""

from __future__ import annotations

from typing import Any


class IdentityMemo:
    """``id(obj)`` -> (obj, witness, result); cleared when it holds ``limit`` entries."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int) -> None:
        self._entries: dict[int, tuple[Any, Any, Any]] = {}
        self._limit = limit

    def get(self, obj: Any, witness: Any) -> Any | None:
        """The result stored for ``obj`` if its witness equals ``witness``, else None."""
        hit = self._entries.get(id(obj))
        if hit is not None and hit[1] == witness:
            return hit[2]
        return None

    def put(self, obj: Any, witness: Any, result: Any) -> Any:
        """Store ``result`` for ``obj`` under ``witness`` (which must not change later: pass
        copies of mutable content); ``result`` is returned."""
        if len(self._entries) >= self._limit:
            self._entries.clear()
        self._entries[id(obj)] = (obj, witness, result)
        return result


__all__ = ["IdentityMemo"]
