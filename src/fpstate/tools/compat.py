"""Can a process or a guest saved on one x86 CPU be restored on another? XSAVE state only.

`compat_x86(src, dst)` boots the kernel and KVM models on both CPUs and replays what a
checkpointer and a VMM do:

- **features**: the user features Linux enables (fpu_user_cfg.max_features = XCR0) and the
  supervisor ones (IA32_XSS) on each side, lost and gained, with the registers they hold;
- **layout**: every shared user component whose CPUID leaf 0xD size, standard offset or
  compacted alignment differs (Intel puts the opmask at 0x440 after the MPX gap, AMD at 0x340);
- **sizes**: the `fpstate.tools.sizes` figures of both sides;
- **process**: a task on SRC with every user feature in use is read through ptrace
  (xstateregs_get); its state is translated component by component (`fpstate.tools.record`:
  a refusal names what DST cannot hold) and written into a stopped DST task
  (`fpstate.tools.validate`: xstateregs_set). glibc's lazy-binding trampolines XSAVEC into a
  stack area sized at process start from CPUID (STATE_SAVE_MASK = SSE|AVX|BNDREGS|opmask|
  ZMM_Hi256|Hi16_ZMM|APX, sysdeps/x86/sysdep.h; xsave_state_size in cpu-features.c): a DST that
  writes more overflows it (CRIU issue 3120). AT_MINSIGSTKSZ growth and CRIU's own
  ``--cpu-cap=fpu`` check (xsave sizes equal) are reported too;
- **guest**: a vCPU on SRC (guest permission for AMX first, leaf 0xD as KVM supports it) holds
  every guest feature in use; on DST the VMM re-creates the vCPU with the *guest's* CPUID (SRC's
  leaf 0xD), restores XCR0 (KVM_SET_XCRS) and the state -- once translated per register (what
  QEMU's vmstate does) and once as the opaque SRC buffer (what Firecracker and
  cloud-hypervisor snapshots carry) -- and KVM_GET_XSAVE2 shows which registers arrive wrong;
  the guest also keeps SRC's leaf 0xD offsets, which DST's hardware does not follow;
- **x87 pointers**: the FOP, FIP and FDP that an FXSAVE stores after an FLD with no exception
  pending, on each CPU model (`fpstate.x86.insn.run_program` told where the FLD ran): AMD
  stores them only with FSW.ES set (X87_POINTERS), Intel CPUs with FDP_EXCPTN_ONLY keep FDP,
  and FOP follows the fopcode sub-mode (FOP_UPDATE). They restore either way, so this never
  makes a move unsafe; but a record/replay trace (rr, which compares saved state) of x87 code
  diverges between two such CPUs (rr issue 2698), and a moved guest's or process's later saves
  follow DST. The same holds for the selectors a 32-bit FXSAVE stores with an exception
  pending: FCS and FDS on a CPU that keeps them (AMD), 0000H where CPUID.(EAX=07H,ECX=0):EBX[13]
  deprecates them (Intel since Haswell).

With ``guest_xcr0`` the VM's CPU model offers fewer XSAVE features than SRC's KVM supports
(QEMU's -cpu, a Firecracker CPU template, `fpstate template`'s answer): SRC's leaf 0xD is cut
to it (`fpstate.kvm.x86.cpuid.offer_xcr0`) before KVM_SET_CPUID2 on both sides, KVM_GET_XSAVE2
holds only those features, and only their layout matters to the guest.

Safe means both a process and a guest restore with every register intact. Everything is
computed by the models; this file only sequences the operations and reads the answers.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Any

from fpstate.kernel.x86 import regset
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.versions import NEWEST, kernel_version
from fpstate.kvm.x86.cpuid import offer_xcr0
from fpstate.tools.blob import decode, encode
from fpstate.tools.record import record_from_blob, refusal_message, translate
from fpstate.tools.registers import component_fields, register_groups
from fpstate.tools.sizes import Sizes, compute_sizes
from fpstate.tools.validate import validate
from fpstate.x86.cpu import machine
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.impl import FOP_UPDATE, X87_POINTERS, for_profile
from fpstate.x86.insn import run_program
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.program import Buffer, Insn, Placement, Program
from fpstate.x86.xfeatures import BY_NUMBER, MXCSR_DEFAULT, XFEATURE_MASK_XTILE_DATA, bits

XTILE_DATA = 18
#: glibc's STATE_SAVE_MASK (sysdeps/x86/sysdep.h, 2.40+: with APX).
GLIBC_STATE_SAVE_MASK = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 19)


def _name(i: int) -> str:
    f = BY_NUMBER.get(i)
    return f.short if f else f"bit{i}"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a party runs into. ``blocking``: the restore loses or corrupts state."""

    who: str
    blocking: bool
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"who": self.who, "blocking": self.blocking, "text": self.text}


@dataclass(frozen=True, slots=True)
class CompatReport:
    src: str
    dst: str
    kernel: str
    user_lost: tuple[int, ...]
    user_gained: tuple[int, ...]
    supervisor_lost: tuple[int, ...]
    supervisor_gained: tuple[int, ...]
    registers_lost: tuple[str, ...]
    registers_gained: tuple[str, ...]
    layout: tuple[str, ...]
    sizes: tuple[tuple[str, int, int], ...]
    amx_guest_permission: str
    process: tuple[Finding, ...]
    guest: tuple[Finding, ...]
    vmm: tuple[Finding, ...]
    #: for a guest that cannot move, the leaf 0xD both CPUs honour (fpstate template)
    template: str = ""
    #: the XCR0 features the VM's CPU model offers (None: everything SRC's KVM supports)
    guest_xcr0: int | None = None
    #: where the two CPUs save different x87 pointers for the same code (never blocking)
    x87: tuple[Finding, ...] = ()

    @property
    def process_restores(self) -> bool:
        return not any(f.blocking for f in self.process)

    @property
    def guest_restores(self) -> bool:
        return not any(f.blocking for f in self.guest)

    @property
    def safe(self) -> bool:
        return self.process_restores and self.guest_restores

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src, "dst": self.dst, "kernel": self.kernel, "safe": self.safe,
            "features": {
                "user_lost": [_name(i) for i in self.user_lost],
                "user_gained": [_name(i) for i in self.user_gained],
                "supervisor_lost": [_name(i) for i in self.supervisor_lost],
                "supervisor_gained": [_name(i) for i in self.supervisor_gained],
            },
            "registers_lost": list(self.registers_lost),
            "registers_gained": list(self.registers_gained),
            "layout_changes": list(self.layout),
            "sizes": {k: {"src": a, "dst": b} for k, a, b in self.sizes},
            "amx_guest_permission": self.amx_guest_permission,
            "process_restores": self.process_restores,
            "process": [f.to_dict() for f in self.process],
            "guest_restores": self.guest_restores,
            "guest": [f.to_dict() for f in self.guest],
            "vmm": [f.to_dict() for f in self.vmm],
            "template": self.template or None,
            "guest_xcr0": None if self.guest_xcr0 is None else hex(self.guest_xcr0),
            "x87_pointers": [f.to_dict() for f in self.x87],
        }


# -- helpers --------------------------------------------------------------------------------------


def _registers(profile: CpuidProfile, mask: int) -> list[str]:
    out: list[str] = []
    for i in bits(mask):
        size = profile.component(i).size
        out += [f"{_name(i)}: {', '.join(register_groups(i, size))}"]
    return out


def _layout_changes(src: CpuidProfile, dst: CpuidProfile, shared: int) -> list[str]:
    out = []
    for i in bits(shared & ~0x3):
        a, b = src.component(i), dst.component(i)
        parts = []
        if a.size != b.size:
            parts.append(f"size {a.size} -> {b.size}")
        if not a.supervisor and a.offset != b.offset:
            parts.append(f"standard offset {a.offset:#x} -> {b.offset:#x}")
        if a.aligned != b.aligned:
            parts.append(f"64-byte alignment in the compacted format {a.aligned} -> "
                         f"{b.aligned}")
        if parts:
            out.append(f"{_name(i)}: " + ", ".join(parts))
    return out


def _pattern_regs(profile: CpuidProfile, mask: int, seed: int) -> list[dict[str, Any]]:
    """A blob-JSON component list with every register of ``mask`` non-zero (x87/SSE with legal
    control values)."""
    rnd = random.Random(seed)
    comps = []
    for i in bits(mask | 0x3):
        size = 160 if i == 0 else profile.component(i).size
        regs = {f.name: hex(rnd.getrandbits(8 * f.size) | 1) for f in component_fields(i, size)}
        if i == 0:
            regs.update(fcw="0x37f", fsw="0x0", ftw="0xff", fop="0x0", fip="0x0", fdp="0x0")
            for n in range(8):  # 80-bit values with a sane exponent
                regs[f"st{n}"] = hex(0x3FFF << 64 | rnd.getrandbits(63) | 1 << 63)
        if i == 1:
            regs.update(mxcsr="0x1f80", mxcsr_mask="0x0")
        if i == 9:
            regs["pkru"] = "0x55555554"
        if i == 17:  # a legal palette-1 configuration: 8 tiles of 16 x 64 bytes
            regs = {"palette": "0x1", **{f"colsb{n}": "0x40" for n in range(8)},
                    **{f"rows{n}": "0x10" for n in range(8)}}
        comps.append({"number": i, "registers": regs})
    return comps


def glibc_xsave_state_size(profile: CpuidProfile, xcr0: int) -> tuple[int, int]:
    """(what glibc reserves, what XSAVEC then writes) for its lazy-binding save area: the
    compacted size of STATE_SAVE_MASK over the components CPUID enumerates, computed once at
    startup (update_active(), cpu-features.c), and the size XSAVEC writes with RFBM =
    STATE_SAVE_MASK & XCR0. Without XSAVEC glibc uses XSAVE and CPUID.(0DH,0).EBX for both."""
    mask = GLIBC_STATE_SAVE_MASK | 0x3
    if not profile.has("XSAVEC"):
        size = standard_size(profile, xcr0)
        return size, size
    reserved = compacted_size(profile, mask & profile.xcr0_supported)
    return reserved, compacted_size(profile, mask & xcr0)


# -- the process ----------------------------------------------------------------------------------


def _process_state(profile: CpuidProfile, kernel: str) -> tuple[bytes, int]:
    """NT_X86_XSTATE of a SRC task with every user feature in use (AMX permitted and used)."""
    m = Machine.boot(profile, kernel, ncpus=1)
    t = m.spawn("saved")
    m.run(0, t)
    if m.system.user.max_features & XFEATURE_MASK_XTILE_DATA:
        m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, XTILE_DATA)
    xcr0 = m.system.xcr0
    obj = {"format": "fpstate-blob/1", "blob_format": "xsave",
           "header": {"xstate_bv": hex(xcr0), "xcomp_bv": "0"},
           "components": _pattern_regs(profile, xcr0, 1)}
    image = encode(obj, profile, "xsave")
    for i in bits(xcr0):
        if i == 0:
            m.user_write(0, 0, image[0:24] + bytes(8) + image[32:160])
        elif i == 1:
            m.user_write(0, 1, image[160:416])
        else:
            c = profile.component(i)
            m.user_write(0, i, image[c.offset:c.offset + c.size])
    tracer = m.spawn("checkpointer")
    m.run(0, tracer)
    m.stop(t)
    size = regset.regset_xstate_size(m.system)
    ret, data = m.syscall(0, _kpath(regset.ptrace_regset), t, regset.PTRACE_GETREGSET,
                          regset.NT_X86_XSTATE, size)
    assert ret == 0, ret
    return data, xcr0


def _kpath(fn: Any) -> Any:
    def path(c: Any, *args: Any) -> Any:
        result = fn(c, *args)
        if False:  # pragma: no cover - a kernel path without preemption points
            yield
        return result
    return path


def _process(src: CpuidProfile, dst: CpuidProfile, kernel: str, ss: Sizes,
             ds: Sizes) -> list[Finding]:
    out: list[Finding] = []
    data, xcr0 = _process_state(src, kernel)
    rec = record_from_blob(data, src, "uabi")
    t = translate(rec, dst, "standard")
    if not t.ok:
        out.append(Finding("process", True, "state translation: "
                           + refusal_message(t, dst.name)))
    else:
        v = validate(t.record.state, dst, "ptrace", kernel=kernel)
        out.append(Finding("process", not v.accepted,
                           f"the translated NT_X86_XSTATE written into a DST tracee: "
                           f"{v.result} ({v.rule}{': ' + v.detail if not v.accepted else ''})"))
    raw = validate(data, dst, "ptrace", kernel=kernel)
    if not raw.accepted:
        out.append(Finding("process", False,
                           f"the SRC regset bytes as they are (a tool that does not translate): "
                           f"{raw.result} ({raw.rule}: {raw.detail})"))
    reserved, _ = glibc_xsave_state_size(src, xcr0)
    lx = translate(rec, dst, "standard").record
    dxcr0 = lx.xcr0 if lx is not None else None
    if dxcr0 is not None:
        _, writes = glibc_xsave_state_size(dst, dxcr0)
        if writes > reserved:
            out.append(Finding("process", True,
                               f"glibc sized its lazy-binding XSAVEC area on SRC for {reserved} "
                               f"bytes; on DST XSAVEC writes {writes} (STATE_SAVE_MASK & XCR0 "
                               f"{dxcr0:#x}): a stack overflow at the next lazy PLT call"))
    a, b = ss.figure("at_minsigstksz").value, ds.figure("at_minsigstksz").value
    if b > a:
        out.append(Finding("process", False,
                           f"AT_MINSIGSTKSZ grows {a} -> {b}: alternate signal stacks sized "
                           "from SRC's auxv may overflow (SIGSEGV on delivery)"))
    us, ud = ss.figure("user_max_size").value, ds.figure("user_max_size").value
    ks, kd = ss.figure("user_default_size").value, ds.figure("user_default_size").value
    if (us, ks) != (ud, kd):
        out.append(Finding("CRIU", False,
                           f"--cpu-cap=fpu (the default, CPU_CAP_DEFAULT) refuses: xsave_size "
                           f"{ks} -> {kd}, xsave_size_max {us} -> {ud} (compel's cpu-cap check "
                           "wants them equal)"))
    return out


# -- the guest ------------------------------------------------------------------------------------


def _vmm(profile: CpuidProfile, kernel: str, perm: bool) -> tuple[Any, str]:
    from fpstate.kvm.x86.vcpu import Vmm, model_config, model_system

    system = model_system(profile, kernel=kernel)
    vmm = Vmm(Machine(system, 1), model_config(system))
    how = ""
    if perm:
        ret = vmm.arch_prctl(xp.ARCH_REQ_XCOMP_GUEST_PERM, XTILE_DATA)
        how = f"ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) = {'0' if ret == 0 else ret}"
    return vmm, how


def _errname(ret: int) -> str:
    return {0: "0", -22: "-EINVAL", -14: "-EFAULT", -1: "-EPERM", -95: "-EOPNOTSUPP",
            -16: "-EBUSY"}.get(ret, str(ret))


def _diff_registers(a: bytes, pa: CpuidProfile, b: bytes, pb: CpuidProfile) -> list[str]:
    """Registers that differ between two KVM buffers, grouped per component."""
    da, db = decode(a, pa, "kvm"), decode(b, pb, "kvm")
    regs_b = {c.number: dict(c.registers) for c in db.components}
    out = []
    for c in da.components:
        other = regs_b.get(c.number)
        if not c.in_xstate_bv:
            continue
        if other is None:
            out.append(f"{c.name} (absent)")
            continue
        bad = [n for n, v in c.registers if other.get(n) != v]
        if bad:
            out.append(f"{c.name}: {len(bad)} of {len(c.registers)} registers "
                       f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return out


def _guest(src: CpuidProfile, dst: CpuidProfile, kernel: str, layout: list[str],
           guest_xcr0: int | None = None) -> tuple[list[Finding], list[Finding], str]:
    s_vmm, _ = _vmm(src, kernel, True)
    s_caps = s_vmm.kvm.caps
    offered = s_caps.supported_xcr0 if guest_xcr0 is None else s_caps.supported_xcr0 & guest_xcr0
    s_amx = bool(offered & XFEATURE_MASK_XTILE_DATA)
    d_probe, _ = _vmm(dst, kernel, False)
    d_amx = bool(d_probe.kvm.caps.supported_xcr0 & XFEATURE_MASK_XTILE_DATA)
    s_vcpu = s_vmm.create_vcpu(s_vmm.create_vm())
    entries = s_vmm.supported_cpuid_0xd()
    if guest_xcr0 is not None:
        entries = offer_xcr0(entries, guest_xcr0)
    s_vmm.set_cpuid2(s_vcpu, entries)
    gxcr0 = s_vcpu.arch.guest_supported_xcr0 | 0x1
    size = s_vcpu.arch.guest_fpu.uabi_size
    obj = {"format": "fpstate-blob/1", "blob_format": "kvm", "size": size,
           "xcr0": hex(s_vmm.m.system.user.max_features if guest_xcr0 is None
                       else s_vmm.m.system.user.max_features & (gxcr0 | 0x3)),
           "header": {"xstate_bv": hex(gxcr0), "xcomp_bv": "0"},
           "components": _pattern_regs(src, gxcr0, 2)}
    assert s_vmm.set_xsave(s_vcpu, encode(obj, src)) == 0
    assert s_vmm.set_xcrs(s_vcpu, [(0, gxcr0)]) == 0
    saved = s_vmm.get_xsave2(s_vcpu)

    guest: list[Finding] = []
    vmm: list[Finding] = []
    if s_amx and d_amx:
        perm = ("needed: DST's VMM must call ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) before "
                "creating the vCPUs, or KVM_SET_CPUID2 with the guest's AMX leaf 0xD fails")
    elif s_amx:
        perm = "the guest has AMX on SRC and DST has none: its tile state cannot be restored"
    elif d_amx:
        perm = "not needed (the guest has no AMX on SRC)"
    else:
        perm = "not applicable (no AMX on either side)"

    def dst_vcpu() -> tuple[Any, Any, int, int]:
        d_vmm, _ = _vmm(dst, kernel, s_amx)
        d_vcpu = d_vmm.create_vcpu(d_vmm.create_vm())
        r_cpuid = d_vmm.set_cpuid2(d_vcpu, entries)
        r_xcrs = d_vmm.set_xcrs(d_vcpu, [(0, gxcr0)])
        return d_vmm, d_vcpu, r_cpuid, r_xcrs

    d_vmm, d_vcpu, r_cpuid, r_xcrs = dst_vcpu()
    if r_cpuid:
        guest.append(Finding("guest", True, f"KVM_SET_CPUID2 with the guest's (SRC's) leaf "
                             f"0xD on DST: {_errname(r_cpuid)}"))
    d_caps = d_vmm.kvm.caps
    if r_xcrs:
        lost = gxcr0 & ~(d_caps.supported_xcr0 | 1)
        why = (f"{', '.join(_name(i) for i in bits(lost))} not in DST's kvm_caps.supported_xcr0"
               if lost else "the vCPU's CPUID could not be installed")
        guest.append(Finding("guest", True, f"KVM_SET_XCRS(XCR0 = {gxcr0:#x}) on DST: "
                             f"{_errname(r_xcrs)} (__kvm_set_xcr: {why})"))
    # QEMU: per-register marshalling through the migration stream.
    # A guest offered fewer features: its buffer holds those (the u64 at 464 still names
    # every feature of SRC's kernel, AMX's included, in a 4096-byte buffer).
    rec = record_from_blob(saved, src, "kvm", xcr0=None if guest_xcr0 is None else gxcr0 | 0x3)
    t = translate(rec, dst, "standard", xcr0=d_caps.supported_xcr0 | 0x3)
    if not t.ok:
        guest.append(Finding("guest", True, "per-register restore: "
                             + refusal_message(t, dst.name)))
        vmm.append(Finding("QEMU", True, "the vmstate fields of the lost components have no "
                           "destination; with -cpu ...,enforce DST QEMU refuses to start, "
                           "older QEMUs ignored a failed KVM_SET_XSAVE (silent loss)"))
    else:
        buf = t.record.state.ljust(d_vcpu.arch.guest_fpu.uabi_size, b"\0")
        buf = buf[:464] + d_vmm.m.system.user.max_features.to_bytes(8, "little") + buf[472:]
        r = d_vmm.set_xsave(d_vcpu, buf)
        got = d_vmm.get_xsave2(d_vcpu)
        wrong = _diff_registers(saved, src, got, dst) if r == 0 else []
        guest.append(Finding("guest", r != 0 or bool(wrong),
                             f"per-register restore (KVM_SET_XSAVE of the translated state): "
                             f"{_errname(r)}" + (f"; wrong: {'; '.join(wrong)}" if wrong else "")))
        vmm.append(Finding("QEMU", False, "marshals each register through vmstate "
                           "(x86_cpu_xsave_all_areas / xrstor_all_areas) with offsets from the "
                           "host it runs on, so the state survives a layout change"))
    if layout:
        guest.append(Finding("guest", True, "the guest keeps SRC's CPUID leaf 0xD, but DST's "
                             "XSAVE follows DST's layout: " + "; ".join(layout)))
        vmm.append(Finding("QEMU", True, "leaf 0xD comes from x86_ext_save_areas, whose offsets "
                           "kvm_cpu_xsave_init() reads from the host: the guest booted with "
                           "SRC's offsets and runs on DST's"))
    # Firecracker / cloud-hypervisor: the SRC kvm_xsave bytes as they are.
    d2_vmm, d2_vcpu, _, _ = dst_vcpu()
    r = d2_vmm.set_xsave(d2_vcpu, saved)
    wrong = _diff_registers(saved, src, d2_vmm.get_xsave2(d2_vcpu), dst) if r == 0 else []
    opaque = (f"KVM_SET_XSAVE of SRC's {len(saved)}-byte buffer as it is: {_errname(r)}"
              + (f"; registers that arrive wrong: {'; '.join(wrong)}" if wrong else ""))
    bad = r != 0 or bool(wrong)
    vmm.append(Finding("Firecracker", bad, opaque + "; snapshots carry the opaque buffer and "
                       "need 'identical hardware' (no XSAVE-level check)"
                       + ("; IA32_XSS (CET supervisor state) is saved only since PR #5972"
                          if s_caps.supported_xss else "")
                       + ("; AMX needs KVM_GET_XSAVE2, a 4096-byte kvm_xsave cannot hold it "
                          f"({size} bytes)" if size > 4096 else "")))
    vmm.append(Finding("cloud-hypervisor", bad, opaque + "; check_cpuid_compatibility() does "
                       "not compare leaf 0xD, so the pre-migration check passes"
                       + ("; an xsave2 -> kvm_xsave conversion truncates the tile data past "
                          "4096 bytes (issue 7533)" if size > 4096 else "")))
    return guest, vmm, perm


#: The x87 probe: an FLD m80 at this placement (FOP 0x3AB: DB /5, ModRM 0xAB), then FXSAVE64,
#: from FOP 0x123, FIP 0x1111 and FDP 0x2222 with no exception pending.
_X87_AT = (Placement(0x401000, 0x402000, 0x3AB), Placement(0x401006))
_X87_FIELDS = (("FOP", 6, 2), ("FIP", 8, 8), ("FDP", 16, 8))


def _x87_saved(profile: CpuidProfile) -> dict[str, int]:
    """FOP, FIP and FDP as the CPU model of ``profile`` stores them in the probe's FXSAVE."""
    start = bytearray(576)
    struct.pack_into("<HHBBHQQI", start, 0, 0x037F, 0, 0, 0, 0x123, 0x1111, 0x2222,
                     MXCSR_DEFAULT)
    start[512] = 1  # XSTATE_BV: x87
    program = Program(bytes(start), (Insn("FLD", data=bytes(10)), Insn("FXSAVE", buf=0)),
                      (Buffer(),))
    out = run_program(profile, program, preempt=False, placement=_X87_AT)[0]
    return {name: int.from_bytes(out.buffers[0][at:at + n], "little")
            for name, at, n in _X87_FIELDS}


def _x87_why(profile: CpuidProfile) -> str:
    impl = for_profile(profile)
    if impl[X87_POINTERS] == "when-es":
        return "pointers stored only with FSW.ES set"
    fdp = "FDP kept (FDP_EXCPTN_ONLY)" if machine(profile).has("FDP_EXCPTN_ONLY") else \
        "FDP the operand's address"
    fop = "FOP kept" if impl[FOP_UPDATE] == "unmasked" else "FOP the FLD's"
    return f"FIP the FLD's address, {fdp}, {fop}"


def _x87_selectors(profile: CpuidProfile) -> tuple[int, int]:
    """(FCS, FDS) as the CPU model of ``profile`` stores them in an FXSAVE32 after an
    FXRSTOR32 of FCS 0x23 and FDS 0x2B with an unmasked invalid-operation exception pending
    (FCW 0x37E, FSW 0x8081)."""
    legacy = bytearray(512)
    struct.pack_into("<HHBBHIHHIHHI", legacy, 0, 0x037E, 0x8081, 0, 0, 0x123, 0x1111, 0x23, 0,
                     0x2222, 0x2B, 0, MXCSR_DEFAULT)
    start = bytearray(576)
    struct.pack_into("<HHI", start, 0, 0x037F, 0, 0)
    struct.pack_into("<I", start, 24, MXCSR_DEFAULT)
    program = Program(bytes(start), (Insn("FXRSTOR32", buf=0), Insn("FXSAVE32", buf=1)),
                      (Buffer(bytes(legacy)), Buffer()))
    out = run_program(profile, program, preempt=False)[0].buffers[1]
    fcs, fds = struct.unpack_from("<H6xH", out, 12)
    return fcs, fds


def _x87(src: CpuidProfile, dst: CpuidProfile) -> list[Finding]:
    """Findings where SRC and DST store different x87 pointers or 32-bit selectors for the
    probes (see the module docstring); none where they agree."""
    out: list[Finding] = []
    a, b = _x87_saved(src), _x87_saved(dst)
    differ = [n for n, _at, _n in _X87_FIELDS if a[n] != b[n]]
    if differ:
        saved = "; ".join(f"{n} {a[n]:#x} -> {b[n]:#x}" for n in differ)
        what = (f"after an FLD (at 0x401000, from 0x402000) with no exception pending, an "
                f"FXSAVE or XSAVE stores {saved} (SRC: {_x87_why(src)}; DST: {_x87_why(dst)})")
        out.append(Finding("rr", False, what + ": a trace recorded on SRC diverges on DST "
                           "where it compares saved state after x87 code, unless the recorder "
                           "clears FIP/FDP (rr issue 2698)"))
    sa, sb = _x87_selectors(src), _x87_selectors(dst)
    if sa != sb:
        def why(p: CpuidProfile) -> str:
            return ("FCS and FDS deprecated, stored as 0000H" if machine(p).has("ZERO_FCS_FDS")
                    else "FCS and FDS kept")
        out.append(Finding("rr", False, f"a 32-bit FXSAVE (without REX.W) with an x87 exception "
                           f"pending stores FCS {sa[0]:#x} -> {sb[0]:#x}, FDS {sa[1]:#x} -> "
                           f"{sb[1]:#x} (SRC: {why(src)}; DST: {why(dst)}; CPUID.(EAX=07H,"
                           f"ECX=0):EBX[13]): a trace of 32-bit x87 code recorded on SRC "
                           f"diverges on DST where it compares that save"))
    if out:
        out.append(Finding("guest", False, "a guest or process moved from SRC keeps its x87 "
                           "registers, but its later saves store the pointers as DST does"))
    return out


# -- the report -----------------------------------------------------------------------------------


def compat_x86(src: CpuidProfile, dst: CpuidProfile, kernel: str = NEWEST,
               guest_xcr0: int | None = None) -> CompatReport:
    """The migration report of ``src`` -> ``dst`` under ``kernel`` on both sides; the guest's
    CPU model offers ``guest_xcr0`` (None: every feature SRC's KVM supports)."""
    kv = kernel_version(kernel).name
    ss, ds = compute_sizes(src, kv), compute_sizes(dst, kv)
    sm = Machine.boot(src, kv, ncpus=1).system
    dm = Machine.boot(dst, kv, ncpus=1).system
    su, du = sm.user.max_features, dm.user.max_features
    ssup = sm.xfeatures_mask_supervisor
    dsup = dm.xfeatures_mask_supervisor
    layout = _layout_changes(src, dst, (su & du) | (ssup & dsup))
    process = _process(src, dst, kv, ss, ds)
    # The guest sees the layout of the features its CPU model offers only.
    glayout = layout if guest_xcr0 is None else _layout_changes(
        src, dst, (su & du & (guest_xcr0 | 0x3)) | (ssup & dsup))
    guest, vmm, perm = _guest(src, dst, kv, glayout, guest_xcr0)
    return CompatReport(
        src=src.name, dst=dst.name, kernel=kv,
        user_lost=tuple(bits(su & ~du)), user_gained=tuple(bits(du & ~su)),
        supervisor_lost=tuple(bits(ssup & ~dsup)), supervisor_gained=tuple(bits(dsup & ~ssup)),
        registers_lost=tuple(_registers(src, su & ~du)),
        registers_gained=tuple(_registers(dst, du & ~su)),
        layout=tuple(layout),
        sizes=tuple((a.key, a.value, b.value) for a, b in zip(ss.figures, ds.figures,
                                                              strict=True)),
        amx_guest_permission=perm, process=tuple(process), guest=tuple(guest), vmm=tuple(vmm),
        template=_template_hint(src, dst) if any(f.blocking for f in guest) else "",
        guest_xcr0=guest_xcr0, x87=tuple(_x87(src, dst)),
    )


def _template_hint(src: CpuidProfile, dst: CpuidProfile) -> str:
    """For a guest that cannot move: the leaf 0xD both CPUs can honour
    (`fpstate.tools.template.pool_template`), "" when the models cannot boot on one."""
    from fpstate.errors import FpstateError
    from fpstate.tools.template import pool_template

    try:
        t = pool_template([src, dst])
    except FpstateError:
        return ""
    left = ", ".join(x.name for x in t.left if not (t.xcr0 | t.xss) >> x.number & 1)
    return (f"`fpstate template {src.name} {dst.name}` gives a CPUID leaf 0xD both honour: "
            f"XCR0 {t.xcr0:#x}, IA32_XSS {t.xss:#x}" + (f" (leaves out {left})" if left else ""))


def format_report(r: CompatReport) -> str:
    """The text of ``fpstate compat``."""
    lines = [f"{r.src} -> {r.dst} (kernel {r.kernel}): "
             + ("SAFE" if r.safe else "NOT SAFE")]

    def names(ix: tuple[int, ...]) -> str:
        return ", ".join(_name(i) for i in ix) or "-"

    lines.append(f"user features lost: {names(r.user_lost)}; gained: {names(r.user_gained)}")
    lines.append(f"supervisor features lost: {names(r.supervisor_lost)}; gained: "
                 f"{names(r.supervisor_gained)}")
    for label, regs in (("registers lost", r.registers_lost),
                        ("registers gained", r.registers_gained)):
        lines.extend(f"{label}: {x}" for x in regs)
    lines.extend(f"layout: {x}" for x in r.layout)
    changed = [(k, a, b) for k, a, b in r.sizes if a != b]
    lines.append("sizes: " + ("; ".join(f"{k} {a} -> {b}" for k, a, b in changed)
                              if changed else "all equal"))
    lines.append(f"AMX guest permission: {r.amx_guest_permission}")
    lines.append(f"process saved on {r.src} restores on {r.dst}: "
                 + ("yes" if r.process_restores else "NO"))
    lines.extend(f"  {'x' if f.blocking else '-'} [{f.who}] {f.text}" for f in r.process)
    offered = ("" if r.guest_xcr0 is None else f" (its CPU model offers XCR0 "
               f"{r.guest_xcr0:#x}: {names(tuple(bits(r.guest_xcr0)))})")
    lines.append(f"guest saved on {r.src}{offered} restores on {r.dst}: "
                 + ("yes" if r.guest_restores else "NO"))
    lines.extend(f"  {'x' if f.blocking else '-'} [{f.who}] {f.text}" for f in r.guest)
    if r.template:
        lines.append(f"  hint: {r.template}")
    lines.append("VMMs:")
    lines.extend(f"  {'x' if f.blocking else '-'} [{f.who}] {f.text}" for f in r.vmm)
    lines.append("x87 pointers: " + ("saved alike" if not r.x87 else "saved differently"))
    lines.extend(f"  - [{f.who}] {f.text}" for f in r.x87)
    return "\n".join(lines)
