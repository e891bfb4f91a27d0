"""Kernel-layer cases about tasks: AMX first use (XFD), fork/vfork/clone, execve.

Real side: `fpstate.host.runner` (an AMX instruction on a kernel that did not enable AMX),
`fpstate.host.amx` (first use without permission; fork after tile use), `fpstate.host.process`
(the registers and permission a new task starts with, and what an execve'd image starts with).
Model side: `Machine.user_write` (#UD, or #NM -> handle_xfd_event), `process.sys_clone` (fpu_clone,
fpu_inherit_perms) and `process.sys_execve` (fpu_flush_thread) from the registers the host
probe loaded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fpstate.errors import HostUnavailable
from fpstate.kernel.x86.conform import (
    Case,
    Facts,
    HostAnswer,
    answer,
    errno_of,
    host_amx_reason,
    host_pku_reason,
    host_system,
    host_without_amx_reason,
    image_registers,
    keys_taken_before,
    load_registers,
    model_registers,
    prefixed,
    user_task,
)
from fpstate.kernel.x86.sched import SIGILL, Machine
from fpstate.kernel.x86.types import CLONE_THREAD, CLONE_VFORK, CLONE_VM, FpuSystem
from fpstate.kernel.x86.xstate_prctl import (
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILEDATA,
    sys_arch_prctl,
)
from fpstate.x86.xfeatures import MXCSR_DEFAULT

# -- XFD: AMX instructions ------------------------------------------------------------------------

_SIGINFO = re.compile(r"(SIG[A-Z]+) si_code=(0x[0-9a-f]+|\d+)")


def _amx_insn_host() -> HostAnswer:
    from fpstate.host.runner import host_xsave, run_program
    from fpstate.x86.program import Insn, Program

    start = bytearray(host_xsave().size)
    start[0:2] = (0x37F).to_bytes(2, "little")
    start[24:28] = MXCSR_DEFAULT.to_bytes(4, "little")
    cfg = bytes([1, 0]) + bytes(14) + (64).to_bytes(2, "little") + bytes(30) + bytes([16]) + \
        bytes(15)
    out = run_program(Program(bytes(start), (Insn("LDTILECFG", data=cfg),)))
    facts: Facts = {"vector": out.fault.vector if out.fault else None}
    match = _SIGINFO.search(out.fault.reason if out.fault else "")
    facts["signal"] = match.group(1) if match else None
    facts["si_code"] = int(match.group(2), 0) if match else None
    return HostAnswer(facts)


def _amx_insn_model(system: FpuSystem, given: Any) -> Facts:
    """LDTILECFG with XCR0[17] = 0: #UD -> SIGILL/ILL_ILLOPN (do_error_trap), fatal here."""
    m = Machine(system, 1)
    t = user_task(m)
    fault = m.user_write(0, 17)
    sig = t.killed_by
    return {"vector": fault.vector if fault else None,
            "signal": "SIGILL" if sig and sig.sig == SIGILL else (str(sig.sig) if sig else None),
            "si_code": sig.code if sig else None}


def _sigill_host() -> HostAnswer:
    from fpstate.host.amx import first_use_without_permission

    signo, si_code = first_use_without_permission()
    return HostAnswer({"signal": "SIGILL" if signo == SIGILL else str(signo), "si_code": si_code})


def _sigill_model(system: FpuSystem, given: Any) -> Facts:
    """TILERELEASE-class first use with IA32_XFD[18] armed and no permission: #NM ->
    handle_xfd_event -> xfd_enable_feature() = -EPERM -> SIGILL/ILL_ILLOPC."""
    m = Machine(system, 1)
    t = user_task(m)
    m.user_write(0, 18)
    sig = t.killed_by
    return {"signal": "SIGILL" if sig and sig.sig == SIGILL else (str(sig.sig) if sig else None),
            "si_code": sig.code if sig else None}


# -- fork, clone, exec ----------------------------------------------------------------------------

SIGCHLD = 17
#: pthread_create's CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
#: CLONE_SYSVSEM, as fpstate.host.process uses it.
THREAD_FLAGS = 0x00050F00
assert THREAD_FLAGS & CLONE_THREAD and THREAD_FLAGS & CLONE_VM
#: The probes' clone flags (fpstate.host.process): fork and vfork are clone() with these.
INHERIT_FLAGS = {
    "fork": SIGCHLD,
    "vfork": CLONE_VM | CLONE_VFORK | SIGCHLD,
    "thread": THREAD_FLAGS,
    "clone-vm": CLONE_VM | SIGCHLD,
}


def _inherit_host(kind: str) -> Callable[[], HostAnswer]:
    def host() -> HostAnswer:
        from fpstate.host.process import inherit

        run = inherit(kind.replace("-", "_"))
        system = host_system()
        facts: Facts = {"child ran": run.child is not None,
                        "parent resumed": run.parent_after is not None}
        if run.child is not None:
            facts.update(prefixed("child", image_registers(system, run.child.raw)))
            facts["child GET_XCOMP_PERM"] = answer(run.child_perm_ret, run.child_perm
                                                    if run.child_perm_ret == 0 else None)
        if run.parent_after is not None:
            facts.update(prefixed("parent after", image_registers(system, run.parent_after.raw)))
        return HostAnswer(facts, run.parent_before.raw)

    return host


def _inherit_model(kind: str) -> Callable[[FpuSystem, Any], Facts]:
    def model(system: FpuSystem, before: bytes) -> Facts:
        from fpstate.kernel.x86.process import sys_clone

        m = Machine(system, 2)
        user_task(m, 0)
        load_registers(m, 0, before)
        child = m.syscall(0, sys_clone, INHERIT_FLAGS[kind])
        m.run(1, child)
        facts: Facts = {"child ran": True, "parent resumed": True}
        facts.update(prefixed("child", model_registers(m, 1)))
        out = child.user_sp - 64
        ret = m.syscall(1, sys_arch_prctl, ARCH_GET_XCOMP_PERM, out)
        value = int.from_bytes(child.process.mm.read(out, 8), "little") if ret == 0 else None
        facts["child GET_XCOMP_PERM"] = answer(ret, value)
        facts.update(prefixed("parent after", model_registers(m, 0)))
        return facts

    return model


def _exec_host() -> HostAnswer:
    from fpstate.host.process import exec_state

    run = exec_state()
    system = host_system()
    facts: Facts = prefixed("image", image_registers(system, run.image.raw))
    bv = run.image.xstate_bv
    raw = run.image.raw
    if bv & 2 and not any(raw[160:416]) and int.from_bytes(raw[24:28], "little") == 0x1F80:
        # In about 1 run in 100 this nested guest comes back to user mode with XINUSE[1] set
        # while XMM0-15 are zero and MXCSR is 1F80H (measured; fpstate.x86.insn.preemptions
        # allows it for the CPU layer): SSE holds its initial values, so it counts as init.
        bv &= ~2
    facts["image XINUSE"] = bv
    facts["GET_XCOMP_SUPP"] = run.supp
    facts["GET_XCOMP_PERM"] = run.perm
    facts["GET_XCOMP_GUEST_PERM"] = run.guest_perm
    return HostAnswer(facts, run.parent_before.raw)


def _exec_model(system: FpuSystem, before: bytes) -> Facts:
    from fpstate.kernel.x86.process import sys_execve

    m = Machine(system, 1)
    t = user_task(m)
    load_registers(m, 0, before)
    m.syscall(0, sys_execve, "probe")
    facts: Facts = prefixed("image", model_registers(m, 0))
    facts["image XINUSE"] = m.cpus[0].regs.xgetbv1() & system.xcr0
    out = t.user_sp - 64
    for option, name in ((ARCH_GET_XCOMP_SUPP, "GET_XCOMP_SUPP"),
                         (ARCH_GET_XCOMP_PERM, "GET_XCOMP_PERM"),
                         (ARCH_GET_XCOMP_GUEST_PERM, "GET_XCOMP_GUEST_PERM")):
        ret = m.syscall(0, sys_arch_prctl, option, out)
        facts[name] = int.from_bytes(t.process.mm.read(out, 8), "little") if ret == 0 \
            else errno_of(ret)
    return facts


def _amx_inherit_host() -> HostAnswer:
    from fpstate.host.amx import inherit_after_tiles

    run = inherit_after_tiles()
    if run.child is None:
        raise HostUnavailable(f"the AMX fork probe's child never ran ({run.exit})")
    facts = prefixed("child", image_registers(host_system(), run.child.raw))
    facts["child XINUSE"] = run.child.xstate_bv
    facts["child GET_XCOMP_PERM"] = answer(run.child_perm_ret, run.child_perm
                                           if run.child_perm_ret == 0 else None)
    return HostAnswer(facts, run.parent_before.raw)


def amx_inherit_model(system: FpuSystem, given: Any) -> Facts:
    """fork() after AMX permission and tile use: the child gets the permission (fpu_inherit_
    perms) and every register but tile data, which starts in its initial state (fpu_clone
    saves with the child's default features)."""
    from fpstate.kernel.x86.process import sys_clone

    m = Machine(system, 2)
    user_task(m, 0)
    m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA)
    load_registers(m, 0, given)
    child = m.syscall(0, sys_clone, 17)
    m.run(1, child)
    facts = prefixed("child", model_registers(m, 1))
    facts["child XINUSE"] = m.cpus[1].regs.xgetbv1() & system.xcr0
    out = child.user_sp - 64
    ret = m.syscall(1, sys_arch_prctl, ARCH_GET_XCOMP_PERM, out)
    facts["child GET_XCOMP_PERM"] = answer(ret, int.from_bytes(child.process.mm.read(out, 8),
                                                                "little") if ret == 0 else None)
    return facts



# -- CPU hotplug ----------------------------------------------------------------------------------


def _hotplug_reason() -> str | None:
    from fpstate.host.hotplug import hotplug_unavailable

    return hotplug_unavailable(1)


def _hotplug_host() -> HostAnswer:
    from fpstate.host.hotplug import cpu_cycle_while_asleep

    run = cpu_cycle_while_asleep(1)
    if run.after is None:
        raise HostUnavailable(f"the hotplug probe's child never woke ({run.exit})")
    return HostAnswer(prefixed("after", image_registers(host_system(), run.after.raw)),
                      run.before.raw)


def hotplug_model(system: FpuSystem, before: bytes) -> Facts:
    """A task holding ``before`` on CPU 1 sleeps (switched out: CPU 1 idles with its registers
    still valid for it), CPU 1 goes offline and comes back (smpboot.cpu_down_up), and the task
    returns to user mode there: what it holds."""
    from fpstate.kernel.x86.smpboot import cpu_down_up

    m = Machine(system, 2)
    t = user_task(m, 1)
    load_registers(m, 1, before)
    m.idle(1)
    cpu_down_up(m, 1)
    m.run(1, t)
    return prefixed("after", model_registers(m, 1))


# -- protection keys across fork ------------------------------------------------------------------


def _pkey_fork_host() -> HostAnswer:
    from fpstate.host.pkeys import pkey_inheritance

    facts = pkey_inheritance()
    return HostAnswer(facts, facts["parent pkey_alloc"])


def pkey_fork_model(system: FpuSystem, first_key: int) -> Facts:
    """The probe of `fpstate.host.pkeys.pkey_inheritance` on the model: pkey_alloc,
    pkey_mprotect of a two-page mapping, fork (sys_clone: the child's mm is a copy, keys and
    allocation map included), the child's pkey_alloc and pkey_free of the parent's key, then
    the parent's pkey_mprotect with it and its own next pkey_alloc. ``first_key`` is the key
    the host's first pkey_alloc gave (the keys below it were taken before, in the process the
    probe was forked from)."""
    from fpstate.kernel.x86.pkeys import sys_pkey_alloc, sys_pkey_free, sys_pkey_mprotect
    from fpstate.kernel.x86.process import sys_clone

    m = Machine(system, 1)
    t = user_task(m)
    keys_taken_before(t, first_key)
    base = m.mmap(t, 2 * 4096)
    facts: Facts = {"parent pkey_alloc": m.syscall(0, sys_pkey_alloc, 0, 0)}
    key = facts["parent pkey_alloc"]
    m.syscall(0, sys_pkey_mprotect, base, 2 * 4096, key)
    facts["parent mapping ProtectionKey"] = t.process.mm.pkeys.get(base, 0)
    child = m.syscall(0, sys_clone, 0, "child")
    m.run(0, child)
    facts["child mapping ProtectionKey"] = child.process.mm.pkeys.get(base, 0)
    facts["child pkey_alloc"] = m.syscall(0, sys_pkey_alloc, 0, 0)
    facts["child pkey_free(parent key)"] = m.syscall(0, sys_pkey_free, key)
    m.run(0, t)
    facts["parent pkey_mprotect(parent key) after the child freed it"] = m.syscall(
        0, sys_pkey_mprotect, base, 4096, key)
    facts["parent pkey_alloc after the child's"] = m.syscall(0, sys_pkey_alloc, 0, 0)
    return facts


# -- the execute-only protection key -----------------------------------------------------------


def _exec_only_host() -> HostAnswer:
    from fpstate.host.pkeys import execute_only_keys

    facts = execute_only_keys()
    return HostAnswer(facts, (facts["A ProtectionKey"], tuple(facts)))


def exec_only_model(system: FpuSystem, given: tuple[int, tuple[str, ...]]) -> Facts:
    """The probe of `fpstate.host.pkeys.execute_only_keys` on the model: three one-page
    mappings A, B, C and the probe's mprotect / pkey_mprotect / pkey_alloc / pkey_free calls,
    the thread's WRPKRU opening the execute-only key in between; "rights" are that key's two
    PKRU bits. ``given`` is the execute-only key the host got (the lowest free one: the keys
    below it were taken in the process the probe was forked from) and the names of the
    probe's answers (host.pkeys.EXEC_ONLY_FACTS), in order."""
    from fpstate.kernel.x86.mm import PROT_EXEC, PROT_READ
    from fpstate.kernel.x86.pkeys import (
        sys_mprotect,
        sys_pkey_alloc,
        sys_pkey_free,
        sys_pkey_mprotect,
    )
    from fpstate.kernel.x86.signal import read_pkru

    first_key, names = given
    m = Machine(system, 1)
    t = user_task(m)
    keys_taken_before(t, first_key)
    c, mm = m.cpus[0], t.process.mm
    a, b, cc = (m.mmap(t, 4096) for _ in range(3))
    out: list[int] = []

    def rights(key: int) -> int:
        return read_pkru(c) >> (2 * key) & 3

    first = m.syscall(0, sys_pkey_alloc, 0, 0)  # the probe's look at the lowest free key
    m.syscall(0, sys_pkey_free, first)
    out.append(rights(first))
    out.append(m.syscall(0, sys_mprotect, a, 4096, PROT_EXEC))
    key = mm.pkeys.get(a, 0)
    out += [key, rights(key)]
    other = m.syscall(0, sys_pkey_alloc, 0, 0)
    out.append(other)
    c.regs.wrpkru(read_pkru(c) & ~(0b11 << 2 * key))  # the thread opens the key
    out += [m.syscall(0, sys_mprotect, b, 4096, PROT_EXEC), mm.pkeys.get(b, 0), rights(key)]
    out += [m.syscall(0, sys_mprotect, a, 4096, PROT_READ), mm.pkeys.get(a, 0)]
    out += [m.syscall(0, sys_mprotect, a, 4096, PROT_READ | PROT_EXEC), mm.pkeys.get(a, 0)]
    out += [m.syscall(0, sys_pkey_mprotect, b, 4096, other, PROT_EXEC), mm.pkeys.get(b, 0)]
    out += [m.syscall(0, sys_mprotect, b, 4096, PROT_READ), mm.pkeys.get(b, 0)]
    out += [m.syscall(0, sys_pkey_free, key), m.syscall(0, sys_pkey_alloc, 0, 0), rights(key)]
    out += [m.syscall(0, sys_mprotect, cc, 4096, PROT_EXEC), mm.pkeys.get(cc, 0), rights(key)]
    return dict(zip(names, out, strict=True))


# -- mmap(PROT_EXEC) -----------------------------------------------------------------------------


def _mmap_exec_host() -> HostAnswer:
    from fpstate.host.pkeys import mmap_execute_only

    facts = mmap_execute_only()
    return HostAnswer(facts, (facts["first free key"], tuple(facts)))


def mmap_exec_model(system: FpuSystem, given: tuple[int, tuple[str, ...]]) -> Facts:
    """The probe of `fpstate.host.pkeys.mmap_execute_only` on the model: mmap(PROT_EXEC)
    twice (the thread opening the execute-only key in between), mmap(PROT_READ |
    PROT_EXEC), pkey_alloc, mprotect(PROT_READ) of the first. ``given`` is the lowest free
    key the host saw and the names of the probe's answers, in order."""
    from fpstate.kernel.x86.mm import PROT_EXEC, PROT_READ
    from fpstate.kernel.x86.pkeys import sys_mmap, sys_mprotect, sys_pkey_alloc
    from fpstate.kernel.x86.signal import read_pkru

    first_key, names = given
    m = Machine(system, 1)
    t = user_task(m)
    keys_taken_before(t, first_key)
    c, mm = m.cpus[0], t.process.mm

    def rights(key: int) -> int:
        return read_pkru(c) >> (2 * key) & 3

    out = [first_key, m.syscall(0, sys_mmap, 0, PROT_EXEC)]
    one = m.syscall(0, sys_mmap, 4096, PROT_EXEC)
    key = mm.pkeys.get(one, 0)
    out += [key, rights(key)]
    c.regs.wrpkru(read_pkru(c) & ~(0b11 << 2 * key))  # the thread opens the key
    two = m.syscall(0, sys_mmap, 4096, PROT_EXEC)
    out += [mm.pkeys.get(two, 0), rights(key)]
    three = m.syscall(0, sys_mmap, 4096, PROT_READ | PROT_EXEC)
    out += [mm.pkeys.get(three, 0), m.syscall(0, sys_pkey_alloc, 0, 0),
            m.syscall(0, sys_mprotect, one, 4096, PROT_READ), mm.pkeys.get(one, 0)]
    return dict(zip(names, out, strict=True))


# -- mprotect over a hole ------------------------------------------------------------------------


def _hole_host() -> HostAnswer:
    from fpstate.host.pkeys import mprotect_over_hole

    facts = mprotect_over_hole()
    return HostAnswer(facts, (facts["pkey_alloc"], tuple(facts)))


#: Where the model puts the probe's pages (a guard page, A, the hole, C's two pages, a guard).
HOLE_BASE = 0x7E00_0000_0000


def hole_model(system: FpuSystem, given: tuple[int, tuple[str, ...]]) -> Facts:
    """The probe of `fpstate.host.pkeys.mprotect_over_hole` on the model: A (one page), a
    one-page hole, C (two pages), and the probe's pkey_mprotect / mprotect calls over them.
    ``given`` is the key the host's pkey_alloc gave (the keys below it were taken in the
    process the probe was forked from) and the names of the probe's answers, in order."""
    from fpstate.kernel.x86.mm import PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_RW
    from fpstate.kernel.x86.pkeys import sys_mprotect, sys_pkey_alloc, sys_pkey_mprotect
    from fpstate.kernel.x86.signal import read_pkru

    first_key, names = given
    m = Machine(system, 1)
    t = user_task(m)
    keys_taken_before(t, first_key)
    c, mm = m.cpus[0], t.process.mm
    a, hole, cc = HOLE_BASE + PAGE_SIZE, HOLE_BASE + 2 * PAGE_SIZE, HOLE_BASE + 3 * PAGE_SIZE
    mm.map(a, PAGE_SIZE)
    mm.map(cc, 2 * PAGE_SIZE)
    key = m.syscall(0, sys_pkey_alloc, 0, 0)
    out = [key, m.syscall(0, sys_pkey_mprotect, a, 4 * PAGE_SIZE, key),
           mm.pkeys.get(a, 0), mm.pkeys.get(cc, 0),
           m.syscall(0, sys_pkey_mprotect, hole, 3 * PAGE_SIZE, key), mm.pkeys.get(cc, 0),
           m.syscall(0, sys_mprotect, a, 2 * PAGE_SIZE, PROT_EXEC)]
    got = mm.pkeys.get(a, 0)
    out += [got, read_pkru(c) >> (2 * got) & 3,
            m.syscall(0, sys_mprotect, a, 4 * PAGE_SIZE, PROT_READ), mm.pkeys.get(a, 0),
            mm.prots.get(a, PROT_RW), mm.prots.get(cc, PROT_RW)]
    return dict(zip(names, out, strict=True))


# -- pkey_alloc's rights and limits ----------------------------------------------------------


def _pkey_alloc_host() -> HostAnswer:
    from fpstate.host.pkeys import pkey_alloc_rights

    facts = pkey_alloc_rights()
    return HostAnswer(facts, (facts["first key"], tuple(facts)))


def pkey_alloc_model(system: FpuSystem, given: tuple[int, tuple[str, ...]]) -> Facts:
    """The probe of `fpstate.host.pkeys.pkey_alloc_rights` on the model (sys_pkey_alloc /
    sys_pkey_free; "rights" are the new key's PKRU bits as the thread's register holds them).
    ``given`` is the first key the host's pkey_alloc gave (the keys below it were taken in the
    process the probe was forked from) and the names of its answers, in order."""
    from fpstate.kernel.x86.pkeys import sys_pkey_alloc, sys_pkey_free
    from fpstate.kernel.x86.signal import read_pkru

    first_key, names = given
    m = Machine(system, 1)
    t = user_task(m)
    keys_taken_before(t, first_key)
    c = m.cpus[0]

    def rights(key: int) -> int:
        return read_pkru(c) >> (2 * key) & 3

    def alloc(init_val: int, flags: int = 0) -> int:
        return m.syscall(0, sys_pkey_alloc, flags, init_val)

    out = [alloc(0, 1), alloc(4)]
    first = alloc(1)
    out += [first - first, rights(first)]
    second = alloc(2)
    out += [second - first, rights(second)]
    third = alloc(3)
    out += [third - first, rights(third)]
    out += [m.syscall(0, sys_pkey_free, second), rights(second)]
    again = alloc(0)
    out += [again - first, rights(again)]
    out += [m.syscall(0, sys_pkey_free, 16), m.syscall(0, sys_pkey_free, -1)]
    n, ret = 0, 0
    while n < 16:
        ret = alloc(0)
        if ret < 0:
            break
        n += 1
    out += [n, ret, m.syscall(0, sys_pkey_free, 0), alloc(0), rights(0), first]
    return dict(zip(names, out, strict=True))


CASES: tuple[Case, ...] = (
    Case("xfd/amx-insn-without-xcr0", "#UD -> do_error_trap -> SIGILL/ILL_ILLOPN",
         _amx_insn_host, _amx_insn_model, host_without_amx_reason),
    Case("xfd/sigill-without-permission", "handle_xfd_event, __xfd_enable_feature (-EPERM)",
         _sigill_host, _sigill_model, host_amx_reason),
    *(Case(f"inherit/{k}", "copy_thread -> fpu_clone, fpu_inherit_perms", _inherit_host(k),
           _inherit_model(k)) for k in INHERIT_FLAGS),
    Case("inherit/amx-tiles-and-permission", "fpu_clone (tile data not copied), "
         "fpu_inherit_perms", _amx_inherit_host, amx_inherit_model, host_amx_reason),
    Case("exec/reset", "fpu_flush_thread -> fpstate_reset, fpu_reset_fpstate_regs",
         _exec_host, _exec_model),
    Case("cpu/hotplug", "native_kick_ap (fpu_fpregs_owner_ctx = NULL), fpu__init_cpu, "
         "fpregs_restore_userregs of a task that slept while its CPU was offline",
         _hotplug_host, hotplug_model, _hotplug_reason),
    Case("inherit/pkeys", "pkey_alloc, do_mprotect_pkey, dup_mmap / arch_dup_pkeys (the "
         "child's mm has the keyed VMAs and its own copy of the allocation map), pkey_free",
         _pkey_fork_host, pkey_fork_model, host_pku_reason),
    Case("mprotect/execute-only-key", "do_mprotect_pkey, arch_override_mprotect_pkey, "
         "__execute_only_pkey (the caller's PKRU denies the key), mm_pkey_is_allocated",
         _exec_only_host, exec_only_model, host_pku_reason),
    Case("mmap/execute-only-key", "do_mmap (PROT_EXEC alone: execute_only_pkey), "
         "__execute_only_pkey (the caller's PKRU denies the key, again once opened)",
         _mmap_exec_host, mmap_exec_model, host_pku_reason),
    Case("mprotect/over-a-hole", "do_mprotect_pkey: vma_find (a start in a hole: ENOMEM at "
         "once), the vm_start != tmp break and tmp < end (ENOMEM after the mappings before "
         "the hole changed), arch_override_mprotect_pkey (the execute-only key's PKRU write "
         "stays)", _hole_host, hole_model, host_pku_reason),
    Case("pkeys/alloc-rights-and-limits", "sys_pkey_alloc, mm_pkey_alloc, "
         "arch_set_user_pkey_access (init_val's rights in the caller's PKRU), sys_pkey_free",
         _pkey_alloc_host, pkey_alloc_model, host_pku_reason),
)
