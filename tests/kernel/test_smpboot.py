"""CPU hotplug in the kernel model (fpstate.kernel.x86.smpboot): what a CPU brought back online
holds, and the two per-CPU variables that must be reset with it."""

from __future__ import annotations

import pytest

from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import token
from fpstate.kernel.x86.sched import Machine, TaskState
from fpstate.kernel.x86.smpboot import cpu_down_up
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
