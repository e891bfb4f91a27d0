"""arm64 register layouts: the sve_context.h / sigcontext.h / ptrace.h formulas and SME effects."""

from hypothesis import given
from hypothesis import strategies as st

from fpstate.arm64 import regs as r
from fpstate.arm64.regs import FPSR_STREAMING, ZERO, FpRegs, Tok


def test_user_fpsimd_state_is_528_bytes_with_fpsr_at_512():
    # sigcontext.h's allocation table: "0x210 fpsimd_context" = 8-byte head + this minus the
    # 8 reserved bytes; ptrace.h: vregs[32] then fpsr, fpcr, __reserved[2].
    assert r.USER_FPSIMD_STATE_SIZE == 528
    assert (r.FPSIMD_FPSR_OFFSET, r.FPSIMD_FPCR_OFFSET) == (512, 516)


@given(st.lists(st.integers(0, (1 << 128) - 1), min_size=32, max_size=32),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_user_fpsimd_state_round_trips(vregs, fpsr, fpcr):
    blob = r.pack_user_fpsimd_state(tuple(vregs), fpsr, fpcr)
    assert len(blob) == 528 and blob[520:] == bytes(8)
    assert r.unpack_user_fpsimd_state(blob) == (tuple(vregs), fpsr, fpcr)


def test_sve_register_block_sizes():
    # 32 Z of vq*16 bytes, 16 P and FFR of vq*2 bytes each.
    assert r.sve_regs_size(1) == 32 * 16 + 17 * 2 == 546
    assert r.sve_regs_size(2) == 1092
    assert r.sve_regs_size(4) == 2184
    assert r.sve_regs_size(16) == 32 * 256 + 17 * 32 == 8736
    assert r.sve_regs_size(0) == 0
    assert r.sve_zreg_offset(4, 31) == 31 * 64
    assert r.sve_pregs_offset(4) == 2048 and r.sve_preg_offset(4, 15) == 2048 + 15 * 8
    assert r.sve_ffr_offset(4) == 2048 + 16 * 8


def test_za_is_svl_squared():
    assert r.za_regs_size(1) == 256
    assert r.za_regs_size(4) == 64 * 64
    assert r.za_regs_size(16) == 65536   # "This could potentially be up to 64K" (sme_alloc)


def test_vl_helpers():
    assert r.sve_vl_valid(16) and r.sve_vl_valid(256) and r.sve_vl_valid(8192)
    assert not r.sve_vl_valid(8) and not r.sve_vl_valid(24) and not r.sve_vl_valid(8208)
    assert r.sve_vq_from_vl(32) == 2 and r.sve_vl_from_vq(16) == 256
    assert r.VL_ARCH_MAX == 256


def test_effective_vq_is_largest_implemented_not_above_request_and_ceiling():
    vqs = frozenset({1, 2, 4})
    assert r.effective_vq(15, 15, vqs) == 4
    assert r.effective_vq(2, 15, vqs) == 2       # LEN=2 asks for VQ 3: rounds down to 2
    assert r.effective_vq(15, 1, vqs) == 2       # ZCR_EL2 ceiling VQ 2
    assert r.effective_vq(0, 15, vqs) == 1
    assert r.effective_vq(3, 15, frozenset({4})) == 4   # SME may lack VQ 1: smallest VQ
    assert r.effective_vq(5, 15, frozenset()) == 0


def test_sysreg_encodings():
    assert r.FP_SYSREGS["FPMR"].sys_reg == (3 << 19) | (3 << 16) | (4 << 12) | (4 << 8) | (2 << 5)
    assert (r.FP_SYSREGS["SVCR"].crm, r.FP_SYSREGS["SVCR"].op2) == (2, 2)
    assert (r.FP_SYSREGS["ZCR_EL1"].op1, r.FP_SYSREGS["ZCR_EL1"].crn) == (0, 1)


def test_smstart_sm_zeroes_vector_state_and_fpmr_and_sets_fpsr():
    a = Tok("t", 1)
    regs = FpRegs(v=a, zhi=a, p=a, fpsr=a, fpmr=a)
    on = r.smstart(regs, sm=True, za=False)
    assert (on.v, on.zhi, on.p, on.fpsr, on.fpmr) == (ZERO, ZERO, ZERO, FPSR_STREAMING, ZERO)
    assert on.sm and not on.za_on and on.svcr == r.SVCR_SM
    assert FPSR_STREAMING.gen == 0x0800009F
    # entering again changes nothing; leaving zeroes again (FPMR included)
    assert r.smstart(on.put(V=a, FPMR=a), sm=True, za=False).fpmr == a
    off = r.smstop(on.put(V=a, FPMR=a), sm=True, za=False)
    assert (off.v, off.fpmr) == (ZERO, ZERO) and not off.sm
    # PSTATE.ZA changes leave FPMR alone
    assert r.smstop(r.smstart(regs, sm=False, za=True), sm=False, za=True).fpmr == a


def test_za_enable_zeroes_za_and_zt0():
    a = Tok("t", 7)
    regs = FpRegs(za=a, zt0=a)
    on = r.smstart(regs, sm=False, za=True)
    assert (on.za, on.zt0, on.za_on, on.svcr) == (ZERO, ZERO, True, r.SVCR_ZA)
    assert r.smstop(on, sm=True, za=True).svcr == 0


def test_components_have_features():
    assert set(r.COMPONENT_FEATURE) == set(r.COMPONENTS)
    assert r.COMPONENT_FEATURE["FPMR"] == "FPMR" and r.COMPONENT_FEATURE["ZHI"] == "SVE"
    assert str(Tok("vm0/0", 3)) == "vm0/0#3" and str(FPSR_STREAMING) == "arch#0x800009f"


def test_ptrace_regset_sizes():
    # SVE_PT_SIZE: 16-byte header, Z/P/FFR at the VL, FPSR/FPCR 16-byte aligned after FFR.
    assert r.sve_pt_fpsr_offset(1) == 576
    assert r.sve_pt_size(1, r.SVE_PT_REGS_SVE) == 592
    assert r.sve_pt_size(2, r.SVE_PT_REGS_SVE) == 1136
    assert r.sve_pt_size(4, r.SVE_PT_REGS_SVE) == 2224
    assert r.sve_pt_size(4, r.SVE_PT_REGS_FPSIMD) == 16 + 528
    assert r.za_pt_size(0) == 16 and r.za_pt_size(2) == 16 + 1024
    assert (r.SVE_PT_VL_INHERIT, r.SVE_PT_VL_ONEXEC) == (2, 4)
