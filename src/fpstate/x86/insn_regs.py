"""The instructions around the XSAVE family: FXSAVE/FXRSTOR, XGETBV/XSETBV, and those that
change XSAVE-managed registers directly: SSE/AVX/AVX-512 loads, VZEROUPPER/VZEROALL, x87
(FLD, FLDCW, FNINIT, EMMS, FNSTSW, FNSTCW), MXCSR, PKRU and AMX.

Models the Intel SDM Vol. 2 pages of each instruction (the opcode is in each docstring) and
the XINUSE/XMODIFIED tracking of Vol. 1 13.6 as the implementation records it
(`fpstate.x86.impl`). Same conventions as `fpstate.x86.insn`: the `Cpu` first, a `Fault` or
None (or the value read) back, nothing changed by a faulting instruction.

Tracking, as measured on the host and recorded in `fpstate.x86.impl`:
- a load sets XINUSE and XMODIFIED of every component it writes (`Cpu.wrote`), whatever the
  value, except where WRITE_XINUSE says the component's XINUSE follows its value (x87);
- VEX.256 and EVEX loads zero the bits above them (up to 511); that zeroing marks the
  component modified but does not set its XINUSE (measured: VMOVDQU ymm from the initial
  state leaves XINUSE[6] = 0), and with VEX256_HI256_XINUSE "per-register" it clears
  XINUSE[6] when no other of ZMM0-15 keeps it in use (`Cpu.zmm_hi256_written`);
- LEGACY_SSE_UPPER marks AVX in use, not modified (XSAVEOPT still skips it after an XRSTOR);
- VZEROUPPER/VZEROALL/TILERELEASE put whole components in their initial configuration and,
  with ZEROING_CLEARS_XINUSE, clear their XINUSE bits;
- LDMXCSR changes MXCSR only, and XINUSE[1] as LDMXCSR_XINUSE says (AMD: kept, as
  XINUSE[1] "pertains only to the XMM registers", 13.6; Intel: set);
- with RESTORE_ZMM_XINUSE "value", a restore that touches ZMM0-15 (FXRSTOR; XRSTOR with RFBM
  bit 1, 2 or 6) recomputes XINUSE[1], [2], [6] from the registers (`restore_zmm_xinuse`),
  XINUSE[2] not while a legacy SSE write keeps it (LEGACY_SSE_KEEPS_AVX, `Cpu.avx_kept`);
- with VEX_XINUSE_RECOMPUTED "recomputed" (Intel), XINUSE[1] and [2] that a VEX.256 load set
  from 0 are cleared by the next XRSTOR that loads AVX or ZMM_Hi256 state while YMM0-15 are
  all zero (`restore_vex_xinuse`), unless another write or restore touched them first.
"""

from __future__ import annotations

import struct

from fpstate.x86.cpu import (
    FSW_B,
    FSW_C1,
    FSW_ES,
    FSW_EXCEPTIONS,
    FSW_IE,
    FSW_SF,
    HI16_ZMM,
    OPMASK,
    PKRU,
    SSE,
    X87,
    X87_INDEFINITE,
    XTILECFG,
    XTILEDATA,
    YMM,
    ZMM_HI256,
    Area,
    Cpu,
    Machine,
    tilecfg_valid,
)
from fpstate.x86.impl import (
    EMMS_TOP,
    FLD_UNDEFINED_FLAGS,
    FNCLEX_UNDEFINED_FLAGS,
    FXSAVE_RESERVED,
    LDMXCSR_XINUSE,
    LEGACY_SSE_KEEPS_AVX,
    LEGACY_SSE_UPPER,
    RESTORE_ZMM_XINUSE,
    VEX256_HI256_XINUSE,
    VEX_XINUSE_RECOMPUTED,
    XRSTOR_LOAD_XINUSE,
    ZEROING_CLEARS_XINUSE,
)
from fpstate.x86.program import Fault
from fpstate.x86.xfeatures import MXCSR_DEFAULT

_NM_TS = Fault("#NM", "CR0.TS[bit 3] = 1")


def _avx_faults(cpu: Cpu, flag: str, xcr0: int) -> Fault | None:
    """#UD unless CPUID has ``flag``, CR4.OSXSAVE = 1 and XCR0 enables ``xcr0`` (SDM 13.3:
    "software can execute Intel AVX instructions only if CR4.OSXSAVE = XCR0[2] = 1", AVX-512
    only with XCR0[7:5] = 111b and XCR0[2:1] = 11b); #NM if CR0.TS."""
    if not cpu.machine.has(flag):
        return Fault("#UD", f"CPUID lacks {flag}")
    if not cpu.cr4_osxsave or cpu.xcr0 & xcr0 != xcr0:
        return Fault("#UD", f"CR4.OSXSAVE = 0 or XCR0 lacks {xcr0:#x}")
    if cpu.cr0_ts:
        return _NM_TS
    return None


#: The components that ZMM0-15 span: XMM (SSE), bits 255:128 (AVX), bits 511:256 (ZMM_Hi256).
ZMM0_15 = 1 << SSE | 1 << YMM | 1 << ZMM_HI256


def restore_zmm_xinuse(cpu: Cpu, rfbm: int = 0) -> None:
    """After FXRSTOR (``rfbm`` 0), or an XRSTOR/XRSTORS whose RFBM meets `ZMM0_15`, with
    RESTORE_ZMM_XINUSE "value": XINUSE[1], [2], [6] := not in the initial configuration (SDM
    13.6) -- but XINUSE[2] stays set while a legacy SSE write keeps it (`Cpu.avx_kept`,
    LEGACY_SSE_KEEPS_AVX) and the restore does not load AVX state (RFBM[2] = 0)."""
    if rfbm >> YMM & 1:
        cpu.avx_kept = False
    if cpu.impl[RESTORE_ZMM_XINUSE] == "value":
        for i in (SSE, YMM, ZMM_HI256):
            if cpu.xcr0 >> i & 1 and not (i == YMM and cpu.avx_kept):
                cpu.track_value(i)


def restore_vex_xinuse(cpu: Cpu, restored: int, initialized: int, ymm_zero: bool) -> None:
    """After an XRSTOR/XRSTORS that loaded ``restored`` from memory and put ``initialized`` in
    the initial configuration, with VEX_XINUSE_RECOMPUTED "recomputed": XINUSE[1] and [2]
    that a load of registers 8-15 set from 0 (`Cpu.vex_soft`) and the restore did not touch
    are cleared when it loaded AVX or ZMM_Hi256 state and YMM0-15 were all zero before it or
    are after it (``ymm_zero``); a restore ends the hold on whatever it touched."""
    soft = cpu.vex_soft & ~(restored | initialized)
    cpu.vex_soft = soft
    if soft and ymm_zero and restored & (1 << YMM | 1 << ZMM_HI256):
        cpu.xinuse &= ~soft
        cpu.vex_soft = 0


def _zero_above(cpu: Cpu, reg: int, width: int) -> None:
    """Zero bits 511:``width`` of ZMM ``reg`` (< 16): "DEST[MAXVL-1:...] := 0"."""
    if width <= 128 and YMM in cpu.regs:
        cpu.regs[YMM][16 * reg:16 * reg + 16] = bytes(16)
        cpu.xmodified |= 1 << YMM
    if width <= 256 and ZMM_HI256 in cpu.regs:
        cpu.regs[ZMM_HI256][32 * reg:32 * reg + 32] = bytes(32)
        cpu.xmodified |= 1 << ZMM_HI256


def _vector_load(cpu: Cpu, reg: int, mask: int) -> None:
    """A load of XMM/YMM ``reg`` wrote the components of ``mask``: as `Cpu.wrote`, and with
    VEX_XINUSE_RECOMPUTED "recomputed" the XINUSE bits a load of registers 8-15 set from 0
    (or that were held already) stay held (`Cpu.vex_soft`, `restore_vex_xinuse`)."""
    held = (cpu.vex_soft | ~cpu.xinuse) & mask
    cpu.wrote(mask)
    if reg >= 8 and cpu.impl[VEX_XINUSE_RECOMPUTED] == "recomputed":
        cpu.vex_soft |= held


def MOVDQU(cpu: Cpu, reg: int, data: bytes) -> Fault | None:
    """MOVDQU xmm, m128 (F3 0F 6F /r): XMM[reg] := data; "DEST[MAXVL-1:128] (Unmodified)".
    With LEGACY_SSE_UPPER, AVX state is marked in use (not modified) too while ZMM_Hi256 is;
    with LEGACY_SSE_KEEPS_AVX, AVX state in use stays so through restores that do not load
    it (`restore_zmm_xinuse`); XINUSE[1] it sets from 0 in XMM8-15 as VEX_XINUSE_RECOMPUTED
    says."""
    if cpu.cr0_ts:
        return _NM_TS
    cpu.regs[SSE][16 * reg:16 * reg + 16] = data
    _vector_load(cpu, reg, 1 << SSE)
    if cpu.impl[LEGACY_SSE_KEEPS_AVX] and cpu.xinuse >> YMM & 1:
        cpu.avx_kept = True
    if cpu.impl[LEGACY_SSE_UPPER] and cpu.xinuse >> ZMM_HI256 & 1:
        cpu.xinuse |= 1 << YMM
        if cpu.impl[VEX256_HI256_XINUSE] == "per-register" and reg < 16:
            cpu.zmm_hi256_written |= 1 << reg  # its upper half now counts as in use too
    return None


def VMOVDQU(cpu: Cpu, reg: int, data: bytes) -> Fault | None:
    """VMOVDQU ymm, m256 (VEX.256.F3.0F.WIG 6F /r): YMM[reg] := data, bits 511:256 zeroed
    (XINUSE[6] as VEX256_HI256_XINUSE says; XINUSE[1], [2] it sets from 0 in YMM8-15 as
    VEX_XINUSE_RECOMPUTED says)."""
    fault = _avx_faults(cpu, "AVX", 0b110)
    if fault:
        return fault
    cpu.regs[SSE][16 * reg:16 * reg + 16] = data[:16]
    cpu.regs[YMM][16 * reg:16 * reg + 16] = data[16:32]
    _zero_above(cpu, reg, 256)
    _vector_load(cpu, reg, 1 << SSE | 1 << YMM)
    if cpu.impl[VEX256_HI256_XINUSE] == "per-register" and ZMM_HI256 in cpu.regs:
        before = cpu.zmm_hi256_written | 1 << reg
        cpu.zmm_hi256_written &= ~(1 << reg)
        if cpu.xinuse >> ZMM_HI256 & 1 and not cpu.zmm_hi256_written \
                and not any(cpu.regs[ZMM_HI256]):
            cpu.xinuse &= ~(1 << ZMM_HI256)
            cpu.zmm_hi256_lag = before
    return None


def VMOVDQU64(cpu: Cpu, reg: int, data: bytes) -> Fault | None:
    """VMOVDQU64 zmm, m512 (EVEX.512.F3.0F.W1 6F /r): ZMM[reg] := data. ZMM0-15 span SSE,
    AVX and ZMM_Hi256; ZMM16-31 are Hi16_ZMM."""
    fault = _avx_faults(cpu, "AVX512F", 0xE6)
    if fault:
        return fault
    if reg >= 16:
        cpu.regs[HI16_ZMM][64 * (reg - 16):64 * (reg - 15)] = data
        cpu.wrote(1 << HI16_ZMM)
        return None
    cpu.regs[SSE][16 * reg:16 * reg + 16] = data[:16]
    cpu.regs[YMM][16 * reg:16 * reg + 16] = data[16:32]
    cpu.regs[ZMM_HI256][32 * reg:32 * reg + 32] = data[32:64]
    cpu.wrote(1 << SSE | 1 << YMM | 1 << ZMM_HI256)
    cpu.zmm_hi256_written |= 1 << reg
    return None


def KMOVQ(cpu: Cpu, reg: int, data: bytes) -> Fault | None:
    """KMOVQ k, m64 (VEX.L0.0F.W1 90 /r, AVX512BW): k[reg] := data."""
    fault = _avx_faults(cpu, "AVX512BW", 0xE6)
    if fault:
        return fault
    cpu.regs[OPMASK][8 * reg:8 * reg + 8] = data
    cpu.wrote(1 << OPMASK)
    return None


def _zeroed(cpu: Cpu, mask: int) -> None:
    """Whole components put in their initial configuration by an instruction."""
    cpu.xmodified |= mask
    cpu.vex_soft &= ~mask
    if mask >> ZMM_HI256 & 1:
        cpu.zmm_hi256_written = 0
    if mask >> YMM & 1:
        cpu.avx_kept = False  # AVX state zeroed: nothing keeps it in use (LEGACY_SSE_KEEPS_AVX)
    if cpu.impl[ZEROING_CLEARS_XINUSE]:
        cpu.xinuse &= ~mask
    else:
        cpu.xinuse |= mask


def VZEROUPPER(cpu: Cpu) -> Fault | None:
    """VZEROUPPER (VEX.128.0F.WIG 77): zero bits MAXVL-1:128 of ZMM0-15 (AVX and ZMM_Hi256
    state); ZMM16-31 unchanged."""
    fault = _avx_faults(cpu, "AVX", 0b110)
    if fault:
        return fault
    mask = 0
    for i in (YMM, ZMM_HI256):
        if i in cpu.regs:
            cpu.regs[i][:] = bytes(len(cpu.regs[i]))
            mask |= 1 << i
    _zeroed(cpu, mask)
    return None


def VZEROALL(cpu: Cpu) -> Fault | None:
    """VZEROALL (VEX.256.0F.WIG 77): zero ZMM0-15 entirely (SSE, AVX, ZMM_Hi256 state); MXCSR
    and ZMM16-31 unchanged."""
    fault = _avx_faults(cpu, "AVX", 0b110)
    if fault:
        return fault
    mask = 0
    for i in (SSE, YMM, ZMM_HI256):
        if i in cpu.regs:
            cpu.regs[i][:] = bytes(len(cpu.regs[i]))
            mask |= 1 << i
    _zeroed(cpu, mask)
    return None


# --- x87 (SDM Vol. 1 8; Vol. 2A FLD, FLDCW, FNINIT, FSTSW, FSTCW, EMMS) -----------------------


def _x87_wait(cpu: Cpu) -> Fault | None:
    """A waiting x87 instruction: #NM if CR0.TS, #MF if an unmasked exception is pending."""
    if cpu.cr0_ts:
        return _NM_TS
    if cpu.x87_pending():
        return Fault("#MF", "pending unmasked x87 exception (FSW.ES = 1)")
    return None


def FLD(cpu: Cpu, data: bytes) -> Fault | None:
    """FLD m80fp (DB /5): push the 80-bit value, loaded without conversion (no #IA, #D).

    If the register that becomes ST(0) is not empty: stack overflow, FSW.IE, SF and C1 set;
    masked (FCW.IM = 1) the QNaN indefinite is pushed, unmasked nothing is pushed and ES is
    set. Otherwise C1 := 0. C0, C2, C3 are "undefined" (FLD_UNDEFINED_FLAGS). A non-control
    instruction: FIP, and as FDP_EXCPTN_ONLY and FOP_UPDATE say FDP and FOP, become this
    instruction's (`Cpu.x87_noncontrol`; unknown to the model without its placement)."""
    return _x87_push(cpu, data, operand=True)


#: FLD1's and FLDZ's constants, +1.0 and +0.0 in double extended precision (exact under
#: every rounding mode).
X87_ONE = bytes.fromhex("0000000000000080ff3f")
X87_ZERO = bytes(10)


def FLD1(cpu: Cpu) -> Fault | None:
    """FLD1 (D9 E8): push +1.0, as FLD pushes (stack overflow, C1, FLD_UNDEFINED_FLAGS for C0,
    C2, C3 -- measured alike on Emerald Rapids), with no memory operand: FDP is "undefined"
    after it (SDM Vol. 1 8.1.8; `Cpu.x87_noncontrol`)."""
    return _x87_push(cpu, X87_ONE, operand=False)


def FLDZ(cpu: Cpu) -> Fault | None:
    """FLDZ (D9 EE): push +0.0, as FLD1 does."""
    return _x87_push(cpu, X87_ZERO, operand=False)


def _x87_push(cpu: Cpu, data: bytes, *, operand: bool) -> Fault | None:
    """The push of FLD, FLD1 and FLDZ (a waiting, non-control instruction)."""
    fault = _x87_wait(cpu)
    if fault:
        return fault
    fsw = cpu.fsw
    if cpu.impl[FLD_UNDEFINED_FLAGS] == "cleared":
        fsw &= ~0x4500
    new_top = (cpu.top - 1) & 7
    overflow = bool(cpu.ftw >> new_top & 1)
    if overflow:
        cpu.set_fsw(fsw | FSW_IE | FSW_SF | FSW_C1)
        if cpu.fcw & FSW_IE:
            cpu.push_x87(X87_INDEFINITE)
    else:
        cpu.set_fsw(fsw & ~FSW_C1)
        cpu.push_x87(data)
    cpu.x87_noncontrol(unmasked=overflow and not cpu.fcw & FSW_IE, operand=operand)
    cpu.x87_regs_written = True
    cpu.wrote(1 << X87)
    return None


def FLDCW(cpu: Cpu, value: int) -> Fault | None:
    """FLDCW m2byte (D9 /5), a waiting instruction: FCW := the low 16 bits (reserved bits as
    the CPU forces them); an exception it unmasks becomes pending at once (FSW.ES, B)."""
    fault = _x87_wait(cpu)
    if fault:
        return fault
    cpu.set_fcw(value & 0xFFFF)
    cpu.set_fsw(cpu.fsw)
    cpu.wrote(1 << X87)
    return None


def FNINIT(cpu: Cpu) -> Fault | None:
    """FNINIT (DB E3), no wait: FCW := 037FH, FSW := 0, all tags empty, FOP/FIP/FDP := 0 with
    their selectors FCS and FDS (FINIT/FNINIT's "FPUInstructionPointer <- 0" and
    "FPUDataPointer <- 0"; FDS 0 measured on Zen 4 after an FXRSTOR32 of FDS 002BH); the data
    registers ST0-7 keep their contents."""
    if cpu.cr0_ts:
        return _NM_TS
    r = cpu.regs[X87]
    r[0:24] = struct.pack("<HHBBHQQ", 0x037F, 0, 0, 0, 0, 0, 0)
    cpu.x87_pointers_known = True
    cpu.x87_selectors = (0, 0)
    cpu.x87_regs_written = False
    cpu.wrote(1 << X87)
    return None


def FNCLEX(cpu: Cpu) -> Fault | None:
    """FNCLEX (DB E2), no wait: FSW's exception flags (PE, UE, OE, ZE, DE, IE), SF, ES and B
    := 0, TOP kept; C0-C3 are "undefined" (FNCLEX_UNDEFINED_FLAGS). A control instruction:
    FIP, FDP and FOP are kept. #NM with CR0.TS."""
    if cpu.cr0_ts:
        return _NM_TS
    fsw = cpu.fsw & ~(FSW_B | FSW_ES | FSW_SF | FSW_EXCEPTIONS)
    if cpu.impl[FNCLEX_UNDEFINED_FLAGS] == "cleared":
        fsw &= ~0x4700
    cpu.set_fsw(fsw)
    cpu.wrote(1 << X87)
    return None


def EMMS(cpu: Cpu) -> Fault | None:
    """EMMS (NP 0F 77), waiting: every tag empty (FTW := FFFFH); FSW.TOP := 0 as EMMS_TOP
    says (AMD)."""
    fault = _x87_wait(cpu)
    if fault:
        return fault
    cpu.regs[X87][4] = 0
    if cpu.impl[EMMS_TOP] == "zeroed":
        cpu.regs[X87][3] &= ~0x38
    cpu.wrote(1 << X87)
    return None


def FNSTSW(cpu: Cpu) -> Fault | int:
    """FNSTSW m2byte (DD /7), no wait: the x87 status word."""
    return _NM_TS if cpu.cr0_ts else cpu.fsw


def FNSTCW(cpu: Cpu) -> Fault | int:
    """FNSTCW m2byte (D9 /7), no wait: the x87 control word."""
    return _NM_TS if cpu.cr0_ts else cpu.fcw


def LDMXCSR(cpu: Cpu, value: int) -> Fault | None:
    """LDMXCSR m32 (NP 0F AE /2): MXCSR := the low 32 bits; #GP(0) if a bit outside
    MXCSR_MASK is set. XINUSE[1] as LDMXCSR_XINUSE says (SDM 13.6: XINUSE[1] pertains to
    the XMM registers; Intel sets it all the same)."""
    if cpu.cr0_ts:
        return _NM_TS
    value &= 0xFFFFFFFF
    if cpu.mxcsr_reserved(value):
        return Fault("#GP", f"MXCSR {value:#x} sets reserved bits")
    cpu.mxcsr = value
    if cpu.impl[LDMXCSR_XINUSE] == "set":
        cpu.wrote(1 << SSE)
    else:
        cpu.xmodified |= 1 << SSE
        cpu.vex_soft &= ~(1 << SSE)  # measured: it ends VEX_XINUSE_RECOMPUTED's hold
    return None


def STMXCSR(cpu: Cpu) -> Fault | int:
    """STMXCSR m32 (NP 0F AE /3): MXCSR."""
    return _NM_TS if cpu.cr0_ts else cpu.mxcsr


# --- PKRU (SDM Vol. 2B RDPKRU, WRPKRU) ---------------------------------------------------


def WRPKRU(cpu: Cpu, value: int) -> Fault | None:
    """WRPKRU (NP 0F 01 EF): PKRU := EAX; #UD if CR4.PKE = 0, #GP if ECX != 0 or EDX != 0
    (the runner passes ECX = 0, EDX:EAX = ``value``)."""
    if not cpu.machine.has("PKU") or not cpu.cr4_pke:
        return Fault("#UD", "CR4.PKE = 0")
    if value >> 32:
        return Fault("#GP", "EDX != 0")
    struct.pack_into("<I", cpu.regs[PKRU], 0, value)
    cpu.wrote(1 << PKRU)
    return None


def RDPKRU(cpu: Cpu) -> Fault | int:
    """RDPKRU (NP 0F 01 EE): EAX := PKRU (ECX = 0); #UD if CR4.PKE = 0."""
    if not cpu.machine.has("PKU") or not cpu.cr4_pke:
        return Fault("#UD", "CR4.PKE = 0")
    return struct.unpack_from("<I", cpu.regs[PKRU])[0]


# --- AMX (SDM Vol. 2A 2.10 exception classes AMX-E1..E6; Vol. 1 13.14 XFD) ---------------------

_TILES = 1 << XTILECFG | 1 << XTILEDATA


def amx_faults(cpu: Cpu) -> Fault | None:
    """#UD unless CPUID has AMX-TILE, CR4.OSXSAVE = 1 and XCR0[18:17] = 11b (64-bit mode)."""
    if not cpu.machine.has("AMX_TILE"):
        return Fault("#UD", "CPUID.(EAX=07H,ECX=0):EDX.AMX-TILE[bit 24] = 0")
    if not cpu.cr4_osxsave or cpu.xcr0 & _TILES != _TILES:
        return Fault("#UD", "CR4.OSXSAVE = 0 or XCR0[18:17] != 11b")
    return None


def tile_faults(cpu: Cpu, t: int, load_store: bool) -> Fault | None:
    """AMX-E3 (``load_store``) and AMX-E5: the enabling #UD, then #NM if XFD is enabled for
    TILEDATA (IA32_XFD_ERR := IA32_XFD AND the components the instruction needs), then the
    #UDs that depend on TILECFG."""
    fault = amx_faults(cpu)
    if fault:
        return fault
    armed = cpu.xcr0 & cpu.xfd & 1 << XTILEDATA
    if armed:
        cpu.xfd_err = cpu.xfd & _TILES
        return Fault("#NM", "XFD enabled for TILEDATA (XCR0[18] = IA32_XFD[18] = 1)")
    p = cpu.palette()
    if p is None:
        return Fault("#UD", "TILES_CONFIGURED = 0")
    rows, colsb = cpu.tile_shape(t) if t < p.max_names else (0, 0)
    if t >= p.max_names or not rows or not colsb:
        return Fault("#UD", f"tmm{t} is not a valid tile")
    if load_store and (colsb % 4 or cpu.regs[XTILECFG][1] >= rows):
        return Fault("#UD", f"tmm{t}: colsb not a multiple of 4 or start_row >= rows")
    return None


def LDTILECFG(cpu: Cpu, data: bytes) -> Fault | None:
    """LDTILECFG m512 (VEX.128.NP.0F38.W0 49 !(11):000:bbb), AMX-E1 (no #NM: "LDTILECFG and
    TILERELEASE initialize the TILEDATA state component", SDM 13.14): #GP for a configuration
    `tilecfg_valid` refuses; palette 0 is TILERELEASE; else load it and zero all tiles."""
    fault = amx_faults(cpu)
    if fault:
        return fault
    if not tilecfg_valid(cpu, data):
        return Fault("#GP", "invalid tile configuration")
    if data[0] == 0:
        return TILERELEASE(cpu)
    cfg = bytearray(data)
    cpu.regs[XTILECFG][:] = cfg
    cpu.wrote(1 << XTILECFG)
    cpu.regs[XTILEDATA][:] = bytes(len(cpu.regs[XTILEDATA]))
    _zeroed(cpu, 1 << XTILEDATA)
    return None


def STTILECFG(cpu: Cpu, dst: bytearray) -> Fault | None:
    """STTILECFG m512 (VEX.128.66.0F38.W0 49 !(11):000:bbb), AMX-E2: the 64-byte configuration,
    or 64 zero bytes when TILES_CONFIGURED = 0 (no #NM: it does not use TILEDATA)."""
    fault = amx_faults(cpu)
    if fault:
        return fault
    dst[0:64] = cpu.regs[XTILECFG] if cpu.palette() else bytes(64)
    return None


def TILELOADD(cpu: Cpu, t: int, data: bytes) -> Fault | None:
    """TILELOADD tmm, sibmem (VEX.128.F2.0F38.W0 4B !(11):rrr:100), AMX-E3: rows start_row ..
    rows-1 of tmm ``t`` from memory (``colsb`` bytes each, stride ``colsb`` as the runner lays
    them out), each row zeroed beyond colsb, rows >= rows zeroed; start_row := 0."""
    fault = tile_faults(cpu, t, True)
    if fault:
        return fault
    p = cpu.palette()
    assert p is not None
    rows, colsb = cpu.tile_shape(t)
    tile = cpu.regs[XTILEDATA]
    base = t * p.bytes_per_tile
    start = cpu.regs[XTILECFG][1]
    data = data.ljust(rows * colsb, b"\0")
    for r in range(start, p.max_rows):
        row = data[r * colsb:(r + 1) * colsb] if r < rows else b""
        tile[base + r * p.bytes_per_row:base + (r + 1) * p.bytes_per_row] = \
            row.ljust(p.bytes_per_row, b"\0")
    cpu.regs[XTILECFG][1] = 0
    cpu.wrote(_TILES)
    return None


def TILESTORED(cpu: Cpu, t: int, dst: bytearray) -> Fault | None:
    """TILESTORED sibmem, tmm (VEX.128.F3.0F38.W0 4B !(11):rrr:100), AMX-E3: rows start_row ..
    rows-1 of tmm ``t``, ``colsb`` bytes each at ``row * colsb`` (the runner's stride); then
    start_row := 0, the only register change (TILECFG modified only if it was not 0)."""
    fault = tile_faults(cpu, t, True)
    if fault:
        return fault
    p = cpu.palette()
    assert p is not None
    rows, colsb = cpu.tile_shape(t)
    start = cpu.regs[XTILECFG][1]
    for r in range(start, rows):
        at = t * p.bytes_per_tile + r * p.bytes_per_row
        dst[r * colsb:(r + 1) * colsb] = cpu.regs[XTILEDATA][at:at + colsb]
    if start:
        cpu.regs[XTILECFG][1] = 0
        cpu.xmodified |= 1 << XTILECFG
    return None


def TILEZERO(cpu: Cpu, t: int) -> Fault | None:
    """TILEZERO tmm (VEX.128.F2.0F38.W0 49 11:rrr:000), AMX-E5: zero every row of tmm ``t``."""
    fault = tile_faults(cpu, t, False)
    if fault:
        return fault
    p = cpu.palette()
    assert p is not None
    base = t * p.bytes_per_tile
    cpu.regs[XTILEDATA][base:base + p.max_rows * p.bytes_per_row] = \
        bytes(p.max_rows * p.bytes_per_row)
    cpu.regs[XTILECFG][1] = 0
    cpu.wrote(_TILES)
    return None


def TILERELEASE(cpu: Cpu) -> Fault | None:
    """TILERELEASE (VEX.128.NP.0F38.W0 49 C0), AMX-E6: TILECFG and TILEDATA to their initial
    configuration (TILES_CONFIGURED = 0); no #NM under XFD (SDM 13.14)."""
    fault = amx_faults(cpu)
    if fault:
        return fault
    cpu.regs[XTILECFG][:] = bytes(64)
    cpu.regs[XTILEDATA][:] = bytes(len(cpu.regs[XTILEDATA]))
    _zeroed(cpu, _TILES)
    return None


# --- FXSAVE / FXRSTOR (SDM Vol. 2A, Vol. 1 10.5.1) ------------------------------------------


def fx_faults(cpu: Cpu, area: Area) -> Fault | None:
    """FXSAVE's and FXRSTOR's faults before any memory access: #UD without FXSR, #NM with
    CR0.TS, #GP for an operand not 16-byte aligned."""
    if not cpu.machine.has("FXSR"):
        return Fault("#UD", "CPUID.01H:EDX.FXSR[bit 24] = 0")
    if cpu.cr0_ts:
        return Fault("#NM", "CR0.TS[bit 3] = 1")
    if area.misalign % 16:
        return Fault("#GP", "memory operand is not aligned on a 16-byte boundary")
    return None


def FXSAVE(cpu: Cpu, area: Area, *, form32: bool = False) -> Fault | None:
    """FXSAVE64 m512byte (NP REX.W 0F AE /0): x87 state, MXCSR, MXCSR_MASK and XMM0-15 into
    bytes 0-415 (CR4.OSFXSR = 1); bytes 463:416 as FXSAVE_RESERVED says, 511:464 untouched.
    ``form32``: FXSAVE m512byte without REX.W (`FXSAVE32`), FIP/FDP stored as 32-bit offsets
    with FCS/FDS (`Cpu.store_x87`)."""
    fault = fx_faults(cpu, area)
    if fault:
        return fault
    cpu.store_x87(area.data, form32=form32)
    cpu.store_sse(area.data, xmm=True, mxcsr=True)
    if cpu.impl[FXSAVE_RESERVED] == "zeroed":
        area.data[416:464] = bytes(48)
    return None


def FXRSTOR(cpu: Cpu, area: Area, *, form32: bool = False) -> Fault | None:
    """FXRSTOR64 m512byte (NP REX.W 0F AE /1): #GP if misaligned or MXCSR sets a bit outside
    MXCSR_MASK; loads x87 state, MXCSR and XMM0-15. The host tracks XINUSE[0] and [1] after it
    as it does after XRSTOR (XRSTOR_LOAD_XINUSE), and [2], [6] as RESTORE_ZMM_XINUSE says.
    ``form32``: FXRSTOR m512byte without REX.W (`FXRSTOR32`), FIP/FDP loaded from 32-bit
    offsets (`Cpu.load_x87`)."""
    fault = fx_faults(cpu, area)
    if fault:
        return fault
    mxcsr = struct.unpack_from("<I", area.data, 24)[0]
    if cpu.mxcsr_reserved(mxcsr):
        return Fault("#GP", f"MXCSR {mxcsr:#x} sets bits outside MXCSR_MASK")
    cpu.load_x87(area.data, form32=form32)
    cpu.mxcsr = mxcsr
    cpu.regs[SSE][:] = area.data[160:416]
    cpu.xmodified |= 0b11
    cpu.vex_soft &= ~0b11
    if cpu.impl[XRSTOR_LOAD_XINUSE] == "set":
        cpu.xinuse |= 0b11
    else:
        cpu.track_value(X87)
        cpu.track_value(SSE)
    restore_zmm_xinuse(cpu)
    return None


# --- XGETBV / XSETBV (SDM Vol. 2C, Vol. 1 13.3) ------------------------------------------------


def _xcr_faults(cpu: Cpu) -> Fault | None:
    if not cpu.machine.has("XSAVE"):
        return Fault("#UD", "CPUID.01H:ECX.XSAVE[bit 26] = 0")
    if not cpu.cr4_osxsave:
        return Fault("#UD", "CR4.OSXSAVE[bit 18] = 0")
    return None


def XGETBV(cpu: Cpu, ecx: int) -> Fault | int:
    """XGETBV (NP 0F 01 D0): EDX:EAX := XCR0 for ECX = 0; for ECX = 1 (with CPUID.(EAX=0DH,
    ECX=1):EAX.XG1[bit 2]) XCR0 AND XINUSE, "always" with bit 1 set if XCR0[1] = 1 and MXCSR
    is not 1F80H (SDM 13.6); #GP for any other ECX. ECX[63:32] are ignored."""
    fault = _xcr_faults(cpu)
    if fault:
        return fault
    ecx &= 0xFFFFFFFF
    if ecx == 0:
        return cpu.xcr0
    if ecx == 1 and cpu.machine.has("XGETBV1"):
        return (cpu.xinuse | (2 if cpu.mxcsr != MXCSR_DEFAULT else 0)) & cpu.xcr0
    return Fault("#GP", f"invalid XCR {ecx:#x} in ECX")


def xcr0_fault(m: Machine, value: int) -> str | None:
    """Why XSETBV(0, ``value``) would #GP (SDM 13.3), or None."""
    if not value & 1:
        return "XCR0[0] (x87) must be 1"
    if value & ~m.xcr0_supported:
        return f"sets bits {value & ~m.xcr0_supported:#x} not in CPUID.(EAX=0DH,ECX=0):EDX:EAX"
    if value & 0b110 == 0b100:
        return "XCR0[2:1] = 10b (AVX without SSE)"
    if value & 0xE0 and (value & 0xE0 != 0xE0 or value & 0b110 != 0b110):
        return "XCR0[7:5] is neither 000b nor 111b with XCR0[2:1] = 11b"
    if value >> 3 & 3 in (1, 2):
        return "XCR0[4:3] is neither 00b nor 11b"
    if value >> 17 & 3 in (1, 2):
        return "XCR0[18:17] is neither 00b nor 11b"
    return None


def XSETBV(cpu: Cpu, ecx: int, value: int) -> Fault | None:
    """XSETBV (NP 0F 01 D1): XCR[ECX] := EDX:EAX. #UD without XSAVE or CR4.OSXSAVE; #GP if
    CPL != 0, ECX != 0, or the value is not a legal XCR0 (`xcr0_fault`). The state of a
    component that XCR0 stops enabling is kept (SDM 13.3)."""
    fault = _xcr_faults(cpu)
    if fault:
        return fault
    if cpu.cpl != 0:
        return Fault("#GP", "CPL > 0")
    if ecx & 0xFFFFFFFF != 0:
        return Fault("#GP", f"invalid XCR {ecx & 0xFFFFFFFF:#x} in ECX")
    why = xcr0_fault(cpu.machine, value)
    if why:
        return Fault("#GP", why)
    cpu.xcr0 = value
    return None


__all__ = [
    "EMMS",
    "FLD",
    "FLD1",
    "FLDCW",
    "FLDZ",
    "FNCLEX",
    "FNINIT",
    "FNSTCW",
    "FNSTSW",
    "FXRSTOR",
    "FXSAVE",
    "KMOVQ",
    "LDMXCSR",
    "LDTILECFG",
    "MOVDQU",
    "RDPKRU",
    "STMXCSR",
    "STTILECFG",
    "TILELOADD",
    "TILERELEASE",
    "TILESTORED",
    "TILEZERO",
    "VMOVDQU",
    "VMOVDQU64",
    "VZEROALL",
    "VZEROUPPER",
    "WRPKRU",
    "XGETBV",
    "XSETBV",
    "ZMM0_15",
    "amx_faults",
    "fx_faults",
    "restore_zmm_xinuse",
    "tile_faults",
    "xcr0_fault",
]
