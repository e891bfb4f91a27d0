"""EL0 entry and exit for FP state: arch/arm64/kernel/entry-common.c (v6.17), and the
instructions a user task executes (the CPU side: where CPACR_EL1's EL0 enables trap).

* el0_svc: fpsimd_syscall_enter() on the way in (SMSTOP SM, which also zeroes FPMR; with
  TIF_SVE zero the non-FPSIMD SVE state; to_save = FP_STATE_FPSIMD so a save during the
  syscall may discard SVE state),
  exit_to_user_mode() -> fpsimd_restore_current_state() and fpsimd_syscall_exit()
  (to_save = FP_STATE_CURRENT) on the way out.
* an IRQ from EL0 enters the kernel without touching FP state and returns through
  exit_to_user_mode() like a syscall.
* `user_op`: one EL0 FP/SVE/SME/FPMR instruction of the current task.  An SVE instruction
  with CPACR_EL1.ZEN's EL0 enable clear traps to do_sve_acc(), SME to do_sme_acc(); an
  instruction of a feature the system lacks, an AdvSIMD one in streaming mode without FA64,
  or a ZA/ZT0 access with PSTATE.ZA clear is a SIGILL (recorded as an observation).
  TPIDR2_EL0 is not behind an SME trap: the kernel sets SCTLR_EL1.EnTP2 when it enables SME.
"""

from __future__ import annotations

from fpstate.arm64.regs import (
    FPMR,
    FPSR,
    FPSR_STREAMING,
    TPIDR2,
    ZA,
    ZERO,
    ZHI,
    ZT0,
    P,
    V,
    smstart,
    smstop,
)
from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.kernel.arm64.fpsimd import (
    current_task,
    do_sme_acc,
    do_sve_acc,
    fpsimd_restore_current_state,
    task_event,
)
from fpstate.kernel.arm64.state import (
    FP_STATE_CURRENT,
    FP_STATE_FPSIMD,
    TASK_KERNEL,
    TASK_USER,
    Host,
    Observation,
)


def ret_to_user(host: Host, cpu: int) -> Host:
    """exit_to_user_mode(): do_notify_resume() -> fpsimd_restore_current_state()."""
    t = current_task(host, cpu)
    host = task_event(host.clear_obs(), t, "ret_to_user")
    return fpsimd_restore_current_state(host, cpu)


def interrupt(host: Host, cpu: int) -> Host:
    """An IRQ taken from user mode: the task enters the kernel (registers stay live)."""
    return task_event(host.clear_obs(), current_task(host, cpu), "interrupt")


def syscall_enter(host: Host, cpu: int) -> Host:
    """el0_svc: fpsimd_syscall_enter(): SMSTOP SM; with TIF_SVE zero Z[VL-1:128], P, FFR;
    to_save = FP_STATE_FPSIMD so that a later save may discard the SVE state lazily."""
    t = current_task(host, cpu)
    host = task_event(host.clear_obs(), t, "syscall", in_syscall=True)
    regs = host.cpus[cpu].regs
    if host.caps.sme and regs.sm:
        host = host.with_regs(cpu, smstop(regs, True, False))
        host = host.expect(t.name, {V: ZERO, ZHI: ZERO, P: ZERO, FPSR: FPSR_STREAMING,
                                    FPMR: ZERO})
    if not host.caps.sve:
        return host
    if t.tif_sve:
        host = host.with_regs(cpu, replace(host.cpus[cpu].regs, zhi=ZERO, p=ZERO))
        host = host.expect(t.name, {ZHI: ZERO, P: ZERO})
    c = host.cpus[cpu]
    return host.with_cpu(replace(c, last=replace(c.last, to_save=FP_STATE_FPSIMD)))


def syscall_exit(host: Host, cpu: int) -> Host:
    """Return from a syscall: ret_to_user (the task leaves the syscall), then
    fpsimd_syscall_exit() (to_save = CURRENT)."""
    t = current_task(host, cpu)
    host = task_event(host.clear_obs(), t, "ret_to_user", in_syscall=False)
    host = fpsimd_restore_current_state(host, cpu)
    if host.caps.sve:
        c = host.cpus[cpu]
        host = host.with_cpu(replace(c, last=replace(c.last, to_save=FP_STATE_CURRENT)))
    return host


USER_OPS = ("fpsimd_write", "fpsimd_read", "sve_write", "sve_read", "smstart_sm",
            "smstart_za", "smstop", "za_write", "za_read", "zt0_write", "zt0_read",
            "fpmr_write", "fpmr_read", "tpidr2_write", "tpidr2_read")


def user_op(host: Host, cpu: int, op: str) -> Host:
    """Current executes one FP instruction at EL0; faults become SIGILL observations."""
    t = current_task(host, cpu)
    if op not in USER_OPS:
        raise IllegalEvent("user", t.mode, op, f"unknown user op (known: {USER_OPS})")
    host = task_event(host.clear_obs(), t, "user_op")
    assert not t.tif_foreign_fpstate, "user mode without live registers"
    caps, name = host.caps, t.name
    regs = host.cpus[cpu].regs
    group, verb = op.rsplit("_", 1) if "_" in op and op != "smstop" else (op, "")

    def sigill(feature: str) -> Host:
        return host.observe(Observation(name, op, feature, "sigill"))

    if group == "fpsimd":
        if not caps.fpsimd or (regs.sm and not caps.fa64):
            return sigill("FP")
        return _rw(host, cpu, name, verb, {V: None, ZHI: ZERO, FPSR: None}, "FP")
    if group == "sve":
        if regs.sm and caps.sme and not host.cpus[cpu].el0_sme:
            host = do_sme_acc(host, cpu)  # streaming SVE is SME: CPACR_EL1.SMEN traps it
            regs = host.cpus[cpu].regs
        if not regs.sm:
            if not caps.sve:
                return sigill("SVE")
            if not host.cpus[cpu].el0_sve:
                host = do_sve_acc(host, cpu)
        return _rw(host, cpu, name, verb, {V: None, ZHI: None, P: None, FPSR: None}, "SVE")
    if group == "fpmr":
        if not caps.fpmr:
            return sigill("FPMR")
        return _rw(host, cpu, name, verb, {FPMR: None}, "FPMR")
    if group == "tpidr2":  # MSR/MRS TPIDR2_EL0: SCTLR_EL1.EnTP2 is set at boot with SME
        if not caps.sme:
            return sigill("SME")
        return _rw(host, cpu, name, verb, {TPIDR2: None}, "SME")
    # SME: SMSTART/SMSTOP, ZA and ZT0
    feature = "SME2" if group == "zt0" else "SME"
    if not caps.sme or (group == "zt0" and not caps.sme2):
        return sigill(feature)
    if not host.cpus[cpu].el0_sme:
        host = do_sme_acc(host, cpu)
    regs = host.cpus[cpu].regs
    if group in ("za", "zt0"):
        if not regs.za_on:
            return host.observe(Observation(name, op, feature, "sigill"))
        return _rw(host, cpu, name, verb, {ZA if group == "za" else ZT0: None}, feature)
    if op == "smstop":
        new = smstop(regs, True, True)
    else:
        new = smstart(regs, sm=(op == "smstart_sm"), za=(op == "smstart_za"))
    expect = {}
    if new.sm != regs.sm:
        expect.update({V: ZERO, ZHI: ZERO, P: ZERO, FPSR: FPSR_STREAMING, FPMR: ZERO})
    if new.za_on and not regs.za_on:
        expect.update({ZA: ZERO, ZT0: ZERO})
    host = host.with_regs(cpu, new).expect(name, expect)
    return host.observe(Observation(name, "SVCR", "SME", "write", new.svcr))


#: The EL0 instructions whose SVE or SME access trap `access_trap` can take, and which.
TRAP_OPS: dict[str, str] = {"sve_write": "SVE", "sve_read": "SVE", "smstart_sm": "SME",
                            "smstart_za": "SME"}


def access_trap(host: Host, cpu: int, op: str) -> Host:
    """el0_sve_acc() / el0_sme_acc(): current executes ``op`` (`TRAP_OPS`) with its access
    trap armed on this CPU (CPACR_EL1.ZEN or SMEN's EL0 enable clear) and enters the kernel,
    where it may be preempted before do_sve_acc() / do_sme_acc() take the FP context
    (`access_trap_handle`). An SVE instruction traps this way only outside streaming mode."""
    t = current_task(host, cpu)
    kind = TRAP_OPS.get(op)
    c = host.cpus[cpu]
    armed = (kind == "SVE" and host.caps.sve and not c.regs.sm and not c.el0_sve) or (
        kind == "SME" and host.caps.sme and not c.el0_sme)
    if t.mode != TASK_USER or not armed:
        raise IllegalEvent("task", t.mode, "access_trap",
                           f"{op} does not take an access trap on CPU {cpu}")
    return task_event(host.clear_obs(), t, "interrupt", in_trap=op, trap_handled=False)


def access_trap_handle(host: Host, cpu: int, flush_foreign: bool = True) -> Host:
    """do_sve_acc() or do_sme_acc() for current's trapped instruction, on the CPU it runs
    on now (``flush_foreign``: see do_sve_acc())."""
    t = current_task(host, cpu)
    if not t.in_trap or t.trap_handled or t.mode != TASK_KERNEL:
        raise IllegalEvent("task", t.mode, "access_trap_handle", f"{t.name} has no trap "
                           "to handle")
    acc = do_sve_acc if TRAP_OPS[t.in_trap] == "SVE" else do_sme_acc
    host = acc(host.clear_obs(), cpu, flush_foreign)
    return host.update_task(host.task(t.name), trap_handled=True)


def access_trap_return(host: Host, cpu: int) -> Host:
    """The return from the handled trap (exit_to_user_mode(): fpsimd_restore_current_state())
    and the instruction executed again -- trapping again if the return left the trap armed."""
    t = current_task(host, cpu)
    if not t.trap_handled or t.mode != TASK_KERNEL:
        raise IllegalEvent("task", t.mode, "access_trap_return", f"{t.name} is not returning "
                           "from a handled trap")
    op = t.in_trap
    host = task_event(host.clear_obs(), t, "ret_to_user", in_trap="", trap_handled=False)
    host = fpsimd_restore_current_state(host, cpu)
    return user_op(host, cpu, op)


def _rw(host: Host, cpu: int, ctx: str, verb: str, comps: dict[str, object],
        feature: str) -> Host:
    """Read each component of ``comps``, or write a fresh token (or the given value)."""
    regs = host.cpus[cpu].regs
    if verb == "read":
        return host.observe(*(Observation(ctx, c, feature, "read", regs.get(c))
                              for c in comps if comps[c] is None))
    tok = host.next_token(ctx)
    values = {c: (tok if v is None else v) for c, v in comps.items()}
    return host.write(cpu, regs.put(**values), ctx, values,
                      (Observation(ctx, next(iter(comps)), feature, "write", tok),))
