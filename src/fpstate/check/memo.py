"""Results memoised by the identity of a mutable object, valid while a witness still holds.

The checker reads the same buffers, register files and dicts of expected values at step after
step, and most of them have not changed since the last step. Hashing their content to find a
memoised result costs as much as the result; comparing them with a snapshot taken when the
result was made (the *witness*) costs far less. An `IdentityMemo` maps ``id(obj)`` to
``(obj, witness, result)``: holding ``obj`` keeps its id from being reused, so a hit is the
same object, and the result is valid when the witness the caller gives now equals the stored
one (a tuple of what the result depends on: a copy of the bytes or the dict, a system, ...).

The checker's memos (these, and the state memos of fpstate.check.world) grow large and live as
long as the process: `settle` keeps the cyclic garbage collector from traversing them again and
again, in the processes fpstate owns (`own_process`).
"""

from __future__ import annotations

import gc
import time
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


#: Whether `settle` may act: the garbage collector is the whole process's, so only processes
#: fpstate owns turn it on (the command line, the explorer's worker processes), never a
#: program that calls the explorer as a library.
SETTLE = False
#: When `settle` last froze the survivors (process time).
_SETTLED = [0.0]
#: Seconds between two `settle` that do something.
SETTLE_EVERY = 0.5


def settle() -> None:
    """Keep the cyclic garbage collector's work proportional to what is new.

    A checker process accumulates memos (millions of tuples, lists and sets by the end of a
    minute), and each full collection of the cyclic garbage collector traverses all of them:
    measured, full collections took 11% of a 24-second x86 run and grew with the memos.
    Called between two walks (when no world of a walk is alive), at most every
    `SETTLE_EVERY` seconds and only in a process fpstate owns (`SETTLE`), this collects what
    the last walks left (their worlds are cyclic garbage) and moves every survivor to the
    permanent generation (gc.freeze), which collections skip. What is frozen is memos,
    caches and the initial worlds: the memos hold acyclic values (ints, bytes, tuples, dicts
    and buffers), freed by their reference counts when a memo drops them.
    """
    if not SETTLE:
        return
    now = time.process_time()
    if now - _SETTLED[0] < SETTLE_EVERY:
        return
    _SETTLED[0] = now
    gc.collect()
    gc.freeze()


def thaw() -> None:
    """Move what `settle` froze back to the collector's care, when something frozen is let go
    that may hold cycles (a cached initial world): frozen objects are freed by their reference
    counts, never by a collection. The next `settle` freezes the survivors again."""
    if SETTLE:
        gc.unfreeze()


def own_process() -> None:
    """Mark this process as fpstate's own (`SETTLE`): the command line and worker processes."""
    global SETTLE
    SETTLE = True


__all__ = ["IdentityMemo", "own_process", "settle", "thaw"]
