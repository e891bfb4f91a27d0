"""Lazy FPU restore across tasks and CPUs, kernel-mode FPU use, and seed 004's update rule."""

from __future__ import annotations

from typing import Any

import pytest

from fpstate.errors import FpstateError
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.context import (
    TRANSITIONS,
    FpregsState,
    check_transition,
    fpregs_state,
    fpregs_state_valid,
)
from fpstate.kernel.x86.hw import KernelBuf, read_token, token
from fpstate.kernel.x86.sched import Machine, TaskState
from fpstate.kernel.x86.types import FpuGuest, IllegalEvent, KernelBug
from fpstate.x86.xfeatures import MXCSR_DEFAULT

YMM, ZMM_HI256, CET_USER = 2, 6, 11


@pytest.fixture
def m() -> Machine:
    return Machine.boot("zen5")


def two_tasks(m: Machine):
    a, b = m.spawn("a"), m.spawn("b")
    m.run(0, a)
    return a, b


# -- init_fpstate and fresh tasks -----------------------------------------------------------------

def test_init_fpstate_is_the_kernel_default_image(m: Machine) -> None:
    """setup_init_fpu_buf(): default size/features, XCOMP_BV = defaults | bit 63, XSTATE_BV 0,
    FCW 037FH, MXCSR 1F80H, MXCSR_MASK of the CPU (0x2FFFF with AMD's misaligned SSE)."""
    init = m.init_fpstate
    assert (init.size, init.xfeatures) == (m.system.kernel.default_size,
                                           m.system.kernel.default_features)
    assert init.xcomp_bv == m.system.kernel.default_features | 1 << 63
    assert init.xstate_bv == 0
    assert init.regs[0:2] == b"\x7f\x03"
    assert int.from_bytes(init.regs[24:28], "little") == MXCSR_DEFAULT
    assert int.from_bytes(init.regs[28:32], "little") == 0x2FFFF
    assert len(init.regs) == 4096


@pytest.mark.parametrize(("profile", "zeroed"), [("zen5", True), ("sapphire-rapids", True),
                                                  ("haswell", False)])
def test_an_xsaves_read_back_leaves_init_fpstate_without_legacy_values(profile: str,
                                                                       zeroed: bool) -> None:
    """Variant init-fpstate-by-xsaves (before f9dfb5e390fa): copy_xregs_to_kernel_booting()
    read init_fpstate back with XSAVES where the CPU has it, which writes nothing of components
    in their initial configuration; a CPU without XSAVES (Haswell) used XSAVE, which writes
    x87 and MXCSR whatever XINUSE says."""
    m = Machine.boot(profile, variants=("init-fpstate-by-xsaves",))
    assert m.system.xsaves is zeroed
    legacy = bytes(m.init_fpstate.regs[0:32])
    if zeroed:
        assert legacy == bytes(32)
    else:
        assert legacy[0:2] == b"\x7f\x03" and legacy[24:28] == MXCSR_DEFAULT.to_bytes(4, "little")


def test_new_process_starts_in_init_state_and_loads_on_return(m: Machine) -> None:
    a = m.spawn()
    assert a.need_fpu_load and a.fpu.last_cpu == -1
    assert a.fpu.fpstate is a.fpu.embedded and a.fpu.fpstate.size == m.system.kernel.default_size
    m.run(0, a)
    assert not a.need_fpu_load
    assert fpregs_state_valid(m.cpus[0], a.fpu)
    assert m.user_read(0, YMM) == bytes(256)
    assert m.cpus[0].regs.mxcsr == MXCSR_DEFAULT


# -- lazy restore ---------------------------------------------------------------------------------

def test_switch_out_saves_and_keeps_the_registers_cached(m: Machine) -> None:
    """switch_fpu(): TIF_NEED_FPU_LOAD set, XSAVES into the fpstate, last_cpu = cpu, owner_ctx
    still the task: CACHED."""
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    value = m.user_read(0, YMM)
    m.idle(0)
    assert a.need_fpu_load and a.fpu.last_cpu == 0
    assert m.cpus[0].fpu_fpregs_owner_ctx is a.fpu
    assert fpregs_state(a, m.cpus) is FpregsState.CACHED
    assert core.fpstate_read_component(m.system, a.fpu.fpstate, YMM) == value


def test_return_to_the_same_cpu_skips_the_restore(m: Machine) -> None:
    """fpregs_restore_userregs(): valid registers are not reloaded -- proven by changing the
    memory image behind the kernel's back: the task still sees its register value."""
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    live = m.user_read(0, YMM)
    m.idle(0)
    core.fpstate_write_component(m.system, a.fpu.fpstate, YMM, token(99, 1, YMM, 256))
    m.run(0, a)
    assert m.user_read(0, YMM) == live


def test_another_task_in_between_forces_a_restore(m: Machine) -> None:
    a, b = two_tasks(m)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    m.run(0, b)
    assert fpregs_state(a, m.cpus) is FpregsState.MEMORY
    assert m.user_read(0, YMM) == bytes(256)  # b's own init state, not a's registers
    m.user_write(0, YMM)
    m.run(0, a)
    assert m.user_read(0, YMM) == mine


def test_migration_restores_from_memory_and_back_again(m: Machine) -> None:
    """last_cpu names one CPU: running elsewhere invalidates the first CPU's cached copy even
    though its owner_ctx still names the task."""
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    first = m.user_read(0, YMM)
    m.migrate(a, 1)
    assert m.user_read(1, YMM) == first and a.fpu.last_cpu == 1
    m.user_write(1, YMM)
    second = m.user_read(1, YMM)
    m.migrate(a, 0)
    assert m.cpus[0].fpu_fpregs_owner_ctx is a.fpu  # stale: CPU 0 still holds `first`
    assert m.user_read(0, YMM) == second


def test_state_table_matches_every_primitive(m: Machine) -> None:
    """Each primitive moves a task between FpregsState as TRANSITIONS says."""
    a, b = two_tasks(m)
    m.user_write(0, YMM)
    seen = []

    def step(event, fn):
        before = fpregs_state(a, m.cpus)
        fn()
        after = fpregs_state(a, m.cpus)
        check_transition(before, event, after)
        seen.append((before, event))

    step("switch_out", lambda: m.idle(0))
    step("restore", lambda: m.run(0, a))
    m.enter_kernel(0)
    step("kernel_fpu_begin", lambda: m.irq_kernel_fpu(0, clobber=1 << YMM))
    step("restore", lambda: m.exit_to_user_mode(0))
    step("switch_out", lambda: m.idle(0))
    step("cpu_taken", lambda: m.run(0, b))
    step("restore", lambda: m.run(1, a))
    assert (FpregsState.REGS, "switch_out") in seen and len(seen) == 7


def test_table_rejects_illegal_events() -> None:
    with pytest.raises(IllegalEvent, match="illegal in state regs"):
        check_transition(FpregsState.REGS, "modify_memory", FpregsState.REGS)
    with pytest.raises(IllegalEvent, match="the kernel's rules say memory"):
        check_transition(FpregsState.CACHED, "kernel_fpu_begin", FpregsState.CACHED)
    assert (FpregsState.CACHED, "modify_regs") not in TRANSITIONS


# -- kernel-mode FPU ------------------------------------------------------------------------------

def test_softirq_kernel_fpu_on_a_cpu_running_a_user_task(m: Machine) -> None:
    """kernel_fpu_begin() from softirq: the interrupted task's registers are saved first, the
    kernel's use is invisible to it, and it reloads on the way back to user mode."""
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    m.enter_kernel(0)
    assert m.irq_kernel_fpu(0, clobber=1 << YMM | 1 << ZMM_HI256)
    assert a.need_fpu_load and m.cpus[0].fpu_fpregs_owner_ctx is None
    assert read_token(m.cpus[0].regs.component(YMM))[0] == core.KERNEL_OWNER
    m.exit_to_user_mode(0)
    assert m.user_read(0, YMM) == mine
    assert m.user_read(0, ZMM_HI256) == bytes(512)


def test_kernel_fpu_on_a_cpu_that_caches_a_switched_out_task(m: Machine) -> None:
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    m.idle(0)
    assert fpregs_state(a, m.cpus) is FpregsState.CACHED
    m.irq_kernel_fpu(0, hardirq=True, clobber=1 << YMM)
    assert fpregs_state(a, m.cpus) is FpregsState.MEMORY
    m.run(0, a)
    assert m.user_read(0, YMM) == mine


def test_hardirq_inside_fpregs_lock_cannot_use_the_fpu(m: Machine) -> None:
    """irq_fpu_usable(): in a hard interrupt only if softirq_count() == 0, i.e. the interrupt
    did not hit a fpregs_lock()ed section; a softirq cannot run there at all."""
    two_tasks(m)
    m.enter_kernel(0)
    c = m.cpus[0]
    core.fpregs_lock(c)
    assert m.irq_kernel_fpu(0, hardirq=True) is False
    with pytest.raises(IllegalEvent, match="softirq on CPU 0 while bottom halves"):
        m.irq_kernel_fpu(0)
    core.fpregs_unlock(c)
    assert m.irq_kernel_fpu(0, hardirq=True) is True


@pytest.mark.parametrize(("kernel", "variants"), [
    ("5.16", ()), (None, ("hardirq-fpu-in-fpregs-lock",))])
def test_before_5_18_a_hardirq_inside_fpregs_lock_takes_the_fpu(kernel: str | None,
                                                                 variants: tuple[str, ...]) -> None:
    """Before 59f5ede3bc0f irq_fpu_usable() was !in_interrupt() || interrupted_user_mode() ||
    interrupted_kernel_fpu_idle(): the same hard interrupt takes the FPU, saving the task's
    live registers (TIF_NEED_FPU_LOAD set) and clobbering them under the section."""
    m = Machine.boot("zen5", kernel, variants=variants)
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    m.enter_kernel(0)
    c = m.cpus[0]
    core.fpregs_lock(c)
    assert m.irq_kernel_fpu(0, hardirq=True, clobber=1 << YMM) is True
    assert a.need_fpu_load and c.fpu_fpregs_owner_ctx is None
    assert read_token(c.regs.component(YMM))[0] == core.KERNEL_OWNER
    core.fpregs_unlock(c)


def _frame_save_with_irq(variants: tuple[str, ...], site: str) -> tuple[Any, ...]:
    """Task a writes AVX on a Zen 5 and, in the kernel, has its frame written by
    copy_fpstate_to_sigframe() with a hard interrupt armed for ``site`` ("" for the first
    window): the CPU, the task, its AVX value and the frame's AVX bytes."""
    from fpstate.kernel.x86.signal import copy_fpstate_to_sigframe

    m = Machine.boot("zen5", variants=variants)
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    c = m.enter_kernel(0)
    frame = a.user_sp - 0x2000 & ~63
    c.irq_in_lock, c.irq_in_lock_site = 1 << YMM, site
    assert copy_fpstate_to_sigframe(c, frame, frame, a.fpu.fpstate.user_size, None)
    off = m.system.profile.component(YMM).offset
    return c, a, mine, a.process.mm.read(frame + off, 256)


@pytest.mark.parametrize("variants", [(), ("hardirq-fpu-in-fpregs-lock",)])
def test_a_hardirq_armed_for_the_handler_setup_passes_the_frame_save(
        variants: tuple[str, ...]) -> None:
    """An interrupt armed for fpu__clear_user_states() (Cpu.irq_in_lock_site) lets
    copy_fpstate_to_sigframe()'s window go by and arrives after the XRSTOR of init_fpstate,
    before fpregs_mark_activate(). Under the old irq_fpu_usable() the marking then gives
    current the handler's registers: a signal handler starting with the kernel's AVX."""
    c, a, mine, saved = _frame_save_with_irq(variants, "fpu__clear_user_states")
    assert c.irq_in_lock == 1 << YMM and c.irq_in_lock_used is None
    assert saved == mine
    core.fpu__clear_user_states(c, a.fpu)
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is bool(variants)
    assert not a.need_fpu_load
    live = c.regs.component(YMM)
    if variants:
        assert read_token(live)[0] == core.KERNEL_OWNER
    else:
        assert live == bytes(256)


@pytest.mark.parametrize("variants", [(), ("hardirq-fpu-in-fpregs-lock",)])
def test_a_hardirq_inside_the_signal_frame_save_reaches_the_frame_only_before_5_18(
        variants: tuple[str, ...]) -> None:
    """copy_fpstate_to_sigframe() holds fpregs_lock() from loading the registers to the XSAVE
    into the frame; a hard interrupt armed for that window (core.fpregs_locked_irq_window)
    scalar under the kernel's rule, and under the old one its clobber lands in the frame."""
    c, _, mine, saved = _frame_save_with_irq(variants, "")
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is bool(variants)
    if variants:
        assert read_token(saved)[0] == core.KERNEL_OWNER
    else:
        assert saved == mine


def test_nested_kernel_fpu_begin_is_refused_and_changes_nothing(m: Machine) -> None:
    two_tasks(m)
    m.enter_kernel(0)
    c = m.cpus[0]
    core.kernel_fpu_begin_mask(c)
    snapshot = (c.bh_disabled, c.kernel_fpu_allowed, c.fpu_fpregs_owner_ctx)
    with pytest.raises(IllegalEvent, match="irq_fpu_usable"):
        core.kernel_fpu_begin_mask(c)
    assert (c.bh_disabled, c.kernel_fpu_allowed, c.fpu_fpregs_owner_ctx) == snapshot
    core.kernel_fpu_end(c)
    with pytest.raises(IllegalEvent, match="without kernel_fpu_begin"):
        core.kernel_fpu_end(c)


def test_kfpu_387_and_mxcsr_defaults(m: Machine) -> None:
    two_tasks(m)
    m.user_write(0, 0, token(3, 1, 0, 160))
    assert m.cpus[0].regs.set_mxcsr(0x1F00) is None
    m.enter_kernel(0)
    c = m.cpus[0]
    core.kernel_fpu_begin_mask(c, core.KFPU_387 | core.KFPU_MXCSR)
    assert c.regs.mxcsr == MXCSR_DEFAULT and c.regs.component(0)[:2] == b"\x7f\x03"
    core.kernel_fpu_end(c)
    m.exit_to_user_mode(0)
    assert m.cpus[0].regs.mxcsr == 0x1F00


def test_save_requires_fpregs_lock(m: Machine) -> None:
    a, _ = two_tasks(m)
    with pytest.raises(IllegalEvent, match=r"save_fpregs_to_fpstate\(\) on CPU 0 requires "
                                           r"fpregs_lock"):
        core.save_fpregs_to_fpstate(m.cpus[0], a.fpu)


def test_switching_to_a_task_running_elsewhere_is_illegal(m: Machine) -> None:
    a, b = two_tasks(m)
    m.run(1, b)
    m.enter_kernel(0)
    with pytest.raises(IllegalEvent, match="not runnable"):
        m.switch_to(0, b)
    assert m.cpus[0].current is a and a.state is TaskState.KERNEL
    with pytest.raises(IllegalEvent, match="'exit_to_user' is illegal while running in user"):
        b.event("exit_to_user")


def test_fpu_sync_fpstate_keeps_registers_live(m: Machine) -> None:
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    m.enter_kernel(0)
    core.fpu_sync_fpstate(m.cpus[0], a.fpu)
    assert not a.need_fpu_load and fpregs_state(a, m.cpus) is FpregsState.REGS
    assert core.fpstate_read_component(m.system, a.fpu.fpstate, YMM) == \
        m.cpus[0].regs.component(YMM)


# -- seed 004: changing current's xstate ---------------------------------------------------------

def _kernel_with_cached_registers(m: Machine):
    """Task a in the kernel with TIF_NEED_FPU_LOAD set but its registers still valid on CPU 0
    (it was switched out to idle and back, and has not returned to user mode yet)."""
    a, _ = two_tasks(m)
    m.enter_kernel(0)
    m.idle(0)
    m.switch_to(0, a)
    assert a.need_fpu_load and fpregs_state_valid(m.cpus[0], a.fpu)
    return a


@pytest.mark.parametrize("variant", [(), ("pasid-write-incoherent",)])
def test_update_with_live_registers_writes_the_register(variant) -> None:
    m = Machine.boot("zen5", variants=variant)
    a, _ = two_tasks(m)
    m.enter_kernel(0)
    value = token(a.pid, 7, CET_USER, 16)
    assert core.fpregs_update_current_xstate(m.cpus[0], CET_USER, value) == "regs"
    m.exit_to_user_mode(0)
    assert m.user_state(a)[CET_USER] == value


def test_update_with_cached_registers_goes_to_memory_and_invalidates(m: Machine) -> None:
    """Andy Lutomirski's rule: TIF_NEED_FPU_LOAD set -> change the memory image and zap
    last_cpu; a kernel_fpu_begin() before the return does not lose the write."""
    a = _kernel_with_cached_registers(m)
    value = token(a.pid, 8, CET_USER, 16)
    assert core.fpregs_update_current_xstate(m.cpus[0], CET_USER, value) == "memory"
    assert a.fpu.last_cpu == -1
    m.irq_kernel_fpu(0, clobber=1 << YMM)
    m.exit_to_user_mode(0)
    assert m.user_state(a)[CET_USER] == value


def test_update_with_cached_registers_reaches_user_mode_through_the_restore(m: Machine) -> None:
    """The invalidation is what makes it work: nothing else touches CPU 0 before the return,
    so without last_cpu = -1 fpregs_restore_userregs() would find the registers valid, skip the
    XRSTOR and hand the task the old value from the stale registers."""
    a = _kernel_with_cached_registers(m)
    old = m.cpus[0].regs.component(CET_USER)
    value = token(a.pid, 10, CET_USER, 16)
    assert value != old
    assert core.fpregs_update_current_xstate(m.cpus[0], CET_USER, value) == "memory"
    assert m.cpus[0].regs.component(CET_USER) == old  # the registers were not touched
    m.exit_to_user_mode(0)
    assert m.cpus[0].regs.component(CET_USER) == value


def test_pasid_write_incoherent_variant_loses_the_write() -> None:
    """fpu__pasid_write() v1: with TIF_NEED_FPU_LOAD set and fpregs_state_valid() it writes the
    register only; a kernel_fpu_begin() on that CPU before the return to user mode makes the
    restore read the stale memory image."""
    m = Machine.boot("zen5", variants={"pasid-write-incoherent"})
    a = _kernel_with_cached_registers(m)
    value = token(a.pid, 9, CET_USER, 16)
    assert core.fpregs_update_current_xstate(m.cpus[0], CET_USER, value) == "regs"
    m.irq_kernel_fpu(0, clobber=1 << YMM)
    m.exit_to_user_mode(0)
    assert m.user_state(a)[CET_USER] == bytes(16)


@pytest.mark.parametrize("variants", [(), ("hardirq-fpu-in-fpregs-lock",)])
def test_a_hardirq_between_the_tif_test_and_the_register_write_loses_it_before_5_18(
        variants: tuple[str, ...]) -> None:
    """Seed 004's rule writes the register when TIF_NEED_FPU_LOAD is clear. A hard interrupt
    wanting the FPU between that test and the write is refused under the kernel's
    irq_fpu_usable(); the old one let its kernel_fpu_begin() save the registers (old value)
    and set the flag, so the write went into registers that were no longer the task's."""
    m = Machine.boot("zen5", variants=variants)
    a, _ = two_tasks(m)
    c = m.enter_kernel(0)
    value = token(a.pid, 7, CET_USER, 16)
    c.irq_in_lock, c.irq_in_lock_site = 1 << YMM, "fpregs_update_current_xstate"
    assert core.fpregs_update_current_xstate(c, CET_USER, value) == "regs"
    assert c.irq_in_lock == 0 and c.irq_in_lock_used is bool(variants)
    m.exit_to_user_mode(0)
    assert m.user_state(a)[CET_USER] == (bytes(16) if variants else value)


def test_update_refuses_a_component_without_space(m: Machine) -> None:
    """CET_KERNEL (12) is guest-only since v6.17: host fpstates have no room for it."""
    two_tasks(m)
    m.enter_kernel(0)
    with pytest.raises(IllegalEvent, match="component 12 has no space"):
        core.fpregs_update_current_xstate(m.cpus[0], 12, bytes(24))


# -- exit and the KVM swap ------------------------------------------------------------------------

def test_exit_drops_the_registers_and_the_task(m: Machine) -> None:
    a, b = two_tasks(m)
    m.user_write(0, YMM)
    m.enter_kernel(0)
    m.do_exit(0)
    assert a.state is TaskState.DEAD and m.cpus[0].current is m.cpus[0].idle
    m.run(0, b)
    assert m.user_read(0, YMM) == bytes(256)


def test_fpu_swap_kvm_fpstate_round_trip(m: Machine) -> None:
    """fpu_swap_kvm_fpstate(): entering the guest saves the task's live state and loads the
    guest's; leaving saves the guest's and brings the task's back."""
    a, _ = two_tasks(m)
    m.user_write(0, YMM)
    mine = m.user_read(0, YMM)
    gfps = core.fpstate_alloc(m.system, m.system.guest.size, valloc=True)
    gfps.is_guest = True
    core.__fpstate_reset(m.system, gfps)
    core.fpstate_init_user(m.system, gfps)
    guest_ymm = token(500, 1, YMM, 256)
    core.fpstate_write_component(m.system, gfps, YMM, guest_ymm)
    gfpu = FpuGuest(m.system.guest.features, 0, 4096, gfps)
    assert gfps.size == m.system.guest.size and gfps.xfd == 0
    m.enter_kernel(0)
    c = m.cpus[0]
    core.fpu_swap_kvm_fpstate(c, gfpu, True)
    assert a.fpu.fpstate is gfps and gfps.in_use and a.fpu.task_fpstate is a.fpu.embedded
    assert c.regs.component(YMM) == guest_ymm
    c.regs.set_component(YMM, token(500, 2, YMM, 256))
    core.fpu_swap_kvm_fpstate(c, gfpu, False)
    assert a.fpu.fpstate is a.fpu.embedded and not gfps.in_use
    assert core.fpstate_read_component(m.system, gfps, YMM) == token(500, 2, YMM, 256)
    m.exit_to_user_mode(0)
    assert m.user_read(0, YMM) == mine


def test_xsave_past_the_buffer_is_a_kernel_bug(m: Machine) -> None:
    """The seed-000 failure mode: an XSAVE sized for more than the buffer holds."""
    two_tasks(m)
    m.user_write(0, YMM)
    small = bytearray(600)
    with pytest.raises(KernelBug, match="xsave-out-of-bounds"):
        m.cpus[0].regs.xsave(KernelBuf(small, "small"), 1 << YMM | 0x3, "XSAVES")


# -- stateful: any interleaving keeps every task's state -----------------------------------------

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

COMPONENTS = (YMM, ZMM_HI256, 7)


class LazyRestore(RuleBasedStateMachine):
    """Three user tasks on two CPUs, with writes, switches, migrations, softirq and hardirq
    kernel FPU use, and fpu_sync_fpstate(). Invariant: every task sees exactly what it last
    wrote (never another task's or the kernel's bytes), and a task in user mode has valid
    registers (fpregs_assert_state_consistent)."""

    @initialize()
    def boot(self) -> None:
        self.m = Machine.boot("zen5")
        self.tasks = [self.m.spawn(f"t{i}") for i in range(3)]
        self.want = {t.pid: {i: self.m.init_value(i) for i in COMPONENTS} for t in self.tasks}
        self.m.run(0, self.tasks[0])
        self.m.run(1, self.tasks[1])

    def _user_cpus(self) -> list[int]:
        return [c.nr for c in self.m.cpus if c.current.state is TaskState.USER]

    @precondition(lambda self: self._user_cpus())
    @rule(data=st.data(), comp=st.sampled_from(COMPONENTS))
    def write(self, data, comp) -> None:
        nr = data.draw(st.sampled_from(self._user_cpus()))
        t = self.m.cpus[nr].current
        self.m.user_write(nr, comp)
        self.want[t.pid][comp] = self.m.user_read(nr, comp)

    @rule(nr=st.integers(0, 1), k=st.integers(0, 2))
    def schedule(self, nr, k) -> None:
        t = self.tasks[k]
        if t.state is TaskState.RUNNABLE:
            self.m.run(nr, t)

    @rule(nr=st.integers(0, 1))
    def idle(self, nr) -> None:
        self.m.idle(nr)

    @rule(k=st.integers(0, 2), nr=st.integers(0, 1))
    def migrate(self, k, nr) -> None:
        t = self.tasks[k]
        if t.state is TaskState.USER and t.on_cpu != nr:
            self.m.migrate(t, nr)

    @rule(nr=st.integers(0, 1), hard=st.booleans())
    def interrupt(self, nr, hard) -> None:
        self.m.irq_kernel_fpu(nr, hardirq=hard, clobber=1 << YMM | 1 << 7)

    @precondition(lambda self: self._user_cpus())
    @rule(data=st.data())
    def sync(self, data) -> None:
        nr = data.draw(st.sampled_from(self._user_cpus()))
        c = self.m.enter_kernel(nr)
        core.fpu_sync_fpstate(c, c.current.fpu)
        self.m.exit_to_user_mode(nr)

    @invariant()
    def every_task_sees_its_own_state(self) -> None:
        for t in self.tasks:
            state = self.m.user_state(t)
            for i in COMPONENTS:
                assert state[i] == self.want[t.pid][i], (t, i)
            if t.state is TaskState.USER:
                core.fpregs_assert_state_consistent(self.m.cpus[t.on_cpu])


LazyRestore.TestCase.settings = settings(max_examples=40, stateful_step_count=25,
                                         deadline=None)
test_lazy_restore_state_machine = LazyRestore.TestCase


# -- the kernel model's registers agree with the full CPU model -----------------------------------

@settings(max_examples=150, deadline=None)
@given(xstate_bv=st.sampled_from([0, 0x3, 0x4, 0xE7, 0xE6, 0xE7 | 1 << 8, 1 << 63]),
       xcomp_bv=st.sampled_from([0, 1, 1 << 63, 1 << 63 | 0xE7, 1 << 63 | 0x7, 1 << 63 | 0x800,
                                 1 << 63 | 0x18E7]),
       hdr_byte=st.sampled_from([None, 16, 23, 24, 63]),
       mxcsr=st.sampled_from([0x1F80, 0x1F00, 0x21F80, 0x41F80, 0x80001F80]),
       mask=st.sampled_from([0xE7, 0x4, 0x1, 0x3, 0x18E7]),
       supervisor=st.booleans())
def test_hw_xrstor_agrees_with_fpstate_x86_insn(xstate_bv, xcomp_bv, hdr_byte, mxcsr, mask,
                                                supervisor) -> None:
    """hw.FpRegs.xrstor (the subset the kernel model uses) against fpstate.x86.insn's
    XRSTOR/XRSTORS on this host's profile: the same fault vector, and after success the same
    MXCSR and components 1..7 (x87 has richer semantics there and is left out)."""
    from fpstate.kernel.x86.hw import FpRegs, KernelBuf
    from fpstate.tools.template import guest_profile
    from fpstate.x86 import cpu as xcpu
    from fpstate.x86 import impl, insn
    from fpstate.x86.profiles import load_profile

    # the Zen 5 KVM guest of sessions 1-13 (XCR0 0xe7, IA32_XSS 0x1800), on any machine
    profile = guest_profile(load_profile("zen5"), 0xE7, 0x1800)
    assert profile.xcr0_supported == 0xE7 and profile.xss_supported == 0x1800
    area = bytearray((i * 7 + 3) & 0xFF for i in range(2472))
    area[512:576] = bytes(64)
    area[512:528] = xstate_bv.to_bytes(8, "little") + xcomp_bv.to_bytes(8, "little")
    if hdr_byte is not None:
        area[512 + hdr_byte] |= 1
    area[24:28] = mxcsr.to_bytes(4, "little")
    name = "XRSTORS" if supervisor else "XRSTOR"
    mine = FpRegs(profile, xcr0=0xE7, xss=0x1800, xsavec_supported=True, mxcsr_mask=0x2FFFF)
    theirs = xcpu.Cpu(xcpu.machine(profile), impl.for_profile(profile), xcr0=0xE7, xss=0x1800,
                      cpl=0)
    f1 = mine.xrstor(KernelBuf(bytearray(area), "area"), mask, name)
    f2 = getattr(insn, name)(theirs, xcpu.Area(bytearray(area), ("buf", 0)), mask)
    assert (f1 and f1.vector) == (f2 and f2.vector), (f1, f2)
    if f1 is None:
        assert mine.mxcsr == theirs.mxcsr
        for i in (1, 2, 5, 6, 7, 11, 12):
            assert mine.component(i) == bytes(theirs.regs[i]), i


def test_pkru_tokens_fit_the_32_bit_register() -> None:
    """A PKRU token is a u32 (0xA4, writer, generation) and 4 zero bytes; it reads back, while
    8-byte tokens of other components (0xA5, generation >= 1 in bytes 4..7) keep their
    format, and a PKRU value that merely starts with 0xA4 is no token. As rights, 0xA4 leaves
    key 0 open (the stack's and the code's key), closes key 1 (AD) and keys 2, 3 to writes."""
    v = token(0x123, 0x456, 9, 8)
    assert v == (0xA4 | 0x123 << 8 | 0x456 << 20).to_bytes(4, "little") + bytes(4)
    assert v[0] & 0x3 == 0 and v[0] >> 2 & 0x3 == 0x1 and v[0] >> 4 & 0x3 == 0x2
    assert read_token(v) == (0x123, 0x456)
    assert read_token(token(7, 1, 10, 8)) == (7, 1)  # PASID: 8 bytes, the general format
    assert read_token((0x000000A4).to_bytes(4, "little") + bytes(4)) is None
    assert read_token((0x000000A5).to_bytes(4, "little") + bytes(4)) is None
    # A guest's writer id (0x8000 | VM << 8 | vCPU) folds into the 12 bits and back.
    assert read_token(token(0x8000 | 2 << 8 | 1, 7, 9, 8)) == (0x8000 | 2 << 8 | 1, 7)
    for owner, gen in ((0x800, 1), (0x8000 | 8 << 8, 1), (5, 4096)):
        with pytest.raises(FpstateError, match="a PKRU value names its writer in 32 bits"):
            token(owner, gen, 9, 8)


def test_a_user_wrpkru_is_a_32_bit_write_that_the_next_task_switch_keeps(m: Machine) -> None:
    """Machine.user_write of PKRU goes through WRPKRU; switching away stashes it in
    thread.pkru and switching back loads it again (x86_pkru_load)."""
    a, b = two_tasks(m)
    m.user_write(0, 9)
    mine = m.user_read(0, 9)
    assert read_token(mine) == (a.pid, a.generation)
    m.idle(0)
    assert a.thread_pkru == int.from_bytes(mine[:4], "little")
    m.run(0, b)
    m.user_write(0, 9)
    assert read_token(m.user_read(0, 9)) == (b.pid, 1)
    m.idle(0)
    m.run(0, a)
    assert m.user_read(0, 9) == mine


@given(owner=st.integers(0, 0xFFFF), n=st.sampled_from([1, 2]))
def test_mxcsr_tokens_name_their_writer_and_are_loadable(owner: int, n: int) -> None:
    """hw.mxcsr_token: never 1F80H, no bit outside 0xFFFF (every MXCSR_MASK allows it), and
    read back as (owner mod 64, n)."""
    from fpstate.kernel.x86.hw import mxcsr_token, read_mxcsr_token

    v = mxcsr_token(owner, n)
    assert v != MXCSR_DEFAULT and not v & ~0xFFFF
    assert read_mxcsr_token(v.to_bytes(4, "little")) == (owner & 0x3F, n)


@given(value=st.integers(0, 2**32 - 1))
@example(value=0x7300)  # RC = 3: no token (found by this test in session 22's CI)
def test_read_mxcsr_token_knows_only_tokens(value: int) -> None:
    from fpstate.kernel.x86.hw import mxcsr_token, read_mxcsr_token

    got = read_mxcsr_token(value.to_bytes(4, "little"))
    assert got is None or mxcsr_token(*got) == value
    assert read_mxcsr_token(MXCSR_DEFAULT.to_bytes(4, "little")) is None
    assert read_mxcsr_token(bytes(3)) is None and read_mxcsr_token(None) is None


@pytest.mark.parametrize("xstate_bv", [0x60003, 0x20003, 0x3])
@pytest.mark.parametrize("xfd", [0, 1 << 18])
def test_hw_xrstor_takes_the_xfd_nm_as_fpstate_x86_insn_does(xstate_bv: int, xfd: int) -> None:
    """XRSTOR of TILEDATA while IA32_XFD arms it: #NM with IA32_XFD_ERR[18] set and nothing
    loaded (SDM 13.14), in the kernel model's registers as in the full CPU model, on a
    Sapphire Rapids profile; armed but not in XSTATE_BV, or not armed, it restores."""
    from fpstate.kernel.x86.hw import FpRegs, KernelBuf
    from fpstate.x86 import cpu as xcpu
    from fpstate.x86 import impl, insn
    from fpstate.x86.layout import standard_size
    from fpstate.x86.profiles import load_profile

    profile = load_profile("sapphire-rapids")
    xcr0 = 0x602E7
    area = bytearray((i * 7 + 3) & 0xFF for i in range(standard_size(profile, xcr0)))
    area[512:576] = xstate_bv.to_bytes(8, "little") + bytes(56)
    area[24:28] = (0x1F80).to_bytes(4, "little")
    mine = FpRegs(profile, xcr0=xcr0, xss=0, xsavec_supported=True, mxcsr_mask=0x2FFFF)
    mine.xfd = xfd
    before = mine.snapshot()
    theirs = xcpu.Cpu(xcpu.machine(profile), impl.for_profile(profile), xcr0=xcr0, xfd=xfd,
                      cpl=0)
    f1 = mine.xrstor(KernelBuf(bytearray(area), "area"), xcr0, "XRSTOR")
    f2 = insn.XRSTOR(theirs, xcpu.Area(bytearray(area), ("buf", 0)), xcr0)
    armed = xfd and xstate_bv >> 18 & 1
    assert (f1 and f1.vector) == (f2 and f2.vector) == ("#NM" if armed else None)
    assert mine.xfd_err == theirs.xfd_err == (1 << 18 if armed else 0)
    if armed:
        assert mine.snapshot() == before
    else:
        assert mine.component(18) == bytes(theirs.regs[18])
