"""Suspend to RAM (ACPI S3), as far as the FPU is concerned: every CPU loses power, the boot
CPU comes back through restore_processor_state(), the others through CPU hotplug.

Models arch/x86/power/cpu.c (save_processor_state() -> __save_processor_state():
kernel_fpu_begin(), CR4 into struct saved_context; restore_processor_state() ->
__restore_processor_state(): CR4, fix_processor_context() -> fpu__resume_cpu(),
do_fpu_end() -> kernel_fpu_end()) in the order kernel/power/suspend.c's suspend_enter() runs
them: pm_sleep_disable_secondary_cpus(), IRQs off, the platform's enter() (ACPI:
x86_acpi_suspend_lowlevel(): save_processor_state(), do_suspend_lowlevel(), the wakeup vector,
restore_processor_state()), IRQs on, pm_sleep_enable_secondary_cpus(). Read in the v6.17 source
(Kingxukai/linux).

Theory of operation: the freezer has stopped every other user task outside its kernel paths
before suspend_enter() runs, the task that wrote ``mem`` to /sys/power/state is current on the
boot CPU, in the kernel, and every other CPU goes offline (fpstate.kernel.x86.smpboot's
takedown). S3 removes power, so every CPU comes back with its RESET values (`FpRegs.reset`:
CR4 0, XCR0 1, IA32_XSS, IA32_XFD and PKRU 0). The secondary CPUs are brought up as after
hotplug, which sets everything fpu__init_cpu() and setup_pku() set. The boot CPU gets CR4 back
from saved_context, XCR0, IA32_XSS and IA32_XFD from fpu__resume_cpu(), and nothing else: the
kernel_fpu_begin() before suspend saved the suspending task's registers and left none valid,
so its next return to user mode restores them from memory -- all but PKRU, which the return
never restores because "the PKRU value of current is always valid in the hardware" (5.14), and
which nothing writes back here. So that task returns to user mode with PKRU 0, every key open,
and its next switch-out stashes 0 in thread.pkru (variant ``pkru-lost-on-resume``; proposed
fix ``resume_pkru``: keep rdpkru() in saved_context). And fpu__resume_cpu() writes IA32_XFD
without the per-CPU cache xfd_state, which keeps the value of the last task restored on this
CPU before suspend (variant ``xfd-state-stale-on-resume``; proposed fix
``resume_xfd_set_state``). docs/findings/kernel-findings.md, section 10.

Hibernation (S4, `hibernate_enter`) restores through the same restore_processor_state(), in
kernel/power/hibernate.c's create_image(), but on registers the boot kernel left, not RESET
values: the image kernel's memory is the snapshot taken between save_processor_state() and
swsusp_arch_suspend(), and the CPU is the one a fresh boot of the same kernel handed over from
resume_target_kernel(). Its PKRU is the boot kernel's, init_pkru_value where its resume ran from
a task with the default; its vector registers hold whatever the boot kernel's own tasks wrote
(`BOOT_KERNEL_FILL`). The same two bugs follow, with the boot kernel's PKRU for RESET's 0.
A hibernation can also end without the power going (`HIBERNATION_ENDINGS`): the same
restore_processor_state() then runs right after the snapshot on this kernel's own registers,
where PKRU is intact and the IA32_XFD write still bypasses xfd_state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fpstate.errors import FpstateError
from fpstate.kernel.x86.core import INIT_PKRU_VALUE, kernel_fpu_begin, kernel_fpu_end
from fpstate.kernel.x86.hw import CR4_FPU_BITS, MXCSR_DEFAULT, PKRU
from fpstate.kernel.x86.init import fpu__disable_cpu
from fpstate.kernel.x86.sched import STATE_KERNEL, Cpu, Machine
from fpstate.kernel.x86.signal import read_pkru
from fpstate.kernel.x86.smpboot import native_kick_ap, start_secondary
from fpstate.kernel.x86.types import PF_KTHREAD, PF_USER_WORKER, IllegalEvent
from fpstate.kernel.x86.xstate import fpu__resume_cpu


@dataclass(frozen=True, slots=True)
class SavedContext:
    """What struct saved_context holds of the FPU's world: CR4, and (proposed fix
    ``resume_pkru`` only) PKRU as rdpkru() read it."""

    cr4: int
    pkru: int | None = None


def save_processor_state(c: Cpu) -> SavedContext:
    """save_processor_state() -> __save_processor_state() on the boot CPU, IRQs off:
    kernel_fpu_begin() (current's live registers saved, TIF_NEED_FPU_LOAD set, this CPU's
    registers owned by no one), then CR4 into saved_context; with proposed fix
    ``resume_pkru``, PKRU too."""
    kernel_fpu_begin(c)
    s = c.m.system
    pkru = None
    if s.ospke and not s.runs_unfixed("pkru-lost-on-resume", "resume_pkru"):
        pkru = read_pkru(c)
    return SavedContext(c.regs.cr4, pkru)


def restore_processor_state(c: Cpu, ctxt: SavedContext) -> None:
    """restore_processor_state() -> __restore_processor_state() on the boot CPU, IRQs off, its
    registers at their RESET values (S3) or as the boot kernel left them (S4): CR4 from
    saved_context, fix_processor_context() -> `fpu__resume_cpu` (XCR0, IA32_XSS, IA32_XFD),
    with proposed fix ``resume_pkru`` WRPKRU of the saved value, then do_fpu_end() ->
    kernel_fpu_end(). PKRU is otherwise left as it was: 0 after S3, the boot kernel's after
    S4."""
    c.regs.cr4 = ctxt.cr4
    fpu__resume_cpu(c)
    if ctxt.pkru is not None:
        c.regs.wrpkru(ctxt.pkru)
    kernel_fpu_end(c)


#: The name of the autosleep workqueue's worker (kernel/power/autosleep.c: an ordered
#: workqueue "autosleep", whose try_to_suspend() calls pm_suspend() or hibernate()).
AUTOSLEEP_WORKER = "kworker/u:autosleep"


def _frozen(m: Machine, what: str, autosleep: bool = False) -> Cpu:
    """CPU 0, whose current user task wrote ``what`` to /sys/power/state and is in the
    kernel; IllegalEvent unless the freezer could have finished: no task inside a kernel path
    (an unfinished KVM_RUN, #NM allocation or exec) and every other CPU idle.

    ``autosleep``: the autosleep workqueue's worker suspends instead (``what`` written to
    /sys/power/autosleep earlier); every CPU must be idle, and the worker -- a kernel thread,
    created the first time -- is switched in on CPU 0."""
    c0 = m.cpus[0]
    busy = [u for u in m.tasks.values() if u.kpath is not None]
    if busy:
        raise IllegalEvent(f"{what}: {busy[0]!r} is inside a kernel path, which the freezer "
                           f"waits for")
    if autosleep:
        for c in m.cpus:
            if c.current is not c.idle:
                raise IllegalEvent(f"{what} by autosleep: CPU {c.nr} still runs "
                                   f"{c.current!r}: the freezer stops it first")
        worker = next((u for u in m.tasks.values() if u.comm == AUTOSLEEP_WORKER), None)
        if worker is None:
            worker = m.kthread(AUTOSLEEP_WORKER)
        m.switch_to(0, worker)
        return c0
    t = c0.current
    if t is c0.idle or t.flags & (PF_KTHREAD | PF_USER_WORKER):
        raise IllegalEvent(f"{what}: CPU 0 runs no user task to write /sys/power/state")
    if t.state is not STATE_KERNEL:
        raise IllegalEvent(f"{what}: {t!r} is not in the kernel")
    for c in m.cpus[1:]:
        if c.current is not c.idle:
            raise IllegalEvent(f"{what}: CPU {c.nr} still runs {c.current!r}: the freezer "
                               f"stops it first")
    return c0


def suspend_enter(m: Machine, *, autosleep: bool = False) -> None:
    """suspend_enter() for ``echo mem > /sys/power/state`` by the current task of CPU 0, in
    the kernel (it wrote the file and slept in the freezer, so it may have been switched out
    and in). IllegalEvent unless the freezer could have finished: no task inside a kernel
    path (an unfinished KVM_RUN, #NM allocation or exec) and every other CPU idle (its
    tasks frozen, switched out). With ``autosleep`` the autosleep worker suspends from an idle
    machine and goes back to sleep after resume (`_frozen`): kernel_fpu_begin() saves no
    user state for it, and fpu__resume_cpu() finds a kernel thread current.

    pm_sleep_disable_secondary_cpus(): each other CPU runs fpu__disable_cpu() and goes down;
    IRQs off; `save_processor_state`; power off (`FpRegs.reset` on every CPU);
    `restore_processor_state`; IRQs on; pm_sleep_enable_secondary_cpus(): each other CPU is
    brought up as after hotplug (`native_kick_ap`, `start_secondary`)."""
    _sleep(m, "suspend", lambda c: c.regs.reset(), autosleep)


#: The byte the boot kernel's own tasks leave in every vector register they used: a value no
#: task of the image kernel wrote (not a token of `fpstate.kernel.x86.hw`).
BOOT_KERNEL_FILL = 0xB0
#: The MXCSR they leave: flush-to-zero set (bit 15), a value no task of the image wrote.
BOOT_KERNEL_MXCSR = MXCSR_DEFAULT | 0x8000


def boot_kernel_registers(c: Cpu, *, boot_cpu: bool) -> None:
    """The registers of ``c`` as the boot kernel hands them to the image kernel (a fresh boot of
    the same build, kernel/power/hibernate.c software_resume() -> resume_target_kernel()):
    power-up (`FpRegs.reset`), fpu__init_cpu() (CR4, FNINIT, XCR0, IA32_XSS, IA32_XFD =
    init_fpstate.xfd), setup_pku() (PKRU = init_pkru_value, as the task that started the
    resume keeps it), every other user component its tasks could use -- all of XCR0 but the
    dynamic ones, which need a permission -- filled with `BOOT_KERNEL_FILL`, MXCSR
    `BOOT_KERNEL_MXCSR`. On the boot CPU, resume_target_kernel()'s own save_processor_state()
    -> kernel_fpu_begin() then loads MXCSR 1F80H (KFPU_MXCSR). Only the registers: the boot
    kernel's per-CPU data is not the image's, which the snapshot brings back."""
    s, regs = c.m.system, c.regs
    regs.reset()
    regs.cr4 = CR4_FPU_BITS
    regs.xcr0, regs.xss = s.xcr0, s.xss
    regs.xfd = s.init_xfd if s.xfd else 0
    for i in range(64):
        if not s.xcr0 >> i & 1 or i == PKRU or s.init_xfd >> i & 1 or i == 17:
            continue  # PKRU below; TILEDATA (armed) and TILECFG need the AMX permission
        fill = bytearray([BOOT_KERNEL_FILL]) * regs.size(i)
        if i == 0:
            fill[24:32] = bytes(8)  # MXCSR and MXCSR_MASK live in regs.mxcsr
        regs.values[i] = bytes(fill)
        regs.xinuse |= 1 << i
    if s.ospke:
        regs.wrpkru(INIT_PKRU_VALUE)
    regs.mxcsr = MXCSR_DEFAULT if boot_cpu else BOOT_KERNEL_MXCSR


#: How a hibernation ends (kernel/power/hibernate.c, v6.17: hibernate() -> power_down()).
#: ``resume``: the power goes, and a boot of the same kernel loads the image and jumps into it.
#: ``rollback``: a wakeup event makes hibernation_platform_enter() return -EAGAIN (or a device
#: -EBUSY), and power_down() returns ("Wakeup event detected during hibernation, rolling
#: back"): the power never goes. ``suspend``: /sys/power/disk is "suspend" (suspend-to-both):
#: after writing the image power_down() suspends to RAM, and the machine wakes from RAM.
HIBERNATION_ENDINGS = ("resume", "rollback", "suspend")


def hibernate_enter(m: Machine, ending: str = "resume", *, autosleep: bool = False) -> None:
    """hibernate() for ``echo disk > /sys/power/state`` by the current task of CPU 0, in the
    kernel, to one of the `HIBERNATION_ENDINGS` (IllegalEvent as for `suspend_enter`).

    The image kernel's create_image() (kernel/power/hibernate.c):
    pm_sleep_disable_secondary_cpus() (fpu__disable_cpu() on each other CPU), IRQs off,
    `save_processor_state`, and swsusp_arch_suspend() takes the snapshot -- the machine model as
    it is now. Control returns after it twice in the kernel's history:

    - at once, on this kernel's own registers: `restore_processor_state`, IRQs on,
      pm_sleep_enable_secondary_cpus() (`native_kick_ap`, `start_secondary`); then
      swsusp_write() and power_down(). ``rollback``: hibernation_platform_enter() takes the
      other CPUs down and up again (pm_sleep_disable_secondary_cpus(), syscore_suspend(),
      pm_wakeup_pending(), syscore_resume(), pm_sleep_enable_secondary_cpus()) and fails,
      and hibernate() thaws. ``suspend``: suspend_devices_and_enter() (`suspend_enter`), and
      hibernate() thaws;
    - ``resume``: after the power went, in the image the boot of the same kernel loaded, with
      every CPU's registers as that boot left them (`boot_kernel_registers`). What the image
      kernel did after the snapshot is lost with the power, so only this return is modelled:
      `restore_processor_state` on the boot CPU, IRQs on, the other CPUs brought up.

    ``autosleep``: the autosleep worker hibernates (autosleep_state "disk") from an idle
    machine, as for `suspend_enter`."""
    if ending not in HIBERNATION_ENDINGS:
        raise FpstateError(f"hibernation ending {ending!r}: one of "
                           f"{', '.join(HIBERNATION_ENDINGS)}")
    if ending == "resume":
        _sleep(m, "hibernate", lambda c: boot_kernel_registers(c, boot_cpu=c.nr == 0),
               autosleep)
        return
    _sleep(m, "hibernate", _power_stays, autosleep, keep=True)
    if ending == "rollback":
        for c in m.cpus[1:]:
            fpu__disable_cpu(c)
        _secondaries_up(m)
        if autosleep:
            m.idle(0)
    else:
        _sleep(m, "suspend", lambda c: c.regs.reset(), autosleep, resumed=True)


def _power_stays(c: Cpu) -> None:
    """No power is lost: ``c`` keeps every register (create_image()'s immediate return)."""


def _sleep(m: Machine, what: str, power_back: Callable[[Cpu], None], autosleep: bool = False,
           *, keep: bool = False, resumed: bool = False) -> None:
    """The sequence suspend to RAM and hibernation share: `_frozen`; each other CPU's
    fpu__disable_cpu() as it goes down; IRQs off; `save_processor_state` on CPU 0; the power
    goes and ``power_back`` sets each CPU's registers as they come back (RESET values, or a
    boot kernel's); `restore_processor_state`; IRQs on; each other CPU brought up as after
    hotplug (`native_kick_ap`, `start_secondary`). With ``autosleep`` the autosleep worker
    runs it and CPU 0 goes idle after it, unless ``keep`` (more follows); ``resumed``: the
    worker is already current (a suspend that follows a hibernation's image)."""
    c0 = m.cpus[0] if resumed else _frozen(m, what, autosleep)
    for c in m.cpus[1:]:
        fpu__disable_cpu(c)
    c0.irqs_disabled = True
    try:
        ctxt = save_processor_state(c0)
        for c in m.cpus:
            power_back(c)
        restore_processor_state(c0, ctxt)
    finally:
        c0.irqs_disabled = False
    _secondaries_up(m)
    if autosleep and not keep:
        m.idle(0)


def _secondaries_up(m: Machine) -> None:
    """pm_sleep_enable_secondary_cpus(): each other CPU brought up as after hotplug."""
    for c in m.cpus[1:]:
        native_kick_ap(c)
        start_secondary(c)


__all__ = ["AUTOSLEEP_WORKER", "BOOT_KERNEL_FILL", "BOOT_KERNEL_MXCSR", "HIBERNATION_ENDINGS",
           "SavedContext", "boot_kernel_registers", "hibernate_enter",
           "restore_processor_state", "save_processor_state", "suspend_enter"]
