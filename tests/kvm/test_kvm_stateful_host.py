"""The same VMM rules applied to the model of KVM and to this machine's real KVM, in any order.

A hypothesis state machine (STYLE.md rule 13) whose every rule is one VMM action done twice:
on a model vCPU (`fpstate.kvm.x86`, configured only from what this KVM reports:
`fpstate.kvm.x86.conform_host.Context`) and on a real vCPU with the in-kernel irqchip (so that
INIT works). Rules: KVM_SET_XCRS, KVM_SET_XSAVE (a buffer a CPU could have saved, or a random
one with one header field wrong -- see `set_xsave_random`), KVM_SET_MSRS of the XSAVE MSRs, a
KVM_RUN whose guest sets XCR0 with XSETBV at CPL 0 or 3, a KVM_RUN whose guest loads registers
at CPL 3, and INIT. After every
step the two must agree on the ioctl's result, the guest's fault, and then on KVM_GET_XSAVE2
(byte for byte) and KVM_GET_XCRS -- the conform cases compare fixed sequences, this compares
the interleavings. A divergence of this host's KVM backend from VMX/SVM KVM that the comparison
meets (`fpstate.host.kvm_guest.BACKEND_DIVERGENCES`) is named where it is allowed for.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fpstate.errors import HostUnavailable
from fpstate.host.child import opmask_pattern, zmm_pattern
from fpstate.kvm.x86 import x86
from fpstate.kvm.x86.conform_guest import load_guest_registers
from fpstate.kvm.x86.conform_host import Context, _errno_of, random_uabi
from fpstate.kvm.x86.vcpu import GuestOp
from fpstate.x86.program import Insn, Program

pytestmark = pytest.mark.host

XCR0S = (0x1, 0x3, 0x7, 0xE7, 0x0, 0x2, 0x5, 0x67, 0xC7, 0x27, 0x207, 0x1E7, 1 << 63)
MSRS = ((x86.MSR_IA32_XSS, 0), (x86.MSR_IA32_XSS, 0x800), (x86.MSR_IA32_XFD, 0),
        (x86.MSR_IA32_XFD, 1 << 18), (x86.MSR_IA32_XFD_ERR, 0))

_CTX: list[Context] = []


def _context() -> Context:
    if not _CTX:
        try:
            _CTX.append(Context())
        except HostUnavailable as e:
            pytest.skip(str(e))
    return _CTX[0]


def _loads(seed: int, xcr0: int, size: int) -> Program:
    """Register loads the guest's XCR0 enables: XMM (MOVDQU), YMM (VMOVDQU), ZMM (VMOVDQU64)
    and opmask registers, each with the pattern of ``seed``."""
    start = bytearray(size)
    start[0:2] = b"\x7f\x03"
    start[24:28] = (0x1F80).to_bytes(4, "little")
    rng = random.Random(seed)
    insns = []
    for n in rng.sample(range(32 if xcr0 & 0xE0 == 0xE0 else 16), 4):
        if xcr0 & 0xE0 == 0xE0:
            insns.append(Insn("VMOVDQU64", reg=n, data=zmm_pattern(n, seed)))
        elif xcr0 & 0x4:
            insns.append(Insn("VMOVDQU", reg=n, data=zmm_pattern(n, seed)[:32]))
        else:
            insns.append(Insn("MOVDQU", reg=n, data=zmm_pattern(n, seed)[:16]))
    if xcr0 & 0x20:
        insns.append(Insn("KMOVQ", reg=seed % 8, data=opmask_pattern(seed % 8, seed)
                          .to_bytes(8, "little")))
    return Program(bytes(start), tuple(insns), cpl=3)


#: The x87 bytes 0..23 of a standard image in x87's initial configuration: FCW 037FH, the
#: rest (FSW, abridged FTW, FOP, FIP, FDP) zero (SDM Vol. 1 13.6).
X87_INITIAL = (0x037F).to_bytes(2, "little") + bytes(22)


def sse_in_init(buf: bytes, mxcsr_mask: int) -> bytes:
    """``buf`` as it reads once the XINUSE bits that this backend's "sse_marked_in_use" makes
    timing-dependent are taken out of the comparison: XSTATE_BV[0] cleared where x87 holds its
    initial values (observed once, a CI run under load), XSTATE_BV[1] where SSE holds its
    initial values (XMM zero, MXCSR 1F80H) and XSTATE_BV[2] where AVX does while ZMM_Hi256 is
    in use (the LEGACY_SSE_UPPER rule of `fpstate.x86.insn.preemptions`, which the CPU model
    allows for the same reason); and where XSTATE_BV[1] is clear, MXCSR and MXCSR_MASK as an
    SSE save in between leaves them (1F80H and the CPU's mask) instead of what an earlier
    KVM_SET_XSAVE left in the guest fpstate. (The guest's MXCSR is 1F80H either way: SSE not
    in use means MXCSR = 1F80H, SDM 13.6.) No XRSTOR of the buffer could tell the two apart."""
    out = bytearray(buf)
    if out[0:24] == X87_INITIAL and out[32:160] == bytes(128):
        out[512] &= ~0x1  # x87 likewise, seen once (session 22's CI, under load)
    if out[160:416] == bytes(256) and struct.unpack_from("<I", out, 24)[0] == 0x1F80:
        out[512] &= ~0x2
    if out[576:832] == bytes(256) and out[512] & 0x40:
        out[512] &= ~0x4
    if not out[512] & 0x2:
        struct.pack_into("<II", out, 24, 0x1F80, mxcsr_mask)
    return bytes(out)


class ModelAndRealKvm(RuleBasedStateMachine):
    @initialize()
    def vcpus(self) -> None:
        self.ctx = _context()
        self.v = self.ctx.vmm()
        self.mvcpu = self.ctx.model_vcpu(self.v)
        self.g = self.ctx.guest_machine(irqchip=True)
        self.xcr0 = self.ctx.system.xcr0  # the XCR0 the guest runs with (backend: host's)

    def teardown(self) -> None:
        if hasattr(self, "g"):
            self.g.close()
            self.ctx._machines.remove(self.g)

    @rule(xcr0=st.sampled_from(XCR0S))
    def set_xcrs(self, xcr0: int) -> None:
        model = self.v.set_xcrs(self.mvcpu, [(0, xcr0)])
        assert model == _errno_of(lambda: self.g.vcpu.set_xcrs(xcr0)), hex(xcr0)

    def _set_xsave(self, seed: int, canonical: bool) -> int:
        buf = random_uabi(random.Random(seed), self.ctx.caps, self.ctx.system.mxcsr_feature_mask,
                          canonical=canonical)
        model = self.v.set_xsave(self.mvcpu, buf)
        assert model == _errno_of(lambda: self.g.vcpu.set_xsave(buf))
        return model

    @rule(seed=st.integers(0, 2**32 - 1))
    def set_xsave(self, seed: int) -> None:
        """A buffer this CPU could have saved (`random_uabi` canonical)."""
        self._set_xsave(seed, True)

    @rule(seed=st.integers(0, 2**32 - 1), then=st.integers(0, 2**32 - 1))
    def set_xsave_random(self, seed: int, then: int) -> None:
        """Random bytes with, now and then, one header field wrong: errno and buffer compared;
        then, if it was accepted, a canonical buffer before anything runs. (XRSTOR and XSAVE
        of this CPU normalise what no CPU would have saved -- reserved x87 control/tag bits,
        ZMM_Hi256 in use without AVX -- and the kernel model's register file, which the model
        of KVM runs on, does not model that normalisation: fpstate.kernel.x86.hw.)"""
        if self._set_xsave(seed, False) == 0:
            self.same_xsave2_and_xcrs()
            self._set_xsave(then, True)

    @rule(msr=st.sampled_from(MSRS))
    def set_msrs(self, msr: tuple[int, int]) -> None:
        model = self.v.set_msrs(self.mvcpu, [msr])
        assert model == self.g.vcpu.set_msrs({msr[0]: msr[1]}), msr
        index = msr[0]
        assert self.v.get_msrs(self.mvcpu, [index]) == self.g.vcpu.get_msrs([index])

    @rule(value=st.sampled_from(XCR0S), cpl=st.sampled_from((0, 0, 3)))
    def guest_xsetbv(self, value: int, cpl: int) -> None:
        out = self.g.run_insns([Insn("XSETBV", reg=0, value=value)], xcr0=self.xcr0, cpl=cpl)
        r = self.v.run(self.mvcpu, [GuestOp("xsetbv", 0, self.xcr0),
                                    GuestOp("xsetbv", 0, value, cpl=cpl)])
        model = r.results[1].vector if r.results[1] else None
        assert model == (out.fault.vector if out.fault else None), (hex(value), cpl)

    @rule(seed=st.integers(0, 255))
    def guest_loads_registers(self, seed: int) -> None:
        """The guest XRSTORs a start image and loads registers at CPL 3 (the one CPL at which
        this backend runs them); the model's vCPU gets the registers the CPU model computes."""
        prog = _loads(seed, self.xcr0, self.g.standard_size(self.xcr0))
        real = self.g.run_program(prog, xcr0=self.xcr0)
        model = load_guest_registers(self.ctx, self.v, self.mvcpu, prog, self.xcr0, real)
        assert model.key() == real.key(), model.differences(real)

    @rule()
    def init(self) -> None:
        self.v.init(self.mvcpu)
        self.g.vcpu.init_vcpu()

    @invariant()
    def same_xsave2_and_xcrs(self) -> None:
        if not hasattr(self, "g"):
            return
        model, real = self.v.get_xsave2(self.mvcpu), self.g.vcpu.get_xsave2()
        if "sse_marked_in_use" in self.ctx.divergences():
            mask = self.ctx.system.mxcsr_feature_mask
            model, real = sse_in_init(model, mask), sse_in_init(real, mask)
        if model != real:
            diff = [i for i in range(len(real)) if model[i] != real[i]]
            raise AssertionError(f"KVM_GET_XSAVE2 differs at {len(diff)} bytes from {diff[0]}: "
                                 f"model {model[diff[0]:diff[0] + 8].hex()} real "
                                 f"{real[diff[0]:diff[0] + 8].hex()}")
        assert self.v.get_xcrs(self.mvcpu) == self.g.vcpu.get_xcrs()


ModelAndRealKvm.TestCase.settings = settings(
    max_examples=25, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_model_and_real_kvm_agree_in_any_order = ModelAndRealKvm.TestCase
