"""The kernel layer of ``fpstate conform``: the x86 FPU core model against the running kernel.

Every `Case` asks one question twice: of the real kernel of this machine (through the probes of
`fpstate.host`, each in a forked child) and of the model (`fpstate.kernel.x86` booted on this
CPU's CPUID profile as the running kernel version). Both answer with *facts*: a flat mapping
``{field: value}``; a mismatch is one field whose values differ (or that one side lacks).

Theory of operation
-------------------
- The host side runs first. Where the model needs the same inputs to give comparable bytes --
  the register contents the probe loaded, the stack pointer the signal interrupted, the frame
  patches it applied -- the host answer carries them (`HostAnswer.given`) and the model side
  replays them, so frames, regsets and registers compare byte for byte, addresses included.
- The model side never touches the machine: it boots `Machine` from the frozen `FpuSystem`
  of this CPU and kernel (`host_system`) and drives the kernel functions the case names.
- A question the host cannot answer (no AMX, no /dev/kvm, an unreadable kernel log) makes the
  case *skipped* with the precise reason; the model side of such a case is still exercised by
  the tests on a profile that has the feature (tests/kernel/test_kernel_differential.py).

The cases live in five modules: this one (boot lines, AT_MINSIGSTKSZ, arch_prctl in each
permission state), `conform_process` (AMX first use, fork/vfork/clone, execve),
`conform_signal` (signal frames, sigaltstack, sigreturn), `conform_ptrace` (NT_X86_XSTATE,
NT_PRFPREG) and `conform_core` (the notes of a core file). `kernel_cases()` lists them all;
`run_kernel_layer()` runs them and returns the report ``fpstate conform --layer kernel``
prints (the layer registers itself with `fpstate.commands.conform` on import).
`conform_example` is the worked example of docs/kernel-example.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.kernel.x86.hw import UserMemory, init_value
from fpstate.kernel.x86.sched import Machine, Task
from fpstate.kernel.x86.types import FpuSystem
from fpstate.kernel.x86.xstate_prctl import (
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_GUEST_PERM,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILEDATA,
    ERRNO_NAMES,
    fpu_lock_guest_permissions,
    sys_arch_prctl,
    sys_sigaltstack,
)
from fpstate.x86.impl import FCW_RESERVED, for_profile
from fpstate.x86.xfeatures import (
    XFEATURE_MASK_PKRU,
    bits,
    feature,
)

Facts = dict[str, Any]

# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostAnswer:
    """What the real kernel said (``facts``) and the inputs the model must replay (``given``)."""

    facts: Facts
    given: Any = None


@dataclass(frozen=True, slots=True)
class Case:
    """One differential question: ``host()`` asks the real kernel, ``model(system, given)`` the
    model; ``needs()`` names what the host lacks for it (a skip reason) or returns None.
    ``rule`` names the kernel functions whose behaviour is compared."""

    name: str
    rule: str
    host: Callable[[], HostAnswer]
    model: Callable[[FpuSystem, Any], Facts]
    needs: Callable[[], str | None] | None = None


@dataclass(frozen=True, slots=True)
class Mismatch:
    case: str
    field: str
    model: str
    real: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; ``what`` and ``differences`` are what the conform summary prints."""
        return {"case": self.case, "field": self.field, "model": self.model, "real": self.real,
                "what": self.field,
                "differences": [f"{self.field}: model {self.model} / real {self.real}"]}


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: str
    compared: int  #: fields compared
    mismatches: tuple[Mismatch, ...]
    skipped: str | None = None  #: why the host could not answer


def show(value: Any) -> str:
    """A fact value as the report prints it: integers in hex (small ones in decimal), bytes as
    hex (long runs abbreviated), tuples element by element."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value) if -10 < value < 10 else f"{value:#x}"
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).hex()
        return text if len(text) <= 48 else f"{text[:48]}... ({len(value)} bytes)"
    if isinstance(value, tuple):
        return "(" + ", ".join(show(v) for v in value) + ")"
    return str(value)


def _bytes_mismatch(case: str, key: str, model: bytes, real: bytes) -> Mismatch:
    n = min(len(model), len(real))
    off = next((i for i in range(n) if model[i] != real[i]), n)
    lo = off & ~7
    return Mismatch(case, f"{key} @byte {off}" + (f" (lengths {len(model)}/{len(real)})"
                                                  if len(model) != len(real) else ""),
                    bytes(model[lo:lo + 16]).hex(), bytes(real[lo:lo + 16]).hex())


def compare(case: str, model: Mapping[str, Any], real: Mapping[str, Any]) -> CaseResult:
    """Field-by-field comparison of two fact mappings (a field one side lacks is a mismatch)."""
    out = []
    keys = list(real) + [k for k in model if k not in real]
    for key in keys:
        if key not in model or key not in real:
            out.append(Mismatch(case, key, show(model.get(key, "<absent>")),
                                show(real.get(key, "<absent>"))))
            continue
        a, b = model[key], real[key]
        if a == b:
            continue
        if isinstance(a, (bytes, bytearray)) and isinstance(b, (bytes, bytearray)):
            out.append(_bytes_mismatch(case, key, bytes(a), bytes(b)))
        else:
            out.append(Mismatch(case, key, show(a), show(b)))
    return CaseResult(case, len(keys), tuple(out))


def run_case(case: Case, system: FpuSystem | None = None) -> CaseResult:
    """Ask the host, then the model with the host's inputs, and compare. HostUnavailable from
    the host side (or a ``needs`` reason) makes the case skipped."""
    reason = case.needs() if case.needs else None
    if reason:
        return CaseResult(case.name, 0, (), reason)
    try:
        ans = case.host()
        system = system or host_system()
    except HostUnavailable as e:
        return CaseResult(case.name, 0, (), str(e))
    return compare(case.name, case.model(system, ans.given), ans.facts)


def kernel_cases(samples: int | None = None, seed: int = 0) -> tuple[Case, ...]:
    """Every case of the kernel layer, in report order. ``samples`` sets the number of random
    ptrace writes (default `conform_ptrace.RANDOM_WRITES`), ``seed`` shifts their seed."""
    from fpstate.kernel.x86 import conform_core, conform_process, conform_ptrace, conform_signal

    ptrace = conform_ptrace.CASES
    if samples is not None or seed:
        count = conform_ptrace.RANDOM_WRITES if samples is None else samples
        ptrace = tuple(c for c in ptrace if c.name != "ptrace/set-random")
        ptrace += (conform_ptrace.random_case(count, conform_ptrace.RANDOM_SEED + seed),)
    return (*BASE_CASES, *conform_process.CASES, *conform_signal.CASES, *ptrace,
            *conform_core.CASES)


def run_kernel_layer(select: str | None = None, samples: int | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Run the cases whose name starts with ``select`` (all by default) and return the report:
    ``{"layer": "kernel", "cases": N, "mismatches": [...], "skipped": [...]}``; each skipped
    entry is ``"case: reason"``."""
    cases = [c for c in kernel_cases(samples, seed) if select is None or c.name.startswith(select)]
    if not cases:
        raise FpstateError(f"no kernel case is named {select!r}*")
    results = [run_case(c) for c in cases]
    return {
        "layer": "kernel",
        "cases": len(results),
        "mismatches": [m.as_dict() for r in results for m in r.mismatches],
        "skipped": [f"{r.case}: {r.skipped}" for r in results if r.skipped],
    }


def _layer_run(samples: int, seed: int) -> Any:
    """The registry's entry point (``fpstate conform --layer kernel``): every case, with
    ``samples`` random ptrace writes."""
    import time

    from fpstate.commands.conform import LayerResult

    start = time.monotonic()
    r = run_kernel_layer(samples=samples, seed=seed)
    return LayerResult("kernel", r["cases"], r["mismatches"], r["skipped"],
                       time.monotonic() - start)


# -- the model of this machine ------------------------------------------------------------------


@cache
def host_boot() -> Any:
    """fpu__init_system_xstate() of this CPU's CPUID as the running kernel version."""
    from fpstate.kernel.x86.versions import version_for_release
    from fpstate.kernel.x86.xstate import fpu__init_system_xstate
    from fpstate.x86.profiles import load_profile

    try:
        kernel = version_for_release(os.uname().release)
    except FpstateError as e:
        raise HostUnavailable(f"the running kernel cannot be modelled: {e}") from None
    profile = load_profile("host")
    return profile, fpu__init_system_xstate(profile, kernel)


@cache
def host_system() -> FpuSystem:
    """The frozen FpuSystem the model runs on: this CPU, the running kernel's version."""
    profile, boot = host_boot()
    return FpuSystem.from_boot(profile, boot)


def user_components(system: FpuSystem) -> list[int]:
    """XCR0 components a user task loads directly (PKRU has its own path; the register views
    below show it as "PKRU")."""
    return bits(system.xcr0 & ~XFEATURE_MASK_PKRU)


def user_task(m: Machine, nr: int = 0, *, sp: int | None = None, comm: str = "probe") -> Task:
    """A new user process running in user mode on CPU ``nr``. With ``sp`` its address space is
    one mapping around that stack pointer (the host child's), and its stack pointer is ``sp``,
    so that frames land at the host's addresses."""
    t = m.spawn(comm)
    if sp is not None:
        mm = UserMemory()
        base = (sp & ~0xFFF) - 0x10000
        mm.map(base, 0x12000)
        t.process.mm = mm
        t.user_sp = sp
    m.run(nr, t)
    return t


def _component_bytes(system: FpuSystem, image: bytes, i: int) -> bytes:
    comp = system.profile.component(i)
    value = image[comp.offset:comp.offset + comp.size]
    if i == 0:
        value = value[:24] + bytes(8) + value[32:]
    return bytes(value)


def load_registers(m: Machine, nr: int, image: bytes) -> None:
    """Make the user task on CPU ``nr`` hold the registers of standard-format ``image`` (an
    XSAVE the host probe took): each XCR0 component whose XSTATE_BV bit is set is written by a
    user instruction (so AMX goes through XFD's first-use path), the others are put in their
    initial configuration; then MXCSR (LDMXCSR) and PKRU (WRPKRU, with OSPKE)."""
    system = m.system
    xstate_bv = int.from_bytes(image[512:520], "little")
    for i in user_components(system):
        if (xstate_bv >> i) & 1:
            fault = m.user_write(nr, i, _component_bytes(system, image, i))
            if fault is not None and fault.vector != "#NM":
                raise FpstateError(f"model refused to load component {i}: {fault}")
        else:
            m.cpus[nr].regs.init_components(1 << i)
    fault = m.cpus[nr].regs.set_mxcsr(int.from_bytes(image[24:28], "little"))
    if fault is not None:
        raise FpstateError(f"model refused MXCSR of the image: {fault}")
    at = pkru_offset(system)
    if at is not None and system.ospke:  # WRPKRU of the image's PKRU (0 where it is initial)
        live = xstate_bv & XFEATURE_MASK_PKRU
        m.cpus[nr].regs.wrpkru(int.from_bytes(image[at:at + 4], "little") if live else 0)


def image_registers(system: FpuSystem, image: bytes) -> dict[str, Any]:
    """The register values a standard-format image holds: component bytes (the initial
    configuration where XSTATE_BV is clear) and MXCSR."""
    xstate_bv = int.from_bytes(image[512:520], "little")
    out: dict[str, Any] = {}
    for i in user_components(system):
        size = system.profile.component(i).size
        live = (xstate_bv >> i) & 1
        out[feature(i).short] = _component_bytes(system, image, i) if live else init_value(i, size)
    out["MXCSR"] = int.from_bytes(image[24:28], "little")
    at = pkru_offset(system)
    if at is not None:
        out["PKRU"] = pkru_text(image[at:at + 4] if xstate_bv & XFEATURE_MASK_PKRU else bytes(4))
    return out


def pkru_offset(system: FpuSystem) -> int | None:
    """PKRU's standard offset where ``system``'s XCR0 has it, else None."""
    return system.profile.component(9).offset if system.xcr0 & XFEATURE_MASK_PKRU else None


def pkru_text(value: bytes) -> str:
    """A PKRU register (the low 4 bytes of its component) as a fact."""
    return f"{int.from_bytes(value[:4], 'little'):#x}"


def model_registers(m: Machine, nr: int) -> dict[str, Any]:
    """The same view of the model CPU ``nr``'s registers. The kernel model's register file
    keeps an x87 image as it was written (fpstate.kernel.x86.hw); the CPU forces FCW's
    reserved bits on every load (fpstate.x86.impl FCW_RESERVED: bit 6 reads 1, bits 15:13 and
    7 read 0), so FCW is shown as this CPU holds it -- a ptrace write or a signal frame may
    carry any FCW."""
    regs = m.cpus[nr].regs
    out: dict[str, Any] = {feature(i).short: regs.component(i) for i in user_components(m.system)}
    x87 = out.get(feature(0).short)
    if x87 is not None:
        and_mask, or_mask = for_profile(m.system.profile)[FCW_RESERVED]
        fcw = int.from_bytes(x87[0:2], "little") & and_mask | or_mask
        out[feature(0).short] = fcw.to_bytes(2, "little") + x87[2:]
    out["MXCSR"] = regs.mxcsr
    if m.system.xcr0 & XFEATURE_MASK_PKRU:
        out["PKRU"] = pkru_text(regs.component(9))
    return out


def prefixed(prefix: str, facts: Mapping[str, Any]) -> Facts:
    return {f"{prefix}.{k}": v for k, v in facts.items()}


def errno_of(ret: int) -> str:
    """0 -> "OK", -22 -> "EINVAL" (the kernel's names, EOPNOTSUPP included)."""
    if ret >= 0:
        return "OK"
    from fpstate.host.child import errno_name

    return ERRNO_NAMES.get(-ret) or errno_name(-ret)


# -- host feature checks ------------------------------------------------------------------------


def host_amx_reason() -> str | None:
    """Why the real side cannot use AMX here, or None when CPU and kernel offer tile data."""
    from fpstate.host.amx import amx_unavailable

    return amx_unavailable()


def host_pku_reason() -> str | None:
    """Why the real side cannot use protection keys here (CPU without PKU, or a kernel that
    did not set CR4.PKE: CPUID.(EAX=7,ECX=0):ECX[4] OSPKE), or None."""
    from fpstate.host import native

    ecx = native.cpuid(7, 0)[2]
    if not (ecx >> 3) & 1:
        return "host lacks PKU: CPUID.(EAX=7,ECX=0):ECX[3]=0"
    if not (ecx >> 4) & 1:
        return "kernel did not enable protection keys: CPUID.(EAX=7,ECX=0):ECX[4] (OSPKE)=0"
    return None


def host_without_amx_reason() -> str | None:
    """For the cases about AMX instructions on a kernel that did not enable them."""
    return None if host_amx_reason() else "host has AMX enabled (see xfd/sigill-without-permission)"


def host_kvm_reason() -> str | None:
    from fpstate.host.kvm import open_kvm

    try:
        open_kvm().close()
    except FpstateError as e:
        return f"no usable /dev/kvm: {e}"
    except OSError as e:
        return f"no usable /dev/kvm: {e.strerror}"
    return None


# -- boot and the auxiliary vector --------------------------------------------------------------


def _boot_host() -> HostAnswer:
    from fpstate.host.dmesg import host_fpu_lines

    lines = host_fpu_lines()
    facts: Facts = {f"x86/fpu line {k}": line for k, line in enumerate(lines)}
    facts["x86/fpu lines"] = len(lines)
    return HostAnswer(facts)


def _boot_model(system: FpuSystem, given: Any) -> Facts:
    lines = host_boot()[1].lines
    facts: Facts = {f"x86/fpu line {k}": line for k, line in enumerate(lines)}
    facts["x86/fpu lines"] = len(lines)
    return facts


def _task_size_host() -> HostAnswer:
    from fpstate.host.task_size import kernel_default_size

    return HostAnswer({"fpu_kernel_cfg.default_size": kernel_default_size()})


def _task_size_model(system: FpuSystem, given: Any) -> Facts:
    return {"fpu_kernel_cfg.default_size": system.kernel.default_size}


def _task_size_reason() -> str | None:
    from fpstate.host.task_size import task_size_unavailable

    return task_size_unavailable()


def _sigframe_line_host() -> HostAnswer:
    from fpstate.host.auxv import max_sigframe_size_from_dmesg

    return HostAnswer({"signal line": f"signal: max sigframe size: "
                                      f"{max_sigframe_size_from_dmesg()}"})


def _sigframe_line_model(system: FpuSystem, given: Any) -> Facts:
    from fpstate.kernel.x86.signal import boot_line

    return {"signal line": boot_line(system)}


def _minsigstksz_host() -> HostAnswer:
    from fpstate.host.auxv import at_minsigstksz

    return HostAnswer({"AT_MINSIGSTKSZ": at_minsigstksz()})


def _minsigstksz_model(system: FpuSystem, given: Any) -> Facts:
    from fpstate.kernel.x86.signal import at_minsigstksz

    return {"AT_MINSIGSTKSZ": at_minsigstksz(system)}


# -- arch_prctl in each permission state ---------------------------------------------------------

#: A GET's pointer argument: None = a valid pointer (the u64 is read back), else the number.
GET_POINTERS: tuple[int | None, ...] = (None, 0, 0xFFFF_8000_0000_0000)
REQ_ARGS: tuple[int, ...] = (*range(64), 64, 1 << 63, 2**64 - 1)
OPTION_NAMES = {ARCH_GET_XCOMP_SUPP: "GET_XCOMP_SUPP", ARCH_GET_XCOMP_PERM: "GET_XCOMP_PERM",
                ARCH_GET_XCOMP_GUEST_PERM: "GET_XCOMP_GUEST_PERM",
                ARCH_REQ_XCOMP_PERM: "REQ_XCOMP_PERM",
                ARCH_REQ_XCOMP_GUEST_PERM: "REQ_XCOMP_GUEST_PERM"}


def prctl_calls() -> tuple[tuple[int, int | None], ...]:
    """The five options with every argument class: GETs with a good, a NULL and a kernel
    pointer; REQs of every bit 0..63 and of numbers past it; two unknown options."""
    calls: list[tuple[int, int | None]] = []
    for option in (ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_GET_XCOMP_GUEST_PERM):
        calls += [(option, p) for p in GET_POINTERS]
    for option in (ARCH_REQ_XCOMP_PERM, ARCH_REQ_XCOMP_GUEST_PERM):
        calls += [(option, n) for n in REQ_ARGS]
    calls += [(0x1020, 0), (0x1026, 0)]
    return tuple(calls)


def _call_name(option: int, arg: int | None) -> str:
    name = OPTION_NAMES.get(option, f"arch_prctl {option:#x}")
    return f"{name}({'&u64' if arg is None else show(arg)})"


def answer(ret: int, value: int | None) -> str:
    return errno_of(ret) + (f" {value:#x}" if value is not None else "")


@dataclass(frozen=True, slots=True)
class PermState:
    """A permission state the calls are made in: ``setup`` calls first (REQ options with a
    feature number), then an altstack of ``altstack`` bytes, then a vCPU (``vcpu``: the guest
    permission is locked by KVM_CREATE_VCPU)."""

    name: str
    setup: tuple[tuple[int, int], ...] = ()
    altstack: int = 0
    vcpu: bool = False
    needs: Callable[[], str | None] | None = None


PERM_STATES: tuple[PermState, ...] = (
    PermState("fresh"),
    PermState("after-refused-req", setup=((ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA),
                                          (ARCH_REQ_XCOMP_GUEST_PERM, ARCH_XCOMP_TILEDATA))),
    PermState("small-altstack", altstack=2048),
    PermState("guest-locked", vcpu=True, needs=host_kvm_reason),
    PermState("amx-permitted", setup=((ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA),),
              needs=host_amx_reason),
    PermState("amx-guest-permitted", setup=((ARCH_REQ_XCOMP_GUEST_PERM, ARCH_XCOMP_TILEDATA),),
              needs=host_amx_reason),
    PermState("amx-permitted-guest-locked", setup=((ARCH_REQ_XCOMP_GUEST_PERM,
                                                    ARCH_XCOMP_TILEDATA),), vcpu=True,
              needs=lambda: host_amx_reason() or host_kvm_reason()),
)


def _prctl_host(state: PermState) -> HostAnswer:
    import ctypes
    import mmap
    import struct

    from fpstate.host.child import PAGE, SYS, SharedMemory, raw_syscall, run_child

    calls = prctl_calls()
    shm = SharedMemory(16 * (len(calls) + len(state.setup) + 1))

    def body() -> int:
        keep: list[Any] = []
        out = ctypes.c_uint64()

        def calls_from(k: int, todo: Any) -> None:
            for option, arg in todo:
                out.value = 0
                ptr = ctypes.addressof(out) if arg is None else arg
                ret = raw_syscall(SYS["arch_prctl"], option, ptr)
                struct.pack_into("<qQ", shm.mem, 16 * k, ret, out.value)
                k += 1

        calls_from(0, state.setup)
        if state.altstack:
            region = mmap.mmap(-1, state.altstack + PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            keep.append(region)
            ss = (ctypes.c_uint64 * 3)(ctypes.addressof(ctypes.c_char.from_buffer(region)), 0,
                                       state.altstack)
            if raw_syscall(SYS["sigaltstack"], ctypes.addressof(ss), 0):
                return 3
        if state.vcpu:
            from fpstate.host.kvm import open_kvm

            vm = open_kvm().create_vm()
            keep += [vm, vm.create_vcpu()]
        calls_from(len(state.setup), calls)
        return 0

    ex = run_child(body)
    if ex.exit_code != 0:
        raise HostUnavailable(f"arch_prctl state {state.name!r}: child ended with {ex}")
    return HostAnswer(_prctl_facts(state, [struct.unpack_from("<qQ", shm.mem, 16 * k)
                                           for k in range(len(state.setup) + len(calls))]))


def _prctl_facts(state: PermState, answers: list[tuple[int, int]]) -> Facts:
    facts: Facts = {}
    every = list(state.setup) + list(prctl_calls())
    for k, ((option, arg), (ret, value)) in enumerate(zip(every, answers, strict=True)):
        where = "setup " if k < len(state.setup) else ""
        shown = value if arg is None and ret == 0 else None
        facts[where + _call_name(option, arg)] = answer(ret, shown)
    return facts


def _prctl_model(state: PermState) -> Callable[[FpuSystem, Any], Facts]:
    def model(system: FpuSystem, given: Any) -> Facts:
        m = Machine(system, 1)
        t = user_task(m)
        out = t.user_sp - 64
        answers = []

        def calls(todo: Any) -> None:
            for option, arg in todo:
                t.process.mm.write(out, bytes(8))
                ret = m.syscall(0, sys_arch_prctl, option, out if arg is None else arg)
                answers.append((ret, int.from_bytes(t.process.mm.read(out, 8), "little")))

        calls(state.setup)
        if state.altstack:
            base = m.mmap(t, state.altstack)
            ret = m.syscall(0, sys_sigaltstack, base, state.altstack, 0)
            if ret:
                raise FpstateError(f"model refused the altstack: {errno_of(ret)}")
        if state.vcpu:  # KVM_CREATE_VCPU -> fpu_alloc_guest_fpstate
            m.enter_kernel(0)
            fpu_lock_guest_permissions(m.cpus[0])
            m.exit_to_user_mode(0)
        calls(prctl_calls())
        return _prctl_facts(state, answers)

    return model


def keys_taken_before(t: Task, first_key: int) -> None:
    """Mark the protection keys below ``first_key`` allocated in ``t``'s mm: the host probe's
    first pkey_alloc gave ``first_key``, so the process it was forked from had taken the
    lower ones (pkey_alloc returns the lowest free key, and fork copies the allocation)."""
    t.process.mm.pkey_allocation_map = (1 << first_key) - 1 if first_key > 0 else 1


def _prctl_keyed_host() -> HostAnswer:
    from fpstate.host.prctl import get_supp_into_keyed_page

    key, opened, closed = get_supp_into_keyed_page()
    return HostAnswer(_prctl_keyed_facts(key, -opened, -closed), key)


def _prctl_keyed_facts(key: int, opened: int, closed: int) -> Facts:
    return {"pkey_alloc": key, "GET_XCOMP_SUPP into the key's page, key open": errno_of(opened),
            "GET_XCOMP_SUPP into the key's page, key closed (AD|WD)": errno_of(closed)}


def _prctl_keyed_model(system: FpuSystem, first_key: int) -> Facts:
    """fpu_xstate_prctl's put_user() into a page with a protection key of its own, under the
    calling thread's PKRU: with the key open, then closed (AD|WD). ``first_key`` is the key
    the host's pkey_alloc gave (the keys below it were taken before the probe)."""
    from fpstate.kernel.x86.pkeys import sys_pkey_alloc, sys_pkey_mprotect
    from fpstate.kernel.x86.signal import read_pkru

    m = Machine(system, 1)
    t = user_task(m)
    keys_taken_before(t, first_key)
    key = m.syscall(0, sys_pkey_alloc, 0, 0)
    page = m.mmap(t, 4096)
    m.syscall(0, sys_pkey_mprotect, page, 4096, key)
    opened = m.syscall(0, sys_arch_prctl, ARCH_GET_XCOMP_SUPP, page)
    c = m.cpus[0]
    c.regs.wrpkru(read_pkru(c) | 0b11 << (2 * key))  # the thread's WRPKRU in user mode
    closed = m.syscall(0, sys_arch_prctl, ARCH_GET_XCOMP_SUPP, page)
    return _prctl_keyed_facts(key, opened, closed)


BASE_CASES: tuple[Case, ...] = (
    Case("boot/lines", "fpu__init_system_xstate: the x86/fpu lines of the boot log",
         _boot_host, _boot_model),
    Case("boot/sigframe-line", "init_sigframe_size: 'signal: max sigframe size' of the boot log",
         _sigframe_line_host, _sigframe_line_model),
    Case("boot/task-size", "fpu__init_task_struct_size: the XSAVE buffer of every task's "
         "task_struct allocation is fpu_kernel_cfg.default_size (no dynamic or guest-only "
         "features; host/task_size.py reads it from the slab cache and BTF)",
         _task_size_host, _task_size_model, _task_size_reason),
    Case("auxv/AT_MINSIGSTKSZ", "get_sigframe_size (ARCH_DLINFO)", _minsigstksz_host,
         _minsigstksz_model),
    *(Case(f"arch_prctl/{s.name}", "fpu_xstate_prctl, xstate_request_perm, "
           "__xstate_request_perm, validate_sigaltstack, fpu_lock_guest_permissions",
           (lambda s=s: _prctl_host(s)), _prctl_model(s), s.needs) for s in PERM_STATES),
    Case("arch_prctl/pkey-closed-buffer", "fpu_xstate_prctl: put_user() under the calling "
         "thread's PKRU (a protection key it closed makes the store fault: -EFAULT)",
         _prctl_keyed_host, _prctl_keyed_model, host_pku_reason),
)

def _register() -> None:
    from fpstate.commands.conform import Layer, register_layer

    register_layer(Layer("kernel", "Linux x86 FPU core: the kernel model vs the running kernel "
                         "(permissions, signal frames, sigreturn, ptrace, fork/exec)", _layer_run))


_register()

__all__ = ["BASE_CASES", "Case", "CaseResult", "HostAnswer", "Mismatch", "compare",
           "host_amx_reason", "host_system", "image_registers", "kernel_cases", "load_registers",
           "model_registers", "run_case", "run_kernel_layer", "user_task"]
