"""Linux arm64 FP/SIMD/SVE/SME/FPMR context management: arch/arm64/kernel/fpsimd.c (v6.17).

Rules this file keeps (the kernel's, from the comment at the top of fpsimd.c)
--------------------------------------------------------------------------------
1. Each CPU's fpsimd_last_state names the context whose state its registers hold, or nobody
   (``st is None``: kernel-mode NEON or a flush ran since).  A task's ``fpsimd_cpu`` names
   the CPU that last held its state.  TIF_FOREIGN_FPSTATE is set unless the registers of
   this CPU hold current's latest user state.
2. Saves go through the binding, never through ``current``: when a VMM thread runs a vCPU,
   KVM binds the vCPU's storage and a save (kernel NEON, context switch) writes guest state
   into the vCPU.  ``to_save`` says the format; a save at a VL other than the live one
   cannot be made consistent and kills the task (fpsimd_save_user_state()).
3. FPSR/FPCR always live in user_fpsimd_state; Z/P/FFR in sve_state when fp_type is SVE.
4. The syscall ABI discards streaming mode and the non-FPSIMD SVE state at syscall entry.

Theory of operation
-------------------
Events are functions ``Host -> Host``, named after the kernel function they model;
preemption is `schedule`.  EL0 entry/exit and user instructions (which take the SVE/SME
access traps exactly where the CPACR_EL1 EL0 enables say) are in
`fpstate.kernel.arm64.entry_common`.  Every context's writes are recorded in
``Host.latest``; every legitimate discard (syscall, exec, SMSTOP, VL change) records the
value the architecture leaves, so the invariants can check that a context reads back
exactly its own latest state.
"""

from __future__ import annotations

from fpstate.arm64.cpu import CpuProfile
from fpstate.arm64.regs import (
    FPMR,
    FPSR,
    SVCR_SM,
    SVCR_ZA,
    TPIDR2,
    VL_ARCH_MAX,
    ZA,
    ZERO,
    ZHI,
    ZT0,
    ZT_SIG_REG_SIZE,
    FpRegs,
    P,
    V,
    effective_vq,
    smstop,
    sve_regs_size,
    sve_vl_from_vq,
    sve_vl_valid,
    sve_vq_from_vl,
    za_regs_size,
)
from fpstate.arm64.statemachine import IllegalEvent, TransitionTable, replace
from fpstate.kernel.arm64 import process
from fpstate.kernel.arm64.state import (
    ARM64_VEC_SME,
    ARM64_VEC_SVE,
    FP_STATE_CURRENT,
    FP_STATE_FPSIMD,
    FP_STATE_SVE,
    LOAD_FPMR_BEFORE_SVCR,
    NR_CPUS,
    TASK_KERNEL,
    TASK_NEW,
    TASK_SLEEPING,
    TASK_USER,
    Binding,
    Cpu,
    FpStore,
    Host,
    HostCaps,
    Observation,
    Task,
)

#: Task mode lifecycle (where the task is with respect to its FP state).
TASK_LIFECYCLE = TransitionTable.of("task", [
    (TASK_NEW, "schedule_in", TASK_KERNEL),
    (TASK_SLEEPING, "schedule_in", TASK_KERNEL),
    (TASK_KERNEL, "schedule_out", TASK_SLEEPING),
    (TASK_KERNEL, "ret_to_user", TASK_USER),
    (TASK_USER, "syscall", TASK_KERNEL),
    (TASK_USER, "interrupt", TASK_KERNEL),
    (TASK_USER, "user_op", TASK_USER),
    (TASK_KERNEL, "kernel_op", TASK_KERNEL),
])

PR_SVE_SET_VL_ONEXEC = 1 << 18
PR_SVE_VL_INHERIT = 1 << 17
PR_SVE_VL_LEN_MASK = 0xFFFF
EINVAL, ENOMEM = 22, 12


# --- boot and task creation ------------------------------------------------------------------
def boot(profile: CpuProfile, ncpus: int = 2,
         variants: frozenset[str] = frozenset()) -> Host:
    """A host of ``ncpus`` identical CPUs after fpsimd_init()/sve_setup()/sme_setup(),
    running the rejected designs ``variants`` that Host.variants carries."""
    caps = HostCaps.from_profile(profile)
    regs = FpRegs(zcr_limit=15)
    return Host(caps, tuple(Cpu(i, regs) for i in range(ncpus)), variants=variants)


def spawn(host: Host, name: str) -> Host:
    """A new user task in the state exec leaves it in (fpsimd_flush_thread() applied)."""
    if name in host.tasks:
        raise IllegalEvent("task", "exists", "spawn", f"task {name!r} already exists")
    task = Task(name)
    host = host.with_task(task).with_store(task.store, FpStore(name))
    return _flush_thread(host, name)


def _vl_default(host: Host, kind: str, onexec: int) -> int:
    info = host.caps.vl_info(kind)
    assert info is not None
    vl = onexec or info.default_vl
    return info.find_supported_vector_length(vl)


def _flush_thread(host: Host, name: str, keep_fpmr: bool = False) -> Host:
    """fpsimd_flush_thread() for task ``name`` (exec): zero the FP state, drop sve_state and
    sme_state, reset the VLs to vl_onexec or the default, SVCR=0, FPMR=0, fp_type=FPSIMD.

    ``keep_fpmr`` is the rejected design before a90878f297d3 ("arm64/fpsimd: Reset FPMR upon
    exec()", April 2025): uw.fpmr left as the old program's last save put it, which the new
    program's first return to user loads."""
    old_fpmr = host.store(host.task(name).store).fpmr if keep_fpmr else ZERO
    t = fpsimd_flush_task_state(host, name).task(name)
    caps = host.caps
    if caps.sve:
        vl = _vl_default(host, ARM64_VEC_SVE, t.sve_vl_onexec)
        t = replace(t, tif_sve=False, sve_vl=vl,
                    sve_vl_onexec=t.sve_vl_onexec if t.tif_sve_vl_inherit else 0)
    if caps.sme:
        vl = _vl_default(host, ARM64_VEC_SME, t.sme_vl_onexec)
        t = replace(t, tif_sme=False, sme_vl=vl,
                    sme_vl_onexec=t.sme_vl_onexec if t.tif_sme_vl_inherit else 0)
    # exec's new stack has no signal frame
    host = host.with_task(replace(t, sigframes=())).with_store(t.store,
                                                                FpStore(name, fpmr=old_fpmr))
    return host.expect(name, {c: ZERO for c in (V, ZHI, P, FPSR, FPMR, ZA, ZT0, TPIDR2)})


# --- small helpers --------------------------------------------------------------------------
def current_task(host: Host, cpu: int) -> Task:
    """``current`` on ``cpu``; IllegalEvent if the CPU is idle."""
    t = host.current(cpu)
    if t is None:
        raise IllegalEvent("cpu", "idle", "task event", f"no task runs on CPU {cpu}")
    return t


def task_event(host: Host, task: Task, event: str, **changes: object) -> Host:
    """Step ``task`` through TASK_LIFECYCLE (IllegalEvent if the event is not allowed),
    with ``changes`` to its other fields made in the same update."""
    mode = TASK_LIFECYCLE.table.get((task.mode, event))
    if mode is None:
        TASK_LIFECYCLE.step(task.mode, event, f"task {task.name}")  # raises IllegalEvent
    if mode == task.mode and not changes and host.tasks.get(task.name) is task:
        return host  # user_op, kernel_op: the task stays where it is
    return host.update_task(task, mode=mode, **changes)


def live_vl(host: Host, cpu: int) -> int:
    """RDVL: the live vector length in bytes (the SME VL in streaming mode)."""
    regs, caps = host.cpus[cpu].regs, host.caps
    if regs.sm and caps.sme_vl:
        return sve_vl_from_vq(effective_vq(regs.smcr_len, 15, caps.sme_vl.vqs))
    if caps.sve_vl:
        return sve_vl_from_vq(effective_vq(regs.zcr_len, regs.zcr_limit, caps.sve_vl.vqs))
    return 0


def sve_state_size(sve_vl: int, sme_vl: int) -> int:
    """__sve_state_size(): SVE_SIG_REGS_SIZE at the larger of the two vector lengths."""
    return sve_regs_size(sve_vq_from_vl(max(sve_vl, sme_vl)))


def sme_state_size(host: Host, sme_vl: int) -> int:
    """__sme_state_size(): ZA_SIG_REGS_SIZE plus ZT_SIG_REG_SIZE with SME2.  The kernel adds
    ZT_SIG_REG_SIZE, which is 512 (bits), although ZT0 needs 64 bytes: 448 bytes of slack."""
    return za_regs_size(sve_vq_from_vl(sme_vl)) + (ZT_SIG_REG_SIZE if host.caps.sme2 else 0)


# --- binding, flush, save, load ---------------------------------------------------------------
def fpsimd_flush_task_state(host: Host, name: str) -> Host:
    """fpsimd_flush_task_state(): invalidate any CPU copy (fpsimd_cpu = NR_CPUS, TIF_FOREIGN)."""
    t = host.task(name)
    return host.update_task(t, fpsimd_cpu=NR_CPUS,
                            tif_foreign_fpstate=t.tif_foreign_fpstate or host.caps.fpsimd)


def fpsimd_flush_cpu_state(host: Host, cpu: int) -> Host:
    """fpsimd_flush_cpu_state(): nobody's state is bound (st = NULL); SMSTOP so that SM and
    ZA are off; TIF_FOREIGN_FPSTATE set for current."""
    c = host.cpus[cpu]
    regs = smstop(c.regs, True, True) if host.caps.sme else c.regs
    host = host.with_cpu(replace(c, regs=regs, last=replace(c.last, st=None)))
    t = host.current(cpu)
    if t is not None:
        host = host.update_task(t, tif_foreign_fpstate=True)
    return host


def cpu_power_cycle(host: Host, cpu: int, *, keep_binding: bool = False) -> Host:
    """An idle CPU loses its FP registers and comes back: taken offline and back
    (fpsimd_cpu_dead(), the CPUHP_ARM64_FPSIMD_DEAD teardown: fpsimd_last_state.st = NULL) or
    powered down by cpuidle (fpsimd_cpu_pm_notifier() at CPU_PM_ENTER:
    fpsimd_save_and_flush_cpu_state(), which has no user state to save for the idle task and
    unbinds). The FP/SIMD, SVE and SME registers come back UNKNOWN (a token of writer
    ``reset:<cpu>``), PSTATE.SM and PSTATE.ZA 0, and EL0 SVE/SME access trapped until a task's
    load enables it. ``keep_binding``: the code before 32365e64a20e (hotplug, 2015) and
    7c68a9cc0402 (CPU PM, 2014), which left fpsimd_last_state naming the last state loaded,
    so that its task skipped the reload there."""
    c = host.cpus[cpu]
    if c.current is not None or c.in_softirq_neon:
        raise IllegalEvent("cpu", "busy", "cpu_power_cycle", "only an idle CPU powers down")
    tok = host.next_token(f"reset:{cpu}")
    regs = replace(c.regs, v=tok, zhi=tok, p=tok, fpsr=tok, fpmr=tok, za=tok, zt0=tok,
                   sm=False, za_on=False)
    host = host.write(cpu, regs)
    last = host.cpus[cpu].last if keep_binding else replace(host.cpus[cpu].last, st=None)
    return host.update_cpu(cpu, last=last, el0_sve=False, el0_sme=False)


def fpsimd_bind_task_to_cpu(host: Host, cpu: int) -> Host:
    """fpsimd_bind_task_to_cpu(): bind current's thread storage, to_save = FP_STATE_CURRENT,
    fpsimd_cpu = this CPU, EL0 SVE/SME traps per TIF_SVE/TIF_SME."""
    t = current_task(host, cpu)
    last = Binding(t.store, t.sve_vl, t.sme_vl, FP_STATE_CURRENT, t.store)
    c = replace(host.cpus[cpu], last=last,
                el0_sve=t.tif_sve and host.caps.sve, el0_sme=t.tif_sme and host.caps.sme)
    return host.with_cpu_task(c, replace(t, fpsimd_cpu=cpu))


def fpsimd_bind_state_to_cpu(host: Host, cpu: int, state: Binding) -> Host:
    """fpsimd_bind_state_to_cpu(): copy an arbitrary descriptor into fpsimd_last_state."""
    return host.update_cpu(cpu, last=state)


def fpsimd_save_user_state(host: Host, cpu: int) -> Host:
    """fpsimd_save_user_state(): write the registers into the storage the binding names.

    Skipped when TIF_FOREIGN_FPSTATE is set.  FPMR is stored whenever the *host* has it;
    SVE format when to_save says SVE (or CURRENT with TIF_SVE) or in streaming mode, at the
    bound VL; a live VL other than the bound one cannot be saved and current is killed."""
    t = host.current(cpu)
    if t is None or t.tif_foreign_fpstate:
        return host
    c, caps = host.cpus[cpu], host.caps
    last, regs = c.last, c.regs
    assert last.st is not None, "TIF_FOREIGN_FPSTATE clear but nothing bound"
    save: dict[str, object] = {}  # the stores into last.st, made in one update
    if caps.fpmr:
        key = last.fpmr or last.st
        if key == last.st:
            save["fpmr"] = regs.fpmr
        else:
            host = host.with_store(key, replace(host.store(key), fpmr=regs.fpmr))
    st = host.store(last.st)
    save_sve = (last.to_save == FP_STATE_CURRENT and t.tif_sve) or last.to_save == FP_STATE_SVE
    vl = last.sve_vl
    if caps.sme:
        save["svcr"] = regs.svcr
        if regs.za_on:
            save.update(za=regs.za, zt0=regs.zt0 if caps.sme2 else st.zt0)
        if regs.sm:
            save_sve, vl = True, last.sme_vl
    if save_sve:
        if live_vl(host, cpu) != vl:
            # WARN_ON(sve_get_vl() != vl): force_signal_inject(SIGKILL)
            host = host.with_store(last.st, replace(st, **save))
            return host.update_task(t, killed="SIGKILL")
        past = sve_regs_size(sve_vq_from_vl(vl)) - st.sve_size
        if past > 0:  # sve_save_state() writes through sve_state as it is (NULL: 0 bytes)
            host = host.update_task(t, overwrite=max(t.overwrite, past))
        save.update(sve_v=regs.v, sve_zhi=regs.zhi, sve_p=regs.p, sve_vl=vl, fpsr=regs.fpsr,
                    fp_type=FP_STATE_SVE)
    else:
        save.update(vregs=regs.v, fpsr=regs.fpsr, fp_type=FP_STATE_FPSIMD)
    return host.with_store(last.st, replace(st, **save))


def fpsimd_save_and_flush_cpu_state(host: Host, cpu: int) -> Host:
    """fpsimd_save_and_flush_cpu_state(): save through the binding, then flush (KVM, PM)."""
    if not host.caps.fpsimd:
        return host
    return fpsimd_flush_cpu_state(fpsimd_save_user_state(host, cpu), cpu)


def fpsimd_save_and_flush_current_state(host: Host, cpu: int) -> Host:
    """fpsimd_save_and_flush_current_state(): save current's state, invalidate its copies."""
    if not host.caps.fpsimd:
        return host
    host = fpsimd_save_user_state(host, cpu)
    return fpsimd_flush_task_state(host, current_task(host, cpu).name)


def task_fpsimd_load(host: Host, cpu: int) -> Host:
    """task_fpsimd_load(): load current's user state from thread_struct into the registers:
    the SVE/SME vector lengths, SVCR (PSTATE.SM and ZA) with ZA and ZT0, then FPMR -- after
    SVCR since e5fa85fce08b ("arm64/fpsimd: Don't corrupt FPMR when streaming mode changes",
    December 2024): a change of PSTATE.SM zeroes FPMR, so the FPMR written before it
    (``LOAD_FPMR_BEFORE_SVCR`` in Host.variants) is lost when the CPU was left in the other
    mode -- then the registers."""
    t, caps = current_task(host, cpu), host.caps
    st = host.store(t.store)
    load: dict[str, object] = {}  # the register writes, made in one update
    restore_sve = False
    if caps.sve or caps.sme:
        if st.fp_type == FP_STATE_FPSIMD:
            t = replace(t, tif_sve=False)
        else:
            if not st.svcr & SVCR_SM:
                # WARN_ON_ONCE(!test_and_set_thread_flag(TIF_SVE)): SVE-format state of a
                # task not in streaming mode always has TIF_SVE set -- else a WARN
                if not t.tif_sve:
                    t = _warn_once(t, "fpsimd.c task_fpsimd_load(): FP_STATE_SVE without "
                                      "TIF_SVE (WARN_ON_ONCE)")
                t = replace(t, tif_sve=True)
            if t.tif_sve:
                load.update(zcr_len=sve_vq_from_vl(t.sve_vl) - 1, zcr_limit=15)
            restore_sve = True
    if caps.sme:
        if t.tif_sme:
            load["smcr_len"] = sve_vq_from_vl(t.sme_vl) - 1
        za_on = bool(st.svcr & SVCR_ZA)
        load.update(sm=bool(st.svcr & SVCR_SM), za_on=za_on)
        if za_on:
            load.update(za=st.za, zt0=st.zt0 if caps.sme2 else ZERO)
    if caps.fpmr:
        fpmr = st.fpmr
        if (LOAD_FPMR_BEFORE_SVCR in host.variants and caps.sme
                and host.cpus[cpu].regs.sm != bool(st.svcr & SVCR_SM)):
            fpmr = ZERO  # written first, then cleared by the change of PSTATE.SM (MSR SVCR)
        load["fpmr"] = fpmr
    if restore_sve:
        load.update(v=st.sve_v, zhi=st.sve_zhi, p=st.sve_p, fpsr=st.fpsr)
        c = host.cpus[cpu]
        # sve_load_state() at the live VL: with TIF_SME clear in streaming mode SMCR_EL1.LEN
        # is whatever the CPU last had, maybe not the VL sve_state is laid out for -- the
        # registers are then loaded wrongly (past the buffer's end if that VL is larger),
        # and the next save kills the task.
        host = host.with_cpu_task(replace(c, regs=replace(c.regs, **load)), t)
        past = sve_regs_size(sve_vq_from_vl(live_vl(host, cpu))) - st.sve_size
        if past > 0:
            host = host.update_task(host.task(t.name), overread=max(t.overread, past))
        return host
    # fpsimd_load_state(): AdvSIMD loads of V0-31 zero Zn[VL-1:128]; P/FFR keep stale
    # contents, unreachable while TIF_SVE is clear (the first SVE use traps and zeroes them).
    load.update(v=st.vregs, zhi=ZERO, fpsr=st.fpsr)
    c = host.cpus[cpu]
    return host.with_cpu_task(replace(c, regs=replace(c.regs, **load)), t)


def fpsimd_restore_current_state(host: Host, cpu: int) -> Host:
    """fpsimd_restore_current_state(): on return to user, load and bind if TIF_FOREIGN."""
    t = current_task(host, cpu)
    if not host.caps.fpsimd:
        return host.update_task(t, tif_foreign_fpstate=False)
    if t.tif_foreign_fpstate:
        host = host.update_task(t, tif_foreign_fpstate=False)
        host = fpsimd_bind_task_to_cpu(task_fpsimd_load(host, cpu), cpu)
    return host


# --- kernel-mode NEON ---------------------------------------------------------------------------
def fpsimd_save_kernel_state(host: Host, cpu: int, name: str) -> Host:
    """fpsimd_save_kernel_state(): save the task's kernel-mode NEON state and bind it."""
    t, regs = host.task(name), host.cpus[cpu].regs
    st = host.mem.get(t.kernel_store, FpStore(f"kernel:{name}"))
    host = host.with_store(t.kernel_store, replace(st, vregs=regs.v, fpsr=regs.fpsr))
    host = fpsimd_bind_state_to_cpu(host, cpu, Binding(t.kernel_store, to_save=FP_STATE_FPSIMD))
    return host.update_task(t, kernel_fpsimd_cpu=cpu)


def fpsimd_load_kernel_state(host: Host, cpu: int, name: str) -> Host:
    """fpsimd_load_kernel_state(): reload unless this CPU still holds it."""
    t, c = host.task(name), host.cpus[cpu]
    if c.last.st == t.kernel_store and t.kernel_fpsimd_cpu == cpu:
        return host
    st = host.store(t.kernel_store)
    return host.with_regs(cpu, replace(c.regs, v=st.vregs, zhi=ZERO, fpsr=st.fpsr))


def kernel_neon_begin(host: Host, cpu: int, softirq: bool = False) -> Host:
    """kernel_neon_begin(): save whatever the binding names (maybe a vCPU), mark
    TIF_KERNEL_FPSTATE in task context, then flush the CPU."""
    t = current_task(host, cpu)
    c = host.cpus[cpu]
    if softirq and c.in_softirq_neon:
        raise IllegalEvent("kernel-neon", "softirq", "kernel_neon_begin",
                           "softirqs do not nest")
    if not softirq and (t.mode != TASK_KERNEL or t.tif_kernel_fpstate):
        raise IllegalEvent("kernel-neon", t.mode, "kernel_neon_begin",
                           "task-context kernel NEON needs a task in the kernel, not nested")
    if t.tif_kernel_fpstate:
        host = fpsimd_save_kernel_state(host, cpu, t.name)
    else:
        host = fpsimd_save_user_state(host, cpu)
        if not softirq:
            host = host.update_task(host.task(t.name), tif_kernel_fpstate=True)
    host = fpsimd_flush_cpu_state(host, cpu)
    return host.update_cpu(cpu, in_softirq_neon=softirq or c.in_softirq_neon)


def kernel_neon_end(host: Host, cpu: int, softirq: bool = False) -> Host:
    """kernel_neon_end(): a softirq that interrupted task kernel NEON restores the task's
    kernel state; otherwise TIF_KERNEL_FPSTATE is cleared."""
    t = current_task(host, cpu)
    if softirq:
        if not host.cpus[cpu].in_softirq_neon:
            raise IllegalEvent("kernel-neon", "idle", "kernel_neon_end(softirq)")
        host = host.update_cpu(cpu, in_softirq_neon=False)
        if t.tif_kernel_fpstate:
            return fpsimd_load_kernel_state(host, cpu, t.name)
        return host
    if not t.tif_kernel_fpstate:
        raise IllegalEvent("kernel-neon", "idle", "kernel_neon_end")
    return host.update_task(t, tif_kernel_fpstate=False)


def kernel_neon_use(host: Host, cpu: int, softirq: bool = False) -> Host:
    """NEON code between kernel_neon_begin() and kernel_neon_end() clobbers V and FPSR with
    values of its own (writer ``softirq:<cpu>``, or ``kernel:<task>``: in task context a
    context of its own, whose values must survive preemption -- `kernel_neon_read`)."""
    writer = f"softirq:{cpu}" if softirq else f"kernel:{current_task(host, cpu).name}"
    tok = host.next_token(writer)
    regs = replace(host.cpus[cpu].regs, v=tok, zhi=ZERO, fpsr=tok)
    if softirq:
        return host.write(cpu, regs)
    return host.write(cpu, regs, writer, {V: tok, FPSR: tok})


def kernel_neon_read(host: Host, cpu: int) -> Host:
    """The task-context NEON code reads V and FPSR before kernel_neon_end(): observations by
    context ``kernel:<task>``, which must be what it wrote although the task may have been
    preempted (fpsimd_save_kernel_state() and fpsimd_load_kernel_state() at the switches) or
    a softirq may have used NEON meanwhile."""
    ctx = f"kernel:{current_task(host, cpu).name}"
    regs = host.cpus[cpu].regs
    return host.observe(Observation(ctx, V, "FP", "read", regs.v),
                        Observation(ctx, FPSR, "FP", "read", regs.fpsr))


def kernel_neon(host: Host, cpu: int, softirq: bool = False) -> Host:
    """kernel_neon_begin(); NEON code clobbers V/FPSR; kernel_neon_end().  A softirq taken
    from user mode returns through ret_to_user, which reloads the task's state."""
    t = current_task(host, cpu)
    host = kernel_neon_begin(host.clear_obs(), cpu, softirq)
    host = kernel_neon_use(host, cpu, softirq)
    host = kernel_neon_end(host, cpu, softirq)
    if softirq and host.task(t.name).mode == TASK_USER:
        host = fpsimd_restore_current_state(host, cpu)
    return host


# --- scheduling, syscalls, interrupts -------------------------------------------------------
#: How fpsimd_thread_switch() switches in a task inside a kernel-mode NEON section
#: (TIF_KERNEL_FPSTATE), by kernel version: ``load`` (aefbab8e77eb, v6.8 and v6.9: load its
#: kernel state, set its TIF_FOREIGN_FPSTATE), ``load-flush`` (e92bee9f861b, v6.10, until
#: 01098d893fa8, April 2025: load, then fpsimd_flush_cpu_state()), ``flush-load`` (since).
KERNEL_SWITCH_LOAD, KERNEL_SWITCH_LOAD_FLUSH, KERNEL_SWITCH_FLUSH_LOAD = (
    "load", "load-flush", "flush-load")


def fpsimd_thread_switch(host: Host, cpu: int, nxt: str | None,
                         kernel_switch: str = KERNEL_SWITCH_FLUSH_LOAD) -> Host:
    """fpsimd_thread_switch(): save prev (kernel or user state), then decide next's
    TIF_FOREIGN_FPSTATE from fpsimd_last_state and next's fpsimd_cpu -- or, for a next
    inside a kernel-mode NEON section (TIF_KERNEL_FPSTATE), fpsimd_flush_cpu_state() and
    then fpsimd_load_kernel_state(): the CPU no longer holds anyone's user state, so once
    the section ends, a switch back to this CPU reloads the user state.

    ``kernel_switch`` names the earlier forms (`KERNEL_SWITCH_LOAD` ...): ``load`` leaves
    fpsimd_last_state as it was -- if it still names next's user state from an earlier
    return to user on this CPU, a switch back after kernel_neon_end() clears
    TIF_FOREIGN_FPSTATE and next returns to user with its kernel NEON values (e92bee9f861b,
    "Avoid erroneous elide of user state reload", after dm-crypt corrupted data on Apple
    M1); ``load-flush`` flushes after loading, and the flush's SMSTOP, on a CPU left in
    streaming mode, zeroes the kernel state just loaded (01098d893fa8, "Avoid clobbering
    kernel FPSIMD state with SMSTOP")."""
    if not host.caps.fpsimd:
        return host
    prev = host.current(cpu)
    if prev is not None:
        if prev.tif_kernel_fpstate:
            host = fpsimd_save_kernel_state(host, cpu, prev.name)
        else:
            host = fpsimd_save_user_state(host, cpu)
    if nxt is None:
        return host
    n = host.task(nxt)
    if n.tif_kernel_fpstate:
        if kernel_switch == KERNEL_SWITCH_LOAD:
            host = fpsimd_load_kernel_state(host, cpu, nxt)
            return host.update_task(host.task(nxt), tif_foreign_fpstate=True)
        if kernel_switch == KERNEL_SWITCH_LOAD_FLUSH:
            return fpsimd_flush_cpu_state(fpsimd_load_kernel_state(host, cpu, nxt), cpu)
        host = fpsimd_flush_cpu_state(host, cpu)
        return fpsimd_load_kernel_state(host, cpu, nxt)
    wrong_task = host.cpus[cpu].last.st != n.store
    wrong_cpu = n.fpsimd_cpu != cpu
    return host.update_task(n, tif_foreign_fpstate=wrong_task or wrong_cpu)


def schedule(host: Host, cpu: int, nxt: str | None,
             kernel_switch: str = KERNEL_SWITCH_FLUSH_LOAD) -> Host:
    """__schedule(): prev (in the kernel) sleeps, ``nxt`` (or idle) runs on ``cpu``
    (``kernel_switch``: see `fpsimd_thread_switch`)."""
    host = host.clear_obs()
    prev = host.current(cpu)
    if nxt is not None:
        n = host.task(nxt)
        if n.mode not in (TASK_NEW, TASK_SLEEPING):
            raise IllegalEvent("task", n.mode, "schedule_in", f"{nxt} is already running")
    if prev is not None:
        host = task_event(host, prev, "schedule_out")
    host = fpsimd_thread_switch(host, cpu, nxt, kernel_switch)
    host = process.tls_thread_switch(host, cpu, nxt)  # __switch_to(): FP, then TLS
    host = host.update_cpu(cpu, current=nxt)
    if nxt is not None:
        host = task_event(host, host.task(nxt), "schedule_in")
    return host


def exec_task(host: Host, cpu: int, keep_fpmr: bool = False) -> Host:
    """execve() of current: flush_thread() -> tls_thread_flush(), fpsimd_flush_thread()
    (``keep_fpmr``: see `_flush_thread`)."""
    t = current_task(host, cpu)
    host = task_event(host.clear_obs(), t, "kernel_op")
    return _flush_thread(process.tls_thread_flush(host, cpu), t.name, keep_fpmr)


# --- traps ---------------------------------------------------------------------------------
def sve_alloc(host: Host, name: str, flush: bool) -> Host:
    """sve_alloc(): allocate (zeroed) or, with ``flush``, zero sve_state."""
    t = host.task(name)
    st = host.store(t.store)
    if st.sve_size and not flush:
        return host
    size = st.sve_size or sve_state_size(t.sve_vl, t.sme_vl)
    return host.with_store(t.store, replace(st, sve_size=size, sve_v=ZERO, sve_zhi=ZERO,
                                            sve_p=ZERO))


def sme_alloc(host: Host, name: str, flush: bool) -> Host:
    t = host.task(name)
    st = host.store(t.store)
    if st.sme_size and not flush:
        return host
    size = st.sme_size or sme_state_size(host, t.sme_vl)
    return host.with_store(t.store, replace(st, sme_size=size, za=ZERO, zt0=ZERO))


def _warn_once(t: Task, where: str) -> Task:
    """A WARN the kernel gives for ``t`` (the first one is kept: Task.warned)."""
    return t if t.warned else replace(t, warned=where)


def do_sve_acc(host: Host, cpu: int, flush_foreign: bool = True) -> Host:
    """do_sve_acc(): first SVE use: allocate sve_state, set TIF_SVE (WARN_ON(1) if it was
    set: "SVE access shouldn't have trapped"), then sve_init_regs(): zero the non-FPSIMD
    part live (sve_flush_live) and bind, or -- the state not live here -- in memory
    (fpsimd_to_sve) and fpsimd_flush_task_state().

    ``flush_foreign`` False is sve_init_regs() before 751ecf6afd65 ("arm64/sve: Discard
    stale CPU state when handling SVE traps", October 2024): without the flush, a task that
    was preempted and migrated before the handler ran still counts as loaded on the CPU it
    left; switched back there, it returns to user with that CPU's SVE traps armed although
    TIF_SVE is set, and its next SVE instruction traps again and WARNs."""
    t = current_task(host, cpu)
    host = sve_alloc(host, t.name, True)
    t = host.task(t.name)
    if t.tif_sve:
        t = _warn_once(t, "fpsimd.c do_sve_acc(): WARN_ON(1): SVE access trapped with "
                          "TIF_SVE set")
    t = replace(t, tif_sve=True)
    host = host.with_task(t).expect(t.name, {ZHI: ZERO, P: ZERO})
    if not t.tif_foreign_fpstate:
        regs = replace(host.cpus[cpu].regs, zcr_len=sve_vq_from_vl(t.sve_vl) - 1, zhi=ZERO,
                       p=ZERO)
        return fpsimd_bind_task_to_cpu(host.with_regs(cpu, regs), cpu)
    st = host.store(t.store)
    host = host.with_store(t.store, replace(st, sve_v=st.vregs, sve_zhi=ZERO, sve_p=ZERO,
                                            sve_vl=t.sve_vl, fp_type=FP_STATE_SVE))
    return fpsimd_flush_task_state(host, t.name) if flush_foreign else host


def do_sme_acc(host: Host, cpu: int, flush_foreign: bool = True) -> Host:
    """do_sme_acc() for an 'SME disabled' trap: allocate both buffers, set TIF_SME
    (WARN_ON(1) if it was set: "With TIF_SME userspace shouldn't generate any traps"), set
    the SME VL and bind (the live state is current's: SM and ZA are still off), or -- not
    live here -- fpsimd_flush_task_state().

    ``flush_foreign`` False is do_sme_acc() before d3eaab3c7090 ("arm64/fpsimd: Discard
    stale CPU state when handling SME traps", December 2024): the same race as do_sve_acc()'s
    before 751ecf6afd65."""
    t = current_task(host, cpu)
    host = sme_alloc(sve_alloc(host, t.name, False), t.name, True)
    t = host.task(t.name)
    if t.tif_sme:
        t = _warn_once(t, "fpsimd.c do_sme_acc(): WARN_ON(1): SME access trapped with "
                          "TIF_SME set")
    t = replace(t, tif_sme=True)
    host = host.with_task(t)
    if not t.tif_foreign_fpstate:
        regs = replace(host.cpus[cpu].regs, smcr_len=sve_vq_from_vl(t.sme_vl) - 1)
        return fpsimd_bind_task_to_cpu(host.with_regs(cpu, regs), cpu)
    return fpsimd_flush_task_state(host, t.name) if flush_foreign else host


# --- vector length control (prctl) -------------------------------------------------------------
def vec_set_vector_length(host: Host, cpu: int, kind: str, vl: int,
                          flags: int, stale_sve: bool = False) -> tuple[Host, int]:
    """vec_set_vector_length() for current, then vec_prctl_status(); -errno on error
    (``stale_sve``: see `change_live_vector_length`)."""
    t = current_task(host, cpu)
    info = host.caps.vl_info(kind)
    if info is None:
        return host, -EINVAL
    if flags & ~(PR_SVE_VL_INHERIT | PR_SVE_SET_VL_ONEXEC) or not sve_vl_valid(vl):
        return host, -EINVAL
    vl = info.find_supported_vector_length(min(vl, VL_ARCH_MAX))
    onexec, inherit = bool(flags & PR_SVE_SET_VL_ONEXEC), bool(flags & PR_SVE_VL_INHERIT)
    cur_vl = t.sve_vl if kind == ARM64_VEC_SVE else t.sme_vl
    if not onexec and vl != cur_vl:
        host = change_live_vector_length(host, cpu, kind, vl, stale_sve)
    t = host.task(t.name)
    keep = vl if (onexec or inherit) else 0
    if kind == ARM64_VEC_SVE:
        t = replace(t, sve_vl_onexec=keep, tif_sve_vl_inherit=inherit)
        status = (t.sve_vl_onexec if onexec else t.sve_vl)
    else:
        t = replace(t, sme_vl_onexec=keep, tif_sme_vl_inherit=inherit)
        status = (t.sme_vl_onexec if onexec else t.sme_vl)
    return host.with_task(t), status | (PR_SVE_VL_INHERIT if inherit else 0)


def change_live_vector_length(host: Host, cpu: int, kind: str, vl: int,
                               stale_sve: bool = False, task: str | None = None) -> Host:
    """change_live_vector_length(): save and flush current (or, for another ``task`` -- a
    stopped tracee -- fpsimd_flush_task_state()), keep PSTATE.SM and the effective FPSIMD
    state, zero the other SVE state, reallocate; an SME VL change also discards ZA.

    ``stale_sve`` is the rejected design before 49ce484187f7 ("arm64/fpsimd: ptrace/prctl:
    Ensure VL changes do not resurrect stale data", v6.16): V taken from sve_state
    (sve_to_fpsimd()) whenever TIF_SVE or SVCR.SM is set, not by fp_type -- but since v6.7 a
    save during a syscall stores FPSIMD format with TIF_SVE still set (to_save
    FP_STATE_FPSIMD), and sve_state then holds an older V."""
    if task is None:
        host = fpsimd_save_and_flush_current_state(host, cpu)
        task = current_task(host, cpu).name
    else:
        host = fpsimd_flush_task_state(host, task)
    t = host.task(task)
    st = host.store(t.store)
    sm = bool(st.svcr & SVCR_SM)
    from_sve = (t.tif_sve or sm) if stale_sve else st.fp_type == FP_STATE_SVE
    vregs = st.sve_v if from_sve else st.vregs  # fpsimd_sync_from_effective_state()
    t = replace(t, **({"sve_vl": vl} if kind == ARM64_VEC_SVE else {"sme_vl": vl}))
    cur_vl = t.sme_vl if sm else t.sve_vl
    st = replace(st, vregs=vregs, sve_size=sve_state_size(t.sve_vl, t.sme_vl), sve_v=vregs,
                 sve_zhi=ZERO, sve_p=ZERO, sve_vl=cur_vl)
    expect = {ZHI: ZERO, P: ZERO}
    if kind == ARM64_VEC_SME:
        st = replace(st, svcr=st.svcr & ~SVCR_ZA, za=ZERO, zt0=ZERO,
                     sme_size=sme_state_size(host, vl))
        expect.update({ZA: ZERO, ZT0: ZERO})
    return host.with_task(t).with_store(t.store, st).expect(t.name, expect)


def prctl_set_vl(host: Host, cpu: int, kind: str, arg: int,
                 stale_sve: bool = False) -> tuple[Host, int]:
    """PR_SVE_SET_VL / PR_SME_SET_VL: sve_set_current_vl() / sme_set_current_vl()
    (``stale_sve``: see `change_live_vector_length`)."""
    t = current_task(host, cpu)
    host = task_event(host.clear_obs(), t, "kernel_op")
    vl, flags = arg & PR_SVE_VL_LEN_MASK, arg & ~PR_SVE_VL_LEN_MASK
    return vec_set_vector_length(host, cpu, kind, vl, flags, stale_sve)


def prctl_get_vl(host: Host, cpu: int, kind: str) -> int:
    """PR_SVE_GET_VL / PR_SME_GET_VL."""
    t = current_task(host, cpu)
    if host.caps.vl_info(kind) is None:
        return -EINVAL
    vl = t.sve_vl if kind == ARM64_VEC_SVE else t.sme_vl
    inherit = t.tif_sve_vl_inherit if kind == ARM64_VEC_SVE else t.tif_sme_vl_inherit
    return vl | (PR_SVE_VL_INHERIT if inherit else 0)


def sve_max_vl(host: Host) -> int:
    return host.caps.sve_vl.max_vl if host.caps.sve_vl else 0


def sme_max_vl(host: Host) -> int:
    return host.caps.sme_vl.max_vl if host.caps.sme_vl else 0



#: EL0 entry/exit and user instructions live in entry_common.py (entry-common.c); these names
#: were importable from here first and stay reachable for callers written against that.
_IN_ENTRY_COMMON = frozenset({"ret_to_user", "interrupt", "syscall_enter", "syscall_exit",
                              "user_op", "USER_OPS"})


def __getattr__(name: str) -> object:
    if name in _IN_ENTRY_COMMON:
        from fpstate.kernel.arm64 import entry_common  # imported late: it imports this module

        return getattr(entry_common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
