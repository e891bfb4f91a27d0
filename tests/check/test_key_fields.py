"""Every field of the x86 model's objects is accounted for by the state key
(fpstate.check.statekey.FIELDS): keyed, or left out for a stated reason. A field added to the
model without a decision fails here; so does a field said to be keyed whose change leaves the
key as it was (session 4 added Task.killed_by, which changes what a state does, and the key
missed it until a later session)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from typing import Any

import pytest

from fpstate.check.scenario import make_world
from fpstate.check.statekey import FIELDS
from fpstate.check.world import Action
from fpstate.kernel.x86.hw import FpRegs
from fpstate.kernel.x86.sched import Cpu, Process, SigAction, Signal, Task
from fpstate.kernel.x86.types import Fpstate, Fpu, FpuGuest, FpuStatePerm
from fpstate.kvm.x86.vcpu import KvmVcpu, VcpuArch

A = Action.of

CLASSES = {"Task": Task, "Process": Process, "Fpu": Fpu, "Fpstate": Fpstate,
           "FpuStatePerm": FpuStatePerm, "Cpu": Cpu, "FpRegs": FpRegs, "KvmVcpu": KvmVcpu,
           "VcpuArch": VcpuArch, "FpuGuest": FpuGuest}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_field_is_keyed_or_left_out_with_a_reason(name: str) -> None:
    fields = {f.name for f in dataclasses.fields(CLASSES[name])}
    table = FIELDS[name]
    assert fields - set(table) == set(), f"{name}: fields the key table does not place"
    assert set(table) - fields == set(), f"{name}: the key table names fields that are gone"
    assert all(why == "key" or len(why) > 10 for why in table.values())


def test_the_machine_and_the_world_place_every_attribute() -> None:
    w = make_world("x86", {}, None)
    for name, obj in (("Machine", w.m), ("World", w)):
        attrs, table = set(vars(obj)), FIELDS[name]
        assert attrs - set(table) == set(), f"{name}: attributes the key table does not place"
        assert set(table) - attrs == set(), f"{name}: the key table names attributes that are gone"


def _world():
    """A state with a signal frame, a sigaltstack, AMX permission, a pending KVM_RUN and both
    CPUs busy, so that most fields have something to say."""
    w = make_world("x86", {}, None)
    for a in [A("run", task="p0.t0", cpu=0), A("sigaltstack", task="p0.t0", size=16384),
              A("sigaction", task="p0.t0", onstack=True), A("write", task="p0.t0",
                                                            component="avx"),
              A("arch_prctl", task="p0.t0", option="req_perm", feature=18),
              A("run", task="p1.t0", cpu=1),
              A("kvm_enter", task="p1.t0", vcpu="vm0.v0", guest="write avx")]:
        w.step(a)
    return w


def _objects(w: Any) -> Iterator[tuple[str, str, Any]]:
    """(where, class name, object) of every model object the key reads, by a path that finds
    the same object in a clone of ``w``."""
    for comm, t in sorted(w.tasks.items()):
        yield f"task {comm}", "Task", t
        yield f"process of {comm}", "Process", t.process
        yield f"fpu of {comm}", "Fpu", t.fpu
        yield f"fpstate of {comm}", "Fpstate", t.fpu.fpstate
        yield f"perm of {comm}", "FpuStatePerm", t.fpu.perm
        yield f"guest perm of {comm}", "FpuStatePerm", t.fpu.guest_perm
    for c in w.m.cpus:
        yield f"cpu {c.nr}", "Cpu", c
        yield f"regs of cpu {c.nr}", "FpRegs", c.regs
    for name, v in sorted(w.vcpus.items()):
        yield f"vcpu {name}", "KvmVcpu", v
        yield f"arch of {name}", "VcpuArch", v.arch
        yield f"guest fpu of {name}", "FpuGuest", v.arch.guest_fpu


def _changed(value: Any, field: str) -> tuple[bool, Any]:
    """(True, another value of the same kind) for a plain field, (False, None) for a reference
    to another model object (its own fields are changed on their own)."""
    if isinstance(value, bool):
        return True, not value
    if isinstance(value, enum.Enum):
        return True, next(m for m in type(value) if m is not value)
    if field in ("thread_pkru", "pkru", "host_pkru"):  # u32 registers
        return True, value ^ 0x4
    if isinstance(value, int):
        return True, 0 if value == -1 else -1
    if isinstance(value, str):
        return True, value + "x"
    if field == "killed_by":
        return True, None if value is not None else Signal(9)
    if field == "pending":
        return True, [*value, Signal(12)]
    if field == "handlers":
        return True, {**value, 12: SigAction()}
    return False, None


def test_changing_a_keyed_field_changes_the_key() -> None:
    w = _world()
    base = w.key()
    tried = 0
    for where, cls, obj in _objects(w):
        for field, why in FIELDS[cls].items():
            if why != "key":
                continue
            plain, new = _changed(getattr(obj, field), field)
            if not plain:
                continue
            c = w.clone()
            target = next(o for wh, _, o in _objects(c) if wh == where)
            setattr(target, field, new)
            assert c.key() != base, f"{where}: {cls}.{field} changed, the key did not"
            tried += 1
    assert tried > 150


def test_a_guests_xfd_err_and_its_loosened_components_are_keyed() -> None:
    """The checker's own record of what a guest expects beside its component values: its
    IA32_XFD_ERR, and the components it armed in XFD while they held a value of its own
    (which may read back as initial): both change what the invariants say."""
    w = _world()
    base = w.key()
    c = w.clone()
    c.guest_xfd_err["vm0.v0"] = 1 << 18
    assert c.key() != base
    own = bytes(range(256))  # a value of the guest's own in YMM_Hi128
    held, loosened = w.clone(), w.clone()
    for c in (held, loosened):
        c.expected["vm0.v0"][2] = own
    loosened.guest_loose["vm0.v0"][2] = own
    assert held.key() != loosened.key()
