"""Implementation-defined choices of the XSAVE feature set, as data, with their origin.

Where the Intel SDM leaves a behaviour to the implementation ("XINUSE[i] may be set to 0 or
1", "state component i may be tracked as unmodified", "C0, C2, C3: undefined") the CPU model
(`fpstate.x86.insn`) does not guess: it asks an `ImplDefined` for the choice, by the key of a
`Choice` whose ``phrase`` is the SDM's own wording (the Sail ``ImpDefBool`` idea). A few
points where a CPU measurably departs from the SDM's literal text (AMD's value-based XINUSE
after XRSTOR) are recorded the same way, with ``deviates`` set.

Rules of this file:
- every choice the model makes is one row of :data:`CHOICES` (key, SDM phrase, reference, the
  allowed values); the model calls ``impl[KEY]`` and nothing else;
- every `ImplDefined` gives a value for every key, and an origin for every value: "measured"
  (with the probe that shows it, kept as a differential test) or "assumed" (documented
  behaviour of that vendor, not measured here);
- :func:`for_profile` picks the record for a CPUID profile by vendor and core; the measured
  records are those of the machines this project has run on (:data:`AMD_ZEN5_HOST`,
  :data:`AMD_ZEN3_HOST`, :data:`AMD_ZEN4_HOST`, :data:`INTEL_EMR_HOST`, each measured with
  `fpstate.host.runner`), and every other core takes its vendor's record, assumed from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fpstate.errors import ProfileError
from fpstate.x86.cpuid import CpuidProfile


@dataclass(frozen=True, slots=True)
class Choice:
    """One point the SDM leaves open (or where a CPU is known to depart from it)."""

    key: str
    phrase: str  #: the SDM's words that leave the choice open
    reference: str  #: where the phrase is
    values: tuple[Any, ...] | type  #: the allowed values, or the type of a numeric value
    deviates: bool = False  #: a value other than the SDM's literal reading exists in silicon


# Keys (the model refers to these names, never to strings).
XRSTOR_INIT_XINUSE = "xrstor_init_xinuse"
XRSTOR_LOAD_XINUSE = "xrstor_load_xinuse"
WRITE_XINUSE = "write_xinuse"
ZEROING_CLEARS_XINUSE = "zeroing_clears_xinuse"
MODIFIED_OPTIMIZATION = "modified_optimization"
X87_POINTERS = "x87_pointers"
FSW_SUMMARY_ON_LOAD = "fsw_summary_on_load"
FCW_RESERVED = "fcw_reserved"
FLD_UNDEFINED_FLAGS = "fld_undefined_flags"
MXCSR_MASK = "mxcsr_mask"
COMPACTED_XSTATE_BV63 = "compacted_xstate_bv63"
FXSAVE_RESERVED = "fxsave_reserved"
X87_POINTER_BITS = "x87_pointer_bits"
X87_FDP_BITS = "x87_fdp_bits"
LEGACY_SSE_UPPER = "legacy_sse_upper"
RESTORE_ZMM_XINUSE = "restore_zmm_xinuse"
VEX256_HI256_XINUSE = "vex256_hi256_xinuse"
EMMS_TOP = "emms_top"
LEGACY_SSE_KEEPS_AVX = "legacy_sse_keeps_avx"
VEX_XINUSE_RECOMPUTED = "vex_xinuse_recomputed"
LDMXCSR_XINUSE = "ldmxcsr_xinuse"
FOP_UPDATE = "fop_update"
FNCLEX_UNDEFINED_FLAGS = "fnclex_undefined_flags"
X87_SELECTORS_LOAD64 = "x87_selectors_load64"
X87_NO_OPERAND_FDP = "x87_no_operand_fdp"

CHOICES: dict[str, Choice] = {c.key: c for c in (
    Choice(XRSTOR_INIT_XINUSE,
           "If RFBM[i] = 1 and XSTATE_BV[i] = 0, state component i may be tracked as init; "
           "XINUSE[i] may be set to 0 or 1.",
           "SDM Vol. 1 13.8.3 (XRSTOR), 13.12 (XRSTORS)", ("init", "in-use")),
    Choice(XRSTOR_LOAD_XINUSE,
           "If RFBM[i] = 1 and XSTATE_BV[i] = 1, state component i is tracked as not init; "
           "XINUSE[i] is set to 1.",
           "SDM Vol. 1 13.8.3", ("set", "value"), deviates=True),
    Choice(WRITE_XINUSE,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration.",
           "SDM Vol. 1 13.6 (the value: the components whose XINUSE follows their value when "
           "an instruction writes them; every other write sets XINUSE)", int),
    Choice(ZEROING_CLEARS_XINUSE,
           "If XINUSE[i] = 0, state component i is known to be in its initial configuration "
           "(whether VZEROUPPER, VZEROALL, FNINIT, TILERELEASE clear it is not specified).",
           "SDM Vol. 1 13.6", (True, False)),
    Choice(MODIFIED_OPTIMIZATION,
           "If RFBM[i] = 1, state component i may be tracked as unmodified; XMODIFIED[i] may "
           "be set to 0 or 1.",
           "SDM Vol. 1 13.8.3, 13.9, 13.11", (True, False)),
    Choice(X87_POINTERS,
           "FIP, FDP and FOP are saved (FXSAVE, XSAVE*) only when FSW.ES = 1 (AMD: \"only if "
           "an unmasked x87 exception is pending\"), or always.",
           "AMD APM Vol. 5 FXSAVE; arch/x86/kernel/cpu/amd.c X86_BUG_FXSAVE_LEAK",
           ("when-es", "always"), deviates=True),
    Choice(FSW_SUMMARY_ON_LOAD,
           "FSW.ES (bit 7) and FSW.B (bit 15) as loaded by XRSTOR/FXRSTOR: recomputed from the "
           "exception flags and the FCW masks, or taken from memory.",
           "SDM Vol. 1 8.1.3.1 (B mirrors ES), 13.5.1", ("recomputed", "loaded")),
    Choice(FCW_RESERVED,
           "(and-mask, or-mask) applied to every value loaded into FCW: bits 15:13 and 7 are "
           "reserved, bit 6 reads as 1.",
           "SDM Vol. 1 8.1.5 (Figure 8-6)", tuple),
    Choice(FLD_UNDEFINED_FLAGS,
           "C0, C2, C3: Undefined. (FLD; FLD1 and FLDZ say the same)",
           "SDM Vol. 2A FLD, FPU Flags Affected", ("unchanged", "cleared")),
    Choice(MXCSR_MASK,
           "MXCSR_MASK: the bits of MXCSR this processor supports; LDMXCSR, FXRSTOR and XRSTOR "
           "#GP on any other bit.",
           "SDM Vol. 1 11.6.6 (Guidelines for Writing to the MXCSR Register)", int),
    Choice(COMPACTED_XSTATE_BV63,
           "The XSTATE_BV field of the XSAVE header sets a bit (including bit 63) that is not "
           "set in XCOMP_BV. (#GP) -- XCOMP_BV[63] is set in the compacted form, so the "
           "literal rule lets XSTATE_BV[63] = 1 pass.",
           "SDM Vol. 1 13.8.2, 13.12", ("gp", "allowed"), deviates=True),
    Choice(FXSAVE_RESERVED,
           "Bytes 463:416 of the FXSAVE area are reserved (bytes 511:464 are available to "
           "software): written as zeros, or not written.",
           "SDM Vol. 1 10.5.1, Table 10-2", ("untouched", "zeroed")),
    Choice(X87_POINTER_BITS,
           "If the instruction has a REX prefix with REX.W = 1, bytes 15:8 are used for the "
           "full 64 bits of FIP: how many low bits the FPU keeps, the rest being their sign "
           "extension.",
           "SDM Vol. 1 13.5.1", int),
    Choice(X87_FDP_BITS,
           "If the instruction has a REX prefix with REX.W = 1, bytes 23:16 are used for the "
           "full 64 bits of FDP: how many low bits the FPU keeps, the rest being their sign "
           "extension (a CPU may keep fewer bits of FIP than of FDP).",
           "SDM Vol. 1 13.5.1", int),
    Choice(LEGACY_SSE_UPPER,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration. (Here: a legacy SSE write of an XMM register while "
           "ZMM_Hi256 is in use also marks AVX state in use.)",
           "SDM Vol. 1 13.6", (True, False)),
    Choice(RESTORE_ZMM_XINUSE,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration. (Here: an XRSTOR whose RFBM includes SSE, AVX or "
           "ZMM_Hi256, or an FXRSTOR, leaves XINUSE[1], [2], [6] of what it did not load as "
           "they were ('kept'), or recomputes all three from the values of ZMM0-15, which "
           "span them ('value').)",
           "SDM Vol. 1 13.6, 13.8.3", ("kept", "value")),
    Choice(VEX256_HI256_XINUSE,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration. (Here: a VEX.256 load of YMMr zeroes bits 511:256 of ZMMr; "
           "XINUSE[6] stays as it was ('kept'), or is cleared unless another of ZMM0-15 has "
           "non-zero bits 511:256 or had them written by an EVEX.512 load since XINUSE[6] was "
           "last recomputed ('per-register').)",
           "SDM Vol. 1 13.6", ("kept", "per-register")),
    Choice(EMMS_TOP,
           "EMMS: x87FPUTagWord := FFFFH (the Operation names nothing else; whether FSW.TOP "
           "is also reset to 0, as MMX instructions do, is not said).",
           "SDM Vol. 2A EMMS; Vol. 1 9.5.1", ("kept", "zeroed"), deviates=True),
    Choice(LEGACY_SSE_KEEPS_AVX,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration. (Here: a legacy SSE write while AVX state is in use keeps "
           "XINUSE[2] set through the restores that RESTORE_ZMM_XINUSE 'value' would recompute "
           "it in but that do not load AVX state -- FXRSTOR, XRSTOR without RFBM[2] -- until "
           "an XRSTOR with RFBM[2], VZEROUPPER or VZEROALL.)",
           "SDM Vol. 1 13.6", (True, False)),
    Choice(VEX_XINUSE_RECOMPUTED,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration. (Here: XINUSE[1] and [2] that a VEX.256 load -- or XINUSE[1] "
           "that a legacy SSE load -- of one of registers 8-15 set, from 0, stay so until an "
           "XRSTOR loads AVX or ZMM_Hi256 state from memory (RSTORMASK), which clears them "
           "where YMM0-15 were all zero before it or are after it ('recomputed') or leaves "
           "them ('kept'); a load of one of registers 0-7, any other write, or a restore of "
           "SSE or AVX state ends this.)",
           "SDM Vol. 1 13.6, 13.8.3", ("kept", "recomputed")),
    Choice(LDMXCSR_XINUSE,
           "It is possible for XINUSE[i] to be 1 even when state component i is in its "
           "initial configuration. (Here: LDMXCSR, which changes MXCSR and no XMM register, "
           "leaves XINUSE[1] as it was ('kept') or sets it ('set').)",
           "SDM Vol. 1 13.6; Vol. 2B LDMXCSR", ("kept", "set")),
    Choice(FOP_UPDATE,
           "If FOP code compatibility mode is disabled (default), FOP is only valid if the "
           "last non-transparent FP instruction executed before a FSAVE/FSTENV/FXSAVE had an "
           "unmasked exception. (Here: every non-control x87 instruction writes the opcode "
           "register ('always'), or only one that incurs an unmasked exception, the register "
           "keeping its value otherwise ('unmasked').)",
           "SDM Vol. 1 8.1.9.1 (IA32_MISC_ENABLE[2])", ("always", "unmasked")),
    Choice(FNCLEX_UNDEFINED_FLAGS,
           "The C0, C1, C2, and C3 flags are undefined. (FCLEX/FNCLEX)",
           "SDM Vol. 2A FCLEX/FNCLEX, FPU Flags Affected", ("unchanged", "cleared")),
    Choice(X87_SELECTORS_LOAD64,
           "The 64-bit forms of FXRSTOR and XRSTOR (REX.W = 1) load 64-bit FIP and FDP and "
           "no FCS or FDS. (Here: what they leave in the FPU's CS and DS selectors, which the "
           "32-bit save forms store where the CPU does not deprecate them -- cleared to "
           "0000H ('zeroed') or as they were ('kept').)",
           "SDM Vol. 1 10.5.1 (Tables 10-2, 10-3), 13.5.1; Vol. 2A FXRSTOR",
           ("zeroed", "kept")),
    Choice(X87_NO_OPERAND_FDP,
           "The x87 FPU data pointer holds the address of the memory operand of the last "
           "non-control instruction; FLD1 and FLDZ have none. (Here, on a CPU that does not "
           "enumerate FDP_EXCPTN_ONLY: such an instruction leaves FDP and FDS as they were "
           "('kept'), or the model claims nothing about them ('undefined': a save that "
           "would show them is one the model cannot answer).)",
           "SDM Vol. 1 8.1.8; CPUID.(EAX=07H,ECX=0):EBX[6]", ("kept", "undefined")),
)}


@dataclass(frozen=True, slots=True)
class ImplDefined:
    """One CPU's answer to every :data:`CHOICES` key, each with its origin."""

    name: str
    values: Mapping[str, Any]
    origins: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = set(CHOICES) - set(self.values)
        extra = set(self.values) - set(CHOICES)
        assert not missing and not extra, (self.name, missing, extra)
        for key, value in self.values.items():
            allowed = CHOICES[key].values
            if isinstance(allowed, type):
                assert isinstance(value, allowed), (self.name, key, value)
            else:
                assert value in allowed, (self.name, key, value)
        assert set(self.origins) == set(CHOICES), (self.name, set(CHOICES) ^ set(self.origins))

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def with_choice(self, key: str, value: Any, origin: str = "chosen by the caller"
                    ) -> ImplDefined:
        """A copy with one choice changed (the explorer tries both sides of a point)."""
        if key not in CHOICES:
            raise ProfileError(f"unknown implementation-defined choice {key!r}; "
                               f"known: {', '.join(CHOICES)}")
        return replace(self, name=f"{self.name}+{key}={value}",
                       values={**self.values, key: value}, origins={**self.origins, key: origin})


_MEASURED = "measured on the Zen 5 host with fpstate.host.runner; test_differential checks it"

#: This machine: AMD EPYC family 1Ah (Zen 5) in a nested KVM guest, Linux 6.18.
AMD_ZEN5_HOST = ImplDefined(
    name="amd-zen5-host",
    values={
        XRSTOR_INIT_XINUSE: "init",
        XRSTOR_LOAD_XINUSE: "value",
        WRITE_XINUSE: 0x201,
        ZEROING_CLEARS_XINUSE: True,
        MODIFIED_OPTIMIZATION: True,
        X87_POINTERS: "when-es",
        FSW_SUMMARY_ON_LOAD: "recomputed",
        FCW_RESERVED: (0x1F3F, 0x0040),
        FLD_UNDEFINED_FLAGS: "unchanged",
        MXCSR_MASK: 0x0002FFFF,
        COMPACTED_XSTATE_BV63: "gp",
        FXSAVE_RESERVED: "untouched",
        X87_POINTER_BITS: 57,
        X87_FDP_BITS: 57,
        LEGACY_SSE_UPPER: True,
        RESTORE_ZMM_XINUSE: "value",
        VEX256_HI256_XINUSE: "per-register",
        EMMS_TOP: "zeroed",
        LEGACY_SSE_KEEPS_AVX: False,
        VEX_XINUSE_RECOMPUTED: "kept",
        LDMXCSR_XINUSE: "kept",
        FOP_UPDATE: "always",
        FNCLEX_UNDEFINED_FLAGS: "unchanged",
        X87_SELECTORS_LOAD64: "zeroed",
        X87_NO_OPERAND_FDP: "kept",
    },
    origins={
        XRSTOR_INIT_XINUSE: _MEASURED + " (XRSTOR of XSTATE_BV=0 then XGETBV(1) reads 0)",
        XRSTOR_LOAD_XINUSE: _MEASURED + " (XSTATE_BV[i]=1 with initial-configuration data "
                            "leaves XINUSE[i]=0; x87 ignores FOP/FIP/FDP in that test)",
        WRITE_XINUSE: _MEASURED + " (MOVDQU/VMOVDQU/VMOVDQU64/KMOVQ of zeros set XINUSE; x87 "
                      "is the exception: its XINUSE follows its value after FLDCW/FNINIT/EMMS, "
                      "where R0-R7 count as in use from an FLD until FNINIT or a restore: FLD "
                      "0.0; EMMS reads 1, FLD 0.0; FNINIT and XRSTOR FSW=0x3800; EMMS read 0). "
                      "Bit 9 (PKRU) is not measured, this guest has no PKU: it is the kernel's "
                      "word, commit ae6012d72fa6 (v6.13, 'x86/pkeys: Ensure updated PKRU value "
                      "is XRSTOR'd'): on AMD the init tracker treats PKRU as initial after any "
                      "WRPKRU of 0, on Intel it stays in use",
        ZEROING_CLEARS_XINUSE: _MEASURED + " (VZEROUPPER clears XINUSE[2,6], VZEROALL [1,2,6])",
        MODIFIED_OPTIMIZATION: _MEASURED + " (XRSTOR b; XSAVEC b, 0x80; XSAVEOPT b leaves the "
                               "XSAVEC bytes where unmodified AVX state would go)",
        X87_POINTERS: _MEASURED + " (saved as 0 unless FSW.ES=1, although CPUID "
                      "0x80000008:EBX[2] XSAVEERPTR is set; the pointers are kept and reappear "
                      "when FLDCW unmasks a pending exception)",
        FSW_SUMMARY_ON_LOAD: _MEASURED + " (FSW=0x8000 or 0x0080 alone loads as 0)",
        FCW_RESERVED: _MEASURED + " (FLDCW 0xFFFF reads back 0x1F7F, FLDCW 0 reads 0x0040)",
        FLD_UNDEFINED_FLAGS: "assumed (differential tests with C0/C2/C3 set in the start "
                             "image check it)",
        MXCSR_MASK: _MEASURED + " (FXSAVE/XSAVE write MXCSR_MASK 0x0002FFFF: DAZ and MM)",
        COMPACTED_XSTATE_BV63: _MEASURED + " (XSTATE_BV=1<<63, XCOMP_BV=1<<63|XCR0 -> #GP)",
        FXSAVE_RESERVED: _MEASURED + " (FXSAVE64 leaves bytes 416-511 as they were)",
        X87_POINTER_BITS: _MEASURED + " (XRSTOR64 of FIP = FDP = 1 << 56 saves "
                          "0xFF00000000000000: bits 56:0 kept, sign-extended)",
        X87_FDP_BITS: _MEASURED + " (as FIP: the same XRSTOR64 of FDP = 1 << 56 saves "
                      "0xFF00000000000000)",
        LEGACY_SSE_UPPER: _MEASURED + " (XRSTOR of ZMM_Hi256 alone, then MOVDQU xmm4: "
                          "XGETBV(1) = 0x46; with opmask or Hi16_ZMM alone: 0x22, 0x82)",
        RESTORE_ZMM_XINUSE: _MEASURED + " (VMOVDQU ymm1 with bits 255:128 zero: XINUSE 0x6; "
                            "then FXRSTOR, or XRSTOR with RFBM 0x2, 0x4 or 0x40: XINUSE[2] = "
                            "0; with RFBM 0x1, 0x20 or 0x80 it stays 1. Hi16_ZMM and opmask "
                            "are not recomputed)",
        VEX256_HI256_XINUSE: _MEASURED + " (VMOVDQU64 zmm11 = non-zero, then VMOVDQU ymm11 = "
                             "0: XINUSE 0x6; with VMOVDQU64 zmm12 = zeros before: 0x46; with "
                             "non-zero ZMM3_H from XRSTOR, VMOVDQU ymm5 = 0: 0x46, ymm3: 0x6)",
        EMMS_TOP: _MEASURED + " (FSW 0x2800 reads 0 after EMMS)",
        LEGACY_SSE_KEEPS_AVX: "not measured there (found on the Zen 3 host after the Zen 5 "
                              "one was gone); assumed absent, on no evidence: at its rate on "
                              "the Zen 3 host, 2 random programs in 50,000, the Zen 5 host's "
                              "test runs could have missed it",
        VEX_XINUSE_RECOMPUTED: "moot: with RESTORE_ZMM_XINUSE 'value' every XRSTOR that "
                               "touches ZMM0-15 recomputes XINUSE[1], [2], [6] from the "
                               "registers anyway (found on the Emerald Rapids host)",
        LDMXCSR_XINUSE: "not measured: the model's rule since session 1, which the CPU "
                        "conform layer never contradicted on the Zen 5, Zen 3 and Zen 4 hosts "
                        "-- but its preemption allowance (a preempted program may find "
                        "XINUSE[1] set) would have admitted a set bit (found on the Emerald "
                        "Rapids host)",
        FOP_UPDATE: "assumed: AMD documents no fopcode compatibility sub-mode; not measured "
                    "-- a save shows FOP only with FSW.ES set (X87_POINTERS 'when-es'), which "
                    "the programs that run an FLD never have",
        FNCLEX_UNDEFINED_FLAGS: "assumed: as measured on the Emerald Rapids host (FNCLEX came "
                                "into the programs after the AMD hosts were gone); the "
                                "differential tests check it on an AMD host",
        X87_SELECTORS_LOAD64: "assumed: as measured on the Zen 4 host (AMD_ZEN4_HOST)",
        X87_NO_OPERAND_FDP: "assumed: as measured on the Zen 4 host (AMD_ZEN4_HOST)",
    },
)

_EMR = ("measured on an Intel Xeon family 6 model CFh (Emerald Rapids) KVM guest, Linux 6.18, "
        "with fpstate.host.runner; test_differential checks it")

#: A fourth measured machine, the first Intel one: family 6 model CFh (Emerald Rapids) in a
#: KVM guest, XCR0 0xE7 (x87, SSE, AVX, AVX-512; the guest is offered no AMX or PKU), CPUID
#: 7:EBX[6] FDP_EXCPTN_ONLY and [13] FCS/FDS deprecated, 57-bit linear addresses. It departs
#: from the SDM's literal reading that the generic Intel record assumed before it in two
#: places (COMPACTED_XSTATE_BV63, EMMS_TOP), keeps fewer bits of FIP than of FDP, and
#: recomputes the XINUSE bits a VEX.256 load set (VEX_XINUSE_RECOMPUTED).
INTEL_EMR_HOST = ImplDefined(
    name="intel-emr-host",
    values={
        XRSTOR_INIT_XINUSE: "init",
        XRSTOR_LOAD_XINUSE: "set",
        WRITE_XINUSE: 0x0,
        ZEROING_CLEARS_XINUSE: True,
        MODIFIED_OPTIMIZATION: True,
        X87_POINTERS: "always",
        FSW_SUMMARY_ON_LOAD: "recomputed",
        FCW_RESERVED: (0x1F3F, 0x0040),
        FLD_UNDEFINED_FLAGS: "unchanged",
        MXCSR_MASK: 0x0000FFFF,
        COMPACTED_XSTATE_BV63: "gp",
        FXSAVE_RESERVED: "untouched",
        X87_POINTER_BITS: 57,
        X87_FDP_BITS: 64,
        LEGACY_SSE_UPPER: False,
        RESTORE_ZMM_XINUSE: "kept",
        VEX256_HI256_XINUSE: "kept",
        EMMS_TOP: "zeroed",
        LEGACY_SSE_KEEPS_AVX: False,
        VEX_XINUSE_RECOMPUTED: "recomputed",
        LDMXCSR_XINUSE: "set",
        FOP_UPDATE: "unmasked",
        FNCLEX_UNDEFINED_FLAGS: "unchanged",
        X87_SELECTORS_LOAD64: "zeroed",
        X87_NO_OPERAND_FDP: "undefined",
    },
    origins={
        XRSTOR_INIT_XINUSE: _EMR + " (XRSTOR of XSTATE_BV=0 then XGETBV(1) reads 0)",
        XRSTOR_LOAD_XINUSE: _EMR + " (XRSTOR of AVX and AVX-512 with XSTATE_BV set and "
                            "initial-configuration data: XGETBV(1) reads their bits set)",
        WRITE_XINUSE: _EMR + " (MOVDQU, VMOVDQU, VMOVDQU64 and KMOVQ of zeros set XINUSE "
                      "1, 2|1, 6|2|1, 7 and 5; x87 stays in use after FLDCW 0x37F, FNINIT and "
                      "EMMS. PKRU not measured: no PKU in this guest; the kernel's word "
                      "(ae6012d72fa6) is that on Intel it stays in use after WRPKRU 0)",
        ZEROING_CLEARS_XINUSE: _EMR + " (VZEROUPPER after VMOVDQU ymm1: XGETBV(1) bit 2 "
                               "clear)",
        MODIFIED_OPTIMIZATION: _EMR + " (XRSTOR b; XSAVEC b, 0x80; XSAVEOPT b leaves the "
                               "XSAVEC bytes where unmodified AVX state would go)",
        X87_POINTERS: _EMR + " (FOP, FIP and FDP saved with FSW.ES = 0; FOP is kept to "
                      "11 bits)",
        FSW_SUMMARY_ON_LOAD: _EMR + " (FSW=0x8000 or 0x0080 alone loads as 0)",
        FCW_RESERVED: _EMR + " (FLDCW 0xFFFF reads back 0x1F7F, FLDCW 0 reads 0x0040)",
        FLD_UNDEFINED_FLAGS: _EMR + " (FSW 0x4500, FLD m80 of 0.0: FNSTSW reads 0x7D00, "
                             "C0, C2 and C3 as they were; the same after FLD1, and FLDZ "
                             "from 0x4700)",
        MXCSR_MASK: _EMR + " (FXSAVE writes MXCSR_MASK 0xFFFF; LDMXCSR 0x21F80 and 0x11F80 "
                    "#GP)",
        COMPACTED_XSTATE_BV63: _EMR + " (XSTATE_BV=1<<63, XCOMP_BV=1<<63|XCR0 -> #GP, as on "
                               "AMD: the SDM's literal reading would let it pass)",
        FXSAVE_RESERVED: _EMR + " (FXSAVE64 leaves bytes 416-511 as they were)",
        X87_POINTER_BITS: _EMR + " (XSAVE64 after XRSTOR64 of FIP = 1 << 56 saves "
                          "0xFF00000000000000, 1 << 57, 1 << 62 and 1 << 63 save 0, "
                          "0x123456789ABCDEF0 saves 0x3456789ABCDEF0: bits 56:0 kept, "
                          "sign-extended; CPUID 0x80000008:EAX[15:8] = 57)",
        X87_FDP_BITS: _EMR + " (the same XRSTOR64 of FDP = 1 << 56, 1 << 57, 1 << 63, "
                      "0x123456789ABCDEF0 saves each unchanged: all 64 bits kept)",
        LEGACY_SSE_UPPER: _EMR + " (XRSTOR of ZMM_Hi256 alone, then MOVDQU xmm4: XGETBV(1) "
                          "has no bit 2)",
        RESTORE_ZMM_XINUSE: _EMR + " (VMOVDQU ymm1 with bits 255:128 zero, then XRSTOR with "
                            "RFBM 0x2: XINUSE[2] stays set)",
        VEX256_HI256_XINUSE: _EMR + " (VMOVDQU64 zmm11 = non-zero, then VMOVDQU ymm11 = 0: "
                             "XINUSE[6] stays set)",
        EMMS_TOP: _EMR + " (FSW 0x2800 reads 0 after EMMS, as on AMD: the SDM's Operation "
                  "names only the tag word)",
        LEGACY_SSE_KEEPS_AVX: _EMR + " as far as it can be: with RESTORE_ZMM_XINUSE 'kept' "
                              "no restore recomputes XINUSE[2], so the Zen 3 quirk cannot "
                              "show (its program reads bit 2 set either way)",
        VEX_XINUSE_RECOMPUTED: _EMR + " (VMOVDQU ymm10 = 0 from the initial state: XINUSE "
                               "0x6; then XRSTOR RFBM 0x4 with XSTATE_BV[2] = 1: 0x4, RFBM "
                               "0x40 with XSTATE_BV[6] = 1: 0x40, RFBM 0x2, 0x20, 0x80 or 0x1: "
                               "kept; with bits 255:128 of ymm10 non-zero instead: kept; a "
                               "MOVDQU, LDMXCSR or EVEX.512 load between, or XSTATE_BV[1] = 1 "
                               "in the start image: kept; XSAVE or XSAVEOPT between: still "
                               "cleared. fpstate conform --layer cpu met it once in 40,000 "
                               "programs. Session 21, from a MOVDQU xmm10 = 0 the same random "
                               "layer met in 30,000: MOVDQU of xmm8-15 from the initial state "
                               "holds XINUSE[1] the same way (xmm10 or xmm11: cleared by the "
                               "XRSTOR of AVX state), a load of one of registers 0-7 ends the "
                               "hold (xmm0, xmm1, xmm3, ymm3: kept), a second load of 8-15 "
                               "does not; with AVX in use from the start image and ymm10's "
                               "upper half non-zero, MOVDQU xmm10 = 0 then an XRSTOR of zero "
                               "AVX state: cleared -- the registers count as zero before the "
                               "restore or after it)",
        LDMXCSR_XINUSE: _EMR + " (LDMXCSR 0x1F80 or 0x3FA0 from the initial state: XGETBV(1) "
                        "reads 0x2 in 8 runs of 8; STMXCSR alone: 0; an XRSTOR of SSE with "
                        "XSTATE_BV[1] = 0 or a VZEROALL after it: 0)",
        FOP_UPDATE: _EMR + " (FNINIT; FLD m80; XSAVE64: FOP and FDP 0, FIP the FLD's address; "
                    "an XRSTOR64 of FOP 0x123 and FDP 0x5555666677778888, then FLD: both "
                    "kept; FCW.IM clear and an FLD onto a full stack: FOP 0x3AB -- DB /5 with "
                    "ModRM 0xAB -- and FDP its operand's address. CPUID 7:EBX[6] "
                    "FDP_EXCPTN_ONLY is set, so FDP follows the same rule; FLDZ and FLD1 "
                    "write FOP 0x1EE and 0x1E8 only with an unmasked stack overflow, and "
                    "never FDP: they have no memory operand)",
        FNCLEX_UNDEFINED_FLAGS: _EMR + " (FSW 0x477F: FNCLEX leaves 0x4700; 0x3A41: 0x3A00; "
                                "0x80BF with FCW.IM clear: 0 -- the flags, SF, ES and B "
                                "cleared, C0-C3 and TOP kept)",
        X87_SELECTORS_LOAD64: "moot there: the CPU deprecates FCS and FDS "
                              "(CPUID.(EAX=07H,ECX=0):EBX[13] ZERO_FCS_FDS), every save stores "
                              "0000H",
        X87_NO_OPERAND_FDP: "moot there: the CPU enumerates FDP_EXCPTN_ONLY, and FLD1 or FLDZ "
                            "kept FDP (measured, an unmasked stack overflow included: "
                            "FOP_UPDATE). 'undefined' is the generic Intel record's claim for "
                            "cores without FDP_EXCPTN_ONLY (Haswell), none of them measured",
    },
)

_INTEL_ASSUMED = "assumed: as measured on the Emerald Rapids host (INTEL_EMR_HOST)"

#: Other Intel cores (Haswell .. Granite Rapids): the Emerald Rapids host's measured choices,
#: not measured themselves (FIP is kept to each CPU's linear-address width: `for_profile`).
INTEL = replace(INTEL_EMR_HOST, name="intel",
                origins={key: _INTEL_ASSUMED for key in CHOICES})

_AMD_ASSUMED = "assumed: as measured on the Zen 5 host (same microcode family behaviour)"

#: Other AMD cores (Zen 2 and older): the Zen 5 host's measured choices, not measured
#: themselves (the x87 pointer width follows each CPU's linear-address width: `for_profile`).
AMD = replace(AMD_ZEN5_HOST, name="amd",
              origins={key: _AMD_ASSUMED for key in CHOICES})

_ZEN3 = ("measured on an AMD EPYC family 19h model 01h (Zen 3) KVM guest, Linux 6.18, with "
         "fpstate.host.runner; test_differential checks it")
_NO_AVX512 = ("not measurable there (no AVX-512: ZMM_Hi256 does not exist, so the choice "
              "cannot arise); as on the Zen 5 host")

#: A second measured machine: AMD EPYC family 19h model 01h (Zen 3, Milan) in a KVM guest,
#: XCR0 0x207 (x87, SSE, AVX, PKRU), 48-bit linear addresses. Every choice that can arise
#: without AVX-512 agrees with the Zen 5 host but the width of the x87 pointers, which is the
#: linear-address width on both, and LEGACY_SSE_KEEPS_AVX, not measured on the Zen 5 host.
AMD_ZEN3_HOST = replace(
    AMD_ZEN5_HOST, name="amd-zen3-host",
    values={**AMD_ZEN5_HOST.values, X87_POINTER_BITS: 48, X87_FDP_BITS: 48,
            LEGACY_SSE_KEEPS_AVX: True},
    origins={**{key: _ZEN3 for key in CHOICES},
             WRITE_XINUSE: _ZEN3 + " (x87 as on the Zen 5 host; PKRU: WRPKRU 0 then "
                           "XGETBV(1) reads bit 9 clear, WRPKRU 4 reads it set, whatever XINUSE "
                           "was before -- the kernel's word of ae6012d72fa6, now measured)",
             X87_POINTER_BITS: _ZEN3 + " (XSAVE64 after XRSTOR64 of FIP = FDP = 1 << 47 saves "
                               "0xFFFF800000000000, 1 << 48 and 1 << 56 save 0, "
                               "0x123456789ABCDEF0 saves 0x56789ABCDEF0: bits 47:0 kept, "
                               "sign-extended; CPUID 0x80000008:EAX[15:8] = 48)",
             LEGACY_SSE_KEEPS_AVX: _ZEN3 + " (VMOVDQU ymm4 = 0, MOVDQU xmm10, then FXRSTOR or "
                                   "XRSTOR RFBM 0x2: XGETBV(1) bit 2 stays set, also after a "
                                   "second FXRSTOR; XRSTOR RFBM 0x4 or 0x6, or VZEROUPPER "
                                   "before the FXRSTOR: clear; MOVDQU before the VMOVDQU: "
                                   "clear. fpstate conform --layer cpu met it 2 times in "
                                   "50,000 programs)",
             LEGACY_SSE_UPPER: _NO_AVX512,
             VEX256_HI256_XINUSE: _NO_AVX512,
             VEX_XINUSE_RECOMPUTED: AMD_ZEN5_HOST.origins[VEX_XINUSE_RECOMPUTED],
             LDMXCSR_XINUSE: AMD_ZEN5_HOST.origins[LDMXCSR_XINUSE],
             FOP_UPDATE: AMD_ZEN5_HOST.origins[FOP_UPDATE],
             FNCLEX_UNDEFINED_FLAGS: AMD_ZEN5_HOST.origins[FNCLEX_UNDEFINED_FLAGS],
             X87_SELECTORS_LOAD64: AMD_ZEN5_HOST.origins[X87_SELECTORS_LOAD64],
             X87_NO_OPERAND_FDP: AMD_ZEN5_HOST.origins[X87_NO_OPERAND_FDP]})

_ZEN4 = ("measured on an AMD EPYC family 19h model 11h (Zen 4, Genoa) KVM guest, Linux 6.18, "
         "with fpstate.host.runner; test_differential checks it")

#: A third measured machine: AMD EPYC family 19h model 11h (Zen 4, Genoa) in a KVM guest,
#: XCR0 0xE7 (x87, SSE, AVX, AVX-512), no PKU. Every choice agrees with the Zen 5 host. The
#: guest's CPUID says 48-bit linear addresses and no LA57, but the FPU keeps 57 bits of FIP
#: and FDP, the core's own width: the width is the silicon's, not what a hypervisor reports.
AMD_ZEN4_HOST = replace(
    AMD_ZEN5_HOST, name="amd-zen4-host",
    origins={**{key: _ZEN4 for key in CHOICES},
             WRITE_XINUSE: _ZEN4 + " (x87 and the vector components as on the Zen 5 host; "
                           "bit 9 is the Zen 3 host's measurement and the kernel's word "
                           "(ae6012d72fa6): this guest has no PKU)",
             X87_POINTER_BITS: _ZEN4 + " (XSAVE64 after XRSTOR64 of FIP = FDP = 1 << 47 saves "
                               "0x800000000000, 1 << 48 saves 1 << 48, 1 << 56 saves "
                               "0xFF00000000000000, 1 << 57 and 1 << 63 save 0, "
                               "0x123456789ABCDEF0 saves 0x3456789ABCDEF0: bits 56:0 kept, "
                               "sign-extended, although the guest's CPUID "
                               "0x80000008:EAX[15:8] = 48 and CPUID 7:ECX[16] LA57 = 0)",
             LEGACY_SSE_KEEPS_AVX: _ZEN4 + " (the Zen 3 host's program -- VMOVDQU ymm4 = 0, "
                                   "MOVDQU xmm10, FXRSTOR, XGETBV(1) -- reads bit 2 clear: "
                                   "the Zen 3 behaviour is absent)",
             VEX_XINUSE_RECOMPUTED: AMD_ZEN5_HOST.origins[VEX_XINUSE_RECOMPUTED],
             # measured when the project came back to a Zen 4 host (session 31), after the
             # Emerald Rapids sessions had added these choices
             LDMXCSR_XINUSE: _ZEN4 + " (LDMXCSR 0x3FA0 from the initial state: XGETBV(1) "
                             "reads 0x2 -- the SDM's MXCSR term of XGETBV(1) -- but an XSAVE "
                             "after it writes XSTATE_BV[1] = 0, 8 runs of 8)",
             FOP_UPDATE: _ZEN4 + " (FSW.IE set and masked, FOP 0x123 in the start image; an FLD "
                         "m80 without an exception, then FLDCW 0x37E, which sets FSW.ES: "
                         "XSAVE64 shows FOP 0x3AB -- DB /5 with ModRM 0xAB -- and the FLD's "
                         "FIP and FDP)",
             FNCLEX_UNDEFINED_FLAGS: _ZEN4 + " (FSW 0x477F: FNCLEX leaves 0x4700; 0x3A41: "
                                     "0x3A00; 0x80BF with FCW.IM clear: 0, as on Emerald "
                                     "Rapids)",
             FLD_UNDEFINED_FLAGS: _ZEN4 + " (FSW 0x4500, FLD m80 of 0.0 or FLD1: FNSTSW reads "
                                  "0x7D00; FLDZ from 0x4700: 0x7D00 -- C0, C2, C3 kept)",
             X87_SELECTORS_LOAD64: _ZEN4 + " (FXRSTOR32 of FCS 0x33 and FDS 0x2B with an "
                                   "exception pending, then FXRSTOR64 or XRSTOR64 of x87 "
                                   "state: FXSAVE32 stores FCS = FDS = 0; an XRSTOR64 of SSE "
                                   "alone keeps 0x33 and 0x2B)",
             X87_NO_OPERAND_FDP: _ZEN4 + " (after that FXRSTOR32 -- FDP 0x2222, FDS 0x2B -- "
                                 "and FNCLEX, FLD1 or FLDZ onto a full stack with FCW.IM "
                                 "clear: FXSAVE32 stores FDP 0x2222 and FDS 0x2B, FIP the "
                                 "instruction's and FCS 0x33; an FLD m80 stores FDS 0, this "
                                 "task's DS)"})

#: Family 19h models of Zen 3 (Milan, Vermeer, Rembrandt, Cezanne); the others are Zen 4.
_ZEN3_MODELS = (range(0x00, 0x10), range(0x20, 0x30), range(0x40, 0x60))


def linear_address_bits(profile: CpuidProfile) -> int:
    """CPUID 0x80000008:EAX[15:8], the linear-address width (48 where the leaf is absent)."""
    if profile.max_extended_leaf < 0x80000008:
        return 48
    return profile.cpuid(0x80000008, 0)[0] >> 8 & 0xFF or 48


def for_profile(profile: CpuidProfile) -> ImplDefined:
    """The implementation-defined choices of ``profile``'s CPU: the measured record of its core
    where there is one (Intel family 6 model CFh: Emerald Rapids; AMD Zen 5: family 1Ah; Zen 3:
    the family 19h models of `_ZEN3_MODELS`; Zen 4: the other family 19h models), else its
    vendor's record (`INTEL`, `AMD`) with FIP kept to the CPU's linear-address width
    (`linear_address_bits`; on AMD FDP too). A measured core keeps its measured widths
    whatever the profile's CPUID says: a KVM guest on Zen 4 reports 48-bit linear addresses
    while its FPU keeps 57 bits of FIP and FDP."""
    family, model = profile.family_model_stepping[:2]
    width = linear_address_bits(profile)
    if profile.vendor not in ("amd", "hygon"):
        if profile.vendor == "intel" and (family, model) == (6, 0xCF):
            return INTEL_EMR_HOST
        if width == INTEL[X87_POINTER_BITS]:
            return INTEL
        return INTEL.with_choice(
            X87_POINTER_BITS, width, f"the CPU's linear-address width (CPUID "
            f"0x80000008:EAX[15:8] = {width}), as on the Emerald Rapids host (57)")
    if family == 0x1A:
        return AMD_ZEN5_HOST
    if family == 0x19:
        return AMD_ZEN3_HOST if any(model in r for r in _ZEN3_MODELS) else AMD_ZEN4_HOST
    if width == AMD[X87_POINTER_BITS]:
        return AMD
    origin = (f"the CPU's linear-address width (CPUID 0x80000008:EAX[15:8] = {width}), as on "
              f"the measured cores (Zen 3: 48, Zen 4 and Zen 5: 57, the silicon's width)")
    return AMD.with_choice(X87_POINTER_BITS, width, origin).with_choice(
        X87_FDP_BITS, width, origin)


__all__ = ["AMD", "AMD_ZEN3_HOST", "AMD_ZEN4_HOST", "AMD_ZEN5_HOST", "CHOICES", "INTEL",
           "INTEL_EMR_HOST",
           "Choice", "ImplDefined", "for_profile", "linear_address_bits"]
