"""The XSAVE-family instructions, with the SDM's semantics and faults, one function each.

Models Intel SDM Vol. 1 chapter 13 (13.7 XSAVE, 13.8 XRSTOR, 13.9 XSAVEOPT, 13.10 XSAVEC,
13.11 XSAVES, 13.12 XRSTORS, 13.14 XFD) and the XSAVE-family pages of Vol. 2. FXSAVE/FXRSTOR,
XGETBV/XSETBV and the register loads, x87, PKRU and AMX instructions are in
`fpstate.x86.insn_regs`. The end of this module answers whole programs: `run_program` (the
model's side of `fpstate.x86.program`), with `kernel_switch`/`preemptions` for what a
preemption between two instructions may change.

Rules of this file:
- every instruction is a function named after its mnemonic, taking the `Cpu` first; it
  returns ``None``, or a `Fault` (and changes nothing), or for XGETBV the value read;
- checks come in the order of the SDM's operation and exception sections, and the variable
  names are the SDM's: RFBM, OLD_BV, XSTATE_BV, XCOMP_BV, COMPMASK, RSTORMASK, FORMAT,
  TO_BE_SAVED, TO_BE_RESTORED, TO_BE_INITIALIZED, XINUSE, XMODIFIED, XRSTOR_INFO;
- memory is an `Area`: the bytes at the operand's address, a symbolic address (only equality
  matters, for XRSTOR_INFO) and the address modulo 64 (the alignment checks);
- every choice the SDM leaves open is read from ``cpu.impl`` (`fpstate.x86.impl`).

The 64-bit forms (XSAVE64, FXSAVE64, ...) are modelled: FIP and FDP are 64-bit fields; so are
FXSAVE, FXRSTOR, XSAVE, XSAVEOPT, XSAVEC and XRSTOR without REX.W (mnemonics FXSAVE32 and so
on: 32-bit FIP/FDP with FCS/FDS in the legacy area).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

from fpstate.errors import MaskError, ProgramError
from fpstate.x86 import insn_regs as R
from fpstate.x86.cpu import (
    CET_S,
    CET_U,
    PASID,
    PKRU,
    SSE,
    X87,
    XTILECFG,
    XTILEDATA,
    ZMM_HI256,
    Area,
    Cpu,
    Machine,
    machine,
    require_modelled,
    tilecfg_valid,
)
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.image import normalise_image
from fpstate.x86.impl import (
    COMPACTED_XSTATE_BV63,
    LEGACY_SSE_UPPER,
    MODIFIED_OPTIMIZATION,
    X87_POINTERS,
    XRSTOR_INIT_XINUSE,
    XRSTOR_LOAD_XINUSE,
    ImplDefined,
    for_profile,
)
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.program import (
    BUFFER_SIZE,
    FORMS32,
    Fault,
    Insn,
    Outcome,
    Placement,
    Program,
    check_program,
)
from fpstate.x86.xfeatures import BY_NUMBER, MXCSR_DEFAULT, XCOMP_BV_COMPACTED_FORMAT, bits

BIT63 = XCOMP_BV_COMPACTED_FORMAT
HDR = 512  #: the XSAVE header: XSTATE_BV at 512, XCOMP_BV at 520, reserved 528-575
EXT = 576  #: the extended region


# --- components: the generic loops' helpers -------------------------------------------------


@cache
def compacted_offsets(m: Machine, xcomp_bv: int) -> tuple[tuple[int, int], ...]:
    """(component, offset) of every bit >= 2 of XCOMP_BV in the compacted format (SDM
    13.4.3): from 576, ascending bit order, 64-byte aligned where CPUID.(0DH, i):ECX[1]."""
    out, offs = [], EXT
    for i in bits(xcomp_bv & ~BIT63 & ~0b11):
        c = m.components[i]
        if c.aligned:
            offs = (offs + 63) // 64 * 64
        out.append((i, offs))
        offs += c.size
    return tuple(out)


def standard_offsets(m: Machine, mask: int) -> tuple[tuple[int, int], ...]:
    return tuple((i, m.components[i].offset) for i in bits(mask & ~0b11))


def _xfd_armed(cpu: Cpu) -> int:
    """Components for which XFD is enabled: XCR0[i] = IA32_XFD[i] = 1 (SDM 13.14)."""
    return cpu.xcr0 & cpu.xfd


def _save_components(cpu: Cpu, dst: bytearray, offsets, save: int, init: int) -> None:
    """The generic loop: components of ``save`` from the registers, of ``init`` as their
    initial configuration (XSAVE of an XFD-armed component), at ``offsets``. PKRU state is
    the 32-bit register (SDM 13.5.7): a save writes bytes 3:0 of its 8 and leaves bytes 7:4
    as they were (measured on an AMD family 19h CPU; see `_load_components`)."""
    m = cpu.machine
    for i, off in offsets:
        if save >> i & 1:
            c = m.components[i]
            size = 4 if i == PKRU else c.size
            value = c.init if init >> i & 1 else cpu.regs[i]
            dst[off:off + size] = value[:size]


# --- save checks (SDM 13.7, 13.9-13.11 "conditions that cause ... to generate a fault") -------


def _save_faults(cpu: Cpu, area: Area, feature: str | None, supervisor: bool) -> Fault | None:
    m = cpu.machine
    if not m.has("XSAVE"):
        return Fault("#UD", "CPUID.01H:ECX.XSAVE[bit 26] = 0")
    if not cpu.cr4_osxsave:
        return Fault("#UD", "CR4.OSXSAVE[bit 18] = 0")
    if feature is not None and not m.has(feature):
        return Fault("#UD", f"CPUID.(EAX=0DH,ECX=1):EAX.{feature} = 0")
    if cpu.cr0_ts:
        return Fault("#NM", "CR0.TS[bit 3] = 1")
    if supervisor and cpu.cpl > 0:
        return Fault("#GP", "CPL > 0")
    if area.misalign % 64:
        return Fault("#GP", "XSAVE area is not 64-byte aligned")
    return None


def XSAVE(cpu: Cpu, area: Area, mask: int, *, form32: bool = False) -> Fault | None:
    """XSAVE mem (NP REX.W 0F AE /4, XSAVE64), SDM Vol. 1 13.7; ``form32``: without REX.W
    (XSAVE32: the legacy area's 32-bit pointers and selectors, `Cpu.store_x87`).

    RFBM := XCR0 AND EDX:EAX; every component of RFBM is written (XSAVE does not use the init
    or modified optimisations), MXCSR and MXCSR_MASK also when RFBM[2] = 1; XSTATE_BV :=
    (OLD_BV AND NOT RFBM) OR (XINUSE AND RFBM). An XFD-armed component is saved as its
    initial configuration with XSTATE_BV[i] = 0 (13.14). Nothing else of the header is written.
    """
    fault = _save_faults(cpu, area, None, False)
    if fault:
        return fault
    RFBM = cpu.xcr0 & mask
    d = area.data
    OLD_BV = struct.unpack_from("<Q", d, HDR)[0]
    XFD_ARMED = _xfd_armed(cpu)
    XINUSE = cpu.xinuse & ~XFD_ARMED
    if RFBM & 1:
        cpu.store_x87(d, form32=form32)
    cpu.store_sse(d, xmm=bool(RFBM & 2), mxcsr=bool(RFBM & 6))
    _save_components(cpu, d, standard_offsets(cpu.machine, RFBM), RFBM, XFD_ARMED)
    struct.pack_into("<Q", d, HDR, OLD_BV & ~RFBM | XINUSE & RFBM)
    return None


def XSAVEOPT(cpu: Cpu, area: Area, mask: int, *, form32: bool = False) -> Fault | None:
    """XSAVEOPT mem (NP REX.W 0F AE /6), SDM Vol. 1 13.9; ``form32`` as for XSAVE.

    As XSAVE, but TO_BE_SAVED := RFBM AND XINUSE (init optimisation), further AND XMODIFIED
    when XRSTOR_INFO = <CPL, 0, this area, 0> (modified optimisation); MXCSR and MXCSR_MASK
    are saved whenever RFBM[1] or RFBM[2], "the init and modified optimizations do not apply".
    """
    fault = _save_faults(cpu, area, "XSAVEOPT", False)
    if fault:
        return fault
    RFBM = cpu.xcr0 & mask
    d = area.data
    OLD_BV = struct.unpack_from("<Q", d, HDR)[0]
    XINUSE = cpu.xinuse & ~_xfd_armed(cpu)
    TO_BE_SAVED = RFBM & XINUSE
    if cpu.xrstor_info == (cpu.cpl, 0, area.address, 0):
        TO_BE_SAVED &= cpu.xmodified
    if TO_BE_SAVED & 1:
        cpu.store_x87(d, form32=form32)
    cpu.store_sse(d, xmm=bool(TO_BE_SAVED & 2), mxcsr=bool(RFBM & 6))
    _save_components(cpu, d, standard_offsets(cpu.machine, RFBM), TO_BE_SAVED, 0)
    struct.pack_into("<Q", d, HDR, OLD_BV & ~RFBM | XINUSE & RFBM)
    return None


def _save_compacted(cpu: Cpu, area: Area, RFBM: int, modified: bool,
                    form32: bool = False) -> None:
    """The body shared by XSAVEC and XSAVES (SDM 13.10, 13.11)."""
    d = area.data
    COMPMASK = RFBM | BIT63
    XINUSE = cpu.xinuse & ~_xfd_armed(cpu)
    TO_BE_SAVED = RFBM & XINUSE
    NEW_HEADER = TO_BE_SAVED
    if modified and cpu.xrstor_info == (cpu.cpl, 0, area.address, COMPMASK):
        TO_BE_SAVED &= cpu.xmodified
    if cpu.mxcsr != MXCSR_DEFAULT and RFBM & 2:
        TO_BE_SAVED |= 2
        NEW_HEADER |= 2
    if TO_BE_SAVED & 1:
        cpu.store_x87(d, form32=form32)
    if TO_BE_SAVED & 2:
        cpu.store_sse(d, xmm=True, mxcsr=True)
    _save_components(cpu, d, compacted_offsets(cpu.machine, COMPMASK), TO_BE_SAVED, 0)
    struct.pack_into("<QQ", d, HDR, NEW_HEADER, COMPMASK)


def XSAVEC(cpu: Cpu, area: Area, mask: int, *, form32: bool = False) -> Fault | None:
    """XSAVEC mem (NP REX.W 0F C7 /4), SDM Vol. 1 13.10; ``form32`` as for XSAVE.

    RFBM := XCR0 AND EDX:EAX; TO_BE_SAVED := RFBM AND XINUSE, plus bit 1 if MXCSR != 1F80H
    and RFBM[1]; components in the compacted format of XCOMP_BV := RFBM OR 8000..0H (an unsaved
    component keeps its space); XSTATE_BV := TO_BE_SAVED. XSAVEC does not read XSTATE_BV."""
    fault = _save_faults(cpu, area, "XSAVEC", False)
    if fault:
        return fault
    _save_compacted(cpu, area, cpu.xcr0 & mask, modified=False, form32=form32)
    return None


def XSAVES(cpu: Cpu, area: Area, mask: int) -> Fault | None:
    """XSAVES mem (NP REX.W 0F C7 /5), SDM Vol. 1 13.11: XSAVEC for RFBM := (XCR0 OR IA32_XSS)
    AND EDX:EAX at CPL 0, with the modified optimisation when XRSTOR_INFO = <CPL, 0, this area,
    RFBM OR 8000..0H>."""
    fault = _save_faults(cpu, area, "XSAVES", True)
    if fault:
        return fault
    RFBM = (cpu.xcr0 | cpu.xss) & mask
    require_modelled(RFBM, "XSAVES")
    _save_compacted(cpu, area, RFBM, modified=True)
    return None


# --- restores (SDM 13.8, 13.12) --------------------------------------------------------------


def _supervisor_fault(cpu: Cpu, i: int, data: bytes) -> Fault | None:
    """XRSTORS "#GP if it would load any element of that component with an unsupported value
    ... or if a bit is set in any reserved portion" (SDM 13.12) for CET and PASID: IA32_U_CET
    bits 9:6 reserved and bits 63:12 canonical; every SSP canonical (48-bit) and 4-byte
    aligned; IA32_PASID bits 63:32 and 30:20 reserved (SDM Vol. 4 MSR index)."""
    def canonical(v: int) -> bool:
        return v >> 47 in (0, (1 << 17) - 1)

    if i == CET_U:
        u_cet, ssp = struct.unpack_from("<QQ", data)
        if u_cet & 0x3C0 or not canonical(u_cet & ~0xFFF):
            return Fault("#GP", "IA32_U_CET sets reserved bits 9:6 or a non-canonical base")
        if not canonical(ssp) or ssp & 3:
            return Fault("#GP", "IA32_PL3_SSP is not canonical and 4-byte aligned")
    elif i == CET_S:
        for n, ssp in enumerate(struct.unpack_from("<QQQ", data)):
            if not canonical(ssp) or ssp & 3:
                return Fault("#GP", f"IA32_PL{n}_SSP is not canonical and 4-byte aligned")
    elif i == PASID:
        if struct.unpack_from("<Q", data)[0] & ~0x800FFFFF:
            return Fault("#GP", "IA32_PASID sets reserved bits")
    return None


def _load_components(cpu: Cpu, src: bytes, offsets, TO_BE_RESTORED: int) -> None:
    """The generic loop of XRSTOR/XRSTORS: copy each component of TO_BE_RESTORED in. TILECFG
    that LDTILECFG would refuse is initialised instead (SDM 13.5.14). PKRU is a 32-bit
    register in an 8-byte component (SDM 13.5.7): bytes 7:4 of the area are not loaded, so
    they read back as 0 and a PKRU of 0 is in its initial configuration whatever they hold
    (measured on an AMD family 19h CPU: XRSTOR of PKRU 0 with bytes 7:4 = 1 leaves XINUSE[9]
    = 0; a later XSAVE leaves the area's bytes 7:4 as they were: `_save_components`)."""
    m = cpu.machine
    for i, off in offsets:
        if TO_BE_RESTORED >> i & 1:
            size = m.components[i].size
            data = src[off:off + size]
            if i == XTILECFG and not tilecfg_valid(cpu, data):
                data = m.components[i].init
            elif i == PKRU:
                data = data[:4] + bytes(4)
            cpu.regs[i][:] = data


def _restore(cpu: Cpu, area: Area, RFBM: int, standard: bool, COMPMASK: int,
             form32: bool = False) -> Fault | None:
    """The part of XRSTOR and XRSTORS after the header checks: the MXCSR and supervisor-value
    #GPs, the XFD #NM, then loading, initialising and tracking."""
    src = area.data
    RSTORMASK = struct.unpack_from("<Q", src, HDR)[0]
    m = cpu.machine
    if standard:
        TO_BE_RESTORED = RFBM & RSTORMASK
        TO_BE_INITIALIZED = RFBM & ~RSTORMASK
        offsets = standard_offsets(m, TO_BE_RESTORED)
        load_mxcsr = bool(RFBM & 6)
    else:
        FORMAT = COMPMASK & ~BIT63
        TO_BE_RESTORED = FORMAT & RFBM & RSTORMASK
        TO_BE_INITIALIZED = RFBM & ~RSTORMASK | RFBM & ~FORMAT
        offsets = compacted_offsets(m, COMPMASK)
        load_mxcsr = bool(TO_BE_RESTORED & 2)
    mxcsr = struct.unpack_from("<I", src, 24)[0]
    if load_mxcsr and cpu.mxcsr_reserved(mxcsr):
        return Fault("#GP", f"MXCSR {mxcsr:#x} sets bits outside MXCSR_MASK")
    for i, off in offsets:
        if TO_BE_RESTORED >> i & 1 and m.components[i].supervisor:
            fault = _supervisor_fault(cpu, i, src[off:off + m.components[i].size])
            if fault:
                return fault
    armed = _xfd_armed(cpu) & TO_BE_RESTORED
    if armed:
        cpu.xfd_err = armed
        return Fault("#NM", f"XFD armed for components {armed:#x} that XSTATE_BV loads")
    ymm_zero = bool(cpu.vex_soft) and cpu.ymm0_15_zero()
    if TO_BE_RESTORED & 1:
        cpu.load_x87(src, form32=form32)
    elif TO_BE_INITIALIZED & 1:
        cpu.init_x87()
    if load_mxcsr:
        cpu.mxcsr = mxcsr
    if TO_BE_RESTORED & 2:
        cpu.regs[SSE][:] = src[160:416]
    elif TO_BE_INITIALIZED & 2:
        cpu.regs[SSE][:] = bytes(256)
        if not standard:
            cpu.mxcsr = MXCSR_DEFAULT
    _load_components(cpu, src, offsets, TO_BE_RESTORED)
    for i in bits(TO_BE_INITIALIZED & ~0b11):
        cpu.regs[i][:] = m.components[i].init
    # Tracking (SDM 13.8.3): XINUSE, XMODIFIED, XRSTOR_INFO.
    if cpu.impl[XRSTOR_LOAD_XINUSE] == "set":
        cpu.xinuse |= TO_BE_RESTORED
    else:
        for i in bits(TO_BE_RESTORED):
            cpu.track_value(i)
    if cpu.impl[XRSTOR_INIT_XINUSE] == "init":
        cpu.xinuse &= ~TO_BE_INITIALIZED
    else:
        cpu.xinuse |= TO_BE_INITIALIZED
    if RFBM >> ZMM_HI256 & 1:
        cpu.zmm_hi256_written = 0  # XINUSE[6] recomputed by this restore
    if RFBM & R.ZMM0_15:
        R.restore_zmm_xinuse(cpu, RFBM)
    if cpu.vex_soft:
        # YMM0-15 zero before the restore, or as it left them (measured: a restore of zero
        # AVX state over a non-zero upper half clears the held bits too)
        ymm_zero = ymm_zero or cpu.ymm0_15_zero()
        R.restore_vex_xinuse(cpu, TO_BE_RESTORED, TO_BE_INITIALIZED, ymm_zero)
    all_ones = (1 << 64) - 1
    cpu.xmodified = all_ones & ~RFBM if cpu.impl[MODIFIED_OPTIMIZATION] else all_ones
    cpu.xrstor_info = (cpu.cpl, 0, area.address, 0 if standard else COMPMASK)
    return None


def XRSTOR(cpu: Cpu, area: Area, mask: int, *, form32: bool = False) -> Fault | None:
    """XRSTOR mem (NP REX.W 0F AE /5, XRSTOR64), SDM Vol. 1 13.8 and the XRSTOR page;
    ``form32``: without REX.W (XRSTOR32: the legacy area's 32-bit pointers, `Cpu.load_x87`).

    #UD without XSAVE or CR4.OSXSAVE; #NM if CR0.TS; #GP if not 64-byte aligned. XCOMP_BV[63]
    picks the form. Standard: #GP if XSTATE_BV sets a bit not in XCR0 or bytes 23:8 of the
    header are not 0. Compacted: #GP without XSAVEC, if XCOMP_BV[62:0] sets a bit not in XCR0,
    if XSTATE_BV sets a bit not in XCOMP_BV, or bytes 63:16 of the header are not 0. Then #GP
    for an illegal MXCSR, #NM for an XFD-armed component it would load (IA32_XFD_ERR set)."""
    fault = _save_faults(cpu, area, None, False)
    if fault:
        return fault
    RFBM = cpu.xcr0 & mask
    XSTATE_BV, XCOMP_BV = struct.unpack_from("<QQ", area.data, HDR)
    if not XCOMP_BV & BIT63:
        if XSTATE_BV & ~cpu.xcr0:
            return Fault("#GP", "standard form: XSTATE_BV sets a bit that is not set in XCR0")
        if any(area.data[HDR + 8:HDR + 24]):
            return Fault("#GP", "standard form: bytes 23:8 of the XSAVE header are not all 0")
        return _restore(cpu, area, RFBM, True, 0, form32)
    if not cpu.machine.has("XSAVEC"):
        return Fault("#GP", "XCOMP_BV[63] = 1 and CPUID.(EAX=0DH,ECX=1):EAX.XSAVEC[bit 1] = 0")
    fault = _compacted_header_faults(cpu, area, XSTATE_BV, XCOMP_BV, cpu.xcr0)
    return fault or _restore(cpu, area, RFBM, False, XCOMP_BV, form32)


def _compacted_header_faults(cpu: Cpu, area: Area, XSTATE_BV: int, XCOMP_BV: int,
                             enabled: int) -> Fault | None:
    if XCOMP_BV & ~BIT63 & ~enabled:
        return Fault("#GP", "XCOMP_BV sets a bit in 62:0 that is not enabled")
    allowed = XCOMP_BV if cpu.impl[COMPACTED_XSTATE_BV63] == "allowed" else XCOMP_BV & ~BIT63
    if XSTATE_BV & ~allowed:
        return Fault("#GP", "XSTATE_BV sets a bit that is not set in XCOMP_BV")
    if any(area.data[HDR + 16:HDR + 64]):
        return Fault("#GP", "bytes 63:16 of the XSAVE header are not all 0")
    return None


def XRSTORS(cpu: Cpu, area: Area, mask: int) -> Fault | None:
    """XRSTORS mem (NP REX.W 0F C7 /3), SDM Vol. 1 13.12: the compacted form of XRSTOR for
    RFBM := (XCR0 OR IA32_XSS) AND EDX:EAX at CPL 0; #GP if XCOMP_BV[63] = 0, and for
    unsupported values of a supervisor component it loads."""
    fault = _save_faults(cpu, area, "XSAVES", True)
    if fault:
        return fault
    RFBM = (cpu.xcr0 | cpu.xss) & mask
    XSTATE_BV, XCOMP_BV = struct.unpack_from("<QQ", area.data, HDR)
    if not XCOMP_BV & BIT63:
        return Fault("#GP", "XCOMP_BV[63] = 0")
    fault = _compacted_header_faults(cpu, area, XSTATE_BV, XCOMP_BV, cpu.xcr0 | cpu.xss)
    if fault:
        return fault
    require_modelled(RFBM & XCOMP_BV, "XRSTORS")
    return _restore(cpu, area, RFBM, False, XCOMP_BV)


# --- programs (fpstate.x86.program) ---------------------------------------------------------

#: XFEATURE_MASK_USER_SUPPORTED (arch/x86/include/asm/fpu/xstate.h, 64-bit).
USER_SUPPORTED = 0xE02FF


def default_xcr0(profile: CpuidProfile) -> int:
    """The XCR0 Linux programs: fpu_user_cfg.max_features of fpu__init_system_xstate()
    (arch/x86/kernel/fpu/xstate.c): CPUID.(0DH,0) within XFEATURE_MASK_USER_SUPPORTED, minus
    components whose xsave_cpuid_features[] gate is missing, minus XTILE_DATA without XFD.
    PKRU's gate OSPKE is set by the kernel itself (setup_pku()): PKU stands for it."""
    xcr0 = profile.xcr0_supported & USER_SUPPORTED
    for i in bits(xcr0):
        gate = BY_NUMBER[i].gate if i in BY_NUMBER else None
        gate = "PKU" if gate == "OSPKE" else gate
        if i > 1 and (gate is None or not profile.has(gate)):
            xcr0 &= ~(1 << i)
    if not profile.has("XFD"):
        xcr0 &= ~(1 << XTILEDATA)
    if not xcr0 >> XTILEDATA & 1:
        xcr0 &= ~(1 << XTILECFG)
    return xcr0


def _pointers_saved(cpu: Cpu) -> bool:
    return cpu.impl[X87_POINTERS] == "always" or cpu.x87_pending()


def kernel_switch(cpu: Cpu) -> Cpu:
    """A preemption between two user instructions: os_xsave() (XSAVES, else XSAVEC, XSAVEOPT,
    XSAVE: arch/x86/kernel/fpu/xstate.h) into the task's fpstate, then
    restore_fpregs_from_fpstate() (XRSTORS/XRSTOR of XFEATURE_MASK_FPSTATE; PKRU by WRPKRU,
    unchanged). XRSTOR_INFO names the kernel's buffer, XINUSE is what the restore tracks, x87
    pointers the save leaves out (FSW.ES = 0 on AMD) are lost."""
    k = cpu.copy()
    k.cpl = 0
    k.zmm_hi256_lag = 0  # the kernel's XSAVES/XRSTORS: the tracking has caught up
    m = k.machine
    mask = k.xcr0 | k.xss
    unknown = not k.x87_pointers_known
    hidden = unknown and _pointers_saved(k)
    k.x87_pointers_known = True
    area = Area(bytearray(compacted_size(m.profile, mask) + 64), ("kernel",), 0)
    if m.has("XSAVES"):
        XSAVES(k, area, mask)
        fault = XRSTORS(k, area, mask & ~(1 << PKRU))
    else:
        save = XSAVEC if m.has("XSAVEC") else XSAVEOPT if m.has("XSAVEOPT") else XSAVE
        save(k, area, mask)
        fault = XRSTOR(k, area, mask & ~(1 << PKRU))
    assert fault is None, f"model bug: the kernel's restore faulted: {fault}"
    k.x87_pointers_known = not hidden
    if hidden:
        k.regs[X87][6:24] = cpu.regs[X87][6:24]
    k.cpl = cpu.cpl
    return k


def preemptions(cpu: Cpu) -> list[Cpu]:
    """The states a preemption may leave (see `kernel_switch`), other than ``cpu`` itself.
    Measured: in about 1 run in 100 a preempted program finds XINUSE as a legacy SSE write
    would leave it (XINUSE[1], and [2] while ZMM_Hi256 is in use: LEGACY_SSE_UPPER) though it
    wrote nothing (the kernel or this nested guest's hypervisor does it): allowed too."""
    out = []
    k = kernel_switch(cpu)
    if k.key() != cpu.key():
        out.append(k)
    if cpu.xcr0 & 2:
        s = k.copy()
        s.xinuse |= 2
        if cpu.impl[LEGACY_SSE_UPPER] and s.xinuse >> 6 & 1:
            s.xinuse |= 4
        if s.xinuse != k.xinuse:
            out.append(s)
    return out


#: Instructions after which a legacy SSE write may still see a just-cleared XINUSE[6].
_LAG_KEEPS = frozenset({"MOVDQU", "KMOVQ"})


def lagging_tracking(cpu: Cpu, insn: Insn) -> list[Cpu]:
    """The other state ``insn`` may find, as the CPU's tracking lags (measured, 60 runs each):
    after a VEX.256 load cleared XINUSE[6] (VEX256_HI256_XINUSE), a legacy SSE write sees it
    still set in half the runs right after, 1 in 60 with a KMOVQ between, never with FNINIT,
    XGETBV, XSAVE or VMOVDQU between (then LEGACY_SSE_UPPER marks AVX, its upper half)."""
    if not cpu.zmm_hi256_lag or insn.mnemonic != "MOVDQU":
        return []
    seen = cpu.copy()
    seen.xinuse |= 1 << ZMM_HI256
    seen.zmm_hi256_written |= seen.zmm_hi256_lag
    seen.zmm_hi256_lag = 0
    return [seen]


def pk_fault(cpu: Cpu, area: Area, write: bool) -> Fault | None:
    """The protection-key check of a data access to ``area`` (SDM Vol. 3A 4.6.2, CR4.PKE = 1,
    a user-mode page with key k): PKRU.ADk = 1 faults every access, PKRU.WDk = 1 every write
    (at CPL 3; at CPL < 3 only with CR0.WP = 1, which the programs' CPL 0 never meets: keyed
    buffers are CPL 3's). The #PF's error code has PK (bit 5) set. Key 0 is not checked (see
    `fpstate.x86.program`)."""
    k = area.pkey
    if not k or not cpu.cr4_pke:
        return None
    rights = struct.unpack_from("<I", cpu.regs[PKRU])[0] >> (2 * k) & 0b11
    if rights & 0b01:
        return Fault("#PF", f"PKRU.AD{k} = 1: access to a page with protection key {k}")
    if write and rights & 0b10:
        return Fault("#PF", f"PKRU.WD{k} = 1: write to a page with protection key {k}")
    return None


#: Per memory instruction: the checks it makes before any memory access (#UD, #NM and the #GP
#: of alignment or CPL come first; a fault of the access itself -- a protection-key #PF --
#: only after them, and before any check that reads the operand, such as XRSTOR's header
#: #GP), and whether it stores to its operand.
_BEFORE_ACCESS: dict[str, tuple[Any, bool]] = {
    "XSAVE": (lambda c, a, i: _save_faults(c, a, None, False), True),
    "XSAVEOPT": (lambda c, a, i: _save_faults(c, a, "XSAVEOPT", False), True),
    "XSAVEC": (lambda c, a, i: _save_faults(c, a, "XSAVEC", False), True),
    "XSAVES": (lambda c, a, i: _save_faults(c, a, "XSAVES", True), True),
    "XRSTOR": (lambda c, a, i: _save_faults(c, a, None, False), False),
    "XRSTORS": (lambda c, a, i: _save_faults(c, a, "XSAVES", True), False),
    "FXSAVE": (lambda c, a, i: R.fx_faults(c, a), True),
    "FXRSTOR": (lambda c, a, i: R.fx_faults(c, a), False),
    "STTILECFG": (lambda c, a, i: R.amx_faults(c), True),
    "TILESTORED": (lambda c, a, i: R.tile_faults(c, i.reg, True), True),
}
# The forms without REX.W fault as their 64-bit forms do.
_BEFORE_ACCESS.update({f: _BEFORE_ACCESS[f[:-2]] for f in FORMS32})


def _execute(cpu: Cpu, insn: Insn, bufs: list[Area]) -> Fault | int | None:
    """One program instruction (operand conventions: `fpstate.host.asm`)."""
    mn = insn.mnemonic
    if mn not in _LAG_KEEPS:
        cpu.zmm_hi256_lag = 0
    if insn.buf >= 0 and bufs[insn.buf].pkey and mn in _BEFORE_ACCESS:
        before, write = _BEFORE_ACCESS[mn]
        area = bufs[insn.buf]
        fault = before(cpu, area, insn) or pk_fault(cpu, area, write)
        if fault:
            return fault
    if mn in _MEMORY:
        area = bufs[insn.buf]
        return _MEMORY[mn](cpu, area) if mn.startswith("FX") else _MEMORY[mn](cpu, area,
                                                                                insn.mask)
    if mn == "XGETBV":
        return R.XGETBV(cpu, insn.reg)
    if mn == "XSETBV":
        return R.XSETBV(cpu, insn.reg, insn.value)
    if mn == "STTILECFG":
        return R.STTILECFG(cpu, bufs[insn.buf].data)
    if mn == "TILESTORED":
        return R.TILESTORED(cpu, insn.reg, bufs[insn.buf].data)
    fn = getattr(R, mn)
    if mn in ("MOVDQU", "VMOVDQU", "VMOVDQU64", "KMOVQ", "TILELOADD"):
        return fn(cpu, insn.reg, insn.data)
    if mn in ("FLD", "LDTILECFG"):
        return fn(cpu, insn.data)
    if mn in ("FLDCW", "LDMXCSR", "WRPKRU"):
        return fn(cpu, insn.value)
    if mn == "TILEZERO":
        return fn(cpu, insn.reg)
    return fn(cpu)


_MEMORY = {"XSAVE": XSAVE, "XSAVEOPT": XSAVEOPT, "XSAVEC": XSAVEC, "XSAVES": XSAVES,
           "XRSTOR": XRSTOR, "XRSTORS": XRSTORS, "FXSAVE": R.FXSAVE, "FXRSTOR": R.FXRSTOR}
_MEMORY.update({f: partial(_MEMORY[f[:-2]], form32=True) for f in FORMS32})


@dataclass(slots=True)
class _World:
    cpu: Cpu
    bufs: list[Area]
    values: list[int]

    def key(self) -> tuple:
        return self.cpu.key(), tuple(bytes(a.data) for a in self.bufs), tuple(self.values)

    def fork(self, cpu: Cpu) -> _World:
        return _World(cpu, [Area(bytearray(a.data), a.address, a.misalign, a.pkey)
                            for a in self.bufs],
                      list(self.values))


def _preempt(worlds: list[_World]) -> list[_World]:
    out, seen = [], set()
    for w in worlds:
        for c in [w.cpu, *preemptions(w.cpu)]:
            v = w if c is w.cpu else w.fork(c)
            key = v.key()
            if key not in seen:
                seen.add(key)
                out.append(v)
    return out


def run_program(profile: CpuidProfile, program: Program, *, xcr0: int | None = None,
                xss: int = 0, xfd: int = 0, impl: ImplDefined | None = None,
                preempt: bool = True, cr4_pke: bool | None = None,
                placement: Sequence[Placement] | None = None) -> list[Outcome]:
    """The model's answer to ``program`` on ``profile``: the SET of outcomes the CPU may give
    (usually one), as the host runner produces them (`fpstate.x86.program`, `fpstate.host.
    runner`): XRSTOR64 of the start image with RFBM = XCR0, the instructions at the program's
    CPL, then XGETBV(1) and an XSAVE64 of XCR0 into a zeroed image, normalised.

    The outcome varies only where a preemption between two instructions changes what the
    CPU tracks (`preemptions`: the modified optimisation is lost, XINUSE is re-derived); every
    such point is tried (``preempt=False``: none is, the outcome of an undisturbed run).
    ``xcr0`` defaults to the XCR0 Linux programs (`default_xcr0`); ``cr4_pke`` to what Linux
    sets (CR4.PKE wherever the CPU has PKU: setup_pku()), a guest kernel may leave it clear.
    ``placement`` says where each instruction ran (the host runner's `Outcome.placement`):
    with it an FLD's FIP, FDP and FOP are known (`Cpu.x87_noncontrol`). ProgramError for a
    start image the XRSTOR refuses (the runner does the same), or a placement that is not one
    per instruction; UnknownPointers when the program would show FIP/FDP of an FLD whose
    placement is not given."""
    check_program(program)
    if placement is not None and len(placement) != len(program.insns):
        raise ProgramError(f"placement of {len(placement)} instructions for a program of "
                           f"{len(program.insns)}")
    m = machine(profile)
    impl = impl or for_profile(profile)
    xcr0 = default_xcr0(profile) if xcr0 is None else xcr0
    why = R.xcr0_fault(m, xcr0)
    if why:
        raise MaskError(f"XCR0 {xcr0:#x} is not valid on {profile.name}: {why}")
    if xss & ~profile.xss_supported:
        raise MaskError(f"IA32_XSS {xss:#x} sets bits not in CPUID.(EAX=0DH,ECX=1):EDX:ECX "
                        f"{profile.xss_supported:#x}")
    require_modelled(xss, "IA32_XSS")
    xfd_ok = sum(c.mask for c in m.components.values() if c.xfd) if m.has("XFD") else 0
    if xfd & ~xfd_ok:
        raise MaskError(f"IA32_XFD {xfd:#x} sets bits the CPU cannot arm ({xfd_ok:#x})")
    cpu = Cpu(m, impl, xcr0=xcr0, xss=xss, xfd=xfd, cpl=program.cpl)
    if cr4_pke is not None:
        cpu.cr4_pke = cr4_pke and m.has("PKU")
    start = Area(bytearray(program.start.ljust(BUFFER_SIZE, b"\0")), ("start",))
    fault = XRSTOR(cpu, start, xcr0)
    if fault:
        raise ProgramError(f"start image rejected: XRSTOR64 of it with RFBM=XCR0 raised {fault}")
    bufs = [Area(bytearray(b.data.ljust(BUFFER_SIZE, b"\0")), ("buf", n), b.misalign, b.pkey)
            for n, b in enumerate(program.buffers)]
    worlds = [_World(cpu, bufs, [])]
    outcomes: dict[tuple, Outcome] = {}
    for step, insn in enumerate(program.insns):
        worlds = _preempt(worlds) if preempt else worlds
        worlds += [w.fork(c) for w in worlds for c in lagging_tracking(w.cpu, insn)]
        alive = []
        at = placement[step] if placement is not None else None
        for w in worlds:
            w.cpu.insn_at = at
            result = _execute(w.cpu, insn, w.bufs)
            if isinstance(result, Fault):
                o = Outcome(tuple(bytes(a.data) for a in w.bufs), tuple(w.values), result, step)
                outcomes.setdefault(o.key(), o)
                continue
            if isinstance(result, int):
                w.values.append(result)
            alive.append(w)
        worlds = alive
    for w in _preempt(worlds) if worlds and preempt else worlds:
        for o in _final(w, xcr0, preempt):
            outcomes.setdefault(o.key(), o)
    return list(outcomes.values())


def _final(w: _World, xcr0: int, preempt: bool) -> list[Outcome]:
    """XGETBV(1) where the CPU has it, then XSAVE64 of XCR0 into a zeroed image, normalised.
    With ``preempt``, a preemption may also fall between the two (measured: 1 run in 60,000
    of an XRSTOR of initial SSE data read XINUSE 0 and then saved XSTATE_BV[1] = 1, on the
    Zen 4 guest with both cores loaded)."""
    cpu = w.cpu
    m = cpu.machine
    xinuse = R.XGETBV(cpu, 1) if m.has("XGETBV1") else None
    assert not isinstance(xinuse, Fault), xinuse
    size = standard_size(m.profile, xcr0)
    offsets = {i: (m.components[i].offset, m.components[i].size) for i in bits(xcr0 & ~3)}
    out = []
    for c in [cpu, *preemptions(cpu)] if preempt else [cpu]:
        area = Area(bytearray(BUFFER_SIZE), ("final",))
        fault = XSAVE(c, area, xcr0)
        assert fault is None, fault
        final = normalise_image(bytes(area.data[:size]), xcr0, offsets)
        out.append(Outcome(tuple(bytes(a.data) for a in w.bufs), tuple(w.values), None, None,
                           xinuse, final))
    return out


__all__ = ["XRSTOR", "XRSTORS", "XSAVE", "XSAVEC", "XSAVEOPT", "XSAVES", "compacted_offsets",
           "default_xcr0", "kernel_switch", "lagging_tracking", "preemptions", "run_program"]
