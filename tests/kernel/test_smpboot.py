"""CPU hotplug in the kernel model (fpstate.kernel.x86.smpboot): what a CPU brought back online
holds, the two per-CPU variables that must be reset with it, and the FPU's use before
fpu__init_cpu() (fpstate.kernel.x86.microcode)."""

from __future__ import annotations

import pytest

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import (
    CR4_FPU_BITS,
    X86_CR4_OSFXSR,
    X86_CR4_OSXMMEXCPT,
    X86_CR4_OSXSAVE,
    KernelBuf,
    token,
)
from fpstate.kernel.x86.init import fpu__disable_cpu
from fpstate.kernel.x86.microcode import cpu_has_entrysign, load_ucode_ap, sha256_blocks
from fpstate.kernel.x86.sched import Machine, TaskState
from fpstate.kernel.x86.smpboot import cpu_down_up, native_kick_ap
from fpstate.kernel.x86.types import IllegalEvent, KernelBug
from fpstate.kernel.x86.xstate_prctl import ARCH_REQ_XCOMP_PERM, sys_arch_prctl

X87, YMM, CET_USER, TILEDATA = 0, 2, 11, 18


def _amx_task_left_on_cpu1(kernel: str | None = None, variants: tuple[str, ...] = ()):
    """A Sapphire Rapids machine whose task t used x87, AVX, CET_USER and AMX tile data on
    CPU 1 and was switched out there (CPU 1 idle, still holding its registers)."""
    m = Machine.boot("sapphire-rapids", kernel, variants=variants)
    t = m.spawn("t")
    m.run(1, t)
    assert m.syscall(1, sys_arch_prctl, ARCH_REQ_XCOMP_PERM, TILEDATA) == 0
    for i in (X87, YMM, TILEDATA):
        m.user_write(1, i)
    if (m.system.kernel.max_features >> CET_USER) & 1:  # v6.6+
        c = m.enter_kernel(1)
        core.fpregs_update_current_xstate(c, CET_USER, token(t.pid, 77, CET_USER, 16))
        m.exit_to_user_mode(1)
    m.idle(1)
    assert m.cpus[1].fpu_fpregs_owner_ctx is t.fpu and t.fpu.last_cpu == 1
    return m, t


def test_a_cpu_comes_back_with_no_owner_init_and_fninit_state_and_xfd_armed() -> None:
    m, t = _amx_task_left_on_cpu1()
    c = m.cpus[1]
    before = c.regs.snapshot()
    cpu_down_up(m, 1)
    after = c.regs.snapshot()
    assert c.fpu_fpregs_owner_ctx is None
    # INIT clears CET (SDM Vol. 3A Table 10-1), FNINIT the x87 state; AVX and AMX stay.
    assert after[CET_USER] == m.init_value(CET_USER) != before[CET_USER]
    assert after[X87] == m.init_value(X87) != before[X87]
    assert after[YMM] == before[YMM] and after[TILEDATA] == before[TILEDATA]
    assert c.regs.component(9)[:4] == core.INIT_PKRU_VALUE.to_bytes(4, "little")
    assert c.regs.xfd == c.xfd_state == m.system.init_xfd == 1 << TILEDATA
    # Back on CPU 1 the task is restored from memory: every value its own.
    m.run(1, t)
    assert m.user_state(t) == {**before, 9: m.user_state(t)[9]}


@pytest.mark.parametrize("kernel", ["5.16", "6.6"])
def test_kernels_before_6_9_keep_a_stale_xfd_state_and_die_restoring_amx(kernel: str) -> None:
    m, t = _amx_task_left_on_cpu1(kernel)
    cpu_down_up(m, 1)
    c = m.cpus[1]
    assert c.regs.xfd == 1 << TILEDATA and c.xfd_state == 0
    with pytest.raises(KernelBug, match="unexpected-nm: XRSTOR"):
        m.run(1, t)


def test_the_variant_runs_the_old_code_on_the_newest_kernel() -> None:
    m, t = _amx_task_left_on_cpu1(variants=("xfd-state-stale-on-online",))
    cpu_down_up(m, 1)
    assert m.cpus[1].xfd_state == 0
    with pytest.raises(KernelBug, match="unexpected-nm"):
        m.run(1, t)


def test_without_the_owner_reset_the_task_skips_its_restore() -> None:
    """Variant cpu-up-keeps-owner: last_cpu and the owner still agree, so the task runs with
    what INIT and FNINIT left of its x87 and CET state."""
    m, t = _amx_task_left_on_cpu1(variants=("cpu-up-keeps-owner",))
    image = m.user_state(t)
    cpu_down_up(m, 1)
    m.run(1, t)
    now = m.cpus[1].regs.snapshot()
    assert now[X87] == m.init_value(X87) != image[X87]
    assert now[CET_USER] == m.init_value(CET_USER) != image[CET_USER]


def test_cpu_0_and_a_busy_cpu_do_not_go_offline() -> None:
    m, t = _amx_task_left_on_cpu1()
    with pytest.raises(IllegalEvent, match="CPU 0 stays online"):
        cpu_down_up(m, 0)
    m.run(1, t)
    assert t.state is TaskState.USER
    with pytest.raises(IllegalEvent, match="still runs"):
        cpu_down_up(m, 1)


def test_a_stale_xfd_state_also_traps_a_task_whose_tiles_were_released_in_its_nm() -> None:
    """CVE-2024-35801's other face: with its tile data in the initial configuration (after
    TILERELEASE) the task is restored without a #NM, but returns to user mode with IA32_XFD
    armed; its next tile instruction takes the XFD #NM, the handler's xfd_update_state() skips
    the write again, and the retried instruction takes #NM again, for ever."""
    m, t = _amx_task_left_on_cpu1(variants=("xfd-state-stale-on-online",))
    m.run(1, t)
    m.user_release(1, 0x3 << 17)
    m.idle(1)
    cpu_down_up(m, 1)
    m.run(1, t)
    assert m.cpus[1].regs.xfd == 1 << TILEDATA and t.fpu.fpstate.xfd == 0
    with pytest.raises(KernelBug, match="xfd-nm-loop"):
        m.user_write(1, TILEDATA)
    # The kernel's design writes IA32_XFD on the restore and the task goes on.
    m, t = _amx_task_left_on_cpu1()
    m.run(1, t)
    m.user_release(1, 0x3 << 17)
    m.idle(1)
    cpu_down_up(m, 1)
    m.run(1, t)
    assert m.cpus[1].regs.xfd == 0 and m.user_write(1, TILEDATA) is None


# -- the FPU before fpu__init_cpu(): AMD's microcode loader (fpstate.kernel.x86.microcode) -----


def _idle_machine(profile: str, kernel: str | None = None, variants: tuple[str, ...] = ()):
    """A machine whose task t ran AVX on CPU 1 and was switched out there."""
    m = Machine.boot(profile, kernel, variants=variants)
    t = m.spawn("t")
    m.run(1, t)
    m.user_write(1, YMM)
    m.idle(1)
    return m, t


def _down_to_init(m: Machine, nr: int) -> None:
    """cpu_down_up() up to start_secondary(): takedown, then native_kick_ap()'s INIT."""
    c = m.cpus[nr]
    fpu__disable_cpu(c)
    native_kick_ap(c)
    assert not c.regs.cr4 & CR4_FPU_BITS


@pytest.mark.parametrize(("profile", "entrysign"), [
    ("zen2", True), ("zen3", True), ("zen4", True), ("zen5", True),  # 17h, 19h, 19h, 1Ah/02h
    ("sapphire-rapids", False), ("haswell", False)])
def test_entrysign_cpus_hash_their_patch(profile: str, entrysign: bool) -> None:
    from fpstate.x86.profiles import load_profile

    assert cpu_has_entrysign(load_profile(profile)) is entrysign


def test_a_cpu_coming_online_hashes_its_microcode_without_the_fpu() -> None:
    """v6.16+: kernel_fpu_allowed is false from cpu_disable_common() to fpu__init_cpu(), so
    sha256() takes the generic C code although the kernel's sha256() has SIMD code; after
    bring-up CR4's FPU bits are back and the FPU is usable again."""
    m, t = _idle_machine("zen4")
    c = m.cpus[1]
    assert c.regs.cr4 == CR4_FPU_BITS and c.kernel_fpu_allowed
    _down_to_init(m, 1)
    assert not core.irq_fpu_usable(c)
    assert load_ucode_ap(c) is False
    m, t = _idle_machine("zen4")
    cpu_down_up(m, 1)
    c = m.cpus[1]
    assert c.regs.cr4 == CR4_FPU_BITS and c.kernel_fpu_allowed and not c.irqs_disabled
    # Once online the same hash runs on the FPU (SHA-NI's XMM registers, the kernel's value).
    c.irqs_disabled = True
    assert sha256_blocks(c) is True
    c.irqs_disabled = False
    m.run(1, t)
    assert m.user_state(t)[YMM] == token(t.pid, 1, YMM, 256)


def test_the_old_irq_fpu_usable_takes_ud_in_kernel_fpu_begin() -> None:
    """Variant fpu-usable-before-init-cpu: in_kernel_fpu was false on a CPU coming online, so
    irq_fpu_usable() said yes and kernel_fpu_begin_mask()'s LDMXCSR ran with CR4.OSFXSR = 0:
    #UD, the oops of the linux-next report."""
    m, _ = _idle_machine("zen4", variants=("fpu-usable-before-init-cpu",))
    with pytest.raises(KernelBug, match=r"invalid-opcode: LDMXCSR with CR4.OSFXSR = 0 in "
                                        r"kernel_fpu_begin_mask\(\) on CPU 1, from sha256"):
        cpu_down_up(m, 1)


@pytest.mark.parametrize(("profile", "kernel"), [("sapphire-rapids", None), ("zen4", "6.12")])
def test_the_old_irq_fpu_usable_is_harmless_without_a_simd_hash(profile: str,
                                                                   kernel: str | None) -> None:
    """The same old irq_fpu_usable() -- selected, or kernel 6.12's own -- says yes in the
    window, yet nothing takes the FPU there: an Intel CPU's loader hashes nothing, and before
    6.16 sha256() had no SIMD code."""
    m, _ = _idle_machine(profile, kernel, variants=("fpu-usable-before-init-cpu",))
    _down_to_init(m, 1)
    assert core.irq_fpu_usable(m.cpus[1])
    assert load_ucode_ap(m.cpus[1]) is False
    m, _ = _idle_machine(profile, kernel)
    cpu_down_up(m, 1)
    assert m.cpus[1].regs.cr4 == CR4_FPU_BITS


def test_ldmxcsr_and_the_xsave_family_take_ud_without_their_cr4_bits() -> None:
    """SDM Vol. 2B LDMXCSR and Vol. 2D XSAVE/XRSTOR: #UD if CR4.OSFXSR (resp. CR4.OSXSAVE) is
    0, checked before the operand (a misaligned area, a reserved MXCSR bit)."""
    m = Machine.boot("sapphire-rapids")
    regs = m.cpus[1].regs
    regs.cr4 = X86_CR4_OSXSAVE
    assert str(regs.set_mxcsr(0xFFFFFFFF)) == "#UD(LDMXCSR with CR4.OSFXSR = 0)"
    regs.cr4 = X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
    assert regs.set_mxcsr(0x1F80) is None
    buf = KernelBuf(bytearray(4096), "test")
    buf.addr = 0x1001  # misaligned: #UD comes first
    assert str(regs.xsave(buf, 3, "XSAVE")) == "#UD(XSAVE with CR4.OSXSAVE = 0)"
    assert str(regs.xrstor(buf, 3, "XRSTORS")) == "#UD(XRSTORS with CR4.OSXSAVE = 0)"
    regs.cr4 = CR4_FPU_BITS
    assert regs.xsave(buf, 3, "XSAVE").vector == "#GP"
