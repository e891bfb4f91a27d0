"""CPU hotplug: a CPU taken offline and brought back, as far as the FPU is concerned.

Models arch/x86/kernel/smpboot.c (native_kick_ap(): "the FPU context is blank, nobody can own
it", then INIT/SIPI; start_secondary() -> identify_secondary_cpu() -> setup_pku(), and
fpu__init_cpu()) with fpu/init.c (fpu__init_cpu_generic(): FNINIT) and fpu/xstate.c
(fpu__init_cpu_xstate(): IA32_XFD, XCR0, IA32_XSS), Linux v6.18.

Theory of operation: per-CPU variables outlive the CPU's time offline, the registers do not
all survive it. INIT puts MPX and CET state in their initial configuration and leaves the
rest (SDM Vol. 3A Table 10-1); the bring-up code runs FNINIT and writes PKRU, XCR0, IA32_XSS
and IA32_XFD. So two per-CPU variables must be reset with them: fpu_fpregs_owner_ctx, or a
task whose last_cpu names this CPU would skip its restore and run with what INIT and FNINIT
left (variant ``cpu-up-keeps-owner``; arm64 had that bug until 2015, variant
``cpu-dead-keeps-binding``), and xfd_state, the cache of IA32_XFD, or xfd_update_state()
skips the write that a task with AMX state needs and the kernel's XRSTOR takes #NM
(CVE-2024-35801: 10e4b5166df9, v6.9; kernels before it, and variant
``xfd-state-stale-on-online``).
"""

from __future__ import annotations

from fpstate.kernel.x86.core import pkru_write_default, xfd_set_state
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.types import IllegalEvent
from fpstate.x86.xfeatures import XFEATURE_MASK_CLEARED_BY_INIT


def cpu_down_up(m: Machine, nr: int) -> None:
    """``echo 0`` then ``echo 1`` to /sys/devices/system/cpu/cpuN/online for CPU ``nr``:
    takedown leaves it running nothing (the model asks that it be idle already: its tasks
    have gone elsewhere), then native_kick_ap() clears its fpu_fpregs_owner_ctx, INIT clears
    the MPX and CET components, setup_pku() loads init_pkru_value, and fpu__init_cpu() runs
    FNINIT and fpu__init_cpu_xstate(): xfd_set_state(init_fpstate.xfd) -- the MSR and its
    per-CPU cache (v6.9+) -- or the MSR alone (before, and variant
    ``xfd-state-stale-on-online``) -- XCR0 and IA32_XSS as at boot. CPU 0 cannot go offline
    (v6.5 removed the CPU0 hotplug option)."""
    if not 0 < nr < len(m.cpus):
        raise IllegalEvent(f"CPU {nr} cannot be taken offline (CPU 0 stays online)")
    c = m.cpus[nr]
    if c.current is not c.idle:
        raise IllegalEvent(f"CPU {nr} still runs {c.current!r}: takedown moves its tasks away")
    s = m.system
    if not s.has_variant("cpu-up-keeps-owner"):
        c.fpu_fpregs_owner_ctx = None
    regs = c.regs
    regs.init_components((regs.xcr0 | regs.xss) & XFEATURE_MASK_CLEARED_BY_INIT)
    pkru_write_default(c)
    regs.fninit()
    if s.xfd:
        if s.runs_unfixed("xfd-state-stale-on-online", "xfd_state_synced"):
            regs.xfd = s.init_xfd  # wrmsrl(MSR_IA32_XFD, init_fpstate.xfd) alone
        else:
            xfd_set_state(c, s.init_xfd)


__all__ = ["cpu_down_up"]
