"""A thread group killed while one of its threads is inside a kernel path: KVM_RUN, the #NM
handler, a clone (kernel/x86/sched.py kill_thread, kill_in_path, check_killable;
kvm/x86/vcpu.py kvm_arch_vcpu_ioctl_run).

The thread leaves KVM_RUN the kernel's way -- the run loop sees the fatal signal, returns
-EINTR without entering the guest, and kvm_put_guest_fpu() makes the task's own fpstate
current again -- before do_exit() frees the task's fpstate; the vCPU's guest fpstate stays
allocated. On a CPU it does so at once; switched out inside the path, it stays runnable and
does so when next scheduled, then exits on its way back to user mode. exec's de_thread(),
which would wait for it, is refused before anything changes.
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
    assert [a.name for a in w.enabled_actions() if a.task == "p1.t0"] == ["kvm_finish"]
    r = w.step(A("kvm_finish", task="p1.t0"))
    assert r.violations == () and r.observed == {"faults": "none", "overflow": 0}
    assert t0.state is TaskState.DEAD
    assert t0.fpu.fpstate is own and t0.fpu.task_fpstate is None
    assert not guest.in_use and not guest.freed
    assert w.do_observe_vcpu("vm0.v0")["avx"] == "init"  # the guest never entered


def test_a_thread_asleep_in_the_nm_handler_finishes_it_and_exits_without_retrying() -> None:
    from fpstate.kernel.x86.sched import SIGKILL

    w = make_world("x86", {"processes": {"p0": 2}, "vms": {}}, None)
    for a in [A("run", task="p0.t1", cpu=1),
              A("arch_prctl", task="p0.t1", option="req_perm", feature=18),
              A("write_nm", task="p0.t1", component="xtiledata"),  # asleep in fpstate_realloc
              A("run", task="p0.t0", cpu=1)]:  # and switched out there
        w.step(a)
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


def test_exec_with_a_thread_preempted_inside_kvm_run_is_refused() -> None:
    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    t0 = w.tasks["p1.t0"]
    assert t0.state is TaskState.RUNNABLE and t0.kpath is not None
    with pytest.raises(StepError, match=r"p1\.t0, RUNNABLE.*is preempted inside a kernel path "
                                        r"\(kvm_arch_vcpu_ioctl_run\): killing its thread "
                                        r"group then is not modelled"):
        w.step(A("exec", task="p1.t1"))
    assert t0.state is TaskState.RUNNABLE  # nothing was torn down
    assert not w.vcpus["vm0.v0"].arch.guest_fpu.fpstate.freed


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


def test_a_refused_exec_changes_nothing() -> None:
    w = _in_kvm_run([A("run", task="p0.t0", cpu=0), A("run", task="p1.t1", cpu=1)])
    t1 = w.tasks["p1.t1"]
    with pytest.raises(StepError):
        w.step(A("exec", task="p1.t1"))
    assert t1.state is TaskState.USER and t1.kpath is None
    # A clone (replaying the history when a path is in flight) sees the same task.
    assert w.clone().tasks["p1.t1"].state is TaskState.USER


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
    proc = subprocess.run([sys.executable, "-c", _REAL_KILL], capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.stdout.startswith("skip"):
        pytest.skip(proc.stdout.strip()[5:])
    assert proc.stdout == "in KVM_RUN\n", proc.stdout + proc.stderr
    assert proc.returncode == -signal.SIGILL
