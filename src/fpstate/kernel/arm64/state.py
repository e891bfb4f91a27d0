"""Data of the arm64 host FP model: the structures of processor.h, fpsimd.h and thread_info.h.

Linux v6.17: ``struct thread_struct`` (uw.fpsimd_state, uw.fpmr, sve_state, sme_state, svcr,
fp_type, vl[], vl_onexec[], fpsimd_cpu, kernel_fpsimd_state), ``struct cpu_fp_state`` (the
per-CPU ``fpsimd_last_state`` binding) and the TIF_FOREIGN_FPSTATE / TIF_SVE / TIF_SME /
TIF_KERNEL_FPSTATE flags.  Behaviour lives in `fpstate.kernel.arm64.fpsimd`.

Every value here is immutable.  Memory that holds FP state (a thread's uw/sve_state/sme_state,
a task's kernel-mode NEON save area, a vCPU's fp_regs/sve_state/sys_regs) is one `FpStore`
in `Host.mem`, named by a key: ``thread:<task>``, ``kernel:<task>``, ``vcpu:<vm>/<n>``.  The
per-CPU binding names the store it saves into, as the kernel's pointers do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fpstate.arm64.cpu import CpuProfile
from fpstate.arm64.regs import SVE_VQ_BYTES, VL_ARCH_MAX, ZERO, FpRegs, Tok, sve_vl_from_vq
from fpstate.arm64.statemachine import FrozenMap, replace, replacer

FP_STATE_CURRENT = "FP_STATE_CURRENT"
FP_STATE_FPSIMD = "FP_STATE_FPSIMD"
FP_STATE_SVE = "FP_STATE_SVE"
#: fpsimd_flush_task_state() writes NR_CPUS into fpsimd_cpu: "no CPU holds this state".
NR_CPUS = 512
ARM64_VEC_SVE, ARM64_VEC_SME = "SVE", "SME"


@dataclass(frozen=True, slots=True)
class VlInfo:
    """struct vl_info for one vector type on a system of identical CPUs."""

    vqs: frozenset[int]
    min_vl: int
    max_vl: int
    max_virtualisable_vl: int
    default_vl: int

    def find_supported_vector_length(self, vl: int) -> int:
        """find_supported_vector_length(): clamp to [min_vl, max_vl], then round down to an
        implemented VL (the vq_map is searched towards smaller VQs)."""
        vl = min(max(vl, self.min_vl), self.max_vl)
        vq = vl // SVE_VQ_BYTES
        below = [q for q in self.vqs if q <= vq]
        return sve_vl_from_vq(max(below) if below else min(self.vqs))


def _vl_info(vqs: frozenset[int], default_cap: int) -> VlInfo | None:
    if not vqs:
        return None
    lo, hi = sve_vl_from_vq(min(vqs)), sve_vl_from_vq(max(vqs))
    # sve_setup()/sme_setup(): with identical CPUs vq_partial_map == vq_map, so every VL is
    # virtualisable and max_virtualisable_vl == max_vl.  Default: largest VL <= 64 (SVE) or
    # <= 32 (SME) bytes, else the minimum.
    info = VlInfo(vqs, lo, hi, hi, lo)
    return replace(info, default_vl=info.find_supported_vector_length(default_cap))


@dataclass(frozen=True, slots=True)
class HostCaps:
    """What the host kernel detected: system_supports_*() and vl_info[]."""

    profile: CpuProfile
    fpsimd: bool
    sve: bool
    sme: bool
    sme2: bool
    fa64: bool
    fpmr: bool
    sve_vl: VlInfo | None
    sme_vl: VlInfo | None

    @classmethod
    def from_profile(cls, profile: CpuProfile) -> HostCaps:
        r = profile.id_regs
        return cls(profile, r.fp and r.advsimd, r.sve, r.sme, r.sme2, r.fa64, r.fpmr,
                   _vl_info(profile.sve_vqs, 64), _vl_info(profile.sme_vqs, 32))

    def vl_info(self, kind: str) -> VlInfo | None:
        return self.sve_vl if kind == ARM64_VEC_SVE else self.sme_vl

    @property
    def kvm_sve_max_vl(self) -> int:
        """kvm_arm_init_sve(): sve_max_virtualisable_vl() capped at VL_ARCH_MAX (0: no SVE)."""
        return min(self.sve_vl.max_virtualisable_vl, VL_ARCH_MAX) if self.sve_vl else 0


@dataclass(frozen=True, slots=True)
class FpStore:
    """FP state in memory for one context.

    For a thread: uw.fpsimd_state (``vregs``, ``fpsr``), uw.fpmr, sve_state (``sve_*``, laid
    out for ``sve_vl`` bytes, ``sve_size`` bytes allocated, 0 = NULL), svcr, sme_state
    (``za``, ``zt0``, ``sme_size`` bytes) and fp_type.  For a vCPU: ctxt.fp_regs, sve_state,
    sys_regs[FPMR] and sys_regs[SVCR], fp_type.
    """

    owner: str
    vregs: Tok = ZERO
    fpsr: Tok = ZERO
    sve_v: Tok = ZERO
    sve_zhi: Tok = ZERO
    sve_p: Tok = ZERO
    sve_vl: int = 0
    sve_size: int = 0
    fpmr: Tok = ZERO
    svcr: int = 0
    za: Tok = ZERO
    zt0: Tok = ZERO
    sme_size: int = 0
    fp_type: str = FP_STATE_FPSIMD
    #: thread_struct.tpidr2_el0: TPIDR2_EL0 while the thread is switched out
    #: (tls_preserve_current_state()); a vCPU's is never used (no SME for guests).
    tpidr2: Tok = ZERO


@dataclass(frozen=True, slots=True)
class Binding:
    """struct cpu_fp_state in per-CPU fpsimd_last_state: whose state the registers hold.

    ``st`` is the store of st/sve_state/sme_state/svcr/fp_type; ``fpmr`` the store whose FPMR
    slot receives FPMR (the kernel keeps a separate pointer).  ``st=None``: nobody's."""

    st: str | None = None
    sve_vl: int = 0
    sme_vl: int = 0
    to_save: str = FP_STATE_CURRENT
    fpmr: str | None = None


#: struct thread_struct from uw onwards (asm/processor.h, v6.17): (field, offset, size).
#: uw is the hardened-usercopy whitelist: tp_value, tp2_value, fpmr, pad, fpsimd_state;
#: fp_type and fpsimd_cpu follow it.  FPMR sits *before* fpsimd_state.
THREAD_UW_LAYOUT: tuple[tuple[str, int, int], ...] = (
    ("uw.tp_value", 0, 8), ("uw.tp2_value", 8, 8), ("uw.fpmr", 16, 8), ("uw.pad", 24, 8),
    ("uw.fpsimd_state", 32, 528), ("fp_type", 560, 4), ("fpsimd_cpu", 564, 4),
    ("sve_state", 568, 8), ("sme_state", 576, 8), ("vl", 584, 8), ("vl_onexec", 592, 8),
)


def thread_field_offset(name: str) -> int:
    return next(off for f, off, _ in THREAD_UW_LAYOUT if f == name)


def thread_fields_at(offset: int, size: int) -> tuple[str, ...]:
    """The thread_struct fields a ``size``-byte store at ``offset`` (from uw) overwrites."""
    return tuple(f for f, off, sz in THREAD_UW_LAYOUT if off < offset + size and offset < off + sz)


TASK_NEW, TASK_USER, TASK_KERNEL, TASK_SLEEPING = "new", "user", "kernel", "sleeping"


@dataclass(frozen=True, slots=True)
class SigFrameFp:
    """The FP records of one rt_sigframe on a task's stack, as setup_sigframe() wrote them
    (user memory: the model keeps it with the task): sve_context's ``vl`` and
    SVE_SIG_FLAG_SM, whether it and za_context carry a payload, za_context's ``vl``, and the
    values the records hold -- V (fpsimd_context, from Z in SVE format), FPSR, Z's upper
    bits and P/FFR (the SVE payload), ZA and ZT0 (with ZA on), FPMR and TPIDR2_EL0."""

    sve_vl: int
    sme_vl: int
    sm: bool
    sve: bool
    za_on: bool
    v: Tok = ZERO
    fpsr: Tok = ZERO
    zhi: Tok = ZERO
    p: Tok = ZERO
    za: Tok = ZERO
    zt0: Tok = ZERO
    fpmr: Tok = ZERO
    tpidr2: Tok = ZERO  #: TPIDR2_EL0 (tpidr2_context)


@dataclass(frozen=True, slots=True)
class Task:
    """The FP part of a task: thread flags, vector lengths, where its state was last live."""

    name: str
    mode: str = TASK_NEW
    tif_foreign_fpstate: bool = True
    tif_sve: bool = False
    tif_sme: bool = False
    tif_kernel_fpstate: bool = False
    tif_sve_vl_inherit: bool = False
    tif_sme_vl_inherit: bool = False
    fpsimd_cpu: int = NR_CPUS
    sve_vl: int = 0
    sme_vl: int = 0
    sve_vl_onexec: int = 0
    sme_vl_onexec: int = 0
    kernel_fpsimd_cpu: int = NR_CPUS
    in_syscall: bool = False
    #: The EL0 instruction (a USER_OPS name) whose SVE or SME access trap the task took and
    #: has not yet returned from ("": none); ``trap_handled`` once do_sve_acc() or
    #: do_sme_acc() ran. The instruction executes again on the return to user.
    in_trap: str = ""
    trap_handled: bool = False
    killed: str = ""
    #: The FP records of the signal frames on its stack, innermost last (SigFrameFp).
    sigframes: tuple[SigFrameFp, ...] = ()
    #: thread_struct fields overwritten through a pointer computed for another field.
    clobbered: frozenset[str] = frozenset()
    #: Bytes task_fpsimd_load() read past the end of sve_state (a load at a live VL larger
    #: than the one it is allocated for).
    overread: int = 0
    #: Bytes fpsimd_save_user_state() wrote past the end of sve_state (streaming or SVE
    #: registers saved where too little, or nothing -- a NULL sve_state -- is allocated).
    overwrite: int = 0
    #: The first WARN the kernel gave for this task (where, what): a state its code holds
    #: impossible, reached anyway.
    warned: str = ""

    @property
    def store(self) -> str:
        return f"thread:{self.name}"

    @property
    def kernel_store(self) -> str:
        return f"kernel:{self.name}"


@dataclass(frozen=True, slots=True)
class Cpu:
    """One physical CPU: its FP registers, its fpsimd_last_state and what runs on it."""

    idx: int
    regs: FpRegs = field(default_factory=FpRegs)
    last: Binding = field(default_factory=Binding)
    current: str | None = None
    #: CPACR_EL1.ZEN / SMEN EL0 enables (sve_user_enable()/sme_user_enable()).
    el0_sve: bool = False
    el0_sme: bool = False
    in_softirq_neon: bool = False


@dataclass(frozen=True, slots=True)
class Observation:
    """What a context saw or was refused by its last access (checked by the invariants).

    ``who`` is a host task name, a vCPU context ``<vm>/<n>`` (the guest), or ``user:<vm>/<n>``
    (the VMM through KVM_GET/SET_ONE_REG).  ``action`` is read, write, undef, sigill or an
    errno name.  ``feature`` is what must be advertised for the access to be allowed."""

    who: str
    what: str
    feature: str
    action: str
    value: Tok | int | None = None


#: A rejected design of the host kernel that code reached from everywhere (the return to
#: user) consults through ``Host.variants`` rather than a parameter: task_fpsimd_load()
#: writing FPMR before SVCR, before e5fa85fce08b (fpstate.kvm.arm64.config).
LOAD_FPMR_BEFORE_SVCR = "load-fpmr-before-svcr"
#: Every design ``Host.variants`` may hold.
HOST_VARIANTS = frozenset({LOAD_FPMR_BEFORE_SVCR})


@dataclass(frozen=True, slots=True)
class Host:
    caps: HostCaps
    cpus: tuple[Cpu, ...]
    tasks: FrozenMap[str, Task] = field(default_factory=FrozenMap)
    mem: FrozenMap[str, FpStore] = field(default_factory=FrozenMap)
    #: (context, component) -> the value the context last wrote or the architecture set.
    latest: FrozenMap[tuple[str, str], Tok] = field(default_factory=FrozenMap)
    gen: int = 0
    obs: tuple[Observation, ...] = ()
    #: The rejected designs this host kernel runs that are consulted here rather than passed
    #: (`LOAD_FPMR_BEFORE_SVCR`); fixed at boot.
    variants: frozenset[str] = frozenset()

    # -- accessors (pure) -------------------------------------------------------------------
    def task(self, name: str) -> Task:
        return self.tasks[name]

    def current(self, cpu: int) -> Task | None:
        name = self.cpus[cpu].current
        return None if name is None else self.tasks[name]

    def store(self, key: str) -> FpStore:
        return self.mem[key]

    def expected(self, ctx: str, comp: str) -> Tok:
        return self.latest.get((ctx, comp), ZERO)

    # -- functional updates -----------------------------------------------------------------
    def with_task(self, task: Task) -> Host:
        return _replace_host(self, tasks=self.tasks.set(task.name, task))

    def update_task(self, task: Task, /, **changes: object) -> Host:
        """``with_task(replace(task, **changes))``."""
        return _replace_host(self, tasks=self.tasks.set(task.name,
                                                        _replace_task(task, **changes)))

    def with_cpu(self, cpu: Cpu) -> Host:
        if self.cpus[cpu.idx] is cpu:
            return self
        cpus = list(self.cpus)
        cpus[cpu.idx] = cpu
        return _replace_host(self, cpus=tuple(cpus))

    def update_cpu(self, cpu: int, /, **changes: object) -> Host:
        """``with_cpu(replace(cpus[cpu], **changes))``."""
        return self.with_cpu(_replace_cpu(self.cpus[cpu], **changes))

    def with_cpu_task(self, cpu: Cpu, task: Task) -> Host:
        """``with_cpu(cpu).with_task(task)`` in one update."""
        cpus = self.cpus
        if cpus[cpu.idx] is not cpu:
            cl = list(cpus)
            cl[cpu.idx] = cpu
            cpus = tuple(cl)
        return _replace_host(self, cpus=cpus, tasks=self.tasks.set(task.name, task))

    def with_regs(self, cpu: int, regs: FpRegs) -> Host:
        return self.with_cpu(_replace_cpu(self.cpus[cpu], regs=regs))

    def with_store(self, key: str, store: FpStore) -> Host:
        return _replace_host(self, mem=self.mem.set(key, store))

    def fresh(self, writer: str) -> tuple[Host, Tok]:
        return _replace_host(self, gen=self.gen + 1), Tok(writer, self.gen + 1)

    def next_token(self, writer: str) -> Tok:
        """The token `fresh` would hand ``writer`` (for `write`)."""
        return Tok(writer, self.gen + 1)

    def write(self, cpu: int, regs: FpRegs, ctx: str = "", values: dict[str, Tok] | None = None,
              obs: tuple[Observation, ...] = ()) -> Host:
        """A write of `next_token`: ``fresh()``, ``with_regs(cpu, regs)``,
        ``expect(ctx, values)`` and ``observe(*obs)`` in one update."""
        c = self.cpus[cpu]
        cpus = self.cpus
        if c.regs is not regs:
            cl = list(cpus)
            cl[cpu] = _replace_cpu(c, regs=regs)
            cpus = tuple(cl)
        latest = self.latest
        if values:
            latest = latest.update({(ctx, k): t for k, t in values.items()})
        return _replace_host(self, gen=self.gen + 1, cpus=cpus, latest=latest,
                             obs=self.obs + obs if obs else self.obs)

    def expect(self, ctx: str, values: dict[str, Tok]) -> Host:
        return _replace_host(self, latest=self.latest.update(
            {(ctx, c): t for c, t in values.items()}))

    def observe(self, *obs: Observation) -> Host:
        return _replace_host(self, obs=self.obs + obs)

    def clear_obs(self) -> Host:
        return _replace_host(self, obs=()) if self.obs else self


_replace_host = replacer(Host)
_replace_cpu = replacer(Cpu)
_replace_task = replacer(Task)
