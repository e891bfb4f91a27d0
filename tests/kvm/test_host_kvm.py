"""Real KVM on this machine, through fpstate.host.kvm and fpstate.host.kvm_guest.

Every test states what KVM (or the guest CPU it virtualises) really does: an errno, a byte
offset, a fault vector and step, a register after INIT. Tests skip with the reason where
/dev/kvm is absent or unusable, or where this host's KVM cannot run what they need. One VM per
module serves the tests that do not change vCPU-wide state.
"""

from __future__ import annotations

import errno
import struct

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host import kvm_uapi as u
from fpstate.host.kvm import KvmError, find_cpuid, kvm_backend
from fpstate.host.kvm_guest import (
    BACKEND_DIVERGENCES,
    IDT,
    GuestMachine,
    HostError,
    guest_xcr0_in_hardware,
    run_guest_program,
)
from fpstate.host.native import cpuid, xgetbv
from fpstate.kvm.x86.vcpu import GuestOp
from fpstate.x86.program import Buffer, Insn, Program

pytestmark = pytest.mark.host

MPX = (1 << 3) | (1 << 4)
AVX512 = 0xE0
XTILE = (1 << 17) | (1 << 18)


def _machine(**kw: object) -> GuestMachine:
    try:
        return GuestMachine(**kw)  # type: ignore[arg-type]
    except HostUnavailable as e:
        pytest.skip(str(e))
    except KvmError as e:
        pytest.skip(f"/dev/kvm is unusable: {e}")


@pytest.fixture(scope="module")
def machine() -> GuestMachine:
    m = _machine()
    yield m
    m.close()


def _supported_xcr0(m: GuestMachine) -> int:
    eax, _ebx, _ecx, edx = find_cpuid(m.cpuid, 0xD, 0)
    return eax | edx << 32


def start_image(xstate_bv: int = 0, mxcsr: int = 0x1F80) -> bytes:
    """A standard-format image: x87 FCW 037FH, MXCSR, XSTATE_BV; everything else zero."""
    img = bytearray(576)
    struct.pack_into("<H", img, 0, 0x037F)
    struct.pack_into("<I", img, 24, mxcsr)
    struct.pack_into("<Q", img, 512, xstate_bv)
    return bytes(img)


def xmm_pattern(i: int) -> bytes:
    return bytes((0x11 * (i + 1) + j) & 0xFF for j in range(16))


def _cpl0_or_skip(m: GuestMachine, cpl: int) -> None:
    if cpl == 0 and (reason := m.xstate_at_cpl0()):
        pytest.skip(reason)


# -- the guest runs programs -----------------------------------------------------------------


@pytest.mark.parametrize("cpl", [3, 0])
def test_guest_xsave_puts_movdqu_xmm_values_at_160_plus_16i(machine: GuestMachine,
                                                            cpl: int) -> None:
    """SDM Vol. 1 13.4.1: XMMi lives at byte 160 + 16*i of the legacy region."""
    _cpl0_or_skip(machine, cpl)
    regs = (0, 1, 7, 15)
    insns = [Insn("MOVDQU", reg=i, data=xmm_pattern(i)) for i in regs]
    insns.append(Insn("XSAVE", buf=0, mask=0x3))
    out = machine.run_program(Program(start_image(), tuple(insns), (Buffer(),), cpl=cpl),
                              xcr0=0x3)
    assert out.fault is None, out.fault
    buf = out.buffers[0]
    for i in regs:
        assert buf[160 + 16 * i:176 + 16 * i] == xmm_pattern(i)
        assert out.final is not None and out.final[160 + 16 * i:176 + 16 * i] == xmm_pattern(i)
    untouched = [i for i in range(16) if i not in regs]
    assert all(buf[160 + 16 * i:176 + 16 * i] == bytes(16) for i in untouched)
    assert struct.unpack_from("<Q", buf, 512)[0] & 0x2, "XSTATE_BV[1] after loading XMM regs"
    assert struct.unpack_from("<I", buf, 24)[0] == 0x1F80


def test_run_guest_program_reports_values_and_faults() -> None:
    """The module-level entry point: values in order, the first fault stops the program."""
    try:
        prog = Program(start_image(), (Insn("STMXCSR"), Insn("XSETBV", reg=0, value=0x3),
                                       Insn("STMXCSR")), cpl=3)
        out = run_guest_program(prog, xcr0=0x3)
    except HostUnavailable as e:
        pytest.skip(str(e))
    assert out.values == (0x1F80,)
    assert out.fault is not None and out.fault.vector == "#GP"  # XSETBV at CPL 3: #GP(0)
    assert out.fault_step == 1
    assert out.final is None and out.xinuse is None


@pytest.mark.parametrize("value", [0x5, 0x0, 0x2, 0x67, 0x200])
def test_guest_xsetbv_of_an_invalid_xcr0_is_gp_at_that_step(machine: GuestMachine,
                                                            value: int) -> None:
    """__kvm_set_xcr() refuses and kvm_emulate_xsetbv() injects #GP(0); XCR0 is unchanged."""
    insns = [Insn("MOVDQU", reg=2, data=xmm_pattern(2)), Insn("XSETBV", reg=0, value=value)]
    out = machine.run_insns(insns, xcr0=0x3, cpl=0)
    assert out.fault is not None and out.fault.vector == "#GP"
    assert out.fault_step == 1
    assert machine.vcpu.get_xcrs() == {0: 0x3}


def test_guest_xsetbv_of_a_valid_xcr0_is_what_kvm_get_xcrs_reports(
        machine: GuestMachine) -> None:
    out = machine.run_insns([Insn("XSETBV", reg=0, value=0x7)], xcr0=0x3, cpl=0)
    assert out.fault is None
    assert machine.vcpu.get_xcrs() == {0: 0x7}


@pytest.mark.parametrize("xcr0", [0x3, 0x7])
def test_guest_xgetbv0_at_cpl3(machine: GuestMachine, xcr0: int) -> None:
    """XGETBV(0) reads the CPU's XCR0: the XCR0 the guest set where KVM loads it on entry
    (kvm_load_guest_xsave_state), the host's where the backend does not (BACKEND_DIVERGENCES)."""
    out = machine.run_insns([Insn("XGETBV", reg=0)], xcr0=xcr0, cpl=3)
    assert out.fault is None
    assert machine.vcpu.get_xcrs() == {0: xcr0}
    expected = xcr0 if guest_xcr0_in_hardware(kvm_backend()) else xgetbv(0)
    assert out.values == (expected,)


def test_guest_xgetbv0_at_cpl0_equals_the_xcr0_the_guest_set(machine: GuestMachine) -> None:
    _cpl0_or_skip(machine, 0)
    out = machine.run_insns([Insn("XGETBV", reg=0)], xcr0=0x7, cpl=0)
    assert out.values == (0x7,)


@pytest.mark.parametrize("cpl", [3, 0])
def test_guest_xsaves_is_ud_when_the_guest_cpuid_lacks_xsaves(machine: GuestMachine,
                                                               cpl: int) -> None:
    """SDM XSAVES: #UD if CPUID.(EAX=0DH,ECX=1):EAX.XSS[bit 3] = 0 (before the CPL check)."""
    if machine.has_xsaves:
        pytest.skip("this KVM offers XSAVES in the guest CPUID")
    try:
        out = machine.run_insns([Insn("XSAVES", buf=0, mask=0x3)], xcr0=0x3, cpl=cpl,
                                buffers=[Buffer()])
    except HostError as e:
        assert cpl == 0 and machine.xstate_at_cpl0(), e  # only where CPL 0 cannot run them
        pytest.skip(f"guest CPL 0 cannot run XSAVES here: {e}")
    assert out.fault is not None and out.fault.vector == "#UD"
    assert out.fault_step == 0
    assert out.buffers[0] == bytes(len(out.buffers[0]))


def _amx_program() -> Program:
    """LDTILECFG of palette 1 with tmm0 = 16 rows x 64 bytes, then TILEZERO tmm0."""
    cfg = bytearray(64)
    cfg[0], cfg[48] = 1, 16
    struct.pack_into("<H", cfg, 16, 64)
    return Program(start_image(), (Insn("LDTILECFG", data=bytes(cfg)), Insn("TILEZERO", reg=0)),
                   cpl=3)


def test_a_guest_xfd_program_needs_xfd_in_the_guest_cpuid(machine: GuestMachine) -> None:
    """The guest arms IA32_XFD only where its CPUID has XFD (else KVM refuses the WRMSR)."""
    if machine.has_xfd:
        pytest.skip("this KVM offers XFD in the guest CPUID")
    with pytest.raises(HostUnavailable, match=r"CPUID\.\(EAX=0DH,ECX=1\):EAX\[4\]=0"):
        machine.run_program(_amx_program(), xcr0=0x3, xfd=1 << 18)


def test_guest_amx_under_xfd_is_nm_at_the_first_tile_data_access(machine: GuestMachine) -> None:
    """SDM 13.14: with XCR0[18] = IA32_XFD[18] = 1, TILEZERO raises #NM (the guest's own
    handler sees it: KVM intercepts the #NM only to read IA32_XFD_ERR, then re-injects it)."""
    if not machine.has_xfd:
        pytest.skip("KVM offers no XFD to guests here: "
                    "KVM_GET_SUPPORTED_CPUID.(EAX=0DH,ECX=1):EAX[4]=0")
    if not _supported_xcr0(machine) & XTILE == XTILE:
        pytest.skip("KVM offers no AMX to guests here: KVM_GET_SUPPORTED_CPUID.(EAX=0DH,"
                    "ECX=0):EAX[18:17] != 11b")
    out = machine.run_program(_amx_program(), xcr0=_supported_xcr0(machine), xfd=1 << 18)
    assert out.fault is not None and (out.fault.vector, out.fault_step) == ("#NM", 1)


def test_misaligned_guest_xsave_is_gp(machine: GuestMachine) -> None:
    """SDM XSAVE: #GP(0) if the memory operand is not 64-byte aligned."""
    prog = Program(start_image(), (Insn("XSAVE", buf=0, mask=0x3),), (Buffer(misalign=16),),
                   cpl=3)
    out = machine.run_program(prog, xcr0=0x3)
    assert out.fault is not None and out.fault.vector == "#GP" and out.fault_step == 0


def test_a_triple_fault_is_a_host_error_with_the_exit_reason() -> None:
    m = _machine()
    try:
        m.write(IDT, bytes(4096))  # no gate: #GP -> #DF -> shutdown
        with pytest.raises(HostError) as info:
            m.run_insns([Insn("XSETBV", reg=0, value=0x5)], xcr0=0x3, cpl=0)
        assert info.value.exit_reason == u.KVM_EXIT_SHUTDOWN
    finally:
        m.close()


# -- vCPU ioctls -----------------------------------------------------------------------------


@pytest.mark.parametrize(("xcr0", "ok"), [
    (0x1, True), (0x3, True), (0x5, False), (0x0, False), (0x2, False), (0x67, False),
    (0x200, False), (1 << 63 | 0x3, False),
])
def test_kvm_set_xcrs(machine: GuestMachine, xcr0: int, ok: bool) -> None:
    """KVM_SET_XCRS: EINVAL when __kvm_set_xcr() refuses (no x87; AVX without SSE; AVX-512
    partly; bits outside guest_supported_xcr0); XCR0 unchanged on refusal."""
    machine.vcpu.set_xcrs(0x3)
    if ok:
        machine.vcpu.set_xcrs(xcr0)
        assert machine.vcpu.get_xcrs() == {0: xcr0}
    else:
        with pytest.raises(KvmError) as info:
            machine.vcpu.set_xcrs(xcr0)
        assert info.value.errno == errno.EINVAL and info.value.call == "KVM_SET_XCRS"
        assert machine.vcpu.get_xcrs() == {0: 0x3}


def test_kvm_set_xcrs_accepts_every_avx512_xcr0_kvm_offers(machine: GuestMachine) -> None:
    supported = _supported_xcr0(machine)
    if supported & AVX512 != AVX512:
        pytest.skip(f"KVM offers no AVX-512 here: supported XCR0 {supported:#x}")
    machine.vcpu.set_xcrs(0x7 | AVX512)
    assert machine.vcpu.get_xcrs() == {0: 0x7 | AVX512}


def test_kvm_set_xcrs_rejects_flags_and_too_many_entries(machine: GuestMachine) -> None:
    for call in (lambda: machine.vcpu.set_xcrs(0x3, flags=1),
                 lambda: machine.vcpu.set_xcrs(None, entries=[(1, 0)] * 17)):
        with pytest.raises(KvmError) as info:
            call()
        assert info.value.errno == errno.EINVAL


def test_kvm_get_xsave_is_4096_bytes_with_a_consistent_header(machine: GuestMachine) -> None:
    """KVM_GET_XSAVE: standard format (XCOMP_BV = 0), XSTATE_BV within guest_supported_xcr0 |
    FPSSE, reserved header bytes zero, and the XCR0 word at 464 = the host's user XCR0
    (fpu_user_cfg.max_features, written by __copy_xstate_to_uabi_buf)."""
    img = machine.vcpu.get_xsave()
    assert len(img) == 4096
    bv, comp = struct.unpack_from("<QQ", img, 512)
    assert comp == 0
    assert bv & ~(_supported_xcr0(machine) | 0x3) == 0
    assert img[528:576] == bytes(48)
    assert struct.unpack_from("<Q", img, 464)[0] == xgetbv(0)


def test_kvm_get_xsave_shows_what_the_guest_loaded(machine: GuestMachine) -> None:
    out = machine.run_insns([Insn("MOVDQU", reg=5, data=xmm_pattern(5)),
                             Insn("LDMXCSR", value=0x1F00)], xcr0=0x3, cpl=3)
    assert out.fault is None
    img = machine.vcpu.get_xsave()
    assert img[160 + 16 * 5:176 + 16 * 5] == xmm_pattern(5)
    assert struct.unpack_from("<I", img, 24)[0] == 0x1F00
    assert struct.unpack_from("<Q", img, 512)[0] & 0x2


def test_kvm_get_xsave2_is_kvm_cap_xsave2_bytes(machine: GuestMachine) -> None:
    size = machine.vm.cap_xsave2()
    assert size >= 4096
    img = machine.vcpu.get_xsave2()
    assert len(img) == size
    if size == 4096:
        assert img == machine.vcpu.get_xsave()


def test_kvm_set_xsave_round_trips_and_the_guest_sees_it(machine: GuestMachine) -> None:
    img = bytearray(machine.vcpu.get_xsave())
    supported = _supported_xcr0(machine)
    bv = 0x7 if supported & 0x4 else 0x3
    struct.pack_into("<QQ", img, 512, bv, 0)
    struct.pack_into("<I", img, 24, 0x1F40)
    for i in range(16):
        img[160 + 16 * i:176 + 16 * i] = xmm_pattern(i)
    machine.vcpu.set_xsave(bytes(img))
    assert machine.vcpu.get_xsave() == bytes(img)
    out = machine.run_insns([Insn("STMXCSR")], xcr0=bv, cpl=3)
    assert out.values == (0x1F40,)


@pytest.mark.parametrize(("what", "edit"), [
    ("MXCSR reserved bit 31 with SSE", lambda b: struct.pack_into("<QI", b, 512, 0x3, 0)
     or struct.pack_into("<I", b, 24, 1 << 31)),
    ("XSTATE_BV with PKRU", lambda b: struct.pack_into("<Q", b, 512, 0x3 | 1 << 9)),
    ("XSTATE_BV with MPX", lambda b: struct.pack_into("<Q", b, 512, 0x3 | MPX)),
    ("XSTATE_BV with AMX tile data", lambda b: struct.pack_into("<Q", b, 512, 0x3 | 1 << 18)),
    ("XSTATE_BV bit 63", lambda b: struct.pack_into("<Q", b, 512, 1 << 63)),
    ("XCOMP_BV compacted", lambda b: struct.pack_into("<Q", b, 520, 1 << 63 | 0x3)),
    ("XCOMP_BV bit 0", lambda b: struct.pack_into("<Q", b, 520, 1)),
    ("reserved header byte", lambda b: b.__setitem__(540, 1)),
])
def test_kvm_set_xsave_rejects_with_einval(machine: GuestMachine, what: str, edit) -> None:
    """kvm_vcpu_ioctl_x86_set_xsave -> fpu_copy_uabi_to_guest_fpstate: XSTATE_BV outside
    kvm_caps.supported_xcr0, XCOMP_BV != 0, reserved header bytes, MXCSR reserved bits."""
    base = bytearray(machine.vcpu.get_xsave())
    struct.pack_into("<QQ", base, 512, 0x3, 0)
    img = bytearray(base)
    edit(img)
    if what.startswith("XSTATE_BV with") and struct.unpack_from("<Q", img, 512)[0] & ~0x3 \
            & _supported_xcr0(machine):
        pytest.skip(f"KVM supports {what[15:]} here")
    machine.vcpu.set_xsave(bytes(base))
    with pytest.raises(KvmError) as info:
        machine.vcpu.set_xsave(bytes(img))
    assert info.value.errno == errno.EINVAL and info.value.call == "KVM_SET_XSAVE"
    assert machine.vcpu.get_xsave() == bytes(base)


def test_kvm_set_xsave_ignores_mxcsr_when_no_legacy_component_is_set(
        machine: GuestMachine) -> None:
    """copy_uabi_to_xstate checks MXCSR only if XSTATE_BV has FP, SSE or YMM."""
    img = bytearray(machine.vcpu.get_xsave())
    struct.pack_into("<QQ", img, 512, 0, 0)
    struct.pack_into("<I", img, 24, 1 << 31)
    machine.vcpu.set_xsave(bytes(img))


def test_xfd_and_xss_msrs(machine: GuestMachine) -> None:
    """Host-initiated KVM_SET_MSRS: IA32_XFD / XFD_ERR accept only bits of
    guest_supported_xcr0 & XFEATURE_MASK_USER_DYNAMIC; IA32_XSS only supported XSS bits."""
    v = machine.vcpu
    assert v.get_msrs([u.MSR_IA32_XFD, u.MSR_IA32_XFD_ERR]) == {u.MSR_IA32_XFD: 0,
                                                                 u.MSR_IA32_XFD_ERR: 0}
    assert v.set_msrs({u.MSR_IA32_XFD: 0}) == 1
    if not _supported_xcr0(machine) & (1 << 18):
        assert v.set_msrs({u.MSR_IA32_XFD: 1 << 18}) == 0
        assert v.set_msrs({u.MSR_IA32_XFD_ERR: 1 << 18}) == 0
    if not machine.has_xsaves:
        assert v.set_msrs({u.MSR_IA32_XSS: 1 << 11}) == 0
    # KVM_SET_MSRS stops at the first refusal and says how many it wrote
    writes = [(u.MSR_IA32_XFD_ERR, 0), (u.MSR_IA32_XFD, 1 << 63), (u.MSR_IA32_XFD_ERR, 0)]
    assert v.set_msrs(writes) == 1


# -- system ioctls and guest permission ------------------------------------------------------


def test_supported_cpuid_leaf_0xd_follows_the_host_layout(machine: GuestMachine) -> None:
    """KVM_GET_SUPPORTED_CPUID 0xD: EAX:EDX within KVM_X86_XCOMP_GUEST_SUPP (only permission-
    gated bits may be missing), EBX = ECX = xstate_required_size(xcr0, false), sub-leaves with
    the host's standard offsets; KVM_CAP_XSAVE2 = max(4096, that size)."""
    xcr0 = _supported_xcr0(machine)
    supp = machine.kvm.xcomp_guest_supp()
    assert xcr0 & ~supp == 0 and (supp & ~xcr0) & ~XTILE == 0
    _eax, ebx, ecx, _edx = find_cpuid(machine.cpuid, 0xD, 0)
    ends = [576]
    for i in range(2, 63):
        if xcr0 >> i & 1:
            size, offset, _c, _d = find_cpuid(machine.cpuid, 0xD, i)
            assert (size, offset) == cpuid(0xD, i)[:2]
            ends.append(offset + size)
    assert ebx == ecx == max(ends)
    assert machine.kvm.cap_xsave2() == max(4096, ebx)


def test_guest_permission_request_for_amx(machine: GuestMachine) -> None:
    """ARCH_REQ_XCOMP_GUEST_PERM(18) in a fresh process: EOPNOTSUPP where the host lacks AMX
    (xstate_request_perm: requested not in fpu_user_cfg.max_features), with nothing changed;
    granted where it has AMX, and KVM_CAP_XSAVE2 then covers the tile data."""
    from fpstate.host.kvm import guest_permission_probe

    r = guest_permission_probe(u.ARCH_XCOMP_TILEDATA)
    if not cpuid(0xD, 0)[0] & (1 << 18):
        assert r["req_errno"] == errno.EOPNOTSUPP
        assert r["req_after_vcpu_errno"] == errno.EOPNOTSUPP
        assert r["guest_perm_after"] == r["guest_perm_before"]
        assert r["cap_xsave2_after"] == r["cap_xsave2_before"] == r["vm_cap_xsave2"]
        assert r["leaf_d_after"] == r["leaf_d_before"]
    else:
        assert r["req_errno"] == 0
        assert r["guest_perm_after"] & (1 << 18)
        assert r["cap_xsave2_after"] > 4096
        assert r["req_after_vcpu_errno"] == 0  # already permitted: 0 before the lock check


def test_kvm_get_device_attr_unknown_is_enxio(machine: GuestMachine) -> None:
    for group, attr in ((1, 0), (0, 5)):
        with pytest.raises(KvmError) as info:
            machine.kvm.get_device_attr(group, attr)
        assert info.value.errno == errno.ENXIO


# -- INIT --------------------------------------------------------------------------------------


def test_init_resets_the_cpu_and_keeps_xcr0_and_the_xsave_state() -> None:
    """INIT (kvm_apic_accept_events -> kvm_vcpu_reset(vcpu, true)): RIP FFF0, CS F000/FFFF0000,
    CR0 = ET (CD/NW kept), CR4 = EFER = 0, RDX = CPUID.1:EAX; XCR0 kept (only RESET writes
    XFEATURE_MASK_FP); the XSAVE state kept except the MPX (and CET) components KVM supports,
    which are zeroed."""
    m = _machine(irqchip=True)
    try:
        out = m.run_insns([Insn("MOVDQU", reg=9, data=xmm_pattern(9)),
                           Insn("LDMXCSR", value=0x1F00)], xcr0=0x3, cpl=3)
        assert out.fault is None
        before = m.vcpu.get_xsave()
        cr0_before = m.vcpu.get_sregs().cr0
        assert m.vcpu.init_vcpu() == u.KVM_MP_STATE_RUNNABLE  # vCPU 0 is the BSP
        s, r = m.vcpu.get_sregs(), m.vcpu.get_regs()
        assert (r.rip, s.cs.selector, s.cs.base) == (0xFFF0, 0xF000, 0xFFFF0000)
        assert s.cr0 == 0x10 | (cr0_before & 0x60000000)
        assert (s.cr4, s.efer) == (0, 0)
        assert r.rdx == find_cpuid(m.cpuid, 1)[0]
        assert m.vcpu.get_xcrs() == {0: 0x3}
        after = m.vcpu.get_xsave()
        cleared = m.kvm.xcomp_guest_supp() & MPX
        expected = bytearray(before)
        for i in range(3, 5):
            if cleared >> i & 1:
                size, offset, _c, _d = find_cpuid(m.cpuid, 0xD, i)
                expected[offset:offset + size] = bytes(size)
        assert after == bytes(expected)
        assert after[160 + 16 * 9:176 + 16 * 9] == xmm_pattern(9)
    finally:
        m.close()


def test_set_mp_state_init_received_is_not_an_init() -> None:
    """KVM_SET_MP_STATE only writes vcpu->arch.mp_state: nothing is reset."""
    m = _machine(irqchip=True)
    try:
        m.run_insns([], xcr0=0x3, cpl=0)
        rip, cr0 = m.vcpu.get_regs().rip, m.vcpu.get_sregs().cr0
        m.vcpu.set_mp_state(u.KVM_MP_STATE_INIT_RECEIVED)
        assert m.vcpu.get_mp_state() == u.KVM_MP_STATE_INIT_RECEIVED
        assert (m.vcpu.get_regs().rip, m.vcpu.get_sregs().cr0) == (rip, cr0)
        assert m.vcpu.get_xcrs() == {0: 0x3}
    finally:
        m.close()


def test_mp_state_and_init_need_the_in_kernel_lapic(machine: GuestMachine) -> None:
    with pytest.raises(KvmError) as info:
        machine.vcpu.set_mp_state(u.KVM_MP_STATE_INIT_RECEIVED)
    assert info.value.errno == errno.EINVAL and info.value.call == "KVM_SET_MP_STATE"
    with pytest.raises(HostUnavailable):
        machine.vcpu.init_vcpu()


def test_backend_divergences_name_known_backends() -> None:
    from fpstate.host.kvm import KVM_BACKENDS

    assert set(BACKEND_DIVERGENCES) <= set(KVM_BACKENDS)
    assert guest_xcr0_in_hardware("kvm_intel") and guest_xcr0_in_hardware("kvm_amd")
    assert not guest_xcr0_in_hardware("kvm_pvm")


@pytest.mark.parametrize(("insns", "buffers", "divergence", "hardware"), [
    ((Insn("LDMXCSR", value=1 << 16),), (), "#UD", "#GP"),
    ((Insn("FXSAVE", buf=0),), (Buffer(misalign=8),), None, "#GP"),
])
def test_cpl3_gp_under_the_backend(machine: GuestMachine, insns: tuple, buffers: tuple,
                                   divergence: str | None, hardware: str) -> None:
    """SDM: LDMXCSR of a reserved bit and a misaligned FXSAVE64 raise #GP(0). Where KVM hands
    guest #GP to its emulator (BACKEND_DIVERGENCES "cpl3_gp_emulated") the guest sees
    something else."""
    out = machine.run_insns(insns, xcr0=0x3, cpl=3, buffers=buffers)
    emulated = "cpl3_gp_emulated" in BACKEND_DIVERGENCES.get(kvm_backend() or "", {})
    expected = divergence if emulated else hardware
    assert (out.fault.vector if out.fault else None) == expected
    assert out.fault_step == (0 if expected else None)


@pytest.mark.parametrize("cpl", [0, 3])
def test_a_guest_run_leaves_sse_initial_and_under_pvm_may_mark_it_in_use(cpl: int) -> None:
    """A fresh vCPU runs only its setup (XSETBV) and, at ``cpl``, its report (OUT): XMM and
    MXCSR keep their initial values; under kvm_pvm SSE may be marked in use all the same
    (BACKEND_DIVERGENCES "sse_marked_in_use": always after CPL 3 on the Zen 5 host, never on
    a Zen 3 host); the model's KVM never.
    On a host with PKU, XSTATE_BV[9] is set with PKRU 0, as in the model of this KVM: KVM
    switches PKRU only for a guest with PKRU in XCR0 or CR4.PKE (kvm_load_guest_xsave_state),
    so this guest runs with the host's PKRU (init_pkru_value, not 0) in the register and its
    fpstate is saved with it, while KVM_GET_XSAVE2 writes vcpu->arch.pkru as the value."""
    from fpstate.kvm.x86.conform_host import Context

    with _machine() as m:
        assert struct.unpack_from("<Q", m.vcpu.get_xsave2(), 512)[0] == 0
        m.run_insns([], xcr0=0x3, cpl=cpl)
        after = m.vcpu.get_xsave2()
    assert after[160:416] == bytes(256) and struct.unpack_from("<I", after, 24)[0] == 0x1F80
    xstate_bv = struct.unpack_from("<Q", after, 512)[0]
    ctx = Context()
    try:
        v = ctx.vmm()
        vcpu = ctx.model_vcpu(v)
        v.run(vcpu, [GuestOp("xsetbv", 0, 0x3, cpl=cpl)])
        model = v.get_xsave2(vcpu)
    finally:
        ctx.close()
    pkru = 1 << 9
    assert xstate_bv & pkru == struct.unpack_from("<Q", model, 512)[0] & pkru == (
        xgetbv(0) & pkru)
    if xstate_bv & pkru:
        at = cpuid(0xD, 9)[1]  # PKRU's standard offset (EBX)
        assert after[at:at + 4] == model[at:at + 4] == bytes(4)
    xstate_bv &= ~pkru
    if "sse_marked_in_use" not in BACKEND_DIVERGENCES.get(kvm_backend() or "", {}):
        assert xstate_bv == 0
    else:
        assert xstate_bv in (0, 0x2)
