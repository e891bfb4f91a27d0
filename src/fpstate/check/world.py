"""The checker's view of a model: actions, worlds, steps, violations and timeline frames.

Rules of this file
------------------
- A *world* is one model instance (the x86 kernel `Machine` with KVM on top, or the arm64
  host with KVM/arm64) plus what the checker tracks beside it: the values each context should
  see (its *expected* state, from the user-visible contract of every action) and what the last
  step emitted (signal frames, ptrace buffers, KVM_GET_XSAVE images).
- An `Action` is data: a name and sorted keyword arguments of plain values (str, int, bool).
  Scenarios, the explorer, shrinking and the executor all pass actions around as data; nothing
  holds a reference into a model.
- `World.step` applies one action: the model's `IllegalEvent` (a precondition the kernel states)
  becomes `StepError` and the step does not count; the model's `KernelBug` (what the kernel
  would WARN about or the memory it would corrupt) becomes a `Violation` of the invariant its
  name maps to; otherwise every invariant of the world is checked (fpstate.check.invariants).
- A world can `clone` itself (a deep copy, or a replay of its history when a kernel path is in
  flight: generators cannot be copied) and name its state canonically with `key`, so the
  explorer can hash states.
- Equal keys mean states that behave alike (that is what makes state hashing sound), so a world
  that says so (`MEMO`) has its invariant checks and its enabled actions memoised by the hash
  of its key, per model, configuration and variant: a state whose key was checked clean is not
  checked again (`checked`), unless the step also emitted something the key does not hold
  (`event_key` None: a signal frame, a ptrace buffer, a model-reported bug). For the same
  reason an action taken again from a state of a known key leads to a state of a known key:
  the successor's hash is remembered and its key is not computed again. Keys are hashed to 64
  bits; with a few million states per process a collision has a probability below 1e-6.
  Inside `audited_memos` every memo answer is recomputed as well and each contradiction is
  recorded with both histories (the explorer's tests and `fpstate check` shrink that way).
"""

from __future__ import annotations

import abc
import contextlib
import copy
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fpstate.errors import FpstateError

Value = str | int | bool


#: Memo of each (model, configuration, variant) in this process (World.memo).
_MEMOS: dict[tuple[str, str, str | None], Memo] = {}
#: How many (model, configuration, variant) memos a process keeps (a campaign worker runs
#: many cells one after another: older memos are dropped).
MEMO_WORLDS = 4
#: Entries a memo may hold before it is cleared (about 100 bytes each).
MEMO_LIMIT = 2_000_000
#: Every memo by state key may be used (False: everything is computed afresh, see
#: `no_memos`).
MEMOS_ON = True


@dataclass(frozen=True, slots=True)
class MemoAudit:
    """A memo answer that the state itself contradicts (`audited_memos`): the memo of
    ``kind`` ("clean", "enabled" or "successor") was filled by ``first``'s history and
    consulted by ``second``'s, whose state keys alike but checks, enables or leads elsewhere
    (``detail``). Equal keys that do not behave alike: the key misses something."""

    kind: str
    first: tuple[Action, ...]
    second: tuple[Action, ...]
    detail: str


#: While not None (`audited_memos`): every memo answer is recomputed and each contradiction
#: appended here; memos remember the history that filled each entry.
AUDIT: list[MemoAudit] | None = None


@contextlib.contextmanager
def audited_memos() -> Iterator[list[MemoAudit]]:
    """Inside the block every memo answer a world takes -- a state checked clean before, its
    enabled actions, the successor of an action -- is also recomputed, and each contradiction
    is recorded as a `MemoAudit` in the list the block gets. The memos are emptied on entry
    and on exit (entries filled without their history, or by audited runs, stay out of other
    runs)."""
    global AUDIT
    saved, AUDIT = AUDIT, []
    _MEMOS.clear()
    try:
        yield AUDIT
    finally:
        AUDIT = saved
        _MEMOS.clear()


@contextlib.contextmanager
def no_memos() -> Iterator[None]:
    """Compute every check and enabled action afresh inside the block (to compare with)."""
    global MEMOS_ON
    saved, MEMOS_ON = MEMOS_ON, False
    try:
        yield
    finally:
        MEMOS_ON = saved


@dataclass(slots=True)
class Memo:
    """What the worlds of one (model, configuration, variant) remember, by state key hash."""

    clean: set[int] = field(default_factory=set)  #: states checked clean
    enabled: dict[int, list[Action]] = field(default_factory=dict)  #: their enabled actions
    #: (state, action) -> the successor state
    successors: dict[tuple[int, Action], int] = field(default_factory=dict)
    #: buffer shapes (World.shapes_hash) the shape predicates found clean
    clean_shapes: set[int] = field(default_factory=set)
    #: the history that filled each entry, by (kind, entry), while audited (`audited_memos`)
    origins: dict[tuple[str, Any], tuple[Action, ...]] = field(default_factory=dict)


class ScenarioError(FpstateError):
    """A scenario or action that cannot be run: bad YAML, unknown action, bad field."""


# -- configuration values (World.validate_config) -------------------------------------------------


def config_int(where: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi], else ScenarioError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ScenarioError(f"{where}: must be an integer from {lo} to {hi}, not {value!r}")
    return value


def config_str(where: str, value: Any, choices: tuple[str, ...] = ()) -> str:
    if not isinstance(value, str) or not value or (choices and value not in choices):
        want = f"one of {', '.join(choices)}" if choices else "a non-empty string"
        raise ScenarioError(f"{where}: must be {want}, not {value!r}")
    return value


def config_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"{where}: must be true or false, not {value!r}")
    return value


def config_mapping(where: str, value: Any, keys: tuple[str, ...] | None = None) -> Mapping[
        str, Any]:
    """``value`` as a mapping with string keys (among ``keys`` when given)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ScenarioError(f"{where}: must be a mapping with names as keys, not {value!r}")
    if keys is not None:
        bad = [k for k in value if k not in keys]
        if bad:
            raise ScenarioError(f"{where}: unknown key {bad[0]!r} (keys: {', '.join(keys)})")
    return value


class StepError(FpstateError):
    """An action the model refuses in the current state (its IllegalEvent), or one whose
    arguments name nothing that exists (a task or CPU that is not there)."""


@dataclass(frozen=True, slots=True)
class Action:
    """One step: ``name`` and its arguments as sorted (key, value) pairs."""

    name: str
    args: tuple[tuple[str, Value], ...] = ()
    #: The ``task`` argument (None without one), for the explorer's choice of a next step.
    task: Value | None = field(default=None, compare=False, repr=False)
    #: The arguments as a dict, for calling the world's do_ method (read, never change it).
    kwargs: dict[str, Value] = field(default_factory=dict, compare=False, repr=False)
    def __post_init__(self) -> None:
        object.__setattr__(self, "task", self.get("task"))
        object.__setattr__(self, "kwargs", dict(self.args))

    @classmethod
    def of(cls, name: str, **args: Value) -> Action:
        k = (name, *args.items())
        got = _ACTIONS.get(k)
        if got is None:
            if len(_ACTIONS) > 100_000:
                _ACTIONS.clear()
            got = _ACTIONS[k] = cls(name, tuple(sorted(args.items())))
        return got

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.args:
            if k == key:
                return v
        return default

    def as_dict(self) -> dict[str, Any]:
        """The scenario form: ``{name: {arg: value, ...}}`` (``{name: {}}`` without args)."""
        return {self.name: dict(self.args)}

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool)
                          and v > 4096 else f"{k}={v}" for k, v in self.args)
        return f"{self.name}({inner})"


#: Actions are immutable values: the explorer builds the same ones at every step.
_ACTIONS: dict[tuple[Any, ...], Action] = {}


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One argument of an action: its type, whether it is required, the allowed values."""

    kind: type
    doc: str
    required: bool = True
    choices: tuple[Value, ...] = ()
    default: Value | None = None


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """An action of a world's vocabulary: what it models and its arguments."""

    name: str
    doc: str
    fields: Mapping[str, FieldSpec] = field(default_factory=dict)

    def validate(self, args: Mapping[str, Any], where: str) -> Action:
        """An `Action` from scenario arguments; ScenarioError naming the bad field."""
        if not isinstance(args, Mapping):
            raise ScenarioError(f"{where}: arguments of {self.name!r} must be a mapping, "
                                f"not {type(args).__name__}")
        unknown = sorted(set(args) - set(self.fields))
        if unknown:
            raise ScenarioError(f"{where}: {self.name}: unknown field {unknown[0]!r} "
                                f"(fields: {', '.join(self.fields) or 'none'})")
        out: dict[str, Value] = {}
        for key, spec in self.fields.items():
            if key not in args:
                if spec.required:
                    raise ScenarioError(f"{where}: {self.name}: missing field {key!r}")
                if spec.default is not None:
                    out[key] = spec.default
                continue
            value = args[key]
            ok = isinstance(value, spec.kind) and not (spec.kind is int
                                                       and isinstance(value, bool))
            if not ok:
                raise ScenarioError(f"{where}: {self.name}: field {key!r} must be "
                                    f"{spec.kind.__name__}, not {value!r}")
            if spec.choices and value not in spec.choices:
                raise ScenarioError(f"{where}: {self.name}: field {key!r} = {value!r} is not "
                                    f"one of {', '.join(map(str, spec.choices))}")
            out[key] = value
        return Action.of(self.name, **out)


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken invariant: its name (fpstate.check.invariants.INVARIANTS) and the evidence."""

    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step returned (for expectations) and the invariants it broke."""

    observed: Mapping[str, Value]
    violations: tuple[Violation, ...]


# -- timeline frames -----------------------------------------------------------------------------

#: Where a context's state lives (the lanes of the counterexample picture).
WHERE_REGS = "regs"  #: its registers on a CPU are the only truth
WHERE_BOTH = "both"  #: the memory image is the truth and a CPU holds a valid copy
WHERE_MEMORY = "memory"  #: only the memory image
WHERE_GONE = "gone"  #: not created yet, or dead


@dataclass(frozen=True, slots=True)
class CpuView:
    """One CPU after a step: what runs there, whose registers it holds, who wrote them."""

    nr: int
    running: str  #: the context running (a task, a vCPU, "idle")
    holds: str | None  #: the context whose state the registers hold (owner_ctx), None if none
    writers: tuple[tuple[str, str], ...]  #: (component, writer) for components not in init


@dataclass(frozen=True, slots=True)
class ContextView:
    """One context (a task, a vCPU) after a step."""

    name: str
    where: str  #: one of WHERE_*
    cpu: int | None  #: the CPU whose registers are involved (regs/both)
    writers: tuple[tuple[str, str], ...]  #: what it would see: (component, writer)
    #: where the memory image says otherwise (only for WHERE_BOTH): (component, writer)
    image: tuple[tuple[str, str], ...] = ()
    note: str = ""  #: e.g. the size of its buffer


@dataclass(frozen=True, slots=True)
class Frame:
    step: int
    action: str
    cpus: tuple[CpuView, ...]
    contexts: tuple[ContextView, ...]
    violation: str | None = None
    detail: str = ""  #: the violation's evidence


# -- worlds --------------------------------------------------------------------------------------


class World(abc.ABC):
    """One model instance under the checker (see the module docstring)."""

    #: The model name scenarios use (``model: x86``).
    model: ClassVar[str]
    #: The action vocabulary.
    SPECS: ClassVar[Mapping[str, ActionSpec]]

    def __init__(self, config: Mapping[str, Any], variant: str | None) -> None:
        self.config = dict(config)
        self.variant = variant
        self.history: list[Action] = []
        self.steps = 0
        self.broken = False  #: a model-detected bug left the model in an unknown state
        #: Action names the explorer leaves out (config ``omit``): a smaller vocabulary.
        self.omit = frozenset(self.config.get("omit", ()))

    # -- what a world provides ---------------------------------------------------------------

    @abc.abstractmethod
    def enabled(self) -> list[Action]:
        """The actions whose preconditions hold now (the explorer picks among them)."""

    @abc.abstractmethod
    def _apply(self, action: Action) -> dict[str, Value]:
        """Run ``action`` on the model; what it observed. Raises the model's IllegalEvent,
        KernelBug, or StepError."""

    @abc.abstractmethod
    def check(self) -> list[Violation]:
        """Every invariant of this world, evaluated on the current state."""

    @abc.abstractmethod
    def bug_violation(self, exc: BaseException) -> Violation | None:
        """The violation a model-detected bug (KernelBug and kin) stands for, None if
        ``exc`` is not one."""

    @abc.abstractmethod
    def key(self) -> Hashable:
        """A canonical, hashable name of the state (equal for states that behave alike)."""

    @abc.abstractmethod
    def frame(self, action: str, violation: str | None, detail: str = "") -> Frame:
        """The timeline view of the current state (``violation``: the invariant the step
        broke, ``detail`` its evidence)."""

    @abc.abstractmethod
    def illegal_types(self) -> tuple[type[BaseException], ...]:
        """The model exception types that mean "illegal in this state"."""

    # -- provided ------------------------------------------------------------------------------

    #: The configuration keys this world reads (besides ``omit``, which every world takes).
    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        """ScenarioError naming the first key of ``config`` this world cannot boot with (the
        keys and their values; worlds add their own rules). ``omit``: action names the
        explorer leaves out of every walk (a scenario may still take them)."""
        keys = (*cls.CONFIG_KEYS, "omit")
        bad = [k for k in config if k not in keys]
        if bad:
            raise ScenarioError(f"config: unknown key {bad[0]!r} for model {cls.model} "
                                f"(keys: {', '.join(keys)})")
        omit = config.get("omit", [])
        if not isinstance(omit, (list, tuple)) or not all(isinstance(n, str) for n in omit):
            raise ScenarioError(f"config.omit: must be a list of action names, not {omit!r}")
        unknown = [n for n in omit if n not in cls.SPECS]
        if unknown:
            raise ScenarioError(f"config.omit: unknown action {unknown[0]!r} for model "
                                f"{cls.model} (known: {', '.join(sorted(cls.SPECS))})")

    @classmethod
    def spec(cls, name: str, where: str) -> ActionSpec:
        try:
            return cls.SPECS[name]
        except KeyError:
            raise ScenarioError(f"{where}: unknown action {name!r} for model {cls.model!r} "
                                f"(known: {', '.join(sorted(cls.SPECS))})") from None

    #: True when an illegal action leaves the world exactly as it was (immutable models), so
    #: a random walk may try another action; False when it may be left half-changed.
    rollback_on_illegal: ClassVar[bool] = False
    #: What `clone` may reuse while the world is unchanged (dropped by every step).
    _snapshot: Any = None

    def step(self, action: Action, check: bool = True) -> StepResult:
        """Apply ``action`` and check every invariant (see the module docstring); with
        ``check`` False only model-detected bugs are reported (replaying a checked path)."""
        self._snapshot = None  # a clone's snapshot of the state before (see X86World.clone)
        try:
            observed = self._apply(action)
        except StepError:
            raise
        except self.illegal_types() as e:
            raise StepError(f"illegal in this state: {e}") from e
        except Exception as e:
            v = self.bug_violation(e)
            if v is None:
                raise
            self.history.append(action)
            self.steps += 1
            self.broken = True
            return StepResult({}, (v,))
        self.history.append(action)
        self.steps += 1
        if self.MEMO and MEMOS_ON:
            self._successor(action)
        return StepResult(observed, tuple(self.checked()) if check else ())

    # -- memoised by key (see the module docstring) -------------------------------------------

    #: True when `key` names everything the invariants and `enabled` read (besides what
    #: `event_key` adds), so results may be memoised by key.
    MEMO: ClassVar[bool] = False
    #: (steps, hash of key) of the state last hashed.
    _hashed: tuple[int, int] | None = None
    #: The name of this world's memo (model, configuration, variant), made once.
    _memo_name: tuple[str, str, str | None] | None = None

    def event_key(self) -> Hashable | None:
        """What the last step emitted that the invariants read and `key` does not hold, or
        None when the step cannot be judged from its state alone (no memo then)."""
        return ()

    #: (steps, hash of the state before, action) of the step that led here, while the hash
    #: of this state is not known yet.
    _came_from: tuple[int, int, Action] | None = None

    def state_hash(self) -> int:
        """``hash(self.key())``, computed once per state."""
        h = self._hashed
        if h is None or h[0] != self.steps:
            h = self._hashed = (self.steps, hash(self.key()))
            came = self._came_from
            if came is not None and came[0] == self.steps:
                succ = self.memo().successors
                if len(succ) > MEMO_LIMIT // 2:
                    succ.clear()
                succ[(came[1], came[2])] = h[1]
                if AUDIT is not None:  # (a global test on the hot path, no call)
                    self._origin("successor", (came[1], came[2]))
        return h[1]

    def _successor(self, action: Action) -> None:
        """After a step: the hash of the new state when the same action was taken before from
        a state of the same key (equal keys behave alike, so their successors have equal
        keys), else where we came from, for `state_hash` to remember."""
        before = self._hashed
        if before is None or before[0] != self.steps - 1:
            return
        h = self.memo().successors.get((before[1], action))
        if h is not None and AUDIT is not None:
            true = hash(self.key())
            if true != h:
                self._audit("successor", (before[1], action),
                            f"{action} led to another key than it did from the same key")
                h = true
        if h is not None:
            self._hashed = (self.steps, h)
        else:
            self._came_from = (self.steps, before[1], action)

    def _audit(self, kind: str, entry: Any, detail: str) -> None:
        """Record a memo answer this state contradicts (`audited_memos`)."""
        assert AUDIT is not None
        first = self.memo().origins.get((kind, entry), ())
        AUDIT.append(MemoAudit(kind, first, tuple(self.history), detail))

    def _origin(self, kind: str, entry: Any) -> None:
        """While audited: remember the history that filled a memo entry."""
        self.memo().origins.setdefault((kind, entry), tuple(self.history))

    def memo_name(self) -> tuple[str, str, str | None]:
        """(model, configuration, variant): the worlds that may share memos."""
        k = self._memo_name
        if k is None:
            k = self._memo_name = (self.model, repr(sorted(self.config.items())), self.variant)
        return k

    def memo(self) -> Memo:
        """This world's memo, shared by every world of the same model, configuration and
        variant in this process."""
        k = self.memo_name()
        got = _MEMOS.get(k)
        if got is None:
            if len(_MEMOS) >= MEMO_WORLDS:  # a long-lived worker moves on to other jobs
                _MEMOS.clear()
            got = _MEMOS[k] = Memo()
        return got

    def checked(self) -> list[Violation]:
        """`check`, skipped for a state whose key was checked clean before (MEMO worlds)."""
        if not (self.MEMO and MEMOS_ON):
            return self.check()
        ev = self.event_key()
        if ev is None:
            return self.check()
        h = hash((self.state_hash(), ev)) if ev != () else self.state_hash()
        clean = self.memo().clean
        if h in clean:
            if AUDIT is not None:
                out = self.check()
                if out:
                    self._audit("clean", h, "checked clean before, violates "
                                + ", ".join(sorted({v.invariant for v in out})) + " now")
                return out
            self.discard_events()
            return []
        out = self.check()
        if not out:
            if len(clean) > MEMO_LIMIT:
                clean.clear()
            clean.add(h)
            if AUDIT is not None:
                self._origin("clean", h)
        return out

    def events(self) -> bool:
        """Whether the last step emitted anything the event predicates read
        (fpstate.check.invariants.READS_EVENTS); True unless a world knows better."""
        return True

    def shapes_hash(self) -> int | None:
        """A hash of everything the shape predicates read (READS_SHAPES), None when the world
        does not compute one (they run on every check then)."""
        return None

    def discard_events(self) -> None:  # noqa: B027 (a hook: most worlds emit nothing)
        """What `check` does besides checking (forget the step's emissions), for a step whose
        check was skipped."""

    def enabled_actions(self) -> list[Action]:
        """`enabled` without the configuration's ``omit``, memoised by key for MEMO
        worlds."""
        if not (self.MEMO and MEMOS_ON):
            return self._explorable()
        by_key = self.memo().enabled
        h = self.state_hash()
        got = by_key.get(h)
        if got is None:
            if len(by_key) > MEMO_LIMIT // 4:
                by_key.clear()
            got = by_key[h] = self._explorable()
            if AUDIT is not None:
                self._origin("enabled", h)
        elif AUDIT is not None:
            fresh = self._explorable()
            if fresh != got:
                self._audit("enabled", h, "enables "
                            + ", ".join(sorted(map(str, set(fresh) ^ set(got))))
                            + " differently")
                return fresh
        return got

    def _explorable(self) -> list[Action]:
        acts = self.enabled()
        omit = self.omit
        return [a for a in acts if a.name not in omit] if omit else acts

    def in_flight(self) -> bool:
        """True when a kernel path is suspended inside the model (a deep copy cannot be made:
        clone replays the history instead)."""
        return False

    def clone(self) -> World:
        if not self.in_flight():
            return copy.deepcopy(self)
        return self.replay(self.history)

    def replay(self, actions: Iterable[Action]) -> World:
        """A fresh world of the same configuration after ``actions`` (StepError if one of
        them is illegal on the way)."""
        w = type(self)(self.config, self.variant)
        for a in actions:
            w.step(a)
        return w
