"""CPU hotplug: a CPU taken offline and brought back, as far as the FPU is concerned.

Models arch/x86/kernel/smpboot.c (cpu_disable_common() -> fpu__disable_cpu(); native_kick_ap():
"the FPU context is blank, nobody can own it", then INIT/SIPI; start_secondary() ->
load_ucode_ap(), fpu__init_cpu(), ap_starting() -> identify_secondary_cpu() -> setup_pku()),
Linux v6.18. fpu/init.c's per-CPU functions are in fpstate.kernel.x86.init
(fpu__init_cpu_generic(): CR4.OSFXSR, FNINIT; fpu__init_cpu_xstate(): CR4.OSXSAVE, IA32_XFD,
XCR0, IA32_XSS), the microcode loader in fpstate.kernel.x86.microcode.

Theory of operation: per-CPU variables outlive the CPU's time offline, the registers do not
all survive it. INIT clears CR4 and puts MPX and CET state in their initial configuration and
leaves the rest (SDM Vol. 3A Table 10-1); the bring-up code sets CR4's FPU bits, runs FNINIT
and writes PKRU, XCR0, IA32_XSS and IA32_XFD. Until then the FPU is not usable, yet the
microcode loader runs first and may hash a patch with SIMD code (`fpstate.kernel.x86.
microcode`): only kernel_fpu_allowed, false from takedown to fpu__init_cpu() (v6.16), keeps
irq_fpu_usable() from saying yes and kernel_fpu_begin()'s LDMXCSR from taking #UD (variant
``fpu-usable-before-init-cpu``). Two more per-CPU variables must be reset: the owner,
fpu_fpregs_owner_ctx, or a task whose last_cpu names this CPU would skip its restore and run
with what INIT and FNINIT left (variant ``cpu-up-keeps-owner``; arm64 had that bug until 2015,
variant ``cpu-dead-keeps-binding``), and xfd_state, the cache of IA32_XFD, or
xfd_update_state() skips the write that a task with AMX state needs and the kernel's XRSTOR
takes #NM (CVE-2024-35801: 10e4b5166df9, v6.9; kernels before it, and variant
``xfd-state-stale-on-online``).
"""

from __future__ import annotations

from fpstate.kernel.x86.core import pkru_write_default
from fpstate.kernel.x86.hw import CR4_FPU_BITS
from fpstate.kernel.x86.init import fpu__disable_cpu, fpu__init_cpu
from fpstate.kernel.x86.microcode import load_ucode_ap
from fpstate.kernel.x86.sched import Cpu, Machine
from fpstate.kernel.x86.types import IllegalEvent
from fpstate.x86.xfeatures import XFEATURE_MASK_CLEARED_BY_INIT


def native_kick_ap(c: Cpu) -> None:
    """native_kick_ap() and the INIT it sends: the CPU's fpu_fpregs_owner_ctx cleared ("the
    FPU context is blank, nobody can own it"; not under variant ``cpu-up-keeps-owner``), then
    INIT clears CR4 and the MPX and CET components -- the state start_secondary() finds."""
    if not c.m.system.has_variant("cpu-up-keeps-owner"):
        c.fpu_fpregs_owner_ctx = None
    regs = c.regs
    regs.cr4 &= ~CR4_FPU_BITS
    regs.init_components((regs.xcr0 | regs.xss) & XFEATURE_MASK_CLEARED_BY_INIT)


def start_secondary(c: Cpu) -> None:
    """start_secondary(), interrupts off: load_ucode_ap() (`microcode.load_ucode_ap`: on AMD,
    a SHA-256 digest that may use the FPU), fpu__init_cpu() (`fpstate.kernel.x86.init`), then
    ap_starting() -> identify_secondary_cpu() -> setup_pku() loads init_pkru_value."""
    c.irqs_disabled = True
    try:
        load_ucode_ap(c)
        fpu__init_cpu(c)
        pkru_write_default(c)
    finally:
        c.irqs_disabled = False


def cpu_down_up(m: Machine, nr: int) -> None:
    """``echo 0`` then ``echo 1`` to /sys/devices/system/cpu/cpuN/online for CPU ``nr``:
    takedown leaves it running nothing (the model asks that it be idle already: its tasks
    have gone elsewhere) and runs cpu_disable_common() -> fpu__disable_cpu(); bring-up is
    `native_kick_ap` then `start_secondary`. CPU 0 cannot go offline (v6.5 removed the CPU0
    hotplug option)."""
    if not 0 < nr < len(m.cpus):
        raise IllegalEvent(f"CPU {nr} cannot be taken offline (CPU 0 stays online)")
    c = m.cpus[nr]
    if c.current is not c.idle:
        raise IllegalEvent(f"CPU {nr} still runs {c.current!r}: takedown moves its tasks away")
    fpu__disable_cpu(c)
    native_kick_ap(c)
    start_secondary(c)


__all__ = ["cpu_down_up", "native_kick_ap", "start_secondary"]
