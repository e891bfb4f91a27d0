"""A signal and rt_sigreturn on the arm64 host model (fpstate.kernel.arm64.signal, process,
v6.17): the FP records setup_sigframe() writes, as values; restore_sigframe() giving them back
through thread_struct after its first save and flush; the VL rule (SIGSEGV); the rejected
design without that flush; exec dropping the frames; the state key telling frames apart;
and TPIDR2_EL0, zero in a handler, restored by sigreturn, switched with its thread."""

from __future__ import annotations

from fpstate.arm64.cpu import load_profile
from fpstate.arm64.regs import FPSR_STREAMING, ZERO, sve_regs_size, sve_vq_from_vl
from fpstate.arm64.statemachine import replace
from fpstate.check.scenario import make_world
from fpstate.check.statekey_arm64 import arm64_key
from fpstate.check.world import Action
from fpstate.kernel.arm64 import entry_common as e
from fpstate.kernel.arm64 import fpsimd as k
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import ARM64_VEC_SVE, FP_STATE_FPSIMD, FP_STATE_SVE


def _thread(profile: str, *ops: str) -> k.Host:
    h = k.boot(load_profile(profile), 1)
    h = e.ret_to_user(k.schedule(k.spawn(h, "a"), 0, "a"), 0)
    for op in ops:
        h = e.user_op(h, 0, op)
    return h


def _signal(h: k.Host) -> k.Host:
    h, _ = sig.deliver_signal(e.interrupt(h, 0), 0)
    return e.ret_to_user(h, 0)


def _reads(h: k.Host, *ops: str) -> dict[str, object]:
    """What each read op observes, by component."""
    out: dict[str, object] = {}
    for op in ops:
        h = e.user_op(h, 0, op)
        out.update({o.what: o.value if o.action == "read" else o.action for o in h.obs})
    return out


def test_the_frame_holds_a_streaming_threads_state_at_the_sme_vl() -> None:
    h = _thread("fvp-aem-fpmr", "smstart_za", "za_write", "zt0_write", "smstart_sm",
                "sve_write", "fpmr_write")
    regs = h.cpus[0].regs
    h = _signal(h)
    [f] = h.task("a").sigframes
    t = h.task("a")
    assert (f.sm, f.sve, f.za_on, f.sve_vl, f.sme_vl) == (True, True, True, t.sme_vl, t.sme_vl)
    assert (f.v, f.zhi, f.p, f.za, f.zt0, f.fpmr) == (regs.v, regs.zhi, regs.p, regs.za,
                                                    regs.zt0, regs.fpmr)
    # The handler: SM and ZA off; leaving streaming mode zeroed Z, P and FPMR, FPSR's reset.
    assert _reads(h, "fpsimd_read", "fpmr_read", "za_read") == {
        "V": ZERO, "FPSR": FPSR_STREAMING, "FPMR": ZERO, "za_read": "sigill"}


def test_an_fpsimd_format_frame_has_no_sve_payload() -> None:
    h = _signal(_thread("neoverse-v1", "fpsimd_write"))
    [f] = h.task("a").sigframes
    assert (f.sm, f.sve, f.za_on, f.sve_vl) == (False, False, False, h.task("a").sve_vl)
    assert (f.zhi, f.p) == (ZERO, ZERO)


def test_sigreturn_gives_back_what_the_handler_overwrote() -> None:
    h = _thread("fvp-aem-fpmr", "smstart_za", "za_write", "zt0_write", "smstart_sm",
                "sve_write", "fpmr_write")
    before = h.cpus[0].regs
    h = _signal(h)
    for op in ("fpsimd_write", "fpmr_write", "smstart_za", "za_write", "zt0_write"):
        h = e.user_op(h, 0, op)
    h = sig.sys_rt_sigreturn(h, 0)
    regs, t = h.cpus[0].regs, h.task("a")
    assert (regs.sm, regs.za_on, t.sigframes, t.tif_sme) == (True, True, (), True)
    assert (regs.v, regs.zhi, regs.p, regs.za, regs.zt0, regs.fpmr) == (
        before.v, before.zhi, before.p, before.za, before.zt0, before.fpmr)
    assert h.store(t.store).fp_type == FP_STATE_SVE


def test_an_fpsimd_only_restore_leaves_z_and_p_zero_for_the_next_sve_use() -> None:
    """restore_fpsimd_context(): TIF_SVE clear, fp_type FPSIMD; the next SVE instruction
    traps and finds Z's upper bits and P zero, whatever the handler had there."""
    h = _signal(_thread("neoverse-v1", "fpsimd_write"))
    v = h.task("a").sigframes[0].v
    h = e.user_op(h, 0, "sve_write")  # the handler uses SVE: TIF_SVE, SVE format
    h = sig.sys_rt_sigreturn(h, 0)
    t = h.task("a")
    assert (t.tif_sve, h.store(t.store).fp_type) == (False, FP_STATE_FPSIMD)
    assert _reads(h, "sve_read") == {"V": v, "ZHI": ZERO, "P": ZERO, "FPSR": v}


def test_a_frame_of_another_vector_length_is_a_sigsegv() -> None:
    """restore_sve_fpsimd_context(): sve_context.vl must be the task's VL (-EINVAL, badframe:
    arm64_notify_segfault())."""
    h = _signal(_thread("neoverse-v1", "sve_write"))
    assert h.task("a").sigframes[0].sve_vl == 32
    h = e.syscall_enter(h, 0)
    h, ret = k.prctl_set_vl(h, 0, ARM64_VEC_SVE, 16)
    h = e.syscall_exit(h, 0)
    assert (ret, h.task("a").sve_vl) == (16, 16)  # PR_SVE_SET_VL returns the new VL
    h = sig.sys_rt_sigreturn(h, 0)
    assert h.task("a").killed == "SIGSEGV"


def test_without_the_first_save_and_flush_the_handlers_registers_stay() -> None:
    """The rejected design (variant sigreturn-no-flush): thread_struct gets the frame, the
    registers stay bound, and the return to user has nothing to load."""
    h = _signal(_thread("neoverse-v1", "fpsimd_write"))
    saved = h.task("a").sigframes[0].v
    h = e.user_op(h, 0, "fpsimd_write")
    handler = h.cpus[0].regs.v
    good = sig.sys_rt_sigreturn(h, 0)
    bad = sig.sys_rt_sigreturn(h, 0, early_flush=False)
    assert good.cpus[0].regs.v == saved != handler
    assert bad.cpus[0].regs.v == handler and bad.store("thread:a").vregs == saved
    assert not bad.task("a").tif_foreign_fpstate


def test_exec_drops_the_frames() -> None:
    h = _signal(_thread("neoverse-n1", "fpsimd_write"))
    h = k.exec_task(e.syscall_enter(h, 0), 0)
    assert h.task("a").sigframes == ()


def test_the_state_key_tells_frames_apart() -> None:
    w = make_world("arm64", {"cpu": "neoverse-v1", "cpus": 1, "vms": {}}, None)
    for a in ({"run": {"task": "other", "cpu": 0}}, {"signal": {"task": "other"}}):
        w.step(next(Action.of(n, **args) for n, args in a.items()))
    h = w.kw.host
    t = h.task("other")
    assert len(t.sigframes) == 1
    without = h.with_task(replace(t, sigframes=()))
    assert arm64_key(w.kw) != arm64_key(w.kw.with_host(without))


# -- TPIDR2_EL0: switched with the TLS registers, zero in a handler, restored by sigreturn -------


def test_tpidr2_is_zero_in_the_handler_and_comes_back_with_sigreturn() -> None:
    h = _thread("apple-m4", "tpidr2_write")
    mine = h.cpus[0].regs.tpidr2
    h = _signal(h)
    assert h.task("a").sigframes[0].tpidr2 == mine  # preserve_tpidr2_context()
    assert _reads(h, "tpidr2_read") == {"TPIDR2": ZERO}  # setup_return()
    h = sig.sys_rt_sigreturn(e.user_op(h, 0, "tpidr2_write"), 0)
    assert _reads(h, "tpidr2_read") == {"TPIDR2": mine}


def test_tpidr2_follows_its_thread_through_a_context_switch() -> None:
    """tls_thread_switch(): saved into thread.tpidr2_el0, next's written, eagerly."""
    h = k.spawn(_thread("apple-m4", "tpidr2_write"), "b")
    a_value = h.cpus[0].regs.tpidr2
    h = k.schedule(e.interrupt(h, 0), 0, "b")
    assert h.store("thread:a").tpidr2 == a_value and h.cpus[0].regs.tpidr2 == ZERO
    h = e.user_op(e.ret_to_user(h, 0), 0, "tpidr2_write")
    h = e.ret_to_user(k.schedule(e.interrupt(h, 0), 0, "a"), 0)
    assert _reads(h, "tpidr2_read") == {"TPIDR2": a_value}


def test_exec_zeroes_tpidr2_and_a_cpu_without_sme_faults_it() -> None:
    h = k.exec_task(e.syscall_enter(_thread("apple-m4", "tpidr2_write"), 0), 0)
    assert h.cpus[0].regs.tpidr2 == ZERO  # tls_thread_flush()
    assert _reads(_thread("neoverse-v1"), "tpidr2_write") == {"tpidr2_write": "sigill"}


# -- fork and clone (process.c arch_dup_task_struct(), copy_thread()) ---------------------------


def test_a_forked_child_gets_copies_a_thread_gets_no_tpidr2_nor_za() -> None:
    from fpstate.kernel.arm64.process import copy_process

    h = _thread("apple-m4", "fpsimd_write", "tpidr2_write", "smstart_za", "za_write",
                "zt0_write")
    fork = copy_process(e.syscall_enter(h, 0), 0, "f", clone_vm=False)
    thread = copy_process(e.syscall_enter(h, 0), 0, "t", clone_vm=True)
    for host, name in ((fork, "f"), (thread, "t")):
        t, st = host.task(name), host.store(f"thread:{name}")
        assert (t.mode, t.tif_foreign_fpstate, st.fp_type) == ("new", True, FP_STATE_FPSIMD)
        assert st.vregs.writer == name != h.cpus[0].regs.v.writer  # a copy is its own
    f, t = fork.store("thread:f"), thread.store("thread:t")
    assert (f.svcr, f.za.writer, f.tpidr2.writer, fork.task("f").tif_sme) == (2, "f", "f", True)
    assert (t.svcr, t.tpidr2, thread.task("t").tif_sme) == (0, ZERO, False)
    old = copy_process(e.syscall_enter(h, 0), 0, "t", clone_vm=True, settls_only=True)
    assert old.store("thread:t").tpidr2 == h.cpus[0].regs.tpidr2  # the parent's pointer
    assert old.store("thread:t").svcr == 2  # and its ZA, as copies


def test_a_fork_copies_the_signal_frames_a_thread_does_not() -> None:
    from fpstate.kernel.arm64.process import copy_process

    h = _signal(_thread("apple-m4", "fpsimd_write"))
    fork = copy_process(e.syscall_enter(h, 0), 0, "f", clone_vm=False)
    thread = copy_process(e.syscall_enter(h, 0), 0, "t", clone_vm=True)
    [frame] = fork.task("f").sigframes
    assert frame.v.writer == "f" and h.task("a").sigframes[0].v.writer == "a"
    assert thread.task("t").sigframes == ()


def test_a_streaming_parent_forks_a_child_out_of_streaming_mode() -> None:
    """task_smstop_sm(dst): V zero, FPSR 0x0800009f, FPMR zero, fp_type FPSIMD."""
    from fpstate.kernel.arm64.process import copy_process

    h = _thread("fvp-aem-fpmr", "fpmr_write", "smstart_sm", "sve_write")
    c = copy_process(e.syscall_enter(h, 0), 0, "c", clone_vm=False)
    st = c.store("thread:c")
    assert (st.vregs, st.fpsr, st.fpmr, st.svcr) == (ZERO, FPSR_STREAMING, ZERO, 0)


def test_sigreturn_into_streaming_mode_sets_tif_sme_for_a_child_that_never_used_sme() -> None:
    """d2907cbe9ea0: a child forked in the handler returns through its parent's streaming
    frame. With the fix TIF_SME is set and the load uses the child's SME VL; v6.17 before it
    left SMCR_EL1.LEN as CPU 1 had it, and the next save killed the child."""
    from fpstate.kernel.arm64.process import copy_process

    h = k.boot(load_profile("fvp-aem-fpmr"), 2)
    h = e.ret_to_user(k.schedule(k.spawn(h, "a"), 0, "a"), 0)
    for op in ("smstart_sm", "sve_write"):
        h = e.user_op(h, 0, op)
    h, _ = sig.deliver_signal(e.interrupt(h, 0), 0)
    h = e.ret_to_user(h, 0)
    h = e.syscall_exit(copy_process(e.syscall_enter(h, 0), 0, "c", clone_vm=False), 0)
    h = e.ret_to_user(k.schedule(h, 1, "c"), 1)
    assert not h.task("c").tif_sme
    for fixed in (True, False):
        r = sig.sys_rt_sigreturn(h, 1, sm_sets_tif_sme=fixed)
        assert r.task("c").tif_sme is fixed and r.cpus[1].regs.sm
        r = k.schedule(e.interrupt(r, 1), 1, None)  # the next save
        assert r.task("c").killed == ("" if fixed else "SIGKILL")


def test_without_the_fix_the_load_reads_past_sve_state_after_a_larger_sme_vl() -> None:
    """d2907cbe9ea0's first case in full: task "big" leaves SMCR_EL1.LEN at SVL 64 on CPU 1;
    the child of "a" (SVE and SME VLs 16: sve_state for 16 bytes) returns into streaming mode
    there without TIF_SME, and v6.17 loads 64-byte vectors from its sve_state."""
    from fpstate.kernel.arm64.process import copy_process

    def set_vls(h: k.Host, cpu: int, **vls: int) -> k.Host:
        h = e.syscall_enter(h, cpu)
        for kind, vl in vls.items():
            h, _ = k.prctl_set_vl(h, cpu, kind, vl)
        return e.syscall_exit(h, cpu)

    h = k.boot(load_profile("fvp-aem-fpmr"), 2)
    h = e.ret_to_user(k.schedule(k.spawn(k.spawn(h, "a"), "big"), 1, "big"), 1)
    h = e.user_op(set_vls(h, 1, SME=64), 1, "smstart_sm")  # LEN for SVL 64 on CPU 1
    h = k.schedule(e.interrupt(h, 1), 1, None)
    h = set_vls(e.ret_to_user(k.schedule(h, 0, "a"), 0), 0, SVE=16, SME=16)
    for op in ("smstart_sm", "sve_write"):
        h = e.user_op(h, 0, op)
    h, _ = sig.deliver_signal(e.interrupt(h, 0), 0)
    h = e.syscall_exit(copy_process(e.syscall_enter(e.ret_to_user(h, 0), 0), 0, "c", False),
                       0)
    h = e.ret_to_user(k.schedule(h, 1, "c"), 1)
    bad = sig.sys_rt_sigreturn(h, 1, sm_sets_tif_sme=False)
    assert bad.store("thread:c").sve_size == sve_regs_size(1)  # sve_alloc() for VL 16
    assert bad.task("c").overread == sve_regs_size(4) - sve_regs_size(1)
    good = sig.sys_rt_sigreturn(h, 1)
    assert good.task("c").overread == 0 and good.cpus[1].regs.sm


def test_sigreturn_restoring_za_allocates_the_storage_streaming_mode_needs() -> None:
    """ea8ccfddbce0: a child forked in the handler of a signal taken with ZA on (no streaming
    mode) returns through that frame: restore_za_context() sets TIF_SME, so SMSTART SM does
    not trap, and the streaming registers need sve_state. With the fix it is allocated; v6.17
    saved them through a NULL sve_state (found by the explorer as a failed model check)."""
    from fpstate.kernel.arm64.process import copy_process
    from fpstate.kvm.arm64.invariants import host_state_in_own_storage

    h = _thread("fvp-aem-fpmr", "smstart_za", "za_write")
    h, _ = sig.deliver_signal(e.interrupt(h, 0), 0)
    h = e.ret_to_user(h, 0)
    h = e.syscall_exit(copy_process(e.syscall_enter(h, 0), 0, "c", clone_vm=False), 0)
    h = e.ret_to_user(k.schedule(e.interrupt(h, 0), 0, "c"), 0)
    assert h.store("thread:c").sve_size == 0 and not h.task("c").tif_sme
    for fixed in (True, False):
        r = sig.sys_rt_sigreturn(h, 0, za_allocs_sve=fixed)
        assert r.task("c").tif_sme and r.cpus[0].el0_sme  # SMSTART SM will not trap
        assert (r.store("thread:c").sve_size > 0) is fixed
        r = e.user_op(r, 0, "smstart_sm")
        r, _ = sig.deliver_signal(e.interrupt(r, 0), 0)  # the next save
        c = r.task("c")
        assert c.overwrite == (0 if fixed else sve_regs_size(sve_vq_from_vl(c.sme_vl)))
    # the checker's save-within-allocation rule reports it
    kw = make_world("arm64", {"vms": {}, "tasks": []}, None).kw.with_host(r)
    assert host_state_in_own_storage(kw) == [
        f"c: fpsimd_save_user_state() wrote {c.overwrite} bytes past sve_state (none "
        "allocated: through a NULL pointer)"]
