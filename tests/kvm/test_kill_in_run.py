"""A thread group killed while one of its threads is inside a kernel path: KVM_RUN, the #NM
handler, a clone, an exec's de_thread() (kernel/x86/sched.py kill_thread, kill_in_path;
kernel/x86/process.py sys_execve; kvm/x86/vcpu.py kvm_arch_vcpu_ioctl_run).

The thread leaves KVM_RUN the kernel's way -- the run loop sees the fatal signal, returns
-EINTR without entering the guest, and kvm_put_guest_fpu() makes the task's own fpstate
current again -- before do_exit() frees the task's fpstate; the vCPU's guest fpstate stays
allocated. On a CPU it does so at once; switched out inside the path, it stays runnable and
does so when next scheduled, then exits on its way back to user mode; an exec's de_thread()
sleeps until it has.
"""

from __future__ import annotations

import pytest

from fpstate.check.scenario import make_world
from fpstate.check.world import Action, StepError
from fpstate.kernel.x86.sched import TaskState

A = Action.of


def _in_kvm_run(extra: list[Action]):
    w = make_world("x86", {}, None)
    for a in [A("run", task="p1.t0", cpu=0),
              A("kvm_enter", task="p1.t0", vcpu="vm0.v0", guest="write avx"), *extra]:
        w.step(a)
    return w


def _asleep_in_nm_handler():
    """p0.t1 asleep in the #NM handler's fpstate_realloc() and switched out there; p0.t0 in
    user mode on CPU 1."""
    w = make_world("x86", {"processes": {"p0": 2}, "vms": {}}, None)
    for a in [A("run", task="p0.t1", cpu=1),
              A("arch_prctl", task="p0.t1", option="req_perm", feature=18),
              A("write_nm", task="p0.t1", component="xtiledata"),
              A("run", task="p0.t0", cpu=1)]:
        w.step(a)
    return w


def test_a_thread_killed_inside_kvm_run_puts_the_guest_fpu_back_first() -> None:
    w = _in_kvm_run([A("run", task="p1.t1", cpu=1)])
    t0 = w.tasks["p1.t0"]
    guest = w.vcpus["vm0.v0"].arch.guest_fpu.fpstate
    own = t0.fpu.task_fpstate
    assert t0.fpu.fpstate is guest and own is not None and guest.in_use
    r = w.step(A("exec", task="p1.t1"))  # de_thread(): SIGKILL to p1.t0, on CPU 0 in KVM_RUN
    assert r.violations == ()
    assert t0.state is TaskState.DEAD
    # kvm_put_guest_fpu() ran before do_exit(): the task's own fpstate was current again and
    # is the one freed; the guest's is unused and still allocated.
    assert t0.fpu.fpstate is own and t0.fpu.task_fpstate is None
    assert not guest.in_use and not guest.freed
    assert not w.vcpus["vm0.v0"].wants_to_run
    # The guest never entered: its AVX state is still the initial one.
    assert w.do_observe_vcpu("vm0.v0")["avx"] == "init"


def test_a_thread_preempted_inside_kvm_run_leaves_it_when_scheduled_then_exits() -> None:
    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    t0, t1 = w.tasks["p1.t0"], w.tasks["p1.t1"]
    guest = w.vcpus["vm0.v0"].arch.guest_fpu.fpstate
    own = t0.fpu.task_fpstate
    assert t0.state is TaskState.RUNNABLE and t0.kpath is not None and t0.fpu.fpstate is guest
    # AMX tile data without permission: SIGILL, whose default action kills the group.
    r = w.step(A("write", task="p1.t1", component="xtiledata"))
    assert r.violations == () and r.observed == {"fault": "#NM", "alive": False}
    assert t1.state is TaskState.DEAD
    # zap_other_threads() marked p1.t0, which is still inside KVM_RUN with the guest FPU.
    assert t0.state is TaskState.RUNNABLE and t0.killed_by is not None
    assert t0.fpu.fpstate is guest and guest.in_use and not own.freed
    assert [a.name for a in w.enabled_actions() if a.task == "p1.t0"] == ["run", "switch_in",
                                                                         "run", "switch_in"]
    w.step(A("run", task="p1.t0", cpu=1))
    assert [a for a in w.enabled_actions() if a.task == "p1.t0"] == [
        A("kvm_finish", task="p1.t0"), A("kvm_finish", task="p1.t0", irq=True)]
    r = w.step(A("kvm_finish", task="p1.t0"))
    assert r.violations == () and r.observed == {"faults": "none", "overflow": 0}
    assert t0.state is TaskState.DEAD
    assert t0.fpu.fpstate is own and t0.fpu.task_fpstate is None
    assert not guest.in_use and not guest.freed
    assert w.do_observe_vcpu("vm0.v0")["avx"] == "init"  # the guest never entered


def test_a_thread_asleep_in_the_nm_handler_finishes_it_and_exits_without_retrying() -> None:
    from fpstate.kernel.x86.sched import SIGKILL

    w = _asleep_in_nm_handler()
    t0, t1 = w.tasks["p0.t0"], w.tasks["p0.t1"]
    small = t1.fpu.fpstate
    w.m.kill(t0, SIGKILL)  # p0.t0 in user mode on CPU 1 takes it at once
    assert t0.state is TaskState.DEAD
    assert t1.state is TaskState.RUNNABLE and t1.kpath is not None and t1.killed_by is not None
    assert not small.freed
    w.step(A("run", task="p0.t1", cpu=0))
    assert t1.state is TaskState.KERNEL and t1.kpath is not None
    r = w.step(A("nm_return", task="p0.t1"))
    # The handler finished its reallocation; the write is not retried, the thread exits and
    # its new, larger fpstate is vfree()d with it (the first one is the fpstate embedded in
    # struct fpu, which goes with the task_struct).
    assert r.violations == () and r.observed["alive"] is False
    assert t1.state is TaskState.DEAD
    assert t1.fpu.fpstate is not small and t1.fpu.fpstate.size > small.size
    assert t1.fpu.fpstate.freed and small is t1.fpu.embedded


def test_exec_with_a_thread_preempted_inside_kvm_run_waits_in_de_thread() -> None:
    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    t0, t1 = w.tasks["p1.t0"], w.tasks["p1.t1"]
    guest = w.vcpus["vm0.v0"].arch.guest_fpu.fpstate
    own = t0.fpu.task_fpstate
    assert t0.state is TaskState.RUNNABLE and t0.kpath is not None
    r = w.step(A("exec", task="p1.t1"))
    # zap_other_threads() marked p1.t0; de_thread() sleeps until it has left KVM_RUN and
    # exited. Nothing of the exec is done yet: the caller still has its thread group and mm.
    assert r.violations == () and r.observed == {"waiting": True}
    assert t0.state is TaskState.RUNNABLE and t0.killed_by is not None
    assert t1.state is TaskState.KERNEL and t1.kpath is not None
    assert t1.process.threads == [t0, t1]
    assert t0.fpu.fpstate is guest and guest.in_use
    names = [a.name for a in w.enabled_actions() if a.task in ("p1.t0", "p1.t1")]
    assert "exec_finish" not in names and "return_to_user" not in names
    with pytest.raises(StepError, match=r"de_thread\(\) still waits"):
        w.step(A("exec_finish", task="p1.t1"))
    # The killed thread runs (preempting the exec on CPU 1), leaves KVM_RUN and exits.
    for a in [A("run", task="p1.t0", cpu=1), A("kvm_finish", task="p1.t0")]:
        assert w.step(a).violations == ()
    assert t0.state is TaskState.DEAD
    assert t0.fpu.fpstate is own and not guest.in_use and not guest.freed
    assert t1.state is TaskState.RUNNABLE and t1.kpath is not None
    w.step(A("run", task="p1.t1", cpu=0))
    # the exec goes on: to its end, or to where it sleeps after flush_thread()
    assert sorted((a.name, a.get("sleep", False)) for a in w.enabled_actions()
                  if a.task == "p1.t1") == [("exec_finish", False), ("exec_finish", True)]
    r = w.step(A("exec_finish", task="p1.t1"))
    assert r.violations == () and r.observed == {"waiting": False}
    assert t1.state is TaskState.USER and t1.kpath is None
    assert t1.process.threads == [t1]
    # fpu_flush_thread(): the default fpstate and permissions; the user state is initial.
    assert t1.fpu.fpstate is t1.fpu.embedded
    assert t1.fpu.perm.state_perm == w.m.system.kernel.default_features
    # PKRU is init_pkru_value (pkru_flush_thread), not the register's initial 0.
    seen = w.do_observe("p1.t1")
    assert seen.pop("pkru") == "0x55555554" and seen.pop("mxcsr") == 0x1F80
    assert all(v == "init" for k, v in seen.items()
               if k not in ("where", "cpu", "state", "xfeatures", "size", "xfd"))
    # The VM belongs to the old mm: KVM ioctls from the new one fail with EIO.
    assert w.step(A("get_xsave", task="p1.t1", vcpu="vm0.v0")).observed["errno"] == "EIO"


def test_exec_with_a_thread_asleep_in_the_nm_handler_waits_for_it() -> None:
    w = _asleep_in_nm_handler()
    t0, t1 = w.tasks["p0.t0"], w.tasks["p0.t1"]
    assert w.step(A("exec", task="p0.t0")).observed == {"waiting": True}
    assert t1.killed_by is not None and t1.state is TaskState.RUNNABLE
    w.step(A("run", task="p0.t1", cpu=0))
    r = w.step(A("nm_return", task="p0.t1"))  # the handler finishes; no retry, it exits
    assert r.violations == () and r.observed["alive"] is False
    assert t1.state is TaskState.DEAD and t1.fpu.fpstate.freed
    assert t0.on_cpu == 1 and t0.state is TaskState.KERNEL  # still asleep where it was
    r = w.step(A("exec_finish", task="p0.t0"))
    assert r.violations == () and t0.state is TaskState.USER
    # exec reset the permissions: AMX must be asked for again.
    assert w.step(A("arch_prctl", task="p0.t0", option="get_perm")).observed["value"] & (
        1 << 18) == 0


def test_a_waiting_exec_cannot_be_run_to_its_end() -> None:
    """Machine.finish refuses a path asleep until other tasks act (it would never end)."""
    from fpstate.kernel.x86.types import IllegalEvent

    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    w.step(A("exec", task="p1.t1"))
    with pytest.raises(IllegalEvent, match=r"p1\.t1.*sleeps in sys_execve\(\) until other "
                                           r"tasks act"):
        w.m.finish(1)


def test_an_exec_killed_in_de_thread_fails_with_eagain() -> None:
    """de_thread()'s ``killed:``: a fatal signal while it sleeps ends the exec, -EAGAIN."""
    import errno

    from fpstate.kernel.x86.sched import SIGKILL, Signal

    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    w.step(A("exec", task="p1.t1"))
    t1 = w.tasks["p1.t1"]
    t1.killed_by = Signal(SIGKILL)
    w.m.kill_in_path(1)
    assert t1.kpath is None and t1.kresult == -errno.EAGAIN
    assert len(t1.process.threads) == 2  # the exec never replaced the image


def test_a_process_killed_while_its_exec_waits_in_de_thread() -> None:
    """kill(2) from another process: the exec asleep in de_thread() takes its ``killed:``
    exit (-EAGAIN) and the thread dies; the thread switched out inside KVM_RUN dies once it
    has left it."""
    import errno

    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    t0, t1 = w.tasks["p1.t0"], w.tasks["p1.t1"]
    w.step(A("exec", task="p1.t1"))
    r = w.step(A("kill", task="p0.t0", target="p1.t1"))
    assert r.violations == () and r.observed == {"dead": 1, "dying": 1}
    assert t1.state is TaskState.DEAD and t1.kresult == -errno.EAGAIN
    assert t1.process.threads == [t0, t1]  # the exec never replaced the image
    assert t0.state is TaskState.RUNNABLE and t0.killed_by is not None
    for a in [A("run", task="p1.t0", cpu=1), A("kvm_finish", task="p1.t0")]:
        assert w.step(a).violations == ()
    guest = w.vcpus["vm0.v0"].arch.guest_fpu.fpstate
    assert t0.state is TaskState.DEAD and not guest.in_use and not guest.freed


def test_kill_reaches_a_stopped_thread_and_not_the_sender() -> None:
    w = make_world("x86", {"processes": {"p0": 1, "p1": 2}, "vms": {}}, None)
    for a in [A("run", task="p1.t1", cpu=1), A("ptrace_stop", task="p1.t1"),
              A("run", task="p1.t0", cpu=1), A("run", task="p0.t0", cpu=0)]:
        w.step(a)
    t1 = w.tasks["p1.t1"]
    assert t1.state is TaskState.STOPPED
    r = w.step(A("kill", task="p0.t0", target="p1.t0"))
    assert r.violations == () and r.observed == {"dead": 2, "dying": 0}
    assert t1.state is TaskState.DEAD and w.tasks["p0.t0"].state is TaskState.USER
    assert t1.fpu.fpstate is t1.fpu.embedded  # released with its task, never reallocated
    with pytest.raises(StepError, match=r"in p0\.t0's own process"):
        make_world("x86", {"processes": {"p0": 2}, "vms": {}}, None).step(
            A("kill", task="p0.t0", target="p0.t1"))


def test_a_clone_whose_caller_is_killed_meanwhile_makes_no_child() -> None:
    from fpstate.kernel.x86.process import sys_clone
    from fpstate.kernel.x86.sched import SIGKILL
    from fpstate.kernel.x86.types import CLONE_THREAD, CLONE_VM

    w = make_world("x86", {"processes": {"p0": 2}, "vms": {}}, None)
    w.step(A("run", task="p0.t0", cpu=0))
    w.step(A("run", task="p0.t1", cpu=1))
    m = w.m
    m.enter_kernel(0)
    m.start(0, sys_clone, CLONE_VM | CLONE_THREAD, "child")  # asleep in dup_task_struct()
    m.kill(w.tasks["p0.t1"], SIGKILL)  # the group dies; p0.t0 finishes its clone first
    # copy_process() sees the fatal signal: no child, every thread of the group dead.
    assert [t.comm for t in m.tasks.values() if t.comm == "child"] == []
    assert {t.comm: t.state for t in m.tasks.values() if t.comm.startswith("p0")} == {
        "p0.t0": TaskState.DEAD, "p0.t1": TaskState.DEAD}


# -- the real kernel ---------------------------------------------------------------------------

_REAL_KILL = """
import os, resource, signal, sys, threading, time
from fpstate.errors import HostUnavailable
from fpstate.host import kvm_uapi as u
from fpstate.host.kvm import KvmError
from fpstate.host.kvm_guest import KERNEL_STACK, SETUP_CODE, GuestMachine

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:
    g = GuestMachine()
except (HostUnavailable, KvmError) as e:
    print("skip", e, flush=True)
    sys.exit(0)
g.write(SETUP_CODE, b"\\xeb\\xfe")  # jmp $: the guest never leaves by itself
g.vcpu.set_sregs(g.long_mode_sregs())
g.vcpu.set_regs(u.KvmRegs(rip=SETUP_CODE, rsp=KERNEL_STACK, rflags=2))
tid = []
def vmm():
    tid.append(threading.get_native_id())
    g.vcpu.run()
    print("KVM_RUN returned", flush=True)
threading.Thread(target=vmm, daemon=True).start()
while not tid:
    time.sleep(0.01)
def times():  # utime, stime + guest_time of the VMM thread (proc(5) stat fields 14, 15, 43)
    with open(f"/proc/self/task/{tid[0]}/stat") as f:
        x = f.read().rsplit(")", 1)[1].split()
    return int(x[11]), int(x[12]) + int(x[40])
# Inside KVM_RUN the thread's time goes to the kernel or the guest (a PVM guest counts as
# system time), none to user mode, where it would be if it were still in Python.
time.sleep(0.2)
before = times()
time.sleep(0.3)
after = times()
if after[0] - before[0] > 1 or after[1] - before[1] < 5:
    print(f"skip the VMM thread's times do not show it in KVM_RUN: {before} -> {after}")
    sys.exit(0)
print("in KVM_RUN", flush=True)
if sys.argv[1] == "wait":  # for another process's kill(2)
    time.sleep(10)
    print("alive", flush=True)
    sys.exit(0)
if sys.argv[1] == "exec":  # de_thread() must wait for the VMM thread to leave KVM_RUN
    os.execv(sys.executable, [sys.executable, "-c", "print('new image'); raise SystemExit(7)"])
signal.pthread_kill(threading.get_ident(), signal.SIGILL)  # this thread's fault: default action
time.sleep(10)
print("alive", flush=True)
"""


@pytest.mark.host
def test_the_real_kernel_kills_a_group_whose_vmm_thread_is_inside_kvm_run() -> None:
    """The model's answer (a fatal signal in one thread kills its sibling inside KVM_RUN, which
    leaves the run loop and exits) against this host's: a process whose VMM thread is in
    ioctl(KVM_RUN) with a guest spinning in `jmp $` dies of the SIGILL its other thread takes,
    at once, and KVM_RUN never returns to user space."""
    import signal
    import subprocess
    import sys

    w = _in_kvm_run([A("run", task="p1.t1", cpu=1)])
    r = w.step(A("write", task="p1.t1", component="xtiledata"))  # no permission: SIGILL
    assert r.observed["alive"] is False
    assert {t.comm: t.state for t in w.m.tasks.values() if t.comm.startswith("p1")} == {
        "p1.t0": TaskState.DEAD, "p1.t1": TaskState.DEAD}
    proc = subprocess.run([sys.executable, "-c", _REAL_KILL, "kill"], capture_output=True,
                          text=True, timeout=60, check=False)
    if proc.stdout.startswith("skip"):
        pytest.skip(proc.stdout.strip()[5:])
    assert proc.stdout == "in KVM_RUN\n", proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGILL


@pytest.mark.host
def test_the_real_kernel_execs_while_a_sibling_is_inside_kvm_run() -> None:
    """The model's answer (exec in one thread while its sibling is inside KVM_RUN: de_thread()
    waits for the sibling to leave the run loop and exit, then the exec completes) against
    this host's: a process whose VMM thread is in ioctl(KVM_RUN) with a guest spinning in
    `jmp $` calls execve() from its other thread, and the new image runs and exits."""
    import subprocess
    import sys

    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    assert w.step(A("exec", task="p1.t1")).observed == {"waiting": True}
    for a in [A("run", task="p1.t0", cpu=1), A("kvm_finish", task="p1.t0"),
              A("run", task="p1.t1", cpu=0)]:
        w.step(a)
    assert w.step(A("exec_finish", task="p1.t1")).observed == {"waiting": False}
    assert [t.comm for t in w.tasks["p1.t1"].process.threads] == ["p1.t1"]
    proc = subprocess.run([sys.executable, "-c", _REAL_KILL, "exec"], capture_output=True,
                          text=True, timeout=60, check=False)
    if proc.stdout.startswith("skip"):
        pytest.skip(proc.stdout.strip()[5:])
    assert proc.stdout == "in KVM_RUN\nnew image\n", proc.stdout + proc.stderr
    assert proc.returncode == 7


@pytest.mark.host
def test_the_real_kernel_kills_a_process_whose_vmm_thread_is_inside_kvm_run() -> None:
    """The model's answer (kill(2) of SIGKILL from another process: the thread inside KVM_RUN
    leaves it and dies with its group) against this host's: the parent sends SIGKILL to a
    child whose VMM thread is in ioctl(KVM_RUN) with a guest spinning in `jmp $`, and the
    child dies of it at once, KVM_RUN never returning to user space."""
    import signal
    import subprocess
    import sys

    w = _in_kvm_run([A("run", task="p0.t0", cpu=1)])
    r = w.step(A("kill", task="p0.t0", target="p1.t1"))
    assert r.observed == {"dead": 2, "dying": 0}
    child = subprocess.Popen([sys.executable, "-c", _REAL_KILL, "wait"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline()  # type: ignore[union-attr]
        if first.startswith("skip"):
            child.wait(10)
            pytest.skip(first.strip()[5:])
        assert first == "in KVM_RUN\n", first + child.stderr.read()  # type: ignore[union-attr]
        child.send_signal(signal.SIGKILL)
        out, _err = child.communicate(timeout=5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert out == ""  # neither "KVM_RUN returned" nor "alive"


# -- a hard interrupt inside fpu_swap_kvm_fpstate()'s locked section ---------------------------


@pytest.mark.parametrize("variant", [None, "hardirq-fpu-in-fpregs-lock"])
def test_a_hardirq_while_the_guest_fpu_is_loaded_reaches_the_guest_only_before_5_18(
        variant: str | None) -> None:
    """fpu_swap_kvm_fpstate() XRSTORs the guest's fpstate and then fpregs_mark_activate()s it
    under fpregs_lock(): a hard interrupt between the two takes the FPU only under the old
    irq_fpu_usable(), and then the guest runs with the kernel's SSE and AVX."""
    w = make_world("x86", {}, variant)
    w.step(A("run", task="p1.t0", cpu=0))
    w.step(A("kvm_run", task="p1.t0", vcpu="vm0.v0", guest="write avx"))
    r = w.step(A("kvm_run", task="p1.t0", vcpu="vm0.v0", guest="read avx", irq=True))
    assert r.observed["irq"] == ("fpu" if variant else "scalar")
    broken = {v.invariant for v in r.violations}
    assert broken == ({"no-foreign-value"} if variant else set())
