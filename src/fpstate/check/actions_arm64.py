"""The arm64 host and KVM/arm64 models under the checker (helper E's models).

The model is immutable (`fpstate.kvm.arm64.kvm_host.KvmWorld` over
`fpstate.kernel.arm64.state.Host`): every event is a function from a world to a new world, an
event the modelled code could never see raises the model's `IllegalEvent` and changes nothing.
This world holds the current `KvmWorld`, turns actions into those functions
(kernel/arm64/fpsimd.py, kvm/arm64/{arm,handle_exit,reset,sys_regs}.py) and keys states by
their content with token generations ranked (fpstate.check.statekey).

The contract of what each context should read back lives in the model itself
(``Host.latest``: every write and every architectural discard records it), so this world adds
no bookkeeping of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import Any, ClassVar

from fpstate.arm64.cpu import load_profile
from fpstate.arm64.idregs import reg_def
from fpstate.arm64.regs import COMPONENTS
from fpstate.arm64.statemachine import IllegalEvent
from fpstate.check import invariants
from fpstate.check.statekey_arm64 import arm64_event_key, arm64_key
from fpstate.check.world import (
    WHERE_BOTH,
    WHERE_MEMORY,
    WHERE_REGS,
    Action,
    ActionSpec,
    ContextView,
    CpuView,
    FieldSpec,
    Frame,
    ScenarioError,
    StepError,
    Value,
    Violation,
    World,
    config_bool,
    config_int,
    config_mapping,
    config_str,
)
from fpstate.kernel.arm64 import entry_common
from fpstate.kernel.arm64 import fpsimd as host_fpsimd
from fpstate.kernel.arm64 import process as host_process
from fpstate.kernel.arm64 import ptrace as host_ptrace
from fpstate.kernel.arm64 import signal as host_signal
from fpstate.kernel.arm64.state import TASK_KERNEL, TASK_USER, Host
from fpstate.kvm.arm64 import arm, reset, sys_regs
from fpstate.kvm.arm64.config import (
    CLONE_INHERITS_TPIDR2,
    CPU_DEAD_KEEPS_BINDING,
    CPU_PM_KEEPS_BINDING,
    EXEC_KEEPS_FPMR,
    KERNEL_NEON_ELIDES_RELOAD,
    KERNEL_NEON_SMSTOP_CLOBBERS,
    PTRACE_SET_NO_FLUSH,
    SIGNAL_KEEPS_TPIDR2,
    SIGRETURN_NO_FLUSH,
    SIGRETURN_SM_WITHOUT_TIF_SME,
    SIGRETURN_ZA_WITHOUT_SVE_STATE,
    SME_TRAP_KEEPS_BINDING,
    SVE_SET_WITHOUT_TIF_SVE,
    SVE_SET_ZEROES_TRACER,
    SVE_TRAP_KEEPS_BINDING,
    UPSTREAM,
    VL_CHANGE_STALE_SVE,
    KvmConfig,
)
from fpstate.kvm.arm64.handle_exit import GUEST_OPS, guest_op
from fpstate.kvm.arm64.kvm_host import (
    FP_STATE_GUEST_OWNED,
    KVM_ARM_VCPU_SVE,
    VCPU_IN_GUEST,
    VCPU_LOADED,
    VCPU_OUT,
    VCPU_PREEMPTED,
    KvmWorld,
)

#: The variants whose SVE or SME access trap handler does not unbind a task handled away
#: from its CPU, and which.
_TRAP_KEEPS_BINDING = {SVE_TRAP_KEEPS_BINDING: "SVE", SME_TRAP_KEEPS_BINDING: "SME"}
#: fpsimd_thread_switch()'s form for a task in kernel-mode NEON, by variant.
_KERNEL_SWITCH = {KERNEL_NEON_ELIDES_RELOAD: host_fpsimd.KERNEL_SWITCH_LOAD,
                  KERNEL_NEON_SMSTOP_CLOBBERS: host_fpsimd.KERNEL_SWITCH_LOAD_FLUSH}
_VCPU = FieldSpec(str, "a vCPU context (<vm>/<n>)")
_TASK = FieldSpec(str, "a host task (vmm, or one of config.tasks)")
_CPU = FieldSpec(int, "a CPU number")
USER_OPS = entry_common.USER_OPS
#: Signal frames a task may have on its stack at once (a handler interrupted by a second
#: signal): the explorer's bound.
MAX_SIGFRAMES = 2
#: Tasks a world may clone (fork or CLONE_VM), in all: the explorer's bound.
MAX_CLONES = 1
#: The FP regsets by note name (fpstate.kernel.arm64.ptrace).
REGSETS: dict[str, int] = {name: note for note, name in host_ptrace.NOTE_NAMES.items()}
_REGSET = FieldSpec(str, "an FP regset (NT_PRFPREG, NT_ARM_SVE, NT_ARM_SSVE, NT_ARM_ZA, "
                    "NT_ARM_ZT, NT_ARM_FPMR, NT_ARM_TLS)", choices=tuple(REGSETS))

ARM64_SPECS: dict[str, ActionSpec] = {s.name: s for s in (
    ActionSpec("run", "schedule a host task on a CPU and return it to user mode (the task "
               "there, in user mode, is interrupted and scheduled out)",
               {"task": _TASK, "cpu": _CPU}),
    ActionSpec("idle", "the CPU's task is interrupted and the CPU goes idle", {"cpu": _CPU}),
    ActionSpec("user_op", f"the task executes an FP instruction at EL0 ({', '.join(USER_OPS)})",
               {"task": _TASK, "op": FieldSpec(str, "the instruction", choices=USER_OPS)}),
    ActionSpec("syscall", "a system call (fpsimd_syscall_enter/exit)", {"task": _TASK}),
    ActionSpec("syscall_enter", "the task enters a system call that takes a while "
               "(fpsimd_syscall_enter()) and stays in the kernel: it may be preempted there, "
               "use kernel-mode NEON, then return (syscall_exit)", {"task": _TASK}),
    ActionSpec("neon_begin", "the task, running inside its system call, begins a "
               "kernel-mode NEON section (kernel_neon_begin(): TIF_KERNEL_FPSTATE) and NEON "
               "code clobbers V and FPSR; preemptible until neon_end", {"task": _TASK}),
    ActionSpec("neon_end", "kernel_neon_end() of the task's kernel-mode NEON section (the "
               "task stays in its system call)", {"task": _TASK}),
    ActionSpec("syscall_exit", "the task, running inside its system call and not in a NEON "
               "section, returns to user mode (exit_to_user_mode(), fpsimd_syscall_exit())",
               {"task": _TASK}),
    ActionSpec("kernel_neon", "a softirq on the CPU uses kernel-mode NEON", {"cpu": _CPU}),
    ActionSpec("hotplug", "the idle CPU is taken offline and brought back: fpsimd_cpu_dead() "
               "unbinds it, its FP registers come back UNKNOWN", {"cpu": _CPU}),
    ActionSpec("cpu_pm", "the idle CPU powers down in a cpuidle state that loses context: "
               "fpsimd_cpu_pm_notifier() unbinds it, its FP registers come back UNKNOWN",
               {"cpu": _CPU}),
    ActionSpec("trap", "the task executes an SVE instruction (sve_read, sve_write) or an "
               "SME one (smstart_sm, smstart_za) whose access trap is armed on its CPU and "
               "enters the kernel (el0_sve_acc, el0_sme_acc), preemptible until trap_handle",
               {"task": _TASK, "op": FieldSpec(str, "the instruction",
                                               choices=tuple(entry_common.TRAP_OPS))}),
    ActionSpec("trap_handle", "do_sve_acc() or do_sme_acc() for the task's trap, on the CPU it "
               "runs on now (the task stays in the kernel)", {"task": _TASK}),
    ActionSpec("trap_return", "the task returns from its handled trap and executes the "
               "instruction again", {"task": _TASK}),
    ActionSpec("signal", "a signal interrupts the task in user mode: setup_rt_frame() saves "
               "its FP state to a frame on its stack and enters the handler (SM, ZA off)",
               {"task": _TASK}),
    ActionSpec("sigreturn", "rt_sigreturn: the task returns through its innermost signal "
               "frame (restore_sigframe())", {"task": _TASK}),
    ActionSpec("set_vl", "prctl(PR_SVE_SET_VL or PR_SME_SET_VL) by the task in user mode "
               "(vec_set_vector_length(): a new VL now)",
               {"task": _TASK, "kind": FieldSpec(str, "the vector type", choices=("SVE", "SME")),
                "vl": FieldSpec(int, "the vector length in bytes")}),
    ActionSpec("clone", "fork (vm false) or clone(CLONE_VM) by the task in user mode: a new "
               "task <task>.c, not yet run (arch_dup_task_struct(), copy_thread())",
               {"task": _TASK, "vm": FieldSpec(bool, "CLONE_VM: share the address space",
                                               required=False, default=False)}),
    ActionSpec("exec", "execve() by the task in user mode (flush_thread(): "
               "fpsimd_flush_thread(), tls_thread_flush()): every FP register reset, VLs to "
               "their on-exec values, no signal frame", {"task": _TASK}),
    ActionSpec("ptrace_get", "PTRACE_GETREGSET by the task in user mode of an FP regset of "
               "a stopped tracee (a new task or one scheduled out)",
               {"task": _TASK, "tracee": _TASK, "regset": _REGSET}),
    ActionSpec("ptrace_set", "PTRACE_SETREGSET by the task in user mode of an FP regset of a "
               "stopped tracee, as read back with every register changed; with sleeps, the "
               "tracer sleeps in the call before the write (wait_task_inactive(), a fault) "
               "and its CPU idles in a state that loses FP context",
               {"task": _TASK, "tracee": _TASK, "regset": _REGSET,
                "sleeps": FieldSpec(bool, "the tracer sleeps before the write",
                                    required=False, default=False),
                "vl": FieldSpec(int, "NT_ARM_SVE/NT_ARM_SSVE: the header's vector length, "
                                "another than the tracee's (gdb's set $vg): the VL changes, "
                                "then the data at it", required=False),
                "fpsimd": FieldSpec(bool, "NT_ARM_SVE: SVE_PT_REGS_FPSIMD, the payload "
                                    "V0-V31/FPSR/FPCR only", required=False, default=False)}),
    ActionSpec("vcpu_init", "KVM_ARM_VCPU_INIT (kvm_reset_vcpu)", {
        "vcpu": _VCPU, "sve": FieldSpec(bool, "KVM_ARM_VCPU_SVE", required=False,
                                        default=False)}),
    ActionSpec("finalize", "KVM_ARM_VCPU_FINALIZE(SVE)", {"vcpu": _VCPU}),
    ActionSpec("hide_fpmr", "KVM_SET_ONE_REG ID_AA64PFR2_EL1 with FPMR = 0 (the VMM does not "
               "advertise FPMR to this VM)", {"vcpu": _VCPU}),
    ActionSpec("get_reg", "KVM_GET_ONE_REG of a system register (FPMR, ZCR_EL1, SVCR...)",
               {"vcpu": _VCPU, "reg": FieldSpec(str, "the register name")}),
    ActionSpec("set_reg", "KVM_SET_ONE_REG of FPMR with a value the VMM writes",
               {"vcpu": _VCPU, "reg": FieldSpec(str, "FPMR", choices=("FPMR",))}),
    ActionSpec("kvm_run", "KVM_RUN: the VMM enters the kernel and loads the vCPU",
               {"vcpu": _VCPU}),
    ActionSpec("enter_guest", "flush, traps, lazy switch, ERET to the guest", {"vcpu": _VCPU}),
    ActionSpec("guest_op", f"the guest executes an FP operation ({', '.join(GUEST_OPS)})",
               {"vcpu": _VCPU, "op": FieldSpec(str, "the operation", choices=tuple(GUEST_OPS)),
                "arg": FieldSpec(str, "ZCR_EL1.LEN or ID register name", required=False)}),
    ActionSpec("exit_guest", "a guest exit handled in the host", {"vcpu": _VCPU}),
    ActionSpec("return_to_user", "KVM_RUN returns to the VMM (vcpu_put, syscall exit)",
               {"vcpu": _VCPU}),
    ActionSpec("preempt_vcpu", "the VMM is preempted inside KVM_RUN (preempt notifier put)",
               {"vcpu": _VCPU, "to": FieldSpec(str, "the host task to run, or idle",
                                               required=False, default="idle")}),
    ActionSpec("resume_vcpu", "the VMM is scheduled back in inside KVM_RUN",
               {"vcpu": _VCPU, "cpu": _CPU}),
    ActionSpec("host_softirq_neon", "a softirq uses NEON between two guest exits",
               {"vcpu": _VCPU}),
)}


class Arm64World(World):
    """The arm64 host with KVM (module docstring). Configuration: ``cpu`` (an arm64 profile,
    default fvp-aem-fpmr), ``cpus`` (2), ``tasks`` (host tasks beside the VMM, default
    ``[other]``), ``vms`` (VM name -> ``{vcpus: n, sve: bool}``, default one VM with one vCPU,
    initialised), ``vhe`` (True)."""

    model: ClassVar[str] = "arm64"
    SPECS: ClassVar[dict[str, ActionSpec]] = ARM64_SPECS
    CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("cpu", "cpus", "tasks", "vms", "vhe")
    rollback_on_illegal: ClassVar[bool] = True

    DEFAULT_TASKS: ClassVar[list[str]] = ["other"]
    DEFAULT_VMS: ClassVar[dict[str, Any]] = {"vm0": {"vcpus": 1}}

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        super().validate_config(config)
        if "cpu" in config:
            config_str("config.cpu", config["cpu"])
        if "cpus" in config:
            config_int("config.cpus", config["cpus"], 1, 64)
        tasks = config.get("tasks", cls.DEFAULT_TASKS)
        if (not isinstance(tasks, (list, tuple))
                or not all(isinstance(t, str) and t for t in tasks)):
            raise ScenarioError(f"config.tasks: must be a list of task names, not {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ScenarioError(f"config.tasks: names must differ: {tasks!r}")
        if "vmm" in tasks:
            raise ScenarioError("config.tasks: 'vmm' is the VMM task's name, there already")
        vms = config_mapping("config.vms", config.get("vms", cls.DEFAULT_VMS))
        for vm, spec in vms.items():
            spec = config_mapping(f"config.vms.{vm}", spec, ("vcpus", "sve"))
            config_int(f"config.vms.{vm}.vcpus", spec.get("vcpus", 1), 0, 16)
            if "sve" in spec:
                config_bool(f"config.vms.{vm}.sve", spec["sve"])
        if "vhe" in config:
            config_bool("config.vhe", config["vhe"])

    def __init__(self, config: dict[str, Any], variant: str | None) -> None:
        super().__init__(config, variant)
        profile = load_profile(self.config.get("cpu", "fvp-aem-fpmr"))
        kcfg = KvmConfig(variant or UPSTREAM, bool(self.config.get("vhe", True)))
        kw = reset.kvm_init(profile, kcfg, int(self.config.get("cpus", 2)))
        host = kw.host
        for name in self.config.get("tasks", self.DEFAULT_TASKS):
            host = host_fpsimd.spawn(host, str(name))
        kw = kw.with_host(host)
        for vm_name, spec in (self.config.get("vms", self.DEFAULT_VMS) or {}).items():
            spec = dict(spec or {})
            kw = reset.kvm_create_vm(kw, vm_name)
            for _ in range(int(spec.get("vcpus", 1))):
                kw, ctx = reset.kvm_create_vcpu(kw, vm_name)
                feats = frozenset({KVM_ARM_VCPU_SVE}) if spec.get("sve") else frozenset()
                kw, ret = reset.kvm_arm_vcpu_init(kw, ctx, feats)
                assert ret == 0, f"KVM_ARM_VCPU_INIT of {ctx}: {ret}"
                if spec.get("sve"):
                    kw, ret = reset.kvm_arm_vcpu_finalize(kw, ctx)
                    assert ret == 0, f"KVM_ARM_VCPU_FINALIZE of {ctx}: {ret}"
        self.kw: KvmWorld = kw.with_host(kw.host.clear_obs())
        #: `enabled` by (task modes, CPU currents, vCPU run states), shared with clones.
        self._enabled_memo: dict[tuple[Any, ...], tuple[Action, ...]] = {}

    # -- World -------------------------------------------------------------------------------

    def illegal_types(self) -> tuple[type[BaseException], ...]:
        return (IllegalEvent,)

    def bug_violation(self, exc: BaseException) -> Violation | None:
        return None

    def check(self) -> list[Violation]:
        return invariants.check(self)

    def clone(self) -> Arm64World:
        new = copy.copy(self)
        new.history = list(self.history)
        return new

    def _apply(self, action: Action) -> dict[str, Value]:
        call = _CALLS.get(id(action))
        if call is None or call[0] is not action:
            fn = getattr(type(self), f"do_{action.name}", None)
            if fn is None:
                raise StepError(f"action {action.name!r} is not known to model {self.model}")
            if len(_CALLS) > 100_000:
                _CALLS.clear()
            call = _CALLS[id(action)] = (action, fn, dict(action.args))
        saved = self.kw
        # Observations belong to one event: what this action lets a context see.
        if saved.host.obs:
            self.kw = saved.with_host(saved.host.clear_obs())
        try:
            return call[1](self, **call[2]) or {}
        except BaseException:
            self.kw = saved  # the model is immutable: the world before the action
            raise

    # -- helpers -----------------------------------------------------------------------------

    def _cpu(self, nr: Any) -> int:
        if not isinstance(nr, int) or not 0 <= nr < len(self.kw.host.cpus):
            raise StepError(f"no CPU {nr}")
        return nr

    def _task_cpu(self, task: str) -> int:
        if task not in self.kw.host.tasks:
            raise StepError(f"no host task {task!r}")
        for c in self.kw.host.cpus:
            if c.current == task:
                return c.idx
        raise StepError(f"task {task} is not running on a CPU")

    def _user_cpu(self, task: str) -> int:
        """The CPU of ``task``, which must be there in user mode (a syscall, a signal, an
        instruction of its own)."""
        nr = self._task_cpu(task)
        if self.kw.host.task(task).mode != TASK_USER:
            raise StepError(f"task {task} is not in user mode")
        return nr

    def _vcpu(self, ctx: str) -> Any:
        if ctx not in self.kw.vcpus:
            raise StepError(f"no vCPU {ctx!r} (vCPUs: {', '.join(self.kw.vcpus) or 'none'})")
        return self.kw.vcpus[ctx]

    def _off_cpu(self, nr: int) -> Host:
        """The host after the task of CPU ``nr`` (if any) is interrupted (if in user mode)
        and scheduled out."""
        host = self.kw.host
        cur = host.current(nr)
        if cur is None:
            return host
        for v in self.kw.vcpus.values():
            if v.cpu == nr and v.run != VCPU_OUT:
                raise StepError(f"CPU {nr}: the VMM is inside KVM_RUN of {v.ctx} "
                                "(use preempt_vcpu)")
        if cur.mode == TASK_USER:
            host = entry_common.interrupt(host, nr)
        return host_fpsimd.schedule(host, nr, None)

    # -- actions: host -----------------------------------------------------------------------

    def do_run(self, task: str, cpu: int) -> dict[str, Value]:
        """Schedule ``task`` in on ``cpu``; it returns to user mode, unless it was preempted
        inside a system call (syscall_enter) or an access trap (trap), where it resumes."""
        nr = self._cpu(cpu)
        if task not in self.kw.host.tasks:
            raise StepError(f"no host task {task!r}")
        t = self.kw.host.task(task)
        if t.mode not in ("new", "sleeping"):
            raise StepError(f"task {task} is not runnable ({t.mode})")
        if task == self.kw.vmm and any(v.run == VCPU_PREEMPTED for v in self.kw.vcpus.values()):
            raise StepError(f"{task} was preempted inside KVM_RUN (use resume_vcpu)")
        host = host_fpsimd.schedule(self._off_cpu(nr), nr, task,
                                    kernel_switch=_KERNEL_SWITCH.get(
                                        self.variant, host_fpsimd.KERNEL_SWITCH_FLUSH_LOAD))
        if not (t.in_syscall or t.in_trap):
            host = entry_common.ret_to_user(host, nr)
        self.kw = self.kw.with_host(host)
        return {}

    def do_idle(self, cpu: int) -> dict[str, Value]:
        nr = self._cpu(cpu)
        if self.kw.host.current(nr) is None:
            raise StepError(f"CPU {cpu} is already idle")
        self.kw = self.kw.with_host(self._off_cpu(nr))
        return {}

    def do_user_op(self, task: str, op: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        self.kw = self.kw.with_host(entry_common.user_op(self.kw.host, nr, op))
        return self._observed()

    def do_syscall(self, task: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        host = entry_common.syscall_exit(entry_common.syscall_enter(self.kw.host, nr), nr)
        self.kw = self.kw.with_host(host)
        return {}

    def _syscall_cpu(self, task: str, neon: bool | None = None) -> int:
        """The CPU of ``task``, which must be there inside a system call it entered with
        syscall_enter (not the VMM inside KVM_RUN), in a kernel-mode NEON section or not as
        ``neon`` says (None: either)."""
        nr = self._task_cpu(task)
        t = self.kw.host.task(task)
        if t.mode != TASK_KERNEL or not t.in_syscall:
            raise StepError(f"task {task} is not inside a system call")
        if task == self.kw.vmm and any(v.run != VCPU_OUT for v in self.kw.vcpus.values()):
            raise StepError(f"{task} is inside KVM_RUN")
        if neon is not None and t.tif_kernel_fpstate != neon:
            raise StepError(f"task {task} is {'not ' if neon else ''}in a kernel-mode NEON "
                            "section")
        return nr

    def do_syscall_enter(self, task: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        self.kw = self.kw.with_host(entry_common.syscall_enter(self.kw.host, nr))
        return {}

    def do_neon_begin(self, task: str) -> dict[str, Value]:
        nr = self._syscall_cpu(task, neon=False)
        host = host_fpsimd.kernel_neon_begin(self.kw.host.clear_obs(), nr)
        self.kw = self.kw.with_host(host_fpsimd.kernel_neon_use(host, nr))
        return {}

    def do_neon_end(self, task: str) -> dict[str, Value]:
        """The section reads its registers back (kernel_neon_read: what it wrote, checked as
        any context's reads are), then kernel_neon_end()."""
        nr = self._syscall_cpu(task, neon=True)
        host = host_fpsimd.kernel_neon_read(self.kw.host, nr)
        self.kw = self.kw.with_host(host_fpsimd.kernel_neon_end(host, nr))
        return self._observed()

    def do_syscall_exit(self, task: str) -> dict[str, Value]:
        nr = self._syscall_cpu(task, neon=False)
        self.kw = self.kw.with_host(entry_common.syscall_exit(self.kw.host, nr))
        return {}

    def _trap_cpu(self, task: str, handled: bool) -> int:
        """The CPU of ``task``, which must be there inside an access trap, handled or not."""
        nr = self._task_cpu(task)
        t = self.kw.host.task(task)
        if not t.in_trap or t.trap_handled != handled:
            raise StepError(f"task {task} has no {'handled' if handled else 'pending'} "
                            "access trap")
        return nr

    def do_trap(self, task: str, op: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        self.kw = self.kw.with_host(entry_common.access_trap(self.kw.host, nr, op))
        return {}

    def do_trap_handle(self, task: str) -> dict[str, Value]:
        nr = self._trap_cpu(task, handled=False)
        kind = entry_common.TRAP_OPS[self.kw.host.task(task).in_trap]
        self.kw = self.kw.with_host(entry_common.access_trap_handle(
            self.kw.host, nr, flush_foreign=_TRAP_KEEPS_BINDING.get(self.variant) != kind))
        return {}

    def do_trap_return(self, task: str) -> dict[str, Value]:
        nr = self._trap_cpu(task, handled=True)
        self.kw = self.kw.with_host(entry_common.access_trap_return(self.kw.host, nr))
        return self._observed()

    def do_signal(self, task: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        host = self.kw.host
        if len(host.task(task).sigframes) >= MAX_SIGFRAMES:
            raise StepError(f"task {task} already has {MAX_SIGFRAMES} signal frames")
        host, _ = host_signal.deliver_signal(entry_common.interrupt(host, nr), nr,
                                             zero_tpidr2=self.variant != SIGNAL_KEEPS_TPIDR2)
        self.kw = self.kw.with_host(entry_common.ret_to_user(host, nr))
        return {}

    def do_sigreturn(self, task: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        host = host_signal.sys_rt_sigreturn(
            self.kw.host, nr, early_flush=self.variant != SIGRETURN_NO_FLUSH,
            sm_sets_tif_sme=self.variant != SIGRETURN_SM_WITHOUT_TIF_SME,
            za_allocs_sve=self.variant != SIGRETURN_ZA_WITHOUT_SVE_STATE)
        self.kw = self.kw.with_host(host)
        return {}

    def do_set_vl(self, task: str, kind: str, vl: int) -> dict[str, Value]:
        nr = self._user_cpu(task)
        host = entry_common.syscall_enter(self.kw.host, nr)
        host, ret = host_fpsimd.prctl_set_vl(host, nr, kind, vl,
                                             stale_sve=self.variant == VL_CHANGE_STALE_SVE)
        self.kw = self.kw.with_host(entry_common.syscall_exit(host, nr))
        return {"ret": ret}

    def do_exec(self, task: str) -> dict[str, Value]:
        """The calling thread only: the model has no thread groups, so a sibling sharing the
        address space is not killed (de_thread()); its FP state is its own either way."""
        nr = self._user_cpu(task)
        host = entry_common.syscall_enter(self.kw.host, nr)
        host = host_fpsimd.exec_task(host, nr, keep_fpmr=self.variant == EXEC_KEEPS_FPMR)
        self.kw = self.kw.with_host(entry_common.syscall_exit(host, nr))
        return {}

    def do_clone(self, task: str, vm: bool = False) -> dict[str, Value]:
        nr = self._user_cpu(task)
        host = self.kw.host
        if len(host.tasks) >= self._clone_limit():
            raise StepError(f"at most {MAX_CLONES} task(s) are cloned in a world")
        child = f"{task}.c"
        if child in host.tasks:
            raise StepError(f"task {child} exists")
        host = entry_common.syscall_enter(host, nr)
        host = host_process.copy_process(host, nr, child, vm,
                                         settls_only=self.variant == CLONE_INHERITS_TPIDR2)
        self.kw = self.kw.with_host(entry_common.syscall_exit(host, nr))
        return {"child": child}

    def _clone_limit(self) -> int:
        """How many host tasks a world may have: its configuration's, the VMM and
        MAX_CLONES clones."""
        return len(self.config.get("tasks", self.DEFAULT_TASKS)) + 1 + MAX_CLONES

    def _tracee(self, tracee: str) -> None:
        if tracee not in self.kw.host.tasks:
            raise StepError(f"no host task {tracee!r}")
        if self.kw.host.task(tracee).in_syscall or self.kw.host.task(tracee).in_trap:
            raise StepError(f"{tracee} was preempted inside the kernel: not in a ptrace stop")
        if tracee == self.kw.vmm and any(v.run != VCPU_OUT for v in self.kw.vcpus.values()):
            raise StepError(f"{tracee} is inside KVM_RUN: a ptrace stop returns from it first")

    def _regset(self, regset: str) -> int:
        note = REGSETS.get(regset)
        if note is None or note not in host_ptrace.host_regsets(self.kw.host.caps):
            raise StepError(f"{regset}: not an FP regset of this host")
        return note

    def do_ptrace_get(self, task: str, tracee: str, regset: str) -> dict[str, Value]:
        nr = self._user_cpu(task)
        self._tracee(tracee)
        note = self._regset(regset)
        self.kw = self.kw.with_host(host_ptrace.ptrace_syscall(
            self.kw.host, nr, lambda h: host_ptrace.ptrace_getregset(h, nr, tracee, note)))
        return self._observed()

    def do_ptrace_set(self, task: str, tracee: str, regset: str, sleeps: bool = False,
                      vl: int | None = None, fpsimd: bool = False) -> dict[str, Value]:
        nr = self._user_cpu(task)
        self._tracee(tracee)
        note = self._regset(regset)
        if (vl is not None or fpsimd) and regset not in ("NT_ARM_SVE", "NT_ARM_SSVE"):
            raise StepError(f"{regset}: vl and fpsimd are fields of NT_ARM_SVE/NT_ARM_SSVE")
        if vl is not None:
            info = self.kw.host.caps.vl_info("SVE" if regset == "NT_ARM_SVE" else "SME")
            if info is None or vl not in {16 * vq for vq in info.vqs}:
                raise StepError(f"{regset}: {vl} is not a vector length this CPU has")
        flush = self.variant != PTRACE_SET_NO_FLUSH
        zero_tracer = self.variant == SVE_SET_ZEROES_TRACER
        self.kw = self.kw.with_host(host_ptrace.ptrace_syscall(
            self.kw.host, nr, lambda h: host_ptrace.ptrace_setregset(
                h, nr, tracee, note, flush=flush, zero_tracer=zero_tracer,
                tif_sve_with_sme_only=self.variant == SVE_SET_WITHOUT_TIF_SVE, vl=vl,
                fpsimd_format=fpsimd), sleeps=sleeps))
        return {}

    def do_hotplug(self, cpu: int) -> dict[str, Value]:
        return self._power_cycle(cpu, CPU_DEAD_KEEPS_BINDING)

    def do_cpu_pm(self, cpu: int) -> dict[str, Value]:
        return self._power_cycle(cpu, CPU_PM_KEEPS_BINDING)

    def _power_cycle(self, cpu: int, keeping_variant: str) -> dict[str, Value]:
        """The idle CPU ``cpu`` loses its registers; ``keeping_variant`` is the design that
        leaves it bound on this path."""
        self.kw = self.kw.with_host(host_fpsimd.cpu_power_cycle(
            self.kw.host, self._cpu(cpu), keep_binding=self.variant == keeping_variant))
        return {}

    def do_kernel_neon(self, cpu: int) -> dict[str, Value]:
        nr = self._cpu(cpu)
        for v in self.kw.vcpus.values():
            if v.cpu == nr and v.run != VCPU_OUT:
                raise StepError(f"CPU {cpu} runs a vCPU loop (use host_softirq_neon)")
        self.kw = self.kw.with_host(host_fpsimd.kernel_neon(self.kw.host, nr, softirq=True))
        return {}

    def _observed(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for o in self.kw.host.obs:
            out[f"{o.what}"] = o.action if o.value is None else str(o.value)
        return out

    # -- actions: KVM ------------------------------------------------------------------------

    def _vmm_out(self, ctx: str) -> None:
        v = self._vcpu(ctx)
        if v.run != VCPU_OUT:
            raise StepError(f"{ctx}: the VMM is inside KVM_RUN")
        if self.kw.host.task(self.kw.vmm).mode != TASK_USER:
            raise StepError("the VMM is not running in user mode")

    def do_vcpu_init(self, vcpu: str, sve: bool = False) -> dict[str, Value]:
        self._vmm_out(vcpu)
        feats = frozenset({KVM_ARM_VCPU_SVE}) if sve else frozenset()
        self.kw, ret = reset.kvm_arm_vcpu_init(self.kw, vcpu, feats)
        return {"ret": ret}

    def do_finalize(self, vcpu: str) -> dict[str, Value]:
        self._vmm_out(vcpu)
        self.kw, ret = reset.kvm_arm_vcpu_finalize(self.kw, vcpu)
        return {"ret": ret}

    def do_hide_fpmr(self, vcpu: str) -> dict[str, Value]:
        self._vmm_out(vcpu)
        v = self._vcpu(vcpu)
        reg = "ID_AA64PFR2_EL1"
        val = reg_def(reg).field("FPMR").put(self.kw.vm(v.vm).id_regs.get(reg), 0)
        self.kw, ret = sys_regs.set_id_reg(self.kw, v, reg, val)
        return {"ret": ret}

    def do_get_reg(self, vcpu: str, reg: str) -> dict[str, Value]:
        self._vmm_out(vcpu)
        self.kw, ret, val = sys_regs.kvm_sys_reg_get_user(self.kw, self._vcpu(vcpu), reg)
        return {"ret": ret, "value": str(val) if val is not None else "none"}

    def do_set_reg(self, vcpu: str, reg: str) -> dict[str, Value]:
        self._vmm_out(vcpu)
        host, tok = self.kw.host.fresh(vcpu)  # the value becomes the vCPU's own
        self.kw = self.kw.with_host(host)
        self.kw, ret = sys_regs.kvm_sys_reg_set_user(self.kw, self._vcpu(vcpu), reg, tok)
        return {"ret": ret}

    def do_kvm_run(self, vcpu: str) -> dict[str, Value]:
        self._vmm_out(vcpu)
        self.kw, ret = arm.kvm_run(self.kw, vcpu)
        return {"ret": ret}

    def do_enter_guest(self, vcpu: str) -> dict[str, Value]:
        self._vcpu(vcpu)
        self.kw = arm.enter_guest(self.kw, vcpu)
        return {}

    def do_guest_op(self, vcpu: str, op: str, arg: str | None = None) -> dict[str, Value]:
        self._vcpu(vcpu)
        value: int | str | None = arg
        if op == "zcr_write" and arg is not None:
            value = int(arg, 0)
        self.kw = guest_op(self.kw, vcpu, op, value)
        return self._observed()

    def do_exit_guest(self, vcpu: str) -> dict[str, Value]:
        self._vcpu(vcpu)
        self.kw = arm.exit_guest(self.kw, vcpu)
        return {}

    def do_return_to_user(self, vcpu: str) -> dict[str, Value]:
        if self._vcpu(vcpu).run != VCPU_LOADED:
            raise StepError(f"{vcpu} is not loaded between guest runs")
        self.kw = arm.return_to_user(self.kw, vcpu)
        return {}

    def do_preempt_vcpu(self, vcpu: str, to: str = "idle") -> dict[str, Value]:
        self._vcpu(vcpu)
        nxt = None if to == "idle" else to
        if nxt is not None and nxt not in self.kw.host.tasks:
            raise StepError(f"no host task {nxt!r}")
        if nxt is not None and (self.kw.host.task(nxt).in_syscall
                                or self.kw.host.task(nxt).in_trap):
            raise StepError(f"{nxt} was preempted inside the kernel (use run)")
        self.kw = arm.preempt_vcpu(self.kw, vcpu, nxt)
        if nxt is not None:
            nr = next(c.idx for c in self.kw.host.cpus if c.current == nxt)
            self.kw = self.kw.with_host(entry_common.ret_to_user(self.kw.host, nr))
        return {}

    def do_resume_vcpu(self, vcpu: str, cpu: int) -> dict[str, Value]:
        nr = self._cpu(cpu)
        v = self._vcpu(vcpu)
        if v.run != VCPU_PREEMPTED:
            raise StepError(f"{vcpu} is not preempted")
        cur = self.kw.host.current(nr)
        if cur is not None and cur.mode == TASK_USER:
            self.kw = self.kw.with_host(entry_common.interrupt(self.kw.host, nr))
        self.kw = arm.resume_vcpu(self.kw, vcpu, nr)
        return {}

    def do_host_softirq_neon(self, vcpu: str) -> dict[str, Value]:
        self._vcpu(vcpu)
        self.kw = arm.host_softirq_neon(self.kw, vcpu)
        return {}

    # -- exploration -------------------------------------------------------------------------

    GUEST_EXPLORE: ClassVar[tuple[str, ...]] = (
        "fpsimd_write", "fpsimd_read", "sve_write", "sve_read", "fpmr_write", "fpmr_read",
        "fp8_op", "smstart", "zcr_write")  # zcr_write without arg: ZCR_EL1.LEN = 0

    def enabled(self) -> list[Action]:
        """The enabled actions; they depend only on the tasks there are (a clone adds one),
        each one's mode, number of signal frames, VLs, fate, system call, NEON section and
        access trap, each CPU's current task, armed access traps and streaming mode, and
        each vCPU's run state and CPU, so they are memoised by those (per initial world:
        clones share the memo, and the names of CPUs and vCPUs never change)."""
        kw = self.kw
        host = kw.host
        sig = (tuple([(name, t.mode, len(t.sigframes), t.sve_vl, t.sme_vl, t.killed,
                       t.in_syscall, t.tif_kernel_fpstate, t.in_trap, t.trap_handled)
                      for name, t in host.tasks.items()]),
               tuple([(c.current, c.el0_sve, c.el0_sme, c.regs.sm) for c in host.cpus]),
               tuple([(v.run, v.cpu) for v in kw.vcpus.values()]))
        got = self._enabled_memo.get(sig)
        if got is None:
            got = self._enabled_memo[sig] = tuple(self._enabled())
        return list(got)

    def _enabled(self) -> list[Action]:
        A = Action.of
        kw = self.kw
        host = kw.host
        out: list[Action] = []
        ncpu = len(host.cpus)
        in_run = {v.cpu for v in kw.vcpus.values() if v.run != VCPU_OUT and v.cpu is not None}
        vmm_in_kvm = any(v.run != VCPU_OUT for v in kw.vcpus.values())
        for name, t in host.tasks.items():
            if t.killed:  # it exits: nothing more of its own
                continue
            if t.mode in ("new", "sleeping"):
                preempted = name == kw.vmm and any(v.run == VCPU_PREEMPTED
                                                   for v in kw.vcpus.values())
                if not preempted:
                    out += [A("run", task=name, cpu=n) for n in range(ncpu) if n not in in_run]
            elif t.mode == TASK_USER:
                ops = ["fpsimd_write", "fpsimd_read", "fpmr_write", "fpmr_read"]
                if host.caps.sve:
                    ops += ["sve_write", "sve_read"]
                if host.caps.sme:
                    ops += ["smstart_sm", "smstart_za", "smstop", "za_write", "za_read",
                            "tpidr2_write", "tpidr2_read"]
                    if host.caps.sme2:
                        ops += ["zt0_write", "zt0_read"]
                out += [A("user_op", task=name, op=op) for op in ops]
                out += [A("syscall", task=name), A("syscall_enter", task=name),
                        A("exec", task=name)]
                c = next((c for c in host.cpus if c.current == name), None)
                if c is not None:
                    if host.caps.sve and not c.regs.sm and not c.el0_sve:
                        out += [A("trap", task=name, op="sve_read"),
                                A("trap", task=name, op="sve_write")]
                    if host.caps.sme and not c.el0_sme:
                        out += [A("trap", task=name, op="smstart_sm"),
                                A("trap", task=name, op="smstart_za")]
                for kind, cur in (("SVE", t.sve_vl), ("SME", t.sme_vl)):
                    info = host.caps.vl_info(kind)
                    if info is not None:
                        out += [A("set_vl", task=name, kind=kind, vl=16 * vq)
                                for vq in sorted(info.vqs) if 16 * vq != cur]
                if len(t.sigframes) < MAX_SIGFRAMES:
                    out.append(A("signal", task=name))
                if len(host.tasks) < self._clone_limit() and f"{name}.c" not in host.tasks:
                    out += [A("clone", task=name, vm=False), A("clone", task=name, vm=True)]
                if t.sigframes:
                    out.append(A("sigreturn", task=name))
                out += self._ptrace_actions(name)
            elif t.mode == TASK_KERNEL and t.in_trap:
                out.append(A("trap_return" if t.trap_handled else "trap_handle", task=name))
            elif t.mode == TASK_KERNEL and t.in_syscall and not (name == kw.vmm and vmm_in_kvm):
                if t.tif_kernel_fpstate:
                    out.append(A("neon_end", task=name))
                else:
                    out += [A("neon_begin", task=name), A("syscall_exit", task=name)]
        for c in host.cpus:
            if c.current is not None and c.idx not in in_run:
                out.append(A("idle", cpu=c.idx))
            # The model's kernel-mode NEON needs a task on the CPU (it refuses an idle one).
            if c.idx not in in_run and c.current is not None:
                out.append(A("kernel_neon", cpu=c.idx))
            if c.current is None:  # (a softirq's NEON section never outlives its step)
                out += [A("hotplug", cpu=c.idx), A("cpu_pm", cpu=c.idx)]
        vmm_user = host.task(kw.vmm).mode == TASK_USER
        for ctx, v in kw.vcpus.items():
            if v.run == VCPU_OUT and vmm_user:
                out += [A("kvm_run", vcpu=ctx), A("hide_fpmr", vcpu=ctx),
                        A("get_reg", vcpu=ctx, reg="FPMR"), A("set_reg", vcpu=ctx, reg="FPMR")]
            elif v.run == VCPU_LOADED:
                out += [A("enter_guest", vcpu=ctx), A("return_to_user", vcpu=ctx),
                        A("host_softirq_neon", vcpu=ctx), A("preempt_vcpu", vcpu=ctx)]
                out += [A("preempt_vcpu", vcpu=ctx, to=n) for n, t in host.tasks.items()
                        if t.mode in ("new", "sleeping") and not t.in_syscall
                        and not t.in_trap]
            elif v.run == VCPU_IN_GUEST:
                out += [A("guest_op", vcpu=ctx, op=op) for op in self.GUEST_EXPLORE]
                out.append(A("exit_guest", vcpu=ctx))
            elif v.run == VCPU_PREEMPTED:
                out += [A("resume_vcpu", vcpu=ctx, cpu=n) for n in range(ncpu)
                        if n not in in_run]
        return out

    def _ptrace_actions(self, tracer: str) -> list[Action]:
        """PTRACE_GETREGSET and PTRACE_SETREGSET (asleep or not) of every FP regset of each
        stopped tracee -- not one the kernel killed, nor the VMM inside KVM_RUN."""
        A = Action.of
        kw = self.kw
        notes = host_ptrace.host_regsets(kw.host.caps)
        in_run = any(v.run != VCPU_OUT for v in kw.vcpus.values())
        out: list[Action] = []
        for name, t in kw.host.tasks.items():
            if (name == tracer or t.killed or t.mode not in host_ptrace.TRACEE_MODES
                    or t.in_syscall or t.in_trap or (name == kw.vmm and in_run)):
                continue
            for note in notes:
                rs = host_ptrace.NOTE_NAMES[note]
                out += [A("ptrace_get", task=tracer, tracee=name, regset=rs),
                        A("ptrace_set", task=tracer, tracee=name, regset=rs),
                        A("ptrace_set", task=tracer, tracee=name, regset=rs, sleeps=True)]
                if rs in ("NT_ARM_SVE", "NT_ARM_SSVE"):
                    kind = "SVE" if rs == "NT_ARM_SVE" else "SME"
                    cur = t.sve_vl if kind == "SVE" else t.sme_vl
                    info = kw.host.caps.vl_info(kind)
                    out += [A("ptrace_set", task=tracer, tracee=name, regset=rs, vl=16 * vq)
                            for vq in (sorted(info.vqs) if info else ()) if 16 * vq != cur]
                    if kind == "SVE":
                        out.append(A("ptrace_set", task=tracer, tracee=name, regset=rs,
                                     fpsimd=True))
        return out

    #: The key names everything `enabled` and the invariants read but the last event's
    #: observations, which `event_key` gives (fpstate.check.statekey_arm64).
    MEMO: ClassVar[bool] = True

    def key(self) -> Hashable:
        return arm64_key(self.kw)

    def event_key(self) -> Hashable:
        """The observations of the last event, canonical as the key is."""
        return arm64_event_key(self.kw)

    def frame(self, action: str, violation: str | None, detail: str = "") -> Frame:
        kw, host = self.kw, self.kw.host
        cpus = []
        for c in host.cpus:
            hyp = kw.hyp[c.idx]
            running = hyp.guest or c.current or "idle"
            holds = _ctx_of_store(c.last.st)
            writers = tuple((comp, str(c.regs.get(comp))) for comp in COMPONENTS
                            if c.regs.get(comp).writer)
            cpus.append(CpuView(c.idx, running, holds, writers))
        ctxs = []
        for name, t in host.tasks.items():
            cpu = next((c.idx for c in host.cpus if c.last.st == t.store), None)
            if cpu is not None and not t.tif_foreign_fpstate and host.cpus[cpu].current == name:
                where = WHERE_REGS
            elif cpu is not None and t.fpsimd_cpu == cpu:
                where = WHERE_BOTH
            else:
                where, cpu = WHERE_MEMORY, None
            ctxs.append(ContextView(name, where, cpu, _store_writers(host.store(t.store))))
        for ctx, v in kw.vcpus.items():
            owned = v.cpu is not None and kw.hyp[v.cpu].fp_owner == FP_STATE_GUEST_OWNED and (
                host.cpus[v.cpu].last.st == v.store)
            where = WHERE_REGS if owned else WHERE_MEMORY
            ctxs.append(ContextView(ctx, where, v.cpu if owned else None,
                                    _store_writers(host.store(v.store))))
        return Frame(self.steps, action, tuple(cpus), tuple(ctxs), violation, detail)


#: id(Action) -> (the action, its do_ method, its keyword arguments): actions are interned
#: values (Action.of), and the entry keeps its action alive.
_CALLS: dict[int, tuple[Action, Any, dict[str, Value]]] = {}


def _ctx_of_store(st: str | None) -> str | None:
    if st is None:
        return None
    return st.split(":", 1)[1]


def _store_writers(store: Any) -> tuple[tuple[str, str], ...]:
    out = []
    for comp, field in (("V", "vregs"), ("FPSR", "fpsr"), ("ZHI", "sve_zhi"), ("P", "sve_p"),
                        ("FPMR", "fpmr"), ("ZA", "za")):
        tok = getattr(store, field)
        if tok.writer:
            out.append((comp, str(tok)))
    return tuple(out)


__all__ = ["ARM64_SPECS", "Arm64World"]
