"""Host kernel model: arch/arm64/kernel/fpsimd.c rules, one behaviour per test."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fpstate.arm64.cpu import load_profile
from fpstate.arm64.regs import FPSR_STREAMING, ZERO, Tok, sve_regs_size, za_regs_size
from fpstate.arm64.statemachine import IllegalEvent
from fpstate.kernel.arm64 import entry_common as e
from fpstate.kernel.arm64 import fpsimd as k
from fpstate.kernel.arm64.state import (
    ARM64_VEC_SME,
    ARM64_VEC_SVE,
    FP_STATE_CURRENT,
    FP_STATE_FPSIMD,
    FP_STATE_SVE,
    LOAD_FPMR_BEFORE_SVCR,
    NR_CPUS,
    Binding,
)
from fpstate.kvm.arm64 import invariants as inv
from fpstate.kvm.arm64.config import KvmConfig
from fpstate.kvm.arm64.kvm_host import KvmWorld


def host(profile="neoverse-v1", tasks=("a", "b"), ncpus=2):
    h = k.boot(load_profile(profile), ncpus)
    for t in tasks:
        h = k.spawn(h, t)
    return h


def running(h, cpu, name):
    return e.ret_to_user(k.schedule(h, cpu, name), cpu)


def read(h, cpu, op):
    h = e.user_op(h, cpu, op)
    return h, {o.what: o.value for o in h.obs}


def written(h):
    return h.obs[-1].value


def test_vector_length_defaults_follow_sve_setup_and_sme_setup():
    v1 = k.boot(load_profile("neoverse-v1")).caps
    assert v1.sve_vl.default_vl == 32 and v1.sve_vl.max_vl == 32 and v1.kvm_sve_max_vl == 32
    fvp = k.boot(load_profile("fvp-aem-fpmr")).caps
    assert fvp.sve_vl.default_vl == 64            # largest <= 64 bytes
    assert fvp.sme_vl.default_vl == 32            # largest <= 32 bytes
    m4 = k.boot(load_profile("apple-m4")).caps
    assert m4.sme_vl.default_vl == 64 and m4.sme_vl.min_vl == 64   # no VL <= 32: the minimum
    assert m4.sve_vl is None and m4.kvm_sve_max_vl == 0
    assert v1.sve_vl.find_supported_vector_length(48) == 32
    assert v1.sve_vl.find_supported_vector_length(8192) == 32


def test_new_task_has_no_live_state():
    h = host()
    t = h.task("a")
    assert t.tif_foreign_fpstate and t.fpsimd_cpu == NR_CPUS and t.sve_vl == 32
    assert h.store(t.store).fp_type == FP_STATE_FPSIMD and h.store(t.store).sve_size == 0


def test_context_switch_is_lazy_and_state_follows_its_owner():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    mine = written(h)
    h = e.interrupt(h, 0)
    h = running(h, 0, "b")                  # saves a, b gets its own (zero) state
    assert h.store("thread:a").vregs == mine
    h, seen = read(h, 0, "fpsimd_read")
    assert seen["V"] == ZERO
    h = e.user_op(h, 0, "fpsimd_write")
    h = e.interrupt(h, 0)
    h = k.schedule(h, 0, "a")
    assert h.task("a").tif_foreign_fpstate      # fpsimd_last_state is b's
    h, seen = read(e.ret_to_user(h, 0), 0, "fpsimd_read")
    assert seen["V"] == mine and h.task("a").fpsimd_cpu == 0


def test_same_cpu_no_intervening_user_keeps_registers():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    tok = written(h)
    h = k.schedule(e.interrupt(h, 0), 0, None)         # idle: a kernel thread
    h = k.schedule(h, 0, "a")
    assert not h.task("a").tif_foreign_fpstate          # wrong_task = wrong_cpu = false
    assert h.cpus[0].regs.v == tok


def test_moving_to_another_cpu_reloads_from_memory():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    tok = written(h)
    h = k.schedule(e.interrupt(h, 0), 0, None)
    h = k.schedule(h, 1, "a")
    assert h.task("a").tif_foreign_fpstate              # wrong_cpu
    h, seen = read(e.ret_to_user(h, 1), 1, "fpsimd_read")
    assert seen["V"] == tok and h.cpus[1].last.st == "thread:a"


def test_stale_binding_on_the_old_cpu_is_not_reused():
    """a runs on CPU 0, then on CPU 1 (writes again), then back on CPU 0 whose
    fpsimd_last_state still names a: only wrong_cpu (fpsimd_cpu == 1) forces the reload."""
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    old = written(h)
    h = k.schedule(e.interrupt(h, 0), 0, None)
    h = running(h, 1, "a")
    h = e.user_op(h, 1, "fpsimd_write")
    new = written(h)
    h = k.schedule(e.interrupt(h, 1), 1, None)
    assert h.cpus[0].last.st == "thread:a" and h.cpus[0].regs.v == old
    h = k.schedule(h, 0, "a")
    assert h.task("a").tif_foreign_fpstate
    h, seen = read(e.ret_to_user(h, 0), 0, "fpsimd_read")
    assert seen["V"] == new


def test_kernel_neon_saves_user_state_and_user_gets_it_back():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    tok = written(h)
    h = e.syscall_enter(h, 0)
    h = k.kernel_neon_begin(h, 0)
    assert h.task("a").tif_kernel_fpstate and h.task("a").tif_foreign_fpstate
    assert h.cpus[0].last.st is None and h.store("thread:a").vregs == tok
    h = k.kernel_neon_end(h, 0)
    assert not h.task("a").tif_kernel_fpstate
    h, seen = read(e.syscall_exit(h, 0), 0, "fpsimd_read")
    assert seen["V"] == tok


def test_preemptible_kernel_neon_is_context_switched():
    h = running(host(), 0, "a")
    h = e.syscall_enter(h, 0)
    h = k.kernel_neon_begin(h, 0)
    h, ktok = h.fresh("kernel:a")
    h = h.with_regs(0, h.cpus[0].regs.put(V=ktok))
    h = running(h, 0, "b")                      # TIF_KERNEL_FPSTATE: kernel state saved
    assert h.store("kernel:a").vregs == ktok
    h = e.user_op(h, 0, "fpsimd_write")
    h = k.schedule(e.interrupt(h, 0), 0, "a")
    assert h.cpus[0].regs.v == ktok             # fpsimd_load_kernel_state()
    h = k.kernel_neon_end(h, 0)
    h, seen = read(e.syscall_exit(h, 0), 0, "fpsimd_read")
    assert seen["V"] == ZERO                    # a never wrote user V


@pytest.mark.parametrize("kernel_flush", [True, False])
def test_switch_in_to_kernel_neon_flushes_the_cpu(kernel_flush):
    """e92bee9f861b: a task whose user state is still bound to CPU 1 (it last returned to
    user there) and whose kernel-mode NEON section began on CPU 0 is switched in on CPU 1:
    fpsimd_flush_cpu_state() there, so that after kernel_neon_end() a switch back to CPU 1
    does not take the registers -- its kernel values -- for its user state. Without it
    (v6.8, v6.9) it returns to user with them."""
    switch = k.KERNEL_SWITCH_FLUSH_LOAD if kernel_flush else k.KERNEL_SWITCH_LOAD
    h = running(host(), 1, "a")
    h = e.user_op(h, 1, "fpsimd_write")
    mine = written(h)
    h = e.syscall_enter(h, 1)                     # a blocking syscall: preempted in it
    h = k.schedule(h, 1, None)
    assert h.cpus[1].last.st == "thread:a" and h.task("a").fpsimd_cpu == 1
    h = k.schedule(h, 0, "a", switch)             # migrates, still in the kernel
    h = k.kernel_neon_use(k.kernel_neon_begin(h, 0), 0)
    kvals = h.cpus[0].regs.v
    h = k.schedule(h, 0, None)                    # preempted inside the NEON section
    h = k.schedule(h, 1, "a", switch)             # back where its user state was bound
    assert h.cpus[1].regs.v == kvals              # fpsimd_load_kernel_state()
    assert (h.cpus[1].last.st is None) == kernel_flush
    h = k.kernel_neon_end(h, 1)
    h = k.schedule(h, 1, None)                    # preempted before returning to user
    h = k.schedule(h, 1, "a", switch)
    assert h.task("a").tif_foreign_fpstate == kernel_flush
    h, seen = read(e.syscall_exit(h, 1), 1, "fpsimd_read")
    assert seen["V"] == (mine if kernel_flush else kvals)
    assert kvals.writer == "kernel:a"


@pytest.mark.parametrize("switch", [k.KERNEL_SWITCH_FLUSH_LOAD, k.KERNEL_SWITCH_LOAD_FLUSH])
def test_switch_in_to_kernel_neon_flushes_before_it_loads(switch):
    """01098d893fa8: the CPU was left in streaming mode by the task that ran there; the
    flush's SMSTOP must come before the kernel state is loaded, or leaving streaming mode
    zeroes the V registers just loaded (v6.10 until April 2025)."""
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.syscall_enter(h, 0)
    h = k.kernel_neon_use(k.kernel_neon_begin(h, 0), 0)
    kvals = h.cpus[0].regs.v
    h = running(h, 0, "b")
    h = e.user_op(h, 0, "smstart_sm")
    assert h.cpus[0].regs.sm
    h = k.schedule(e.interrupt(h, 0), 0, "a", switch)
    assert not h.cpus[0].regs.sm
    assert h.cpus[0].regs.v == (kvals if switch == k.KERNEL_SWITCH_FLUSH_LOAD else ZERO)


@pytest.mark.parametrize(("op", "fixed"), [("sve_read", True), ("sve_read", False),
                                           ("smstart_za", True), ("smstart_za", False)])
def test_a_trap_handled_after_migration_unbinds_the_cpu_it_left(op, fixed):
    """751ecf6afd65 (SVE) and d3eaab3c7090 (SME): the task traps on CPU 0, is preempted
    and handled on CPU 1 (its state not live there: converted in memory), then switched
    back to CPU 0. With fpsimd_flush_task_state() in the handler the return reloads and
    binds with the trap disabled; without it CPU 0 still counts as holding the task, the
    return skips the load, the trap stays armed and the instruction traps again: WARN."""
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.access_trap(h, 0, op)
    assert h.task("a").mode == "kernel" and h.task("a").in_trap == op
    h = k.schedule(h, 0, None)
    h = k.schedule(h, 1, "a")
    assert h.task("a").tif_foreign_fpstate
    h = e.access_trap_handle(h, 1, flush_foreign=fixed)
    h = k.schedule(h, 1, None)
    h = k.schedule(h, 0, "a")
    assert h.task("a").tif_foreign_fpstate == fixed
    h = e.access_trap_return(h, 0)
    t = h.task("a")
    assert t.mode == "user" and not t.in_trap
    assert (t.warned == "") == fixed
    if not fixed:
        assert "WARN_ON(1)" in t.warned and ("TIF_SVE" if op == "sve_read" else "TIF_SME") \
            in t.warned
    with pytest.raises(IllegalEvent):
        e.access_trap(h, 0, op)                   # bound with the trap disabled now


@pytest.mark.parametrize("variants", [frozenset(), frozenset({LOAD_FPMR_BEFORE_SVCR})])
def test_fpmr_is_loaded_after_svcr(variants):
    """e5fa85fce08b: task_fpsimd_load() writes SVCR, then FPMR; written the other way round
    (v6.9 to December 2024), the change of PSTATE.SM on a CPU left in streaming mode by
    another task zeroes the FPMR just loaded."""
    h = k.boot(load_profile("fvp-aem-fpmr"), 1, variants)
    for name in ("a", "b"):
        h = k.spawn(h, name)
    h = running(h, 0, "a")
    h = e.user_op(h, 0, "fpmr_write")
    mine = written(h)
    h = running(k.schedule(e.interrupt(h, 0), 0, None), 0, "b")
    h = e.user_op(h, 0, "smstart_sm")
    h = running(k.schedule(e.interrupt(h, 0), 0, None), 0, "a")
    assert not h.cpus[0].regs.sm
    h, seen = read(h, 0, "fpmr_read")
    assert seen["FPMR"] == (ZERO if variants else mine)


def test_softirq_neon_nested_in_task_neon_restores_task_kernel_state():
    h = running(host(), 0, "a")
    h = e.syscall_enter(h, 0)
    h = k.kernel_neon_begin(h, 0)
    h, ktok = h.fresh("kernel:a")
    h = h.with_regs(0, h.cpus[0].regs.put(V=ktok))
    h = k.kernel_neon(h, 0, softirq=True)
    assert h.cpus[0].regs.v == ktok and h.task("a").tif_kernel_fpstate


def test_softirq_neon_from_user_mode_returns_through_ret_to_user():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    tok = written(h)
    h = k.kernel_neon(h, 0, softirq=True)
    assert not h.task("a").tif_foreign_fpstate and h.cpus[0].regs.v == tok


@pytest.mark.parametrize("event", [
    lambda h: k.kernel_neon_begin(k.kernel_neon_begin(h, 0), 0),
    lambda h: k.kernel_neon_end(h, 0),
    lambda h: k.kernel_neon_end(h, 0, softirq=True),
    lambda h: k.schedule(h, 1, "a"),
    lambda h: e.syscall_enter(h, 0),
])
def test_illegal_kernel_events_raise_and_change_nothing(event):
    h = e.syscall_enter(running(host(), 0, "a"), 0)
    before = h
    with pytest.raises(IllegalEvent):
        event(h)
    assert h == before and h.task("a").mode == "kernel" and not h.task("a").tif_kernel_fpstate


def test_user_op_in_kernel_mode_is_illegal():
    h = e.syscall_enter(running(host(), 0, "a"), 0)
    with pytest.raises(IllegalEvent, match="user_op"):
        e.user_op(h, 0, "fpsimd_write")
    assert h.task("a").mode == "kernel"


def test_first_sve_use_traps_and_allocates_for_the_vl():
    h = running(host(), 0, "a")
    assert not h.cpus[0].el0_sve
    h = e.user_op(h, 0, "sve_write")
    t, st = h.task("a"), h.store("thread:a")
    assert t.tif_sve and h.cpus[0].el0_sve
    assert st.sve_size == sve_regs_size(2) == 1092      # __sve_state_size(32, 0)
    assert h.cpus[0].regs.zhi == written(h)


def test_sve_without_sve_is_sigill():
    h = running(host("neoverse-n1"), 0, "a")
    h = e.user_op(h, 0, "sve_write")
    assert h.obs[-1].action == "sigill" and not h.task("a").tif_sve


def test_syscall_discards_sve_state_but_keeps_fpsimd():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "sve_write")
    tok = written(h)
    h = e.syscall_enter(h, 0)
    assert h.cpus[0].last.to_save == FP_STATE_FPSIMD
    assert h.cpus[0].regs.zhi == ZERO and h.cpus[0].regs.v == tok
    h = running(h, 0, "b")                        # save during the syscall: FPSIMD format
    assert h.store("thread:a").fp_type == FP_STATE_FPSIMD
    h = k.schedule(e.interrupt(h, 0), 0, "a")
    h = e.syscall_exit(h, 0)
    assert not h.task("a").tif_sve and h.cpus[0].last.to_save == FP_STATE_CURRENT
    h, seen = read(h, 0, "sve_read")              # traps again: zeroed non-FPSIMD state
    assert seen == {"V": tok, "ZHI": ZERO, "P": ZERO, "FPSR": tok}


def test_sve_state_survives_a_switch_outside_syscalls():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "sve_write")
    tok = written(h)
    h = running(e.interrupt(h, 0), 0, "b")
    st = h.store("thread:a")
    assert (st.fp_type, st.sve_vl, st.sve_zhi) == (FP_STATE_SVE, 32, tok)
    h = running(e.interrupt(h, 0), 0, "a")
    h, seen = read(h, 0, "sve_read")
    assert seen == {"V": tok, "ZHI": tok, "P": tok, "FPSR": tok} and h.task("a").tif_sve


def test_exec_resets_state_and_vector_lengths():
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.user_op(e.user_op(h, 0, "sve_write"), 0, "fpmr_write")
    h, ret = k.prctl_set_vl(e.syscall_enter(h, 0), 0, ARM64_VEC_SVE, 16)
    assert ret == 16
    h = k.exec_task(h, 0)
    t = h.task("a")
    assert t.sve_vl == 64 and not t.tif_sve and t.tif_foreign_fpstate
    st = h.store("thread:a")
    assert (st.sve_size, st.fpmr, st.vregs, st.fp_type) == (0, ZERO, ZERO, FP_STATE_FPSIMD)


def test_vl_onexec_and_inherit():
    h = e.syscall_enter(running(host("fvp-aem-fpmr"), 0, "a"), 0)
    h, ret = k.vec_set_vector_length(h, 0, ARM64_VEC_SVE, 16, k.PR_SVE_SET_VL_ONEXEC)
    assert ret == 16 and h.task("a").sve_vl == 64 and h.task("a").sve_vl_onexec == 16
    h = k.exec_task(h, 0)
    assert h.task("a").sve_vl == 16 and h.task("a").sve_vl_onexec == 0     # one exec only
    h, ret = k.vec_set_vector_length(h, 0, ARM64_VEC_SVE, 32, k.PR_SVE_VL_INHERIT)
    assert ret == 32 | k.PR_SVE_VL_INHERIT
    h = k.exec_task(k.exec_task(h, 0), 0)
    assert h.task("a").sve_vl == 32                                         # inherited
    assert k.prctl_get_vl(h, 0, ARM64_VEC_SVE) == 32 | k.PR_SVE_VL_INHERIT


@pytest.mark.parametrize("profile,kind,arg,want", [
    ("neoverse-v1", ARM64_VEC_SVE, 48, 32),          # rounded down to an implemented VL
    ("neoverse-v1", ARM64_VEC_SVE, 8192, 32),        # clamped to VL_ARCH_MAX then max_vl
    ("neoverse-v1", ARM64_VEC_SVE, 17, -22),         # not a multiple of 16: EINVAL
    ("neoverse-v1", ARM64_VEC_SVE, 16 | (1 << 19), -22),   # unknown flag: EINVAL
    ("neoverse-n1", ARM64_VEC_SVE, 16, -22),         # no SVE: EINVAL
    ("neoverse-v1", ARM64_VEC_SME, 16, -22),         # no SME: EINVAL
    ("apple-m4", ARM64_VEC_SME, 16, 64),             # SME min VL is 64 on M4
])
def test_prctl_set_vl(profile, kind, arg, want):
    h = running(host(profile), 0, "a")
    _, ret = k.prctl_set_vl(e.syscall_enter(h, 0), 0, kind, arg)
    assert ret == want


def test_changing_the_live_vl_keeps_fpsimd_zeroes_the_rest():
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.user_op(h, 0, "sve_write")
    tok = written(h)
    h, ret = k.prctl_set_vl(e.syscall_enter(h, 0), 0, ARM64_VEC_SVE, 32)
    st = h.store("thread:a")
    assert ret == 32 and st.sve_size == sve_regs_size(2) and st.sve_zhi == ZERO
    h, seen = read(e.syscall_exit(h, 0), 0, "fpsimd_read")
    assert seen["V"] == tok


def test_streaming_mode_and_za():
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    h = e.user_op(h, 0, "smstart_sm")
    assert h.task("a").tif_sme and h.cpus[0].regs.sm
    h, seen = read(h, 0, "fpsimd_read")
    assert seen == {"V": ZERO, "FPSR": FPSR_STREAMING}
    h = e.user_op(h, 0, "za_write")
    assert h.obs[-1].action == "sigill"           # ZA not enabled
    h = e.user_op(e.user_op(h, 0, "smstart_za"), 0, "za_write")
    za = written(h)
    h = e.syscall_enter(h, 0)                     # SM off, ZA kept
    assert not h.cpus[0].regs.sm and h.cpus[0].regs.za_on
    h = running(h, 0, "b")
    st = h.store("thread:a")
    assert st.za == za and st.svcr == 0b10
    assert st.sme_size == za_regs_size(2) + 512   # SME VL 32 bytes; ZT_SIG_REG_SIZE slack
    h = running(e.interrupt(h, 0), 0, "a")
    h, seen = read(h, 0, "za_read")
    assert seen["ZA"] == za


def test_streaming_fpsimd_needs_fa64():
    h = running(host("apple-m4"), 0, "a")
    h = e.user_op(h, 0, "smstart_sm")
    h = e.user_op(h, 0, "fpsimd_write")
    assert h.obs[-1].action == "sigill"           # M4 has no FA64
    h = e.user_op(h, 0, "sve_write")              # streaming SVE is fine without SVE
    assert h.obs[-1].action == "write"


def test_fpmr_needs_feat_fpmr_and_is_per_task():
    h = running(host("neoverse-v2"), 0, "a")
    assert e.user_op(h, 0, "fpmr_write").obs[-1].action == "sigill"
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.user_op(h, 0, "fpmr_write")
    tok = written(h)
    h = running(e.interrupt(h, 0), 0, "b")
    assert h.store("thread:a").fpmr == tok
    h, seen = read(h, 0, "fpmr_read")
    assert seen["FPMR"] == ZERO
    h = running(e.interrupt(h, 0), 0, "a")
    h, seen = read(h, 0, "fpmr_read")
    assert seen["FPMR"] == tok


def test_streaming_mode_changes_zero_fpmr():
    """DDI0601 FPMR: entering or leaving Streaming SVE mode sets FPMR to zero, whether by
    SMSTART/SMSTOP at EL0 or by the SMSTOP SM of fpsimd_syscall_enter(); ZA changes do not."""
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.user_op(h, 0, "fpmr_write")
    tok = written(h)
    h, seen = read(e.user_op(h, 0, "smstart_za"), 0, "fpmr_read")
    assert seen["FPMR"] == tok                                # ZA on: FPMR kept
    h, seen = read(e.user_op(h, 0, "smstart_sm"), 0, "fpmr_read")
    assert seen["FPMR"] == ZERO
    h = e.user_op(h, 0, "fpmr_write")
    tok = written(h)
    h = e.syscall_exit(e.syscall_enter(h, 0), 0)              # syscall from streaming mode
    h, seen = read(h, 0, "fpmr_read")
    assert seen["FPMR"] == ZERO and tok != ZERO
    w = KvmWorld(h, KvmConfig(), (), "a")
    assert inv.context_reads_own_latest(w) == []


def test_save_at_a_live_vl_other_than_the_bound_one_kills():
    h = running(host("fvp-aem-fpmr"), 0, "a")
    h = e.user_op(h, 0, "sve_write")                 # TIF_SVE, VL 64
    last = h.cpus[0].last
    h = k.fpsimd_bind_state_to_cpu(h, 0, Binding(last.st, 32, 0, FP_STATE_SVE, last.st))
    h = k.fpsimd_save_user_state(h, 0)
    assert h.task("a").killed == "SIGKILL"


# --- stateful: random host histories keep every context's state its own --------------------
class HostMachine(RuleBasedStateMachine):
    """Random schedules, syscalls, interrupts, user FP/SVE/SME/FPMR instructions, SVE and SME
    access traps handled after any preemption, kernel and softirq NEON and VL changes on 2
    CPUs and 3 tasks; after every user access and at the end of every task NEON section,
    each context must read exactly its own latest state; a live user task's EL0 SVE/SME
    access follows its TIF flags, and the kernel never WARNs."""

    tasks = ("a", "b", "c")

    def __init__(self):
        super().__init__()
        self.h = k.boot(load_profile("fvp-aem-fpmr"), 2)
        for t in self.tasks:
            self.h = k.spawn(self.h, t)

    def _cpus(self, *modes):
        return [c.idx for c in self.h.cpus
                if (c.current is None and None in modes)
                or (c.current is not None and self.h.task(c.current).mode in modes)]

    def _check(self):
        w = KvmWorld(self.h, KvmConfig(), (), "a")
        problems = inv.no_context_observes_another(w) + inv.context_reads_own_latest(w)
        assert not problems, problems

    def _neon_end(self, cpu):
        """The task NEON section reads its registers back, then ends."""
        self.h = k.kernel_neon_read(self.h.clear_obs(), cpu)
        self._check()
        self.h = k.kernel_neon_end(self.h, cpu)

    @precondition(lambda self: self._cpus("kernel", None) and any(
        t.mode in ("new", "sleeping") for t in self.h.tasks.values()))
    @rule(data=st.data())
    def schedule(self, data):
        cpu = data.draw(st.sampled_from(self._cpus("kernel", None)))
        cur = self.h.current(cpu)
        if cur is not None and cur.tif_kernel_fpstate and data.draw(st.booleans()):
            self._neon_end(cpu)
        ready = [n for n, t in self.h.tasks.items() if t.mode in ("new", "sleeping")]
        self.h = k.schedule(self.h, cpu, data.draw(st.sampled_from([*ready, None])))

    @precondition(lambda self: self._cpus("kernel"))
    @rule(data=st.data())
    def to_user(self, data):
        cpu = data.draw(st.sampled_from(self._cpus("kernel")))
        cur = self.h.current(cpu)
        if cur.tif_kernel_fpstate:
            self._neon_end(cpu)
        if cur.in_trap:
            if not cur.trap_handled:
                self.h = e.access_trap_handle(self.h, cpu)
            self.h = e.access_trap_return(self.h, cpu)
            self._check()
            return
        self.h = (e.syscall_exit if cur.in_syscall else e.ret_to_user)(self.h, cpu)

    @precondition(lambda self: self._cpus("user"))
    @rule(data=st.data(), syscall=st.booleans())
    def to_kernel(self, data, syscall):
        cpu = data.draw(st.sampled_from(self._cpus("user")))
        self.h = (e.syscall_enter if syscall else e.interrupt)(self.h, cpu)

    @precondition(lambda self: self._cpus("user"))
    @rule(data=st.data(), op=st.sampled_from(e.USER_OPS))
    def user(self, data, op):
        cpu = data.draw(st.sampled_from(self._cpus("user")))
        self.h = e.user_op(self.h, cpu, op)
        self._check()

    @precondition(lambda self: self._cpus("user", "kernel"))
    @rule(data=st.data())
    def softirq(self, data):
        self.h = k.kernel_neon(self.h, data.draw(st.sampled_from(self._cpus("user", "kernel"))),
                               softirq=True)

    @precondition(lambda self: self._cpus("user"))
    @rule(data=st.data(), op=st.sampled_from(tuple(e.TRAP_OPS)))
    def trap(self, data, op):
        cpu = data.draw(st.sampled_from(self._cpus("user")))
        try:
            self.h = e.access_trap(self.h, cpu, op)
        except IllegalEvent:  # that trap is not armed on this CPU
            pass

    @precondition(lambda self: any(
        self.h.task(c).in_trap and not self.h.task(c).trap_handled
        for c in (cpu.current for cpu in self.h.cpus) if c is not None))
    @rule(data=st.data())
    def trap_handle(self, data):
        cpus = [c.idx for c in self.h.cpus if c.current is not None
                and self.h.task(c.current).in_trap and not self.h.task(c.current).trap_handled]
        self.h = e.access_trap_handle(self.h, data.draw(st.sampled_from(cpus)))

    @precondition(lambda self: self._cpus("kernel"))
    @rule(data=st.data())
    def task_neon_begin(self, data):
        cpu = data.draw(st.sampled_from(self._cpus("kernel")))
        if not self.h.current(cpu).tif_kernel_fpstate:
            self.h = k.kernel_neon_use(k.kernel_neon_begin(self.h, cpu), cpu)

    @precondition(lambda self: self._cpus("kernel"))
    @rule(data=st.data(), vl=st.sampled_from([16, 32, 64]))
    def set_vl(self, data, vl):
        cpu = data.draw(st.sampled_from(self._cpus("kernel")))
        self.h, ret = k.vec_set_vector_length(self.h, cpu, ARM64_VEC_SVE, vl, 0)
        assert ret == vl

    @invariant()
    def nobody_is_killed(self):
        assert all(not t.killed for t in self.h.tasks.values())

    @invariant()
    def bindings_follow_flags_and_nothing_warns(self):
        w = KvmWorld(self.h, KvmConfig(), (), "a")
        problems = inv.host_traps_follow_tif(w) + inv.host_never_warns(w)
        assert not problems, problems


TestHostMachine = HostMachine.TestCase
TestHostMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_observation_tokens_name_their_writer():
    h = running(host(), 0, "a")
    h = e.user_op(h, 0, "fpsimd_write")
    assert isinstance(written(h), Tok) and written(h).writer == "a"


def test_the_checker_s_system_calls_and_neon_sections_keep_their_rules():
    """The checker's syscall_enter / neon_begin / neon_end / syscall_exit: each where the
    kernel can be, a task preempted in its system call resumes there, and no debugger can
    reach it (it is not in a ptrace stop)."""
    from fpstate.check.scenario import make_world
    from fpstate.check.world import Action, StepError

    w = make_world("arm64", {"cpu": "neoverse-n1", "cpus": 2, "tasks": ["gdb"], "vms": {}},
                   None)
    A = Action.of
    with pytest.raises(StepError, match="not inside a system call"):
        w.step(A("neon_begin", task="vmm"))
    w.step(A("syscall_enter", task="vmm"))
    names = {a.name for a in w.enabled() if a.task == "vmm"}
    assert names == {"neon_begin", "syscall_exit"}
    w.step(A("neon_begin", task="vmm"))
    assert {a.name for a in w.enabled() if a.task == "vmm"} == {"neon_end"}
    with pytest.raises(StepError, match="is in a kernel-mode NEON section"):
        w.step(A("syscall_exit", task="vmm"))
    w.step(A("idle", cpu=0))                       # preempted inside the section
    w.step(A("run", task="gdb", cpu=1))
    assert not any(a.name.startswith("ptrace") and a.get("tracee") == "vmm"
                   for a in w.enabled())
    with pytest.raises(StepError, match="preempted inside the kernel"):
        w.step(A("ptrace_get", task="gdb", tracee="vmm", regset="NT_PRFPREG"))
    w.step(A("run", task="vmm", cpu=0))
    t = w.kw.host.task("vmm")
    assert t.mode == "kernel" and t.in_syscall and t.tif_kernel_fpstate
    w.step(A("neon_end", task="vmm"))
    w.step(A("syscall_exit", task="vmm"))
    assert w.kw.host.task("vmm").mode == "user"
    r = w.step(A("user_op", task="vmm", op="fpsimd_read"))
    assert r.violations == () and r.observed["V"] == "arch#0x0"


@pytest.mark.parametrize("loaded", [True, False])
def test_a_neon_section_reads_back_its_registers_after_preemption(loaded, monkeypatch):
    """neon_end's reads (kernel_neon_read) are checked like any context's: with the kernel
    state saved and loaded at the switches the section gets its values back after another
    task used the CPU; with the load at switch-in dropped (fpsimd_load_kernel_state()), the
    checker says the section read another context's value."""
    from fpstate.check.scenario import make_world
    from fpstate.check.world import Action

    if not loaded:
        monkeypatch.setattr(k, "fpsimd_load_kernel_state", lambda host, cpu, name: host)
    w = make_world("arm64", {"cpu": "neoverse-n1", "cpus": 1, "tasks": ["b"], "vms": {}},
                   None)
    A = Action.of
    for a in (A("syscall_enter", task="vmm"), A("neon_begin", task="vmm"),
              A("run", task="b", cpu=0), A("user_op", task="b", op="fpsimd_write"),
              A("run", task="vmm", cpu=0)):
        assert w.step(a).violations == ()
    r = w.step(A("neon_end", task="vmm"))
    assert r.observed["V"].startswith("kernel:vmm#" if loaded else "b#")
    names = {v.invariant for v in r.violations}
    assert names == (set() if loaded else {"no-lost-write", "no-foreign-value"})


def test_preempting_a_vcpu_for_a_task_that_is_not_there_is_a_step_error():
    """Shrinking replays paths with steps removed: a task cloned in a removed step is named
    by a later preempt_vcpu, which must be refused as illegal, not crash."""
    from fpstate.check.scenario import make_world
    from fpstate.check.world import Action, StepError

    w = make_world("arm64", {"cpu": "neoverse-n1", "cpus": 1, "tasks": []}, None)
    w.step(Action.of("kvm_run", vcpu="vm0/0"))
    with pytest.raises(StepError, match=r"no host task 'vmm\.c'"):
        w.step(Action.of("preempt_vcpu", vcpu="vm0/0", to="vmm.c"))


@pytest.mark.parametrize("keep", [False, True])
def test_a_cpu_power_cycle_unbinds_it_and_leaves_unknown_registers(keep):
    """cpu_power_cycle (fpsimd_cpu_dead / the CPU_PM_ENTER notifier): the idle CPU comes back
    with reset:<cpu> values and EL0 SVE/SME trapped; unbound, so the task that ran there last
    reloads its own V on its way back -- unless the binding is kept (the code before
    32365e64a20e / 7c68a9cc0402), when it reads the reset's values."""
    h = host("fvp-aem-fpmr")
    h = running(h, 1, "a")
    h = e.user_op(h, 1, "fpsimd_write")
    mine = written(h)
    h = k.schedule(e.interrupt(h, 1), 1, None)
    assert h.cpus[1].last.st is not None and h.cpus[1].current is None
    with pytest.raises(IllegalEvent):
        k.cpu_power_cycle(running(h, 0, "b"), 0)
    h = k.cpu_power_cycle(h, 1, keep_binding=keep)
    c = h.cpus[1]
    assert c.regs.v.writer == "reset:1" and c.regs.fpsr == c.regs.v
    assert not (c.el0_sve or c.el0_sme or c.regs.sm or c.regs.za_on)
    assert (c.last.st is not None) is keep
    h, seen = read(running(h, 1, "a"), 1, "fpsimd_read")
    assert seen["V"] == (h.cpus[1].regs.v if keep else mine)
    assert (seen["V"].writer == "reset:1") is keep
