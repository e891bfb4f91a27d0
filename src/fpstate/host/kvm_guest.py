"""A 64-bit KVM guest that runs instruction programs: the real-KVM side of the program contract.

`run_guest_program` answers the question of `fpstate.x86.program` (read its docstring) inside a
KVM guest of this machine, so the answer is what the CPU *as virtualised by KVM* does: guest
XCR0 is set by the guest's own XSETBV (which KVM intercepts and checks with __kvm_set_xcr),
IA32_XSS by the guest's WRMSR, and faults are delivered through the guest's own IDT.

Guest-physical memory (one 2 MiB slot, identity-mapped by one 2 MiB page, user-accessible):

    0x1000 PML4   0x2000 PDPT   0x3000 PD   0x4000 GDT   0x4800 TSS   0x5000 IDT
    0x6000 status block (see _STATUS_*)     0x7000 exception stubs, 0x80 bytes per vector
    0xE000 CPL 3 stack top                   0x10000 CPL 0 stack top (also TSS.RSP0)
    0x10000 setup code (CPL 0)               0x18000 program code (program.cpl)
    0x20000 + 0x4000*i  buffer i (64-byte aligned, plus its misalign)
    0x40000 start image   0x44000 final image   0x48000.. instruction data (register loads)

Theory of operation
-------------------
1. Setup (CPL 0): XSETBV(0, xcr0); WRMSR(IA32_XSS, xss) when the guest CPUID has XSAVES. KVM
   intercepts both (__kvm_set_xcr, kvm_set_msr_common). A fault here is bad input
   (ProgramError).
2. IRETQ to ``program.cpl`` (CPL 3 runs with RFLAGS.IOPL = 3 so that it may report with OUT;
   CR0.AM is set as Linux sets it, RFLAGS.AC clear), then XRSTOR64 of ``start`` with RFBM =
   xcr0 (a fault there is bad input too).
3. Before instruction n the guest stores n in the status block, so an exception handler knows
   the faulting step. Handlers (interrupt gates, vectors 0-31) store vector, error code and the
   faulting RIP, then OUT to `EXIT_PORT` and HLT.
4. After the last instruction: XGETBV(1) & xcr0 where the guest CPUID has XGETBV1, XSAVE64 with
   RFBM = xcr0 into a zeroed image, OUT to `EXIT_PORT`.
The run ends at that KVM_EXIT_IO (or a KVM_EXIT_HLT); any other exit is a HostError.

The XSAVE family is encoded in its REX.W (64-bit) forms, as the kernel does (XSAVE64 etc.):
the legacy region then holds 64-bit FIP/FDP.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from fpstate.errors import HostUnavailable, ProgramError
from fpstate.host import kvm_uapi as u
from fpstate.host.kvm import CpuidEntry, Kvm, find_cpuid, open_kvm
from fpstate.host.kvm_uapi import HostError
from fpstate.host.native import encode
from fpstate.x86.program import (
    BUFFER_SIZE,
    Buffer,
    Fault,
    Insn,
    Outcome,
    Program,
    check_program,
)

MEM_SIZE = 0x200000
PML4, PDPT, PD, GDT, TSS, IDT = 0x1000, 0x2000, 0x3000, 0x4000, 0x4800, 0x5000
STATUS, STUBS = 0x6000, 0x7000
USER_STACK, KERNEL_STACK = 0xE000, 0x10000
SETUP_CODE, PROGRAM_CODE = 0x10000, 0x18000
BUFFERS, BUFFER_STRIDE = 0x20000, 0x4000
START_IMAGE, FINAL_IMAGE, DATA, DATA_END = 0x40000, 0x44000, 0x48000, MEM_SIZE
EXIT_PORT = 0xF1

_STATUS_STATE, _STATUS_VECTOR, _STATUS_ERROR, _STATUS_STEP = 0, 4, 8, 16
_STATUS_RIP, _STATUS_XINUSE, _STATUS_VALUES = 24, 32, 64
_MAX_VALUES = (0x1000 - _STATUS_VALUES) // 8
_DONE, _FAULTED = 1, 2
#: Setup steps, stored sign-extended in the step word (program steps are 0..n-1, final n).
_STEP_XSETBV, _STEP_XSS, _STEP_XRSTOR = -1, -2, -3
_SETUP_NAMES = {_STEP_XSETBV: "XSETBV of XCR0", _STEP_XSS: "WRMSR IA32_XSS",
                _STEP_XRSTOR: "XRSTOR64 of the start image"}

KERNEL_CS, KERNEL_DS, USER_CS, USER_DS, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 18, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 0x20, 0x200, 0x400, 1 << 18
EFER_LME, EFER_LMA = 0x100, 0x400

#: Exception vectors (SDM Vol. 3A, Table 6-1) as Fault.vector names.
VECTORS = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
           8: "#DF", 9: "CSO", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF",
           16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 28: "#HV",
           29: "#VC", 30: "#SX"}
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def _i() -> Any:
    import iced_x86

    return iced_x86


# -- instruction encoding --------------------------------------------------------------------


class _Emitter:
    """Collects iced-x86 instructions and lays out instruction data in guest memory."""

    def __init__(self) -> None:
        self.ins: list[Any] = []
        self.data: list[tuple[int, bytes]] = []
        self.data_top = DATA
        self.values = 0
        self.tile_colsb = [64] * 8  # bytes per row of each tile, from the last LDTILECFG

    def put(self, code: str, *ops: Any) -> None:
        """Append Instruction.create_<operand kinds>(Code.<code>, *ops)."""
        x = _i()
        kinds = "_".join(_kind(op, code) for op in ops)
        create = getattr(x.Instruction, "create_" + kinds if kinds else "create")
        self.ins.append(create(getattr(x.Code, code), *ops))

    def mem(self, addr: int) -> Any:
        return _i().MemoryOperand(displ=addr)

    def place(self, data: bytes) -> int:
        addr = self.data_top
        self.data_top = (addr + len(data) + 63) // 64 * 64
        if self.data_top > DATA_END:
            raise ProgramError("instruction data does not fit in the guest's data area")
        self.data.append((addr, data))
        return addr

    def value_slot(self) -> int:
        if self.values >= _MAX_VALUES:
            raise ProgramError(f"more than {_MAX_VALUES} values read by one program")
        self.values += 1
        return STATUS + _STATUS_VALUES + 8 * (self.values - 1)

    def mov32(self, reg: str, value: int) -> None:
        self.put("MOV_R32_IMM32", _r(reg), value & 0xFFFFFFFF)

    def edx_eax(self, value: int) -> None:
        self.mov32("EAX", value)
        self.mov32("EDX", value >> 32)

    def step(self, n: int) -> None:
        self.put("MOV_RM64_IMM32", self.mem(STATUS + _STATUS_STEP), n)

    def report(self, state: int) -> None:
        self.put("MOV_RM32_IMM32", self.mem(STATUS + _STATUS_STATE), state)
        self.put("OUT_IMM8_AL", EXIT_PORT, _r("AL"))
        self.put("HLT")


class _Reg(int):
    """An iced Register value marked as a register (iced registers are plain ints)."""


def _kind(op: Any, code: str) -> str:
    """The create_* operand kind of ``op``: reg, mem, u64 (IMM64 forms), i32 (negative), u32."""
    if isinstance(op, _Reg):
        return "reg"
    if isinstance(op, _i().MemoryOperand):
        return "mem"
    if code.endswith("IMM64"):
        return "u64"
    return "i32" if op < 0 else "u32"


def _r(name: str, n: int = 0) -> _Reg:
    return _Reg(getattr(_i().Register, name) + n)


_XSAVE_CODES = {
    "XSAVE": "XSAVE64_MEM", "XSAVEOPT": "XSAVEOPT64_MEM", "XSAVEC": "XSAVEC64_MEM",
    "XSAVES": "XSAVES64_MEM", "XRSTOR": "XRSTOR64_MEM", "XRSTORS": "XRSTORS64_MEM",
    "FXSAVE": "FXSAVE64_M512BYTE", "FXRSTOR": "FXRSTOR64_M512BYTE",
}
_LOADS = {  # mnemonic -> (iced code, register family)
    "MOVDQU": ("MOVDQU_XMM_XMMM128", "XMM0"), "VMOVDQU": ("VEX_VMOVDQU_YMM_YMMM256", "YMM0"),
    "VMOVDQU64": ("EVEX_VMOVDQU64_ZMM_K1Z_ZMMM512", "ZMM0"), "KMOVQ": ("VEX_KMOVQ_KR_KM64", "K0"),
}
_NO_OPERANDS = {"VZEROUPPER": "VEX_VZEROUPPER", "VZEROALL": "VEX_VZEROALL", "FNINIT": "FNINIT",
                "EMMS": "EMMS", "TILERELEASE": "VEX_TILERELEASE"}


def buffer_address(i: int, misalign: int) -> int:
    return BUFFERS + BUFFER_STRIDE * i + misalign


def emit_insn(e: _Emitter, insn: Insn, buffers: Sequence[int]) -> None:
    """Encode one program instruction (operands as in the program docstring)."""
    m = insn.mnemonic
    if m in _XSAVE_CODES:
        e.edx_eax(insn.mask)
        e.put(_XSAVE_CODES[m], e.mem(buffers[insn.buf]))
    elif m in _LOADS:
        code, family = _LOADS[m]
        e.put(code, _r(family, insn.reg), e.mem(e.place(insn.data)))
    elif m in _NO_OPERANDS:
        e.put(_NO_OPERANDS[m])
    elif m == "XGETBV":
        e.mov32("ECX", insn.reg)
        e.put("XGETBV")
        slot = e.value_slot()
        e.put("MOV_RM32_R32", e.mem(slot), _r("EAX"))
        e.put("MOV_RM32_R32", e.mem(slot + 4), _r("EDX"))
    elif m == "XSETBV":
        e.mov32("ECX", insn.reg)
        e.edx_eax(insn.value)
        e.put("XSETBV")
    elif m == "FLD":
        e.put("FLD_M80FP", e.mem(e.place(insn.data)))
    elif m == "FLDCW":
        e.put("FLDCW_M2BYTE", e.mem(e.place(struct.pack("<H", insn.value & 0xFFFF))))
    elif m == "LDMXCSR":
        e.put("LDMXCSR_M32", e.mem(e.place(struct.pack("<I", insn.value & 0xFFFFFFFF))))
    elif m == "WRPKRU":
        e.mov32("ECX", 0)
        e.edx_eax(insn.value & 0xFFFFFFFF)
        e.put("WRPKRU")
    elif m == "RDPKRU":
        e.mov32("ECX", 0)
        e.put("RDPKRU")
        e.put("MOV_RM32_R32", e.mem(e.value_slot()), _r("EAX"))
    elif m == "STMXCSR":
        e.put("STMXCSR_M32", e.mem(e.value_slot()))
    elif m == "FNSTSW":
        e.put("FNSTSW_AX")
        e.put("MOV_RM16_R16", e.mem(e.value_slot()), _r("AX"))
    elif m == "FNSTCW":
        e.put("FNSTCW_M2BYTE", e.mem(e.value_slot()))
    elif m == "LDTILECFG":
        e.tile_colsb = [struct.unpack_from("<H", insn.data, 16 + 2 * t)[0] or 64 for t in range(8)]
        e.put("VEX_LDTILECFG_M512", e.mem(e.place(insn.data)))
    elif m == "STTILECFG":
        e.put("VEX_STTILECFG_M512", e.mem(buffers[insn.buf]))
    elif m == "TILELOADD":
        stride = e.tile_colsb[insn.reg]
        e.put("MOV_R64_IMM64", _r("RAX"), e.place(insn.data or b"\0"))
        e.put("MOV_R64_IMM64", _r("RCX"), stride)
        x = _i()
        e.put("VEX_TILELOADD_TMM_SIBMEM", _r("TMM0", insn.reg),
              x.MemoryOperand(x.Register.RAX, x.Register.RCX, 1))
    elif m == "TILEZERO":
        e.put("VEX_TILEZERO_TMM", _r("TMM0", insn.reg))
    else:  # check_program() admits only the mnemonics above
        raise AssertionError(f"no guest encoding for {m}")


# -- the guest machine -----------------------------------------------------------------------


def _segment(selector: int, *, code: bool, dpl: int) -> u.KvmSegment:
    return u.KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3,
                        present=1, dpl=dpl, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def _gdt_entries() -> bytes:
    tss_lo = (0x67 | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | ((TSS >> 24) & 0xFF) << 56)
    return struct.pack("<7Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00AFFA000000FFFF,
                       0x00CFF2000000FFFF, tss_lo, TSS >> 32)


def _stub(vector: int) -> bytes:
    """Exception handler for ``vector``: record vector, error code and RIP, report, halt."""
    e = _Emitter()
    if vector in _ERROR_CODE_VECTORS:
        e.put("POP_R64", _r("RAX"))
    else:
        e.put("XOR_R32_RM32", _r("EAX"), _r("EAX"))
    e.put("MOV_RM64_R64", e.mem(STATUS + _STATUS_ERROR), _r("RAX"))
    e.put("MOV_RM32_IMM32", e.mem(STATUS + _STATUS_VECTOR), vector)
    e.put("MOV_R64_RM64", _r("RAX"), _i().MemoryOperand(_i().Register.RSP))
    e.put("MOV_RM64_R64", e.mem(STATUS + _STATUS_RIP), _r("RAX"))
    e.report(_FAULTED)
    code = encode(e.ins, STUBS + 0x80 * vector)
    assert len(code) <= 0x80, f"stub {vector} is {len(code)} bytes"
    return code


class GuestMachine:
    """One VM with one vCPU in 64-bit long mode, ready to run programs.

    ``cpuid`` is the guest CPUID for KVM_SET_CPUID2 (default: KVM_GET_SUPPORTED_CPUID as is,
    so that the guest may XSETBV every XCR0 bit KVM offers). ``irqchip`` adds the in-kernel
    irqchip, which `Vcpu.init_vcpu` needs. The vCPU is available as ``.vcpu`` for the KVM
    ioctls (KVM_GET_XSAVE, KVM_SET_XCRS, ...).
    """

    def __init__(self, kvm: Kvm | None = None, *, cpuid: Sequence[CpuidEntry] | None = None,
                 irqchip: bool = False) -> None:
        self.kvm = kvm or open_kvm()
        self.vm = self.kvm.create_vm(irqchip=irqchip)
        try:
            self.mem = self.vm.add_memory(0, 0, MEM_SIZE)
            self.vcpu = self.vm.create_vcpu(0)
            self.cpuid = tuple(cpuid) if cpuid is not None else self.kvm.supported_cpuid()
            self.vcpu.set_cpuid2(self.cpuid)
            self._build_tables()
        except BaseException:
            self.vm.close()
            raise
        d1 = find_cpuid(self.cpuid, 0xD, 1)[0]
        self.has_xgetbv1 = bool(d1 & 4)
        self.has_xsaves = bool(d1 & 8)
        self._cpl0: str | None = ""  # "" = not probed yet (xstate_at_cpl0)

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> GuestMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # memory

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa:gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.mem[gpa:gpa + size])

    def _build_tables(self) -> None:
        # Page tables: PML4[0] -> PDPT[0] -> PD[0] = one 2 MiB page at 0: P, RW, US (+PS).
        self.write(PML4, struct.pack("<Q", PDPT | 7))
        self.write(PDPT, struct.pack("<Q", PD | 7))
        self.write(PD, struct.pack("<Q", 0 | 0x87))
        self.write(GDT, _gdt_entries())
        self.write(TSS + 4, struct.pack("<Q", KERNEL_STACK))  # RSP0
        for v in range(32):
            handler = STUBS + 0x80 * v
            gate = struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, 0, 0x8E,
                               (handler >> 16) & 0xFFFF, handler >> 32, 0)
            self.write(IDT + 16 * v, gate)
            self.write(STUBS + 0x80 * v, _stub(v))

    def long_mode_sregs(self) -> u.KvmSregs:
        """CR0/CR4/EFER and segments of a 64-bit kernel with CR4.OSXSAVE (SDM Vol. 3A 10.8.5)."""
        s = self.vcpu.get_sregs()
        s.cs = _segment(KERNEL_CS, code=True, dpl=0)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, name, _segment(KERNEL_DS, code=False, dpl=0))
        s.tr = u.KvmSegment(base=TSS, limit=0x67, selector=TSS_SEL, type=11, present=1)
        s.ldt = u.KvmSegment(selector=0, type=2, present=1, limit=0xFFFF, unusable=1)
        s.gdt = u.KvmDtable(base=GDT, limit=7 * 8 - 1)
        s.idt = u.KvmDtable(base=IDT, limit=256 * 16 - 1)
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
        s.cr3 = PML4
        s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE
        s.efer = EFER_LME | EFER_LMA
        return s

    # running

    def run_code(self, code: bytes) -> dict[str, int]:
        """Run CPL 0 ``code`` (which must end by reporting through `EXIT_PORT` or HLT) from a
        fresh long-mode register state; returns the status block's fields."""
        self.write(STATUS, bytes(0x1000))
        self.write(SETUP_CODE, code)
        self.vcpu.set_sregs(self.long_mode_sregs())
        regs = u.KvmRegs(rip=SETUP_CODE, rsp=KERNEL_STACK, rflags=2)
        self.vcpu.set_regs(regs)
        reason = self.vcpu.run()
        if reason == u.KVM_EXIT_IO:
            direction, port, _size, _data = self.vcpu.exit_io()
            if direction != u.KVM_EXIT_IO_OUT or port != EXIT_PORT:
                raise HostError(reason, f"unexpected I/O on port {port:#x}")
        elif reason != u.KVM_EXIT_HLT:
            raise HostError(reason, self.vcpu.exit_detail(reason))
        state, vector, error, step, rip, xinuse = struct.unpack_from(
            "<IIQqQQ", self.read(STATUS, 40))
        return {"state": state, "vector": vector, "error": error, "step": step, "rip": rip,
                "xinuse": xinuse}

    def run_program(self, program: Program, *, xcr0: int, xss: int = 0) -> Outcome:
        """Run ``program`` in the guest (see the module docstring) and return its Outcome."""
        return self._run(program, xcr0=xcr0, xss=xss, xstate=True)

    def run_insns(self, insns: Sequence[Insn], *, xcr0: int, cpl: int = 0,
                  buffers: Sequence[Buffer] = ()) -> Outcome:
        """Run bare instructions: XSETBV(xcr0) at CPL 0, then ``insns`` at ``cpl``, with no
        XRSTOR of a start image and no final XSAVE (the registers are whatever the vCPU holds,
        as KVM_SET_XSAVE or the previous run left them). For the XSETBV and XGETBV questions,
        and for hosts whose KVM cannot run the XSAVE family at guest CPL 0. ``final`` and
        ``xinuse`` of the Outcome are None."""
        program = Program(start=bytes(576), insns=tuple(insns), buffers=tuple(buffers), cpl=cpl)
        return self._run(program, xcr0=xcr0, xss=0, xstate=False)

    def _run(self, program: Program, *, xcr0: int, xss: int, xstate: bool) -> Outcome:
        check_program(program)
        if xss and not self.has_xsaves:
            raise HostUnavailable(
                f"IA32_XSS={xss:#x} needs XSAVES, and the guest CPUID lacks it: "
                f"CPUID.(EAX=0DH,ECX=1):EAX[3]=0")
        bufs = [buffer_address(i, b.misalign) for i, b in enumerate(program.buffers)]
        e = _Emitter()
        # 1. setup at CPL 0: XCR0 and IA32_XSS (KVM intercepts both)
        e.step(_STEP_XSETBV)
        e.mov32("ECX", 0)
        e.edx_eax(xcr0)
        e.put("XSETBV")
        if self.has_xsaves:
            e.step(_STEP_XSS)
            e.mov32("ECX", u.MSR_IA32_XSS)
            e.edx_eax(xss)
            e.put("WRMSR")
        # 2. to program.cpl: IRETQ frame SS, RSP, RFLAGS, CS, RIP
        user = program.cpl == 3
        e.put("PUSHQ_IMM32", USER_DS if user else KERNEL_DS)
        e.put("PUSHQ_IMM32", USER_STACK if user else KERNEL_STACK - 0x1000)
        e.put("PUSHQ_IMM32", 0x3002 if user else 0x2)
        e.put("PUSHQ_IMM32", USER_CS if user else KERNEL_CS)
        e.put("PUSHQ_IMM32", PROGRAM_CODE)
        e.put("IRETQ")
        setup = encode(e.ins, SETUP_CODE)
        # 3. at program.cpl: XRSTOR64 of the start image, the program, XGETBV(1), XSAVE64
        e.ins = []
        if xstate:
            e.step(_STEP_XRSTOR)
            e.edx_eax(xcr0)
            e.put("XRSTOR64_MEM", e.mem(START_IMAGE))
        for n, insn in enumerate(program.insns):
            e.step(n)
            emit_insn(e, insn, bufs)
        e.step(len(program.insns))
        if xstate and self.has_xgetbv1:
            e.mov32("ECX", 1)
            e.put("XGETBV")
            e.put("MOV_RM32_R32", e.mem(STATUS + _STATUS_XINUSE), _r("EAX"))
            e.put("MOV_RM32_R32", e.mem(STATUS + _STATUS_XINUSE + 4), _r("EDX"))
        if xstate:
            e.edx_eax(xcr0)
            e.put("XSAVE64_MEM", e.mem(FINAL_IMAGE))
        e.report(_DONE)
        body = encode(e.ins, PROGRAM_CODE)
        if len(setup) > PROGRAM_CODE - SETUP_CODE or len(body) > BUFFERS - PROGRAM_CODE:
            raise ProgramError(f"program of {len(program.insns)} instructions is too long")
        # memory
        for i, b in enumerate(program.buffers):
            self.write(BUFFERS + BUFFER_STRIDE * i, bytes(BUFFER_STRIDE))
            self.write(bufs[i], b.data.ljust(BUFFER_SIZE, b"\0"))
        self.write(START_IMAGE, program.start.ljust(BUFFER_SIZE, b"\0"))
        self.write(FINAL_IMAGE, bytes(BUFFER_SIZE))
        for addr, data in e.data:
            self.write(addr, data)
        self.write(PROGRAM_CODE, body)
        st = self.run_code(setup)
        return self._outcome(program, st, bufs, e.values, xcr0, xstate)

    def _outcome(self, program: Program, st: dict[str, int], bufs: list[int], nvalues: int,
                 xcr0: int, xstate: bool) -> Outcome:
        n = len(program.insns)
        buffers = tuple(self.read(a, BUFFER_SIZE) for a in bufs)
        if st["state"] == _FAULTED:
            vector = VECTORS.get(st["vector"], f"vector {st['vector']}")
            step = st["step"]
            reason = f"guest vector {st['vector']}, error code {st['error']:#x}, rip {st['rip']:#x}"
            if step < 0:
                raise ProgramError(f"{_SETUP_NAMES[step]} faulted in the guest: {vector} "
                                   f"(xcr0 {xcr0:#x}); {reason}")
            if step >= n:
                raise HostError(u.KVM_EXIT_IO, f"final XSAVE64 faulted: {vector}; {reason}")
            values = self._values(min(nvalues, _values_before(program, step)))
            return Outcome(buffers=buffers, values=values, fault=Fault(vector, reason),
                           fault_step=step)
        if st["state"] != _DONE:
            raise HostError(u.KVM_EXIT_HLT, f"guest stopped at step {st['step']} without report")
        if not xstate:
            return Outcome(buffers=buffers, values=self._values(nvalues))
        final = normalise_standard(self.read(FINAL_IMAGE, self.standard_size(xcr0)), xcr0,
                                   self.standard_offsets())
        xinuse = st["xinuse"] & xcr0 if self.has_xgetbv1 else None
        return Outcome(buffers=buffers, values=self._values(nvalues), xinuse=xinuse,
                       final=final)

    def xstate_at_cpl0(self) -> str | None:
        """None if this KVM runs XGETBV at guest CPL 0, else why not (the HostError text)."""
        if self._cpl0 == "":
            try:
                self.run_insns([Insn("XGETBV", reg=0)], xcr0=1, cpl=0)
                self._cpl0 = None
            except HostError as e:
                self._cpl0 = f"guest CPL 0 cannot run XSAVE-family instructions here: {e}"
        return self._cpl0

    def _values(self, count: int) -> tuple[int, ...]:
        raw = self.read(STATUS + _STATUS_VALUES, 8 * count)
        return struct.unpack(f"<{count}Q", raw)

    # layout facts from the guest CPUID

    def standard_offsets(self) -> dict[int, tuple[int, int]]:
        """{component: (offset, size)} of the standard format, from guest CPUID leaf 0xD."""
        out = {0: (0, 160), 1: (160, 256)}
        for i in range(2, 63):
            size, offset, _ecx, _edx = find_cpuid(self.cpuid, 0xD, i)
            if size:
                out[i] = (offset, size)
        return out

    def standard_size(self, xcr0: int) -> int:
        """The standard-format size for ``xcr0``: max(576, offset + size over its components)."""
        ends = [o + s for i, (o, s) in self.standard_offsets().items() if i >= 2 and xcr0 >> i & 1]
        return max([576, *ends])


_VALUE_MNEMONICS = frozenset({"XGETBV", "RDPKRU", "STMXCSR", "FNSTSW", "FNSTCW"})


def _values_before(program: Program, step: int) -> int:
    """How many values the instructions before ``step`` appended (a faulting one appends none)."""
    return sum(1 for insn in program.insns[:step] if insn.mnemonic in _VALUE_MNEMONICS)


def normalise_standard(image: bytes, xcr0: int, layout: dict[int, tuple[int, int]]) -> bytes:
    """A standard-format image with every XCR0 component whose XSTATE_BV bit is clear put in its
    initial configuration (SDM Vol. 1 13.6: x87 FCW = 037FH, everything else zero; MXCSR is not
    part of the SSE init state and is kept). XSAVE leaves such components unwritten."""
    out = bytearray(image)
    bv = struct.unpack_from("<Q", out, 512)[0]
    for i, (offset, size) in layout.items():
        if xcr0 >> i & 1 and not bv >> i & 1 and offset + size <= len(out):
            if i == 0:
                out[0:24] = struct.pack("<HHBBHQQ", 0x037F, 0, 0, 0, 0, 0, 0)
                out[32:160] = bytes(128)
            else:
                out[offset:offset + size] = bytes(size)
    return bytes(out)


#: How KVM backends other than VMX/SVM differ, guest-visibly, from the KVM the model follows;
#: measured on a host running each (see the findings notes). The tests read this table.
BACKEND_DIVERGENCES: dict[str, dict[str, str]] = {
    "kvm_pvm": {
        "guest_xcr0_not_in_hardware": (
            "the guest's XCR0 (KVM_GET_XCRS, set by the guest's XSETBV) is not loaded into the "
            "CPU while the guest runs: guest XGETBV(0) reads the host's XCR0, and XSAVE and VEX "
            "instructions follow the host's XCR0"),
        "no_xstate_at_cpl0": (
            "guest CPL 0 runs in hardware ring 3 and traps on XSAVE-family, XGETBV, STMXCSR "
            "and VEX instructions; KVM's emulator cannot run them (KVM_EXIT_INTERNAL_ERROR, "
            "KVM_INTERNAL_ERROR_EMULATION)"),
    },
}


def guest_xcr0_in_hardware(backend: str | None) -> bool:
    """Whether a guest's XCR0 is the CPU's XCR0 while that guest runs (kvm_load_guest_xsave_
    state, x86.c), for a KVM backend (`fpstate.host.kvm.kvm_backend`)."""
    return "guest_xcr0_not_in_hardware" not in BACKEND_DIVERGENCES.get(backend or "", {})


_machines: dict[tuple, GuestMachine] = {}


def machine_for(cpuid: Sequence[CpuidEntry] | None = None) -> GuestMachine:
    """A cached GuestMachine per guest CPUID (KVM allows KVM_SET_CPUID2 to change only before
    the first KVM_RUN, so each CPUID gets its own VM)."""
    key = tuple(cpuid) if cpuid is not None else ()
    if key not in _machines:
        _machines[key] = GuestMachine(cpuid=cpuid)
    return _machines[key]


def run_guest_program(program: Program, *, xcr0: int, xss: int = 0,
                      cpuid: Sequence[CpuidEntry] | None = None) -> Outcome:
    """Run ``program`` at ``program.cpl`` in a KVM guest whose own XSETBV sets XCR0 = ``xcr0``
    (and WRMSR sets IA32_XSS = ``xss`` when the guest CPUID has XSAVES); see the module
    docstring. ProgramError for a malformed program or a setup that faults (an XCR0 KVM
    rejects, a start image XRSTOR rejects); HostError for an unexpected KVM exit."""
    return machine_for(cpuid).run_program(program, xcr0=xcr0, xss=xss)
