"""KVM x86 under the checker: VMs and vCPUs of helper I's model on top of the kernel model.

The world is the x86 kernel world (fpstate.check.actions_x86) plus the kvm module
(`fpstate.kvm.x86.vcpu.Kvm`) loaded on the same `Machine`: a VMM is one of the configured
processes, its KVM ioctls are system calls of that task, and each vCPU is a context of its own
(``<vm>.v<n>``) whose guest writes tokens that name it. Every action calls the model's
functions (kvm_arch_vcpu_create, kvm_vcpu_ioctl_set_cpuid2, kvm_arch_vcpu_ioctl_run,
kvm_apic_accept_events, kvm_arch_vcpu_ioctl_get_xsave2, kvm_load/put_guest_fpu).

The guest's contract (what each vCPU expects to read back): its own writes; INIT puts the
components the SDM clears on INIT in their initial configuration (and leaves the rest);
userspace's XSAVE-managed MSR writes (KVM_SET_MSRS of IA32_U_CET / IA32_PL0_SSP) set them.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from operator import attrgetter
from typing import Any, ClassVar

from fpstate.check import invariants
from fpstate.check.actions_x86 import X86_SPECS, X86World, component_number
from fpstate.check.memo import IdentityMemo
from fpstate.check.statekey import digest, fps_values, pkru_value, raw_digest, regs_values
from fpstate.check.views_x86 import with_pkru
from fpstate.check.world import (
    WHERE_MEMORY,
    Action,
    ActionSpec,
    ContextView,
    FieldSpec,
    Frame,
    ScenarioError,
    StepError,
    config_bool,
    config_int,
    config_mapping,
    config_str,
)
from fpstate.check.world import Value as V
from fpstate.errors import MaskError
from fpstate.kernel.x86 import core
from fpstate.kernel.x86.hw import (
    MXCSR,
    MXCSR_INIT,
    MXCSR_OFFSET,
    PKRU,
    next_mxcsr_token,
    pkru_bytes,
    token,
)
from fpstate.kernel.x86.regset import mxcsr_by_format
from fpstate.kernel.x86.sched import STATE_USER, Machine, Task
from fpstate.kernel.x86.types import XFEATURE_MASK_SUPERVISOR_ALL, Fpstate
from fpstate.kernel.x86.xstate_prctl import ARCH_REQ_XCOMP_GUEST_PERM, sys_arch_prctl
from fpstate.kvm.x86 import fpu as kfpu
from fpstate.kvm.x86 import vcpu as kv
from fpstate.kvm.x86 import x86 as kx86
from fpstate.kvm.x86.cpuid import offer_xcr0
from fpstate.x86.profiles import load_profile
from fpstate.x86.xfeatures import (
    BY_NUMBER,
    XFEATURE_MASK_BNDCSR,
    XFEATURE_MASK_BNDREGS,
    XFEATURE_MASK_CET_KERNEL,
    XFEATURE_MASK_CET_USER,
    XFEATURE_MASK_FP,
    XFEATURE_MASK_FPSSE,
    XFEATURE_MASK_PKRU,
    XFEATURE_MASK_SSE,
    bits,
    parse_mask,
)

#: The XSAVE components the SDM puts in their initial configuration on INIT (MPX BNDREGS and
#: BNDCSR, CET IA32_U_CET/IA32_PL3_SSP and IA32_PL0-2_SSP); seed 003.
ARCH_INIT_CLEARED = (XFEATURE_MASK_BNDREGS | XFEATURE_MASK_BNDCSR | XFEATURE_MASK_CET_USER
                     | XFEATURE_MASK_CET_KERNEL)
GUEST_OWNER = kv.GUEST_OWNER
_VCPU = FieldSpec(str, "a vCPU name (<vm>.v<n>)")
_VMM = FieldSpec(str, "the VMM task (a task of the configuration)")


def _path(fn: Any) -> Any:
    """A kernel path without preemption points around a model function (an ioctl body)."""
    def path(c: Any, *args: Any) -> Any:
        result = fn(c, *args)
        if False:  # pragma: no cover - a generator
            yield
        return result
    path.__qualname__ = fn.__qualname__
    return path


KVM_SPECS: dict[str, ActionSpec] = dict(X86_SPECS)
KVM_SPECS.update({s.name: s for s in (
    ActionSpec("create_vcpu", "KVM_CREATE_VCPU (kvm_arch_vcpu_create: guest fpstate allocated "
               "with guest_default_cfg, guest permission locked, RESET)",
               {"task": _VMM, "vm": FieldSpec(str, "VM name"), "vcpu": _VCPU}),
    ActionSpec("set_cpuid", "KVM_SET_CPUID2 with everything KVM_GET_SUPPORTED_CPUID offers in "
               "leaf 0xD, cut to the VM's xcr0 where the configuration gives one (dynamic "
               "features get space now: EPERM without guest permission)",
               {"task": _VMM, "vcpu": _VCPU}),
    ActionSpec("set_xcr0", "KVM_SET_XCRS: XCR0 = every feature the guest CPUID supports",
               {"task": _VMM, "vcpu": _VCPU}),
    ActionSpec("kvm_run", "KVM_RUN: the guest runs a ';'-separated program of 'write <comp>', "
               "'read <comp>', 'release <comp|comp>', 'ldmxcsr', 'xsetbv', 'init', "
               "'wrmsr <xfd|xfd_err> <value>', 'rdmsr <xfd|xfd_err>'",
               {"task": _VMM, "vcpu": _VCPU, "guest": FieldSpec(str, "the guest program"),
                "irq": FieldSpec(bool, "a hard interrupt whose handler wants the FPU arrives "
                                 "where irq_at says; it clobbers SSE and AVX if "
                                 "irq_fpu_usable() lets it (output irq: fpu, scalar, or none "
                                 "when the run did not get there)",
                                 required=False, default=False),
                "irq_at": FieldSpec(str, "where the interrupt of irq arrives: swap -- inside "
                                    "fpu_swap_kvm_fpstate()'s fpregs_lock()ed section as the "
                                    "guest FPU is loaded, between its XRSTOR and "
                                    "fpregs_mark_activate(); exit -- while KVM handles the "
                                    "program's first intercepted exit, interrupts on, "
                                    "outside any such section; xfd -- inside "
                                    "fpu_update_guest_xfd()'s section, between fps->xfd and "
                                    "the IA32_XFD write, as KVM emulates a guest WRMSR",
                                    required=False, choices=("swap", "exit", "xfd"),
                                    default="swap")}),
    ActionSpec("kvm_enter", "KVM_RUN up to its preemption point (guest FPU loaded, VMM in the "
               "kernel): a later idle/run preempts it there",
               {"task": _VMM, "vcpu": _VCPU,
                "guest": FieldSpec(str, "the guest program", required=False, default=""),
                "at": FieldSpec(str, "the preemption point: entry -- the run loop's "
                                "cond_resched() before the guest runs; exit -- KVM handling "
                                "the program's first intercepted exit, interrupts on (a "
                                "program that exits nowhere runs to its end: output stopped)",
                                required=False, choices=kv.PREEMPT_POINTS, default="entry")}),
    ActionSpec("kvm_finish", "the suspended KVM_RUN runs the guest and returns to user mode",
               {"task": _VMM,
                "irq": FieldSpec(bool, "a hard interrupt whose handler wants the FPU arrives "
                                 "inside the next fpregs_lock()ed section the rest of the run "
                                 "reaches: fpu_swap_kvm_fpstate() putting the guest FPU back, "
                                 "between the XRSTOR of the VMM's own state and "
                                 "fpregs_mark_activate(); it clobbers SSE and AVX if "
                                 "irq_fpu_usable() lets it (output irq: fpu, scalar or none)",
                                 required=False, default=False)}),
    ActionSpec("kvm_init", "INIT latched (KVM_SET_VCPU_EVENTS) and accepted by "
               "KVM_GET_MP_STATE (kvm_apic_accept_events -> kvm_vcpu_reset(init_event))",
               {"task": _VMM, "vcpu": _VCPU}),
    ActionSpec("get_xsave", "KVM_GET_XSAVE2 of a vCPU", {"task": _VMM, "vcpu": _VCPU}),
    ActionSpec("set_xsave", "KVM_GET_XSAVE2 then KVM_SET_XSAVE of the same buffer, as a VMM "
               "saving and restoring a vCPU (snapshot, live migration): the guest must see "
               "its own values afterwards", {"task": _VMM, "vcpu": _VCPU}),
    ActionSpec("set_fpu", "KVM_SET_FPU of x87 and XMM values of the VMM's own (the legacy "
               "interface): the guest takes them only where its fpstate's XSTATE_BV has x87 "
               "and SSE, KVM's rule (the header is not touched)",
               {"task": _VMM, "vcpu": _VCPU}),
    ActionSpec("edit_xsave", "KVM_GET_XSAVE2, the VMM stores a value of its own into one "
               "component of the buffer and sets its XSTATE_BV bit, KVM_SET_XSAVE (a debugger "
               "stub writing a guest register, as QEMU's gdbstub does through the whole "
               "buffer): the guest must then see the VMM's value",
               {"task": _VMM, "vcpu": _VCPU,
                "component": FieldSpec(str, "a user component the guest was offered")}),
    ActionSpec("migrate_xsave", "KVM_GET_XSAVE2 of vCPU src, then KVM_SET_XSAVE of that "
               "buffer into vCPU vcpu (a snapshot restored into another vCPU, a migration "
               "between VMs whose CPU models may differ): on success the guest of vcpu sees "
               "src's user state, and its own PKRU where the buffer has none (KVM's ABI)",
               {"task": _VMM, "vcpu": _VCPU, "src": FieldSpec(str, "the source vCPU")}),
    ActionSpec("observe_vcpu", "what the guest would see and where its state lives (for "
               "expect:), with its fpstate's XFD and XSTATE_BV and KVM's copy of its XFD_ERR",
               {"vcpu": _VCPU}),
    ActionSpec("set_xfd_msr", "KVM_SET_MSRS of IA32_XFD by the VMM (host-initiated: a restore "
               "of saved MSRs, a debugger): the guest's contract is that of its own WRMSR "
               "(output ret: the number of MSRs written, 0 or 1)",
               {"task": _VMM, "vcpu": _VCPU,
                "value": FieldSpec(int, "the value (default 0x40000: arm TILEDATA)",
                                   required=False, default=1 << 18)}),
    ActionSpec("set_cet_msr", "KVM_SET_MSRS of an XSAVE-managed CET MSR (IA32_U_CET for "
               "cet_user, IA32_PL0_SSP for cet_kernel): the guest FPU is loaded around the "
               "WRMSR", {"task": _VMM, "vcpu": _VCPU,
                         "component": FieldSpec(str, "cet_user or cet_kernel",
                                                choices=("cet_user", "cet_kernel"))}),
)})


#: kvm_run's ``irq_at``: the site its interrupt is armed for (Cpu.irq_in_lock_site; "" is the
#: first fpregs_lock()ed section, fpu_swap_kvm_fpstate() loading the guest FPU).
KVM_RUN_IRQ_SITES = {"swap": "", "exit": kv.HANDLE_EXIT, "xfd": "fpu_update_guest_xfd"}
#: The MSRs a guest program names (wrmsr, rdmsr).
GUEST_MSRS = {"xfd": kx86.MSR_IA32_XFD, "xfd_err": kx86.MSR_IA32_XFD_ERR}


class _Eio(Exception):
    """A KVM ioctl from an mm that does not own the VM: -EIO."""


class KvmX86World(X86World):
    """The x86 kernel model with KVM loaded (see the module docstring).

    Extra configuration: ``vms`` maps a VM name to ``{vmm: <task>, vcpus: <n>,
    guest_amx: <bool>, xcr0: <mask>}`` (default ``{vm0: {vmm: p1.t0, vcpus: 1}}``; ``{}`` for
    none). At boot the VMM creates the VM and its vCPUs and sets their CPUID (guest_amx: asks
    for the guest AMX permission first; xcr0: the XSAVE features its CPU model offers, a mask
    or '|'-joined names that CPUID.(0DH,0) is cut to, as QEMU's -cpu does; default every
    supported one). ``kvm_vendor``: vmx or svm (default by the CPU's vendor).
    """

    model: ClassVar[str] = "x86"
    SPECS: ClassVar[dict[str, ActionSpec]] = KVM_SPECS
    CONFIG_KEYS: ClassVar[tuple[str, ...]] = (*X86World.CONFIG_KEYS, "vms", "kvm_vendor")
    KVM_VARIANTS: ClassVar[frozenset[str]] = frozenset(kv.KVM_VARIANTS)

    DEFAULT_VMM: ClassVar[str] = "p1.t0"  #: a VM's VMM task when its spec names none
    DEFAULT_VMS: ClassVar[dict[str, Any]] = {"vm0": {"vmm": DEFAULT_VMM, "vcpus": 1}}
    MAX_VCPUS: ClassVar[int] = 16
    #: VMs a configuration may have (a guest's writer id holds its VM's number: kv.guest_owner)
    MAX_VMS: ClassVar[int] = 64

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        super().validate_config(config)
        tasks = cls.task_names(config)
        vms = config_mapping("config.vms", config.get("vms", cls.DEFAULT_VMS))
        if len(vms) > cls.MAX_VMS:
            raise ScenarioError(f"config.vms: at most {cls.MAX_VMS} VMs, not {len(vms)}")
        for vm, spec in vms.items():
            where = f"config.vms.{vm}"
            spec = config_mapping(where, spec, ("vmm", "vcpus", "guest_amx", "xcr0"))
            vmm = config_str(f"{where}.vmm", spec.get("vmm", cls.DEFAULT_VMM))
            if vmm not in tasks:
                if "vms" not in config:
                    raise ScenarioError(
                        f"config.vms: the default VM's VMM is {vmm}, which these processes do "
                        f"not have (tasks: {', '.join(tasks) or 'none'}); give vms, or "
                        "vms: {} for none")
                raise ScenarioError(f"{where}.vmm: no task {vmm!r} "
                                    f"(tasks: {', '.join(tasks) or 'none'})")
            config_int(f"{where}.vcpus", spec.get("vcpus", 1), 0, cls.MAX_VCPUS)
            if "guest_amx" in spec:
                config_bool(f"{where}.guest_amx", spec["guest_amx"])
            if "xcr0" in spec:
                cls.offered_xcr0(where, spec["xcr0"])
        if config.get("kvm_vendor") is not None:
            config_str("config.kvm_vendor", config["kvm_vendor"], ("vmx", "svm"))

    @staticmethod
    def offered_xcr0(where: str, value: Any) -> int:
        """A VM's ``xcr0``: an int, or a mask as the command line takes it (parse_mask)."""
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ScenarioError(f"{where}.xcr0: a mask (an int, or names such as "
                                f"'x87|sse|avx'), not {value!r}")
        if isinstance(value, str):
            try:
                value = parse_mask(value)
            except MaskError as e:
                raise ScenarioError(f"{where}.xcr0: {e}") from None
        if not 0 <= value < 1 << 64:
            raise ScenarioError(f"{where}.xcr0: {value} is not a 64-bit mask")
        return value

    def _boot(self) -> Machine:
        profile = load_profile(self.config.get("cpu", "sapphire-rapids"))
        kvm_variants = frozenset({self.variant} & self.KVM_VARIANTS)
        system = kv.model_system(profile, kvm_variants, self.config.get("kernel"))
        if self._system_variants():
            system = system.with_options(variants=self._system_variants())
        if self.config.get("fixes"):
            system = system.with_options(fixes=self.config["fixes"])
        m = Machine(system, int(self.config.get("cpus", 2)))
        vendor = self.config.get("kvm_vendor") or (
            "vmx" if profile.vendor == "intel" else "svm")
        self.kvm = kv.Kvm(m, kv.model_config(system, vendor, kvm_variants))
        self.vcpus: dict[str, kv.KvmVcpu] = {}
        self.vm_mm: dict[str, Any] = {}
        #: Each vCPU's VM, by name (vm_names is by identity: for lookups before a clone).
        self.vcpu_vm: dict[str, str] = {}
        self.vm_names: dict[int, str] = {}
        self._seen_bugs = 0
        #: The KVM_RUNs suspended at their preemption point (kvm_enter), by VMM task: (vCPU,
        #: the vCPU, its ops, the guest program, where the run stopped -- kvm_enter's ``at``
        #: -- and how many of its ops had completed).
        self._pending_run: dict[str, tuple[str, kv.KvmVcpu, list[Any], str, str, int]] = {}
        #: Each guest's IA32_XFD_ERR as the guest expects to read it: set by its XFD #NMs
        #: (the CPU ORs in the component's bit), replaced by its own WRMSR.
        self.guest_xfd_err: dict[str, int] = {}
        #: Each guest's components it armed in IA32_XFD while they held a value of its own:
        #: component -> that value. The SDM does not keep an armed component's state (an
        #: XSAVE* saves it as initial), so until the guest changes the component it may read
        #: back that value or the initial configuration, nothing else (`guest_loose_ok`).
        self.guest_loose: dict[str, dict[int, bytes]] = {}
        return m

    def _setup(self) -> None:
        super()._setup()
        vms = self.config.get("vms", self.DEFAULT_VMS)
        for vm_name, spec in (vms or {}).items():
            spec = dict(spec or {})
            vmm = self.task(spec.get("vmm", self.DEFAULT_VMM))
            self.m.run(0, vmm)
            if spec.get("guest_amx"):
                self.m.syscall(0, sys_arch_prctl, ARCH_REQ_XCOMP_GUEST_PERM, 18)
            vm = kv.KvmVm(self.kvm)
            self.kvm.vms.append(vm)
            self.vm_names[id(vm)] = vm_name
            for n in range(int(spec.get("vcpus", 1))):
                name = f"{vm_name}.v{n}"
                self.do_create_vcpu(vmm.comm, vm_name, name)
                self.do_set_cpuid(vmm.comm, name)
                self.do_set_xcr0(vmm.comm, name)
            self.m.idle(0)
        self.emitted = []

    # -- lookups -----------------------------------------------------------------------------

    def vcpu(self, name: Any) -> kv.KvmVcpu:
        v = self.vcpus.get(name)
        if v is None:
            raise StepError(f"no vCPU {name!r} (vCPUs: {', '.join(self.vcpus) or 'none'})")
        return v

    def vm(self, name: str) -> kv.KvmVm:
        for vm in self.kvm.vms:
            if self.vm_names[id(vm)] == name:
                return vm
        raise StepError(f"no VM {name!r}")

    def vmm_cpu(self, task: str, vcpu: str | None = None) -> tuple[Task, int]:
        """The VMM task and its CPU for an ioctl on ``vcpu``. A VM belongs to the mm that
        created it: from any other mm (another process, or the same one after execve) the
        ioctl fails with EIO (kvm_vcpu_ioctl: kvm->mm != current->mm), which `_Eio`
        carries to the action."""
        t = self.task(task)
        nr = self.user_cpu(t)
        if vcpu is not None:
            self.vcpu(vcpu)
            if self.vm_mm[vcpu] is not t.process.mm:
                raise _Eio()
        return t, nr

    def name_of_owner(self, owner: int) -> str:
        if owner & GUEST_OWNER and owner != core.KERNEL_OWNER:
            for name, v in self.vcpus.items():
                if kv.guest_owner(v) == owner:
                    return name
        return super().name_of_owner(owner)

    def fpstates(self) -> list[tuple[str, Fpstate, Task | None]]:
        out = super().fpstates()
        for name, v in self.vcpus.items():
            out.append((f"{name} (guest fpstate)", v.arch.guest_fpu.fpstate,
                        self._vmm_task(name)))
        return out

    def _vmm_task(self, vcpu: str) -> Task | None:
        """A live task of the mm that owns ``vcpu``'s VM (None once that mm is gone)."""
        mm = self.vm_mm.get(vcpu)
        for t in self.live():
            if t.process.mm is mm:
                return t
        return None

    def guest_tracked(self, v: kv.KvmVcpu) -> tuple[int, ...]:
        """The components a guest's values are compared in: x87 and SSE (every guest has
        them, XSAVE or not: KVM keeps them in user_xfeatures whatever its CPUID says), its
        XCR0 and XSS features the guest fpstate holds, and PKRU (vcpu->arch.pkru) where the
        host has OSPKE and the guest may enable PKRU."""
        caps = self.kvm.caps
        mask = (v.arch.guest_supported_xcr0 | XFEATURE_MASK_FPSSE) & ~XFEATURE_MASK_PKRU
        mask |= caps.supported_xss & v.arch.guest_supported_xss
        out = tuple(bits(mask & v.arch.guest_fpu.fpstate.xfeatures))
        if self.pkru_tracked and v.arch.guest_supported_xcr0 & XFEATURE_MASK_PKRU:
            out += (PKRU,)
        return out

    def expected_value(self, name: str, i: int) -> bytes:
        """A guest without a value of its own expects the initial configuration (PKRU 0, as
        vcpu->arch.pkru starts), a task what `X86Views.expected_value` says."""
        if name in self.vcpus:
            v = self.expected[name].get(i)
            return v if v is not None else self.init_values[i]
        return super().expected_value(name, i)

    def guest_seen(self, name: str) -> dict[int, bytes]:
        """What the guest of ``name`` would see: its fpstate's image, or -- while KVM_RUN has
        it loaded -- wherever the VMM task's current state lives."""
        v = self.vcpu(name)
        fps = v.arch.guest_fpu.fpstate
        t = self._loaded_in(fps)
        out = self.seen(t) if t is not None else self.image(fps)
        if not self.pkru_tracked:
            return out
        # The guest's PKRU is vcpu->arch.pkru between steps: KVM loads it right before VM
        # entry and saves it right after the exit, with no preemption point between.
        return with_pkru(out, pkru_bytes(v.arch.pkru))

    def guest_where(self, name: str) -> tuple[str, int | None]:
        t = self._loaded_in(self.vcpu(name).arch.guest_fpu.fpstate)
        if t is not None:
            return self.where(t)
        return WHERE_MEMORY, None

    def _loaded_in(self, fps: Fpstate) -> Task | None:
        """The task that has guest fpstate ``fps`` swapped in (inside KVM_RUN), if any."""
        if not fps.in_use:
            return None
        for t in self.live():
            if t.fpu.fpstate is fps:
                return t
        return None

    @staticmethod
    def guest_owner(v: kv.KvmVcpu) -> int:
        """The writer id of what the guest of ``v`` writes (kv.guest_owner)."""
        return kv.guest_owner(v)

    def _token(self, v: kv.KvmVcpu, i: int) -> bytes:
        self.m.generation += 1
        return token(kv.guest_owner(v), self.m.generation, i,
                     self.m.system.profile.component(i).size)

    def _apply(self, action: Action) -> dict[str, V]:
        try:
            return super()._apply(action)
        except _Eio:
            return {"ret": -5, "errno": "EIO"}
        finally:
            for name, loose in self.guest_loose.items():
                if loose:  # an allowance ends with the value it was given for
                    exp = self.expected.get(name, {})
                    for i in [i for i, own in loose.items() if exp.get(i) != own]:
                        del loose[i]
            if self._pending_run:
                for task in list(self._pending_run):
                    t = self.tasks.get(task)
                    if t is None or t.kpath is None or (
                            t.kpath.__qualname__ != "kvm_arch_vcpu_ioctl_run"):
                        del self._pending_run[task]  # its thread died in KVM_RUN (kill_in_path)

    # -- checks ------------------------------------------------------------------------------

    def event_key(self) -> Any:
        """As X86World's; a bug the KVM model reported in this step is judged too."""
        if len(self.kvm.violations) + len(self.kvm.warnings) != self._seen_bugs:
            return None
        return super().event_key()

    def check(self) -> list[Any]:
        out = []
        bugs = self.kvm.violations + self.kvm.warnings
        for b in bugs[self._seen_bugs:]:
            out.append(invariants.violation_for_bug(b.name, b.detail))
        self._seen_bugs = len(bugs)
        return out + super().check()

    # -- actions -----------------------------------------------------------------------------

    def do_create_vcpu(self, task: str, vm: str, vcpu: str) -> dict[str, V]:
        t, nr = self.vmm_cpu(task)
        if vcpu in self.vcpus:
            raise StepError(f"vCPU name {vcpu!r} is taken")
        kvm_vm = self.vm(vm)
        v = self.m.syscall(nr, _path(kv.kvm_arch_vcpu_create), kvm_vm, len(kvm_vm.vcpus))
        self.vcpus[vcpu] = v
        self.vcpu_vm[vcpu] = vm
        self.vm_mm[vcpu] = t.process.mm
        self.expected[vcpu] = {}
        self.guest_xfd_err[vcpu] = 0
        self.guest_loose[vcpu] = {}
        self.emitted.append(("reset", (vcpu, v)))
        return {"size": v.arch.guest_fpu.fpstate.size,
                "xfeatures": v.arch.guest_fpu.fpstate.xfeatures}

    def do_set_cpuid(self, task: str, vcpu: str) -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        entries = self.m.syscall(nr, _path(kv.kvm_dev_get_supported_cpuid_0xd), self.kvm)
        vm_spec = (self.config.get("vms", self.DEFAULT_VMS) or {}).get(
            self.vcpu_vm.get(vcpu)) or {}
        if "xcr0" in vm_spec:  # the VMM's CPU model offers fewer features
            entries = offer_xcr0(entries, self.offered_xcr0("config.vms", vm_spec["xcr0"]))
        ret = self.m.syscall(nr, kv.kvm_vcpu_ioctl_set_cpuid2, v, entries)
        v.arch.cr4_osxsave = True  # KVM_SET_SREGS: the guest OS enables XSAVE
        return {"ret": ret, "xcr0_supported": v.arch.guest_supported_xcr0}

    def do_set_xcr0(self, task: str, vcpu: str) -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        xcr0 = v.arch.guest_supported_xcr0 | XFEATURE_MASK_FP
        ret = self.m.syscall(nr, _path(lambda c: kx86.kvm_vcpu_ioctl_x86_set_xcrs(
            v, [(0, xcr0)])))
        return {"ret": ret}

    def _guest_ops(self, v: kv.KvmVcpu, program: str) -> list[tuple[kv.GuestOp, int | None]]:
        ops: list[tuple[kv.GuestOp, int | None]] = []
        for part in (p.strip() for p in program.split(";")):
            if not part:
                continue
            word, _, arg = part.partition(" ")
            arg = arg.strip()
            if word == "write":
                i = component_number(arg)
                ops.append((kv.GuestOp("write", i, data=self._token(v, i)), i))
            elif word == "read":
                ops.append((kv.GuestOp("read", component_number(arg)), None))
            elif word == "ldmxcsr":  # one of the guest's two MXCSR values, in turn
                name = next(n for n, x in self.vcpus.items() if x is v)
                value = next_mxcsr_token(kv.guest_owner(v), self.expected[name].get(MXCSR))
                ops.append((kv.GuestOp("ldmxcsr", value=value), MXCSR))
            elif word == "release":
                mask = sum(1 << component_number(x.strip()) for x in arg.split("|"))
                ops.append((kv.GuestOp("release", value=mask), None))
            elif word == "xsetbv":
                ops.append((kv.GuestOp("xsetbv", 0, v.arch.guest_supported_xcr0
                                       | XFEATURE_MASK_FP), None))
            elif word == "init":
                ops.append((kv.GuestOp("init"), None))
            elif word in ("wrmsr", "rdmsr"):
                ops.append((self._guest_msr_op(word, arg, part), None))
            else:
                raise StepError(f"unknown guest op {part!r}")
        return ops

    @staticmethod
    def _guest_msr_op(word: str, arg: str, part: str) -> kv.GuestOp:
        """'wrmsr <msr> <value>' or 'rdmsr <msr>' of a guest program (`GUEST_MSRS`)."""
        name, _, value = arg.partition(" ")
        index = GUEST_MSRS.get(name)
        if index is None:
            raise StepError(f"guest op {part!r}: unknown MSR {name!r} "
                            f"(known: {', '.join(GUEST_MSRS)})")
        value = value.strip()
        if word == "rdmsr":
            if value:
                raise StepError(f"guest op {part!r}: rdmsr takes an MSR name only")
            return kv.GuestOp("rdmsr", index)
        try:
            data = int(value, 0)
        except ValueError:
            raise StepError(f"guest op {part!r}: wrmsr needs an MSR name and an integer "
                            f"value (e.g. 'wrmsr xfd 0x40000')") from None
        if not 0 <= data < 1 << 64:
            raise StepError(f"guest op {part!r}: {data:#x} is not a 64-bit MSR value")
        return kv.GuestOp("wrmsr", index, data)

    def guest_loose_ok(self, name: str, i: int, got: bytes | None) -> bool:
        """Whether ``got`` is what the guest of ``name`` may read in component ``i`` that it
        armed in IA32_XFD with a value of its own (`guest_loose`): that value's initial
        configuration (a save while armed dropped it). A later change of the component's
        expected value ends the allowance (`_apply`)."""
        own = self.guest_loose[name].get(i)
        return own is not None and got == self.init_values[i]

    def _guest_contract(self, name: str, v: kv.KvmVcpu,
                        ops: list[tuple[kv.GuestOp, int | None]], results: tuple[Any, ...]) -> None:
        exp = self.expected[name]
        for (op, i), r in zip(ops, results, strict=False):
            if op.kind in ("wrmsr", "rdmsr") or (op.kind == "write" and r is not None):
                self._guest_msr_contract(name, op, i, r)
            elif op.kind == "ldmxcsr" and r is None:
                exp[MXCSR] = op.value.to_bytes(4, "little")
            elif op.kind == "write" and r is None and i is not None:
                exp[i] = op.data  # type: ignore[assignment]
                if i == 17:  # LDTILECFG puts TILEDATA in its initial configuration
                    exp.pop(18, None)
            elif op.kind == "release":
                for b in bits(op.value & v.arch.xcr0):
                    exp.pop(b, None)
                if op.value & v.arch.xcr0 & XFEATURE_MASK_SSE:  # SSE's initial MXCSR too
                    exp.pop(MXCSR, None)
            elif op.kind == "init":
                self._init_contract(name)

    def _guest_msr_contract(self, name: str, op: kv.GuestOp, i: int | None, r: Any) -> None:
        """IA32_XFD and IA32_XFD_ERR as the guest of ``name`` sees them (SDM 13.14): an XFD
        #NM sets the component's bit in XFD_ERR, the guest's WRMSR XFD_ERR replaces it, and
        its RDMSR must read what those left (an event no-lost-write judges); arming a
        component that holds a value of the guest's loosens it (`guest_loose`)."""
        if op.kind == "write":
            if i is not None and getattr(r, "vector", None) == "#NM":
                self.guest_xfd_err[name] |= 1 << i
        elif op.kind == "wrmsr" and r is None:
            if op.number == kx86.MSR_IA32_XFD_ERR:
                self.guest_xfd_err[name] = op.value
            elif op.number == kx86.MSR_IA32_XFD:
                exp, loose = self.expected[name], self.guest_loose[name]
                for b in bits(op.value):
                    own = exp.get(b)
                    if own is not None and loose.get(b) != own:
                        loose[b] = own
        elif (op.kind == "rdmsr" and op.number == kx86.MSR_IA32_XFD_ERR
              and isinstance(r, int) and r != self.guest_xfd_err[name]):
            self.emitted.append(("guest_msr", (name, "IA32_XFD_ERR", r,
                                               self.guest_xfd_err[name])))

    def _init_contract(self, name: str) -> None:
        caps = self.kvm.caps
        for b in bits((caps.supported_xcr0 | caps.supported_xss) & ARCH_INIT_CLEARED):
            self.expected[name].pop(b, None)

    def do_kvm_run(self, task: str, vcpu: str, guest: str, irq: bool = False,
                   irq_at: str = "swap") -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        ops = self._guest_ops(v, guest)
        prog = tuple(op for op, _ in ops)
        result, out = self._irq_in_lock(
            nr, irq, lambda: self.m.syscall(nr, kv.kvm_arch_vcpu_ioctl_run, v, prog),
            KVM_RUN_IRQ_SITES[irq_at])
        return {**self._after_run(vcpu, v, ops, result), **out}

    def _after_run(self, name: str, v: kv.KvmVcpu, ops: list[tuple[kv.GuestOp, int | None]],
                   result: kv.RunResult) -> dict[str, V]:
        self._guest_contract(name, v, ops, result.results)
        inits = [n for n, (op, _) in enumerate(ops) if op.kind == "init"]
        if inits:
            # INIT inside KVM_RUN: the components it clears must read as initial afterwards
            # unless the guest wrote them after the INIT (the state before is not observable
            # from here, so "everything else unchanged" is checked by the no-lost-write
            # contract instead).
            rewritten = {i for op, i in ops[inits[-1] + 1:] if op.kind == "write" and i is not None}
            self.emitted.append(("init", (name, v, None, self.guest_seen(name), rewritten)))
        faults = [r.vector for r in result.results if hasattr(r, "vector")]
        return {"faults": ",".join(faults) or "none",
                "overflow": 0 if result.overflow is None else result.overflow.bytes_beyond}

    def do_kvm_enter(self, task: str, vcpu: str, guest: str = "",
                     at: str = "entry") -> dict[str, V]:
        t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        ops = self._guest_ops(v, guest)
        self.m.enter_kernel(nr)
        done: list[Any] = []
        self.m.start(nr, kv.kvm_arch_vcpu_ioctl_run, v, tuple(op for op, _ in ops), at, done)
        if t.kpath is None:  # at: exit, and the program exited nowhere: the run is over
            result = t.kresult
            self.m.exit_to_user_mode(nr)
            return {"stopped": False, **self._after_run(vcpu, v, ops, result)}
        # Stopped inside the program: the guest expects what the ops before the exit did.
        self._guest_contract(vcpu, v, ops[:len(done)], tuple(done))
        self._pending_run[task] = (vcpu, v, ops, guest, at, len(done))
        return {"stopped": True} if at == "exit" else {}

    def do_kvm_finish(self, task: str, irq: bool = False) -> dict[str, V]:
        t = self.task(task)
        pending = self._pending_run.get(task)
        if t.kpath is None or pending is None or t.on_cpu is None or task in self.nm_pending:
            raise StepError(f"{task} has no KVM_RUN in progress on a CPU")
        nr = t.on_cpu
        result, out = self._irq_in_lock(nr, irq, lambda: self.m.finish(nr))
        self.m.exit_to_user_mode(nr)
        del self._pending_run[task]
        name, v, ops, _guest, _at, before = pending
        rest = kv.RunResult(result.results[before:], result.overflow)
        return {**self._after_run(name, v, ops[before:], rest), **out}

    def do_kvm_init(self, task: str, vcpu: str) -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        before = self.guest_seen(vcpu)
        v.pending_init = True
        cleared = self.m.syscall(nr, _path(kv.kvm_apic_accept_events), v)
        self._init_contract(vcpu)
        self.emitted.append(("init", (vcpu, v, before, self.guest_seen(vcpu), set())))
        return {"cleared": cleared}

    def _get_xsave2(self, nr: int, name: str, v: kv.KvmVcpu) -> bytes:
        """KVM_GET_XSAVE2 of ``v`` from CPU ``nr``, emitted for the invariants that judge what
        a VMM is shown (nothing-beyond-advertised, regset-view-shows-the-task), with what
        the guest holds and the components it armed in its XFD holding a value of its own
        (`guest_loose`: they may show as initial)."""
        buf = self.m.syscall(nr, _path(kx86.kvm_arch_vcpu_ioctl_get_xsave2), v)
        self.emitted.append(("kvm_uabi", (name, v, buf, self._guest_held(name, v),
                                          frozenset(self.guest_loose[name]))))
        return buf

    def _guest_held(self, name: str, v: kv.KvmVcpu) -> dict[int, bytes]:
        """What the guest of ``name`` holds by the contract, now: its expected value of every
        component it is compared in, and its MXCSR (for regset-view-shows-the-task, which
        judges a buffer against what the guest held when the VMM read it)."""
        out = {i: self.expected_value(name, i) for i in self.guest_tracked(v)}
        out[MXCSR] = self.expected[name].get(MXCSR, MXCSR_INIT)
        return out

    def do_get_xsave(self, task: str, vcpu: str) -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        buf = self._get_xsave2(nr, vcpu, v)
        return {"size": len(buf), "xstate_bv": int.from_bytes(buf[512:520], "little")}

    def do_set_xsave(self, task: str, vcpu: str) -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        buf = self._get_xsave2(nr, vcpu, v)
        ret = self.m.syscall(nr, _path(kx86.kvm_arch_vcpu_ioctl_set_xsave), v, buf)
        # The guest's expected values stay as they were: the buffer is its own state.
        return {"ret": ret, "xstate_bv": int.from_bytes(buf[512:520], "little")}

    def _editable(self, v: kv.KvmVcpu) -> tuple[int, ...]:
        """The components a VMM's edit of a vCPU's buffer may set: the user components the
        guest's values are compared in (`guest_tracked`, supervisor state aside: it is not in
        a UABI buffer)."""
        return tuple(i for i in self.guest_tracked(v)
                     if not (XFEATURE_MASK_SUPERVISOR_ALL >> i) & 1)

    def do_edit_xsave(self, task: str, vcpu: str, component: str) -> dict[str, V]:
        """KVM_GET_XSAVE2, one component of the buffer replaced by a value of ``task``'s own
        (x87 without MXCSR and MXCSR_MASK, which stay the buffer's) with its XSTATE_BV bit
        set, KVM_SET_XSAVE. On success the guest expects that value (PKRU: vcpu->arch.pkru
        takes it, the header having PKRU) -- or, for a component its XFD arms, the initial
        configuration (KVM clears the bit since b45f72177594) -- and the MXCSR the kernel's
        rule gives
        (`_mxcsr_after_uabi_set`: an edit of SSE hands a compacted kernel's stale MXCSR back).
        """
        t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        i = component_number(component)
        if i not in self._editable(v):
            raise StepError(f"{component} is not a user component {vcpu}'s guest was offered")
        buf = bytearray(self._get_xsave2(nr, vcpu, v))
        t.generation += 1
        comp = self.m.system.profile.component(i)
        value = token(t.pid, t.generation, i, comp.size)
        if i == 0:  # the legacy x87 bytes around MXCSR and MXCSR_MASK (24..31)
            buf[0:24] = value[:24]
            buf[32:160] = value[32:160]
        else:
            buf[comp.offset:comp.offset + comp.size] = value
        bv = int.from_bytes(buf[512:520], "little") | 1 << i
        buf[512:520] = bv.to_bytes(8, "little")
        armed = v.arch.guest_fpu.fpstate.xfd
        ret = self.m.syscall(nr, _path(kx86.kvm_arch_vcpu_ioctl_set_xsave), v, bytes(buf))
        if ret == 0:
            if (armed >> i) & 1:
                # KVM's ABI since b45f72177594: a component the guest's XFD arms takes its
                # initial configuration, whatever the buffer says (as XSAVE would save it).
                self.expected[vcpu].pop(i, None)
            else:
                self.expected[vcpu][i] = value
            self._mxcsr_after_uabi_set(vcpu, bytes(buf[MXCSR_OFFSET:MXCSR_OFFSET + 4]), bv)
        return {"ret": ret, "xstate_bv": bv}

    def do_set_fpu(self, task: str, vcpu: str) -> dict[str, V]:
        """KVM_SET_FPU of x87 and XMM values of ``task``'s own (the legacy interface: QEMU's
        without XSAVE, rust-vmm's ``set_fpu``). The contract is KVM's rule
        (kvm_arch_vcpu_ioctl_set_fpu): the fields go into the guest fpstate's legacy area and
        XSTATE_BV stays as it is, so the guest takes the x87 values only where the header has
        x87 and the XMM registers only where it has SSE -- elsewhere the next XRSTOR gives it
        the initial configuration and the write is lost; byte 5 of the image (after the
        abridged tag word) becomes 0; MXCSR is not written."""
        t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        t.generation += 1
        x87 = bytearray(token(t.pid, t.generation, 0, 160))
        sse = token(t.pid, t.generation, 1, 256)
        hdr = int.from_bytes(v.arch.guest_fpu.fpstate.regs[512:520], "little")
        ret = self.m.syscall(nr, _path(kx86.kvm_arch_vcpu_ioctl_set_fpu), v,
                             kx86.kvm_fpu_of(bytes(x87) + sse))
        if ret == 0:
            x87[kx86.FTW_OFFSET + 1] = 0
            self._set_fpu_contract(vcpu, v, hdr, bytes(x87), sse)
        return {"ret": ret, "xstate_bv": hdr}

    def _set_fpu_contract(self, name: str, v: kv.KvmVcpu, hdr: int, x87: bytes,
                          sse: bytes) -> None:
        """KVM's rule for a KVM_SET_FPU of ``x87`` and ``sse`` into a guest fpstate whose
        XSTATE_BV is ``hdr``: each reaches the guest only where the header has it."""
        tracked = self.guest_tracked(v)
        for i, value in ((0, x87), (1, sse)):
            if hdr >> i & 1 and i in tracked:
                self.expected[name][i] = value

    def do_migrate_xsave(self, task: str, vcpu: str, src: str) -> dict[str, V]:
        """KVM_GET_XSAVE2 of ``src`` and KVM_SET_XSAVE of the buffer into ``vcpu``, both from
        ``task``'s mm. The contract on success (fpu_copy_uabi_to_guest_fpstate): every user
        component ``vcpu``'s guest can use takes ``src``'s value where ``src``'s guest can use
        it too, else its initial configuration (the buffer does not hold it: KVM_GET_XSAVE2
        masks with the source's guest_supported_xcr0), MXCSR included; a component
        ``vcpu``'s XFD arms takes its initial configuration (KVM_SET_XSAVE clears its header
        bit since b45f72177594); one that ``src`` holds loosely (`guest_loose`: armed with a
        value, so its image may have dropped it) is loose in ``vcpu`` too; PKRU takes ``src``'s
        where the buffer's XSTATE_BV has PKRU and is left as it was otherwise (KVM passes a
        NULL PKRU pointer); so is MXCSR on a standard-format kernel when XSTATE_BV has none
        of x87, SSE and AVX, unless the proposed fix mxcsr_by_format is applied; supervisor
        state (CET) is not in the buffer and stays. On an error nothing changes."""
        if src == vcpu:
            raise StepError("migrate_xsave: src must be another vCPU (set_xsave is the same "
                            "vCPU's round trip)")
        self.vmm_cpu(task, src)
        _t, nr = self.vmm_cpu(task, vcpu)
        vs, vd = self.vcpu(src), self.vcpu(vcpu)
        buf = self._get_xsave2(nr, src, vs)
        armed = vd.arch.guest_fpu.fpstate.xfd
        ret = self.m.syscall(nr, _path(kx86.kvm_arch_vcpu_ioctl_set_xsave), vd, buf)
        hdr = int.from_bytes(buf[512:520], "little")
        if ret == 0:
            self._migrate_contract(vcpu, vd, src, vs, hdr, armed)
        return {"ret": ret, "xstate_bv": hdr}

    def _migrate_contract(self, name: str, v: kv.KvmVcpu, src: str, vs: kv.KvmVcpu,
                          hdr: int, armed: int = 0) -> None:
        exp, sexp = self.expected[name], self.expected[src]
        loose, sloose = self.guest_loose[name], self.guest_loose[src]
        src_user = set(self.guest_tracked(vs)) - {PKRU}
        for i in self.guest_tracked(v):
            if (XFEATURE_MASK_SUPERVISOR_ALL >> i) & 1:
                continue  # supervisor state (CET): not in a UABI buffer
            if i == PKRU:
                if hdr & XFEATURE_MASK_PKRU:
                    exp[i] = self.expected_value(src, PKRU)
                continue
            if (armed >> i) & 1:
                exp.pop(i, None)  # armed in the destination's XFD: initial (b45f72177594)
            elif i in src_user and i in sexp:
                exp[i] = sexp[i]
                if sloose.get(i) == sexp[i]:
                    loose[i] = sexp[i]  # the source's value or its initial configuration
            else:
                exp.pop(i, None)
        s = self.m.system
        if (not hdr & 0x7 and not s.xcompacted
                and not mxcsr_by_format(s)):
            # copy_uabi_to_xstate() copies MXCSR only with x87, SSE or AVX in the header, and
            # a standard-format XRSTOR loads MXCSR from the image whatever XSTATE_BV says: the
            # guest keeps its old MXCSR (a compacted XRSTORS gives 1F80H). Found by the
            # explorer on Haswell; kept here as the kernel's rule (kvm-findings), as PKRU's is.
            # The proposed fix mxcsr_by_format stores the buffer's MXCSR whatever the header
            # says (found missing here by campaign x86-kernels, Haswell with two vCPUs).
            return
        if MXCSR in sexp:
            exp[MXCSR] = sexp[MXCSR]
        else:
            exp.pop(MXCSR, None)

    def do_observe_vcpu(self, vcpu: str) -> dict[str, V]:
        v = self.vcpu(vcpu)
        where, cpu = self.guest_where(vcpu)
        fps = v.arch.guest_fpu.fpstate
        out: dict[str, V] = {"where": where, "cpu": -1 if cpu is None else cpu,
                             "xfeatures": fps.xfeatures, "size": fps.size,
                             "xcr0": v.arch.xcr0, "xfd": fps.xfd,
                             "xfd_err": v.arch.guest_fpu.xfd_err,
                             "xstate_bv": fps.xstate_bv}
        seen = self.guest_seen(vcpu)
        for i in self.guest_tracked(v):
            out[BY_NUMBER[i].short] = self.writer(seen[i], i)
        out["mxcsr"] = int.from_bytes(seen[MXCSR], "little")
        return out

    def do_set_cet_msr(self, task: str, vcpu: str, component: str) -> dict[str, V]:
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        i = component_number(component)
        if not (v.arch.guest_supported_xss >> i) & 1:
            return {"ret": 1}  # kvm_set_msr_common: not supported for this guest
        value = self._token(v, i)

        def set_msr(c: Any) -> int:
            kfpu.kvm_load_guest_fpu(c, v)
            c.regs.set_component(i, value)  # WRMSR of the XSAVE-managed MSR
            kfpu.kvm_put_guest_fpu(c, v)
            return 0

        ret = self.m.syscall(nr, _path(set_msr))
        self.expected[vcpu][i] = value
        return {"ret": ret}

    def do_set_xfd_msr(self, task: str, vcpu: str, value: int = 1 << 18) -> dict[str, V]:
        """KVM_SET_MSRS of IA32_XFD = ``value`` from the VMM (host-initiated: a restore, a
        debugger). The guest's contract is that of its own WRMSR: a component the write arms
        while it holds a value of the guest's may read back as initial (`guest_loose`)."""
        _t, nr = self.vmm_cpu(task, vcpu)
        v = self.vcpu(vcpu)
        written = self.m.syscall(nr, _path(kx86.kvm_vcpu_ioctl_set_msrs), v,
                                 [(kx86.MSR_IA32_XFD, value)])
        if written == 1:
            self._guest_msr_contract(vcpu, kv.GuestOp("wrmsr", kx86.MSR_IA32_XFD, value),
                                     None, None)
        return {"ret": written}

    # -- exploration -------------------------------------------------------------------------

    #: "xsetbv; write pkru": PKRU in the guest's XCR0 but CR4.PKE clear, so XRSTOR writes it.
    GUEST_PROGRAMS: ClassVar[tuple[str, ...]] = ("write avx", "write opmask", "write xtiledata",
                                                 "xsetbv; write avx", "xsetbv; write pkru",
                                                 "init", "read avx", "ldmxcsr")
    #: A guest OS's use of XFD for AMX (Linux's own, as a guest), offered where the guest has
    #: TILEDATA: switch to a task that has not used AMX (arm), the same with that task's first
    #: TILEDATA access (#NM in the same entry), and the #NM handler (read and clear XFD_ERR,
    #: disarm, retry the access).
    GUEST_XFD_PROGRAMS: ClassVar[tuple[str, ...]] = (
        "wrmsr xfd 0x40000", "wrmsr xfd 0x40000; write xtiledata",
        "rdmsr xfd_err; wrmsr xfd_err 0; wrmsr xfd 0; write xtiledata")

    def enabled(self) -> list[Action]:
        out = super().enabled()
        A = Action.of
        for name, v in self.vcpus.items():
            t = self._vmm_task(name)
            if t is None:
                continue
            mm = self.vm_mm[name]
            if t.state is STATE_USER and t.process.mm is mm:
                xcr0, xss = v.arch.guest_supported_xcr0, v.arch.guest_supported_xss
                # These depend only on the names and the guest's supported XCR0/XSS: built
                # once (Actions are interned values).
                # The other vCPUs of this VMM's mm: sources a migration may take from.
                srcs = tuple(n for n in self.vcpus if n != name and self.vm_mm[n] is mm)
                edits = self._editable(v)
                k = (t.comm, name, xcr0, xss, self.GUEST_PROGRAMS, self.GUEST_XFD_PROGRAMS,
                     srcs, edits)
                acts = _VMM_ACTIONS.get(k)
                if acts is None:
                    acts = []
                    for prog in self.GUEST_PROGRAMS:
                        comps = [w.split()[1] for w in prog.split(";")
                                 if w.split()[0] == "write"]
                        if all((xcr0 >> component_number(c)) & 1 for c in comps):
                            acts.append(A("kvm_run", task=t.comm, vcpu=name, guest=prog))
                    acts.append(A("kvm_run", task=t.comm, vcpu=name, guest="read avx",
                                  irq=True))
                    acts.append(A("kvm_run", task=t.comm, vcpu=name, guest="write avx; xsetbv",
                                  irq=True, irq_at="exit"))
                    if (xcr0 >> 18) & 1:
                        for prog in self.GUEST_XFD_PROGRAMS:
                            acts.append(A("kvm_run", task=t.comm, vcpu=name, guest=prog))
                        for at in ("exit", "xfd"):
                            acts.append(A("kvm_run", task=t.comm, vcpu=name,
                                          guest="wrmsr xfd 0x40000", irq=True, irq_at=at))
                        for prog in ("wrmsr xfd 0x40000", "write xtiledata"):
                            acts.append(A("kvm_enter", task=t.comm, vcpu=name, guest=prog,
                                          at="exit"))
                        acts.append(A("set_xfd_msr", task=t.comm, vcpu=name))
                    acts.append(A("kvm_enter", task=t.comm, vcpu=name, guest="write avx"))
                    # Preempted while KVM handles an exit: programs with one op that can exit,
                    # so that where the run stopped is the program's and the state's to say.
                    acts.append(A("kvm_enter", task=t.comm, vcpu=name, guest="write avx; xsetbv",
                                  at="exit"))
                    acts.append(A("kvm_init", task=t.comm, vcpu=name))
                    acts.append(A("get_xsave", task=t.comm, vcpu=name))
                    acts.append(A("set_xsave", task=t.comm, vcpu=name))
                    acts.append(A("set_fpu", task=t.comm, vcpu=name))
                    for src in srcs:
                        acts.append(A("migrate_xsave", task=t.comm, vcpu=name, src=src))
                    for i in edits:
                        acts.append(A("edit_xsave", task=t.comm, vcpu=name,
                                      component=BY_NUMBER[i].short))
                    acts.append(A("set_cpuid", task=t.comm, vcpu=name))
                    for comp in ("cet_user", "cet_kernel"):
                        if (xss >> component_number(comp)) & 1:
                            acts.append(A("set_cet_msr", task=t.comm, vcpu=name,
                                          component=comp))
                    acts.append(A("arch_prctl", task=t.comm, option="req_guest_perm",
                                  feature=18))
                    if len(_VMM_ACTIONS) > 10_000:
                        _VMM_ACTIONS.clear()
                    _VMM_ACTIONS[k] = acts = tuple(acts)
                out.extend(acts)
            elif (t.comm in self._pending_run and t.kpath is not None and t.on_cpu is not None
                  and t.comm not in self.nm_pending and self.m.cpus[t.on_cpu].current is t
                  and self._pending_run[t.comm][0] == name):  # once, for its vCPU
                out.append(A("kvm_finish", task=t.comm))
                out.append(A("kvm_finish", task=t.comm, irq=True))
        return out

    def extra_key(self, cn: Any) -> Hashable:
        out = []
        for name in sorted(self.vcpus):
            v = self.vcpus[name]
            a = v.arch
            fps = a.guest_fpu.fpstate
            exp = regs_values(cn, self.expected[name])
            # The process whose mm owns the VM (-1: none, as after its exec): KVM ioctls from
            # any other return EIO.
            vmm = self._vmm_task(name)
            user_fpu = a.user_fpu  # variant kvm-save-min-size only
            out.append((name, -1 if vmm is None else vmm.process.tgid, _ARCH_FIELDS(a),
                        pkru_value(cn, a.pkru), pkru_value(cn, a.host_pkru),
                        _cpuid_key(a.cpuid), v.pending_init, v.wants_to_run,
                        v.last_vmentry_cpu != -1, _GUEST_FPU_FIELDS(a.guest_fpu),
                        (fps.size, fps.xfeatures, fps.xfd, fps.xstate_bv, fps.in_use,
                         fps_values(cn, self.m.system, fps)), exp,
                        None if user_fpu is None else (
                            user_fpu.size, fps_values(cn, self.m.system, user_fpu),
                            bytes(user_fpu.regs[512:528]), raw_digest(bytes(a.user_fpu_tail))),
                        self.guest_xfd_err[name], regs_values(cn, self.guest_loose[name])))
        pending = tuple(sorted((task, p[0], p[3], p[4], p[5])
                               for task, p in self._pending_run.items()))
        return tuple(out), pending

    def frame(self, action: str, violation: str | None, detail: str = "") -> Frame:
        f = super().frame(action, violation, detail)
        ctxs = list(f.contexts)
        for name in self.vcpus:
            where, cpu = self.guest_where(name)
            seen = self.guest_seen(name)
            writers = tuple((BY_NUMBER[i].short, self.writer(seen[i], i))
                            for i in self.guest_tracked(self.vcpus[name])
                            if i in seen and self.writer(seen[i], i) != "init")
            note = f"guest fpstate {self.vcpus[name].arch.guest_fpu.fpstate.size} B"
            ctxs.append(ContextView(name, where, cpu, writers, (), note))
        return Frame(f.step, f.action, f.cpus, tuple(ctxs), f.violation, f.detail)


#: The plain fields of a vCPU's kvm_vcpu_arch and guest FPU in its key (statekey.FIELDS).
#: PKRU and the host's PKRU go in apart (statekey.pkru_value: a guest's token is ranked).
_ARCH_FIELDS = attrgetter("xcr0", "ia32_xss", "guest_supported_xcr0",
                          "guest_supported_xss", "cpuid_dynamic_bits_dirty",
                          "xfd_no_write_intercept", "nm_intercepted", "cr4_osxsave",
                          "cr4_pke", "cr0_ts")
_GUEST_FPU_FIELDS = attrgetter("xfeatures", "xfd_err", "uabi_size")


def _cpuid_key(entries: Any) -> int:
    """A vCPU's CPUID entries in the key: the digest of them as plain tuples, made once per
    tuple of entries (immutable: nothing to witness)."""
    got = _CPUID_KEYS.get(entries, ())
    if got is None:
        got = _CPUID_KEYS.put(entries, (), digest(tuple(
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries)))
    return got


_CPUID_KEYS = IdentityMemo(1024)

#: (VMM task, vCPU, guest XCR0, guest XSS, guest programs, migration sources, editable
#: components) -> the VMM's vCPU actions.
_VMM_ACTIONS: dict[tuple[Any, ...], tuple[Action, ...]] = {}

__all__ = ["ARCH_INIT_CLEARED", "GUEST_OWNER", "KVM_SPECS", "KvmX86World"]
