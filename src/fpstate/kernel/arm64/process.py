"""The TPIDR2_EL0 part of arch/arm64/kernel/process.c (v6.17): SME's TPIDR2_EL0 travels with
a thread's TLS registers, not with its FP state.

- tls_preserve_current_state(): on the way out of a thread (and before ptrace reads it)
  TPIDR2_EL0 is read into thread.tpidr2_el0.
- tls_thread_switch() (from __switch_to(), after fpsimd_thread_switch()): preserve prev's,
  then write next's thread.tpidr2_el0 into the register -- eagerly, at every switch: there is
  no lazy binding as for the FP registers.
- tls_thread_flush() (exec, flush_thread()): TPIDR2_EL0 = 0.

Only TPIDR2_EL0 is modelled; TPIDR_EL0 and TPIDRRO_EL0 hold no FP state.
"""

from __future__ import annotations

from fpstate.arm64.regs import ZERO
from fpstate.arm64.statemachine import replace
from fpstate.kernel.arm64.state import Host


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


__all__ = ["tls_preserve_current_state", "tls_thread_flush", "tls_thread_switch"]
