"""The TPIDR2_EL0 part of arch/arm64/kernel/process.c (v6.17): SME's TPIDR2_EL0 travels with
a thread's TLS registers, not with its FP state.

- tls_preserve_current_state(): on the way out of a thread (and before ptrace reads it)
  TPIDR2_EL0 is read into thread.tpidr2_el0.
- tls_thread_switch() (from __switch_to(), after fpsimd_thread_switch()): preserve prev's,
  then write next's thread.tpidr2_el0 into the register -- eagerly, at every switch: there is
  no lazy binding as for the FP registers.
- tls_thread_flush() (exec, flush_thread()): TPIDR2_EL0 = 0.
- `copy_process`: the FP and TPIDR2_EL0 part of fork and clone -- arch_dup_task_struct()
  and copy_thread().

Only TPIDR2_EL0 is modelled; TPIDR_EL0 and TPIDRRO_EL0 hold no FP state.

Values a child is given are copies, and a copy is the child's own: each of the parent's
tokens becomes a fresh token of the child (the invariants then catch a child that sees its
parent's registers rather than its copy). TPIDR2_EL0 is the exception where the copy is not
the child's: a thread sharing the parent's memory that inherited it would hold a pointer
into its parent's stack, so under the rejected design it keeps the parent's token.
"""

from __future__ import annotations

from dataclasses import fields

from fpstate.arm64.regs import (
    FPMR,
    FPSR,
    FPSR_STREAMING,
    SVCR_SM,
    SVCR_ZA,
    TPIDR2,
    ZA,
    ZERO,
    ZHI,
    ZT0,
    P,
    Tok,
    V,
)
from fpstate.arm64.statemachine import IllegalEvent, replace
from fpstate.kernel.arm64 import fpsimd
from fpstate.kernel.arm64.state import (
    FP_STATE_SVE,
    TASK_NEW,
    FpStore,
    Host,
    SigFrameFp,
    Task,
)


def tls_preserve_current_state(host: Host, cpu: int) -> Host:
    """tls_preserve_current_state(): current's TPIDR2_EL0 into thread.tpidr2_el0 (with
    system_supports_tpidr2())."""
    t = host.current(cpu)
    if t is None or not host.caps.sme:
        return host
    st = host.store(t.store)
    return host.with_store(t.store, replace(st, tpidr2=host.cpus[cpu].regs.tpidr2))


def tls_thread_switch(host: Host, cpu: int, nxt: str | None) -> Host:
    """tls_thread_switch(next): preserve current's, then load next's TPIDR2_EL0 (nothing is
    loaded when the CPU goes idle: the register keeps prev's value, which no task reads)."""
    host = tls_preserve_current_state(host, cpu)
    if nxt is None or not host.caps.sme:
        return host
    tpidr2 = host.store(host.task(nxt).store).tpidr2
    return host.with_regs(cpu, replace(host.cpus[cpu].regs, tpidr2=tpidr2))


def tls_thread_flush(host: Host, cpu: int) -> Host:
    """tls_thread_flush() for current at exec: TPIDR2_EL0 = 0."""
    if not host.caps.sme:
        return host
    return host.with_regs(cpu, replace(host.cpus[cpu].regs, tpidr2=ZERO))


#: The register values a signal frame's FP records hold (every Tok field of SigFrameFp): a
#: fork's copies of them are the child's own.
_FRAME_VALUES = tuple(f.name for f in fields(SigFrameFp) if f.type in ("Tok", Tok))


def copy_process(host: Host, cpu: int, child: str, clone_vm: bool,
                 settls_only: bool = False) -> Host:
    """fork (``clone_vm`` False) or a clone sharing the address space (CLONE_VM) by current
    on ``cpu``: a new task ``child``, not yet run.

    arch_dup_task_struct(): fpsimd_save_and_flush_current_state() and
    fpsimd_sync_from_effective_state() (V from Z in SVE format), the copy, then the child
    in FPSIMD format (no sve_state, TIF_SVE clear), out of streaming mode (task_smstop_sm():
    V zeroed, FPSR 0x0800009f, FPMR zeroed, if the parent was streaming), with no sme_state,
    TIF_SME clear and ZA off. copy_thread(): fpsimd_flush_task_state(child); with SME, a fork
    takes the live TPIDR2_EL0 and, with ZA on, ZA and ZT0 (copy_thread_za()) -- "PSTATE.ZA
    and TPIDR2 need to be manipulated as a pair" -- and a CLONE_VM child gets TPIDR2_EL0 = 0
    and ZA off. The VLs and their on-exec settings are copied; so are the signal frames of a
    fork (the stack is copied), not a thread's.

    ``settls_only`` is the rejected design before that rule: TPIDR2_EL0 and ZA inherited by
    every child, TPIDR2_EL0 reset only for CLONE_SETTLS (never passed here)."""
    if child in host.tasks:
        raise IllegalEvent("task", "exists", "clone", f"task {child!r} already exists")
    caps = host.caps
    host = fpsimd.fpsimd_save_and_flush_current_state(host, cpu)
    parent = fpsimd.current_task(host, cpu)
    pst = host.store(parent.store)
    live_tpidr2 = host.cpus[cpu].regs.tpidr2
    copies: dict[Tok, Tok] = {}

    def copy(tok: Tok) -> Tok:
        """The child's own token for a value copied from the parent."""
        nonlocal host
        if not tok.writer:
            return tok
        got = copies.get(tok)
        if got is None:
            host, got = host.fresh(child)
            copies[tok] = got
        return got

    v = pst.sve_v if pst.fp_type == FP_STATE_SVE else pst.vregs
    fpsr, fpmr = pst.fpsr, pst.fpmr if caps.fpmr else ZERO
    if caps.sme and pst.svcr & SVCR_SM:  # task_smstop_sm(dst)
        v, fpsr, fpmr = ZERO, FPSR_STREAMING, ZERO
    st = FpStore(child, vregs=copy(v), fpsr=copy(fpsr), fpmr=copy(fpmr))
    t = Task(child, mode=TASK_NEW, sve_vl=parent.sve_vl, sme_vl=parent.sme_vl,
             sve_vl_onexec=parent.sve_vl_onexec, sme_vl_onexec=parent.sme_vl_onexec,
             tif_sve_vl_inherit=parent.tif_sve_vl_inherit,
             tif_sme_vl_inherit=parent.tif_sme_vl_inherit,
             sigframes=() if clone_vm else tuple(
                 replace(f, **{k: copy(getattr(f, k)) for k in _FRAME_VALUES})
                 for f in parent.sigframes))
    expect = {V: st.vregs, FPSR: st.fpsr, FPMR: st.fpmr, ZHI: ZERO, P: ZERO, ZA: ZERO,
              ZT0: ZERO, TPIDR2: ZERO}
    if caps.sme:
        inherit = not clone_vm or settls_only
        if inherit and pst.svcr & SVCR_ZA:  # copy_thread_za()
            st = replace(st, svcr=SVCR_ZA, za=copy(pst.za), zt0=copy(pst.zt0),
                         sve_size=fpsimd.sve_state_size(t.sve_vl, t.sme_vl),
                         sme_size=fpsimd.sme_state_size(host, t.sme_vl))
            t = replace(t, tif_sme=True)
            expect.update({ZA: st.za, ZT0: st.zt0})
        if not clone_vm:
            st = replace(st, tpidr2=copy(live_tpidr2))
        elif settls_only:  # the parent's pointer, into the parent's stack
            st = replace(st, tpidr2=live_tpidr2)
        expect[TPIDR2] = st.tpidr2
    host = host.with_task(t).with_store(t.store, st)
    return host.expect(child, expect)


__all__ = ["copy_process", "tls_preserve_current_state", "tls_thread_flush",
           "tls_thread_switch"]
