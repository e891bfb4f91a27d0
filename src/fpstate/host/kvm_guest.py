"""A 64-bit KVM guest that runs instruction programs: the real-KVM side of the program contract.

`run_guest_program` answers the question of `fpstate.x86.program` (read its docstring) inside a
KVM guest of this machine, so the answer is what the CPU *as virtualised by KVM* does: the
guest's XCR0 is set by the guest's own XSETBV (which KVM intercepts and checks with
__kvm_set_xcr), IA32_XSS by the guest's WRMSR, and faults arrive at the guest's own IDT.

Guest-physical memory (one 2 MiB slot, identity-mapped by one 2 MiB page, user-accessible):

    0x1000 PML4   0x2000 PDPT   0x3000 PD   0x4000 GDT   0x4800 TSS   0x5000 IDT
    0x6000 status block (_STATUS_*), value slots from 0x6040     0x7000 exception stubs
    0xE000 CPL 3 stack top        0x10000 CPL 0 stack top (also TSS.RSP0)
    0x10000 setup code (CPL 0)    0x18000 program code (at program.cpl)
    0x20000 + 0x4000*i  buffer i (64-byte aligned, plus its misalign)
    0x40000 start image   0x44000 final image   0x48000 STTILECFG scratch   0x48040.. data pool

Theory of operation
-------------------
1. Setup at CPL 0: XSETBV(0, xcr0); WRMSR(IA32_XSS, xss) when the guest CPUID has XSAVES;
   WRMSR(IA32_XFD, xfd) when it has XFD (AMX under XFD; a nonzero ``xfd`` needs it). KVM
   intercepts the XSETBV and the WRMSRs (until a nonzero IA32_XFD write stops XFD write
   interception on VMX). A fault here is bad input (ProgramError).
2. IRETQ to ``program.cpl`` (CPL 3 runs with RFLAGS.IOPL = 3 so that it may report with OUT;
   CR0.AM is set as Linux sets it, RFLAGS.AC clear), where the program first stores its CS
   and DS (MOV r/m16, Sreg: the selectors each `Placement` names), then XRSTOR64 of ``start``
   with RFBM = xcr0 (a fault there is bad input too).
3. Before instruction n the guest stores n in the status block, so an exception handler knows
   the faulting step. Handlers (interrupt gates, vectors 0-31) store vector, error code and the
   faulting RIP, then OUT to `EXIT_PORT` and HLT.
4. After the last instruction: XGETBV(1) & xcr0 where the guest CPUID has XGETBV1, XSAVE64 with
   RFBM = xcr0 into a zeroed image (normalised with `normalise_image`, offsets from the guest
   CPUID), OUT to `EXIT_PORT`.
The run ends at that KVM_EXIT_IO (or a KVM_EXIT_HLT); any other exit is a HostError.

The instructions are encoded exactly as the user-mode runner encodes them
(`fpstate.host.asm.emit_insn`: 64-bit forms, memory operands ``[rbx + disp32]``); RBX is 0 in
the guest, so displacements are guest-physical (= linear) addresses. The stride of TILELOADD
and TILESTORED is read with STTILECFG just before them, as the runner does.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import replace

from iced_x86 import Code, Instruction, MemoryOperand, Register

from fpstate.errors import HostUnavailable, ProgramError
from fpstate.host import kvm_uapi as u
from fpstate.host.asm import (
    VALUE_MNEMONICS,
    Asm,
    Operands,
    emit_insn,
    mem,
    operand_data,
)
from fpstate.host.asm import placement as placed_at
from fpstate.host.kvm import CpuidEntry, Kvm, find_cpuid, open_kvm
from fpstate.host.kvm_uapi import HostError
from fpstate.x86.image import normalise_image
from fpstate.x86.program import (
    BUFFER_SIZE,
    Buffer,
    Fault,
    Insn,
    Outcome,
    Placement,
    Program,
    check_program,
)

MEM_SIZE = 0x200000
PML4, PDPT, PD, GDT, TSS, IDT = 0x1000, 0x2000, 0x3000, 0x4000, 0x4800, 0x5000
STATUS, STUBS = 0x6000, 0x7000
USER_STACK, KERNEL_STACK = 0xE000, 0x10000
SETUP_CODE, PROGRAM_CODE = 0x10000, 0x18000
BUFFERS, BUFFER_STRIDE = 0x20000, 0x4000
START_IMAGE, FINAL_IMAGE, SCRATCH, DATA = 0x40000, 0x44000, 0x48000, 0x48040
EXIT_PORT = 0xF1

_STATE, _VECTOR, _ERROR, _STEP, _RIP, _XINUSE, _SELECTORS, _VALUES = 0, 4, 8, 16, 24, 32, 40, 64
_MAX_VALUES = (0x1000 - _VALUES) // 8
_DONE, _FAULTED = 1, 2
#: Setup steps, stored sign-extended in the step word (program steps are 0..n-1, final n).
_STEP_XSETBV, _STEP_XSS, _STEP_XRSTOR, _STEP_XFD = -1, -2, -3, -4
_SETUP_NAMES = {_STEP_XSETBV: "XSETBV of XCR0", _STEP_XSS: "WRMSR IA32_XSS",
                _STEP_XRSTOR: "XRSTOR64 of the start image", _STEP_XFD: "WRMSR IA32_XFD"}

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

#: How KVM backends other than VMX/SVM differ, guest-visibly, from the KVM the model follows;
#: measured on a host running each (see the findings notes). The tests read this table.
BACKEND_DIVERGENCES: dict[str, dict[str, str]] = {
    "kvm_pvm": {
        "guest_xcr0_not_in_hardware": (
            "the guest's XCR0 (KVM_GET_XCRS, set by the guest's XSETBV) is not loaded into the "
            "CPU while the guest runs: guest XGETBV(0) reads the host's XCR0, and XSAVE and VEX "
            "instructions follow the host's XCR0"),
        "no_xstate_at_cpl0": (
            "guest CPL 0 runs in hardware ring 3 and traps on XSAVE-family, XGETBV, STMXCSR, "
            "LDMXCSR, FLD and VEX instructions; KVM's emulator cannot run them "
            "(KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION)"),
        "sse_marked_in_use": (
            "after a KVM_RUN, KVM_GET_XSAVE2 may show SSE in use (XSTATE_BV[1] = 1) with its "
            "initial values (XMM zero, MXCSR 1F80H) though the guest never touched them: "
            "on the Zen 5 host always once the guest reached CPL 3 (hardware ring 3 through "
            "PVM's switcher), now and then -- timing-dependent -- for a guest that stayed at "
            "CPL 0; on a Zen 3 host (family 19h) not after a CPL 3 run either; in the model "
            "(VMX/SVM KVM) only the guest's own instructions change XINUSE; once (Emerald "
            "Rapids, a full test run on both cores) x87 too: XSTATE_BV[0] = 1 with x87's "
            "initial values"),
        "guest_pkru_without_cr4_pke": (
            "the guest runs in hardware ring 3 under the host's CR4, whose PKE is set: WRPKRU "
            "and RDPKRU at guest CPL 3 run although the guest left CR4.PKE clear (VMX/SVM KVM: "
            "#UD, CR4.PKE is the guest's own)"),
        "guest_cs_of_host": (
            "guest CPL 3 runs in hardware ring 3 with the host's user code segment: after an "
            "IRETQ that loads the guest's CS selector 0x1B, MOV from CS reads 0x33 (the host's "
            "__USER_CS), and an x87 instruction leaves 0x33 in FCS, which FXSAVE without REX.W "
            "stores (VMX/SVM: the guest's own selector; measured on Zen 4, session 32)"),
        "cpl3_gp_emulated": (
            "a #GP at guest CPL 3 goes to KVM's instruction emulator first: LDMXCSR of a "
            "reserved MXCSR bit reaches the guest as #UD (hardware: #GP), and a FXSAVE64 to a "
            "16-byte misaligned address completes (hardware: #GP)"),
    },
}


def guest_xcr0_in_hardware(backend: str | None) -> bool:
    """Whether a guest's XCR0 is the CPU's XCR0 while that guest runs (kvm_load_guest_xsave_
    state, x86.c), for a KVM backend (`fpstate.host.kvm.kvm_backend`)."""
    return "guest_xcr0_not_in_hardware" not in BACKEND_DIVERGENCES.get(backend or "", {})


def buffer_address(i: int, misalign: int) -> int:
    return BUFFERS + BUFFER_STRIDE * i + misalign


# -- guest code ------------------------------------------------------------------------------


def _step(a: Asm, n: int) -> None:
    a.store_imm(STATUS + _STEP, n)


def _report(a: Asm, state: int) -> None:
    """status = state; OUT EXIT_PORT, AL; HLT (the run ends at the OUT's KVM_EXIT_IO)."""
    a.emit(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, mem(STATUS + _STATE), state))
    a.emit(Instruction.create_u32_reg(Code.OUT_IMM8_AL, EXIT_PORT, Register.AL))
    a.op(Code.HLT)


def _stub(vector: int) -> bytes:
    """Exception handler for ``vector``: record vector, error code and RIP, report, halt."""
    a = Asm(STUBS + 0x80 * vector)
    if vector in _ERROR_CODE_VECTORS:
        a.emit(Instruction.create_reg(Code.POP_R64, Register.RAX))
    else:
        a.emit(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EAX, Register.EAX))
    a.store64(STATUS + _ERROR, Register.RAX)
    a.emit(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, mem(STATUS + _VECTOR), vector))
    a.emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, Register.RAX,
                                      MemoryOperand(Register.RSP)))
    a.store64(STATUS + _RIP, Register.RAX)
    _report(a, _FAULTED)
    assert len(a.code) <= 0x80, f"stub {vector} is {len(a.code)} bytes"
    return bytes(a.code)


def _gdt_entries() -> bytes:
    tss_lo = 0x67 | (TSS & 0xFFFFFF) << 16 | 0x89 << 40 | ((TSS >> 24) & 0xFF) << 56
    return struct.pack("<7Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00AFFA000000FFFF,
                       0x00CFF2000000FFFF, tss_lo, TSS >> 32)


def architectural_selectors(cpl: int) -> tuple[int, int]:
    """(CS, DS) of a program at guest ``cpl`` as VMX or SVM runs it: the FCS and FDS an x87
    instruction leaves (`fpstate.x86.program.Placement`). Setup runs with KERNEL_CS and every
    data segment KERNEL_DS (`GuestMachine.long_mode_sregs`); the IRETQ to the program loads CS
    from its frame and, returning to CPL 3, loads DS with a null selector because KERNEL_DS's
    DPL 0 is below the new CPL (SDM Vol. 2A IRET, "RETURN-TO-OUTER-PRIVILEGE-LEVEL")."""
    return (USER_CS, 0) if cpl == 3 else (KERNEL_CS, KERNEL_DS)


def _segment(selector: int, *, code: bool) -> u.KvmSegment:
    return u.KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3,
                        present=1, dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def _operands(program: Program) -> tuple[list[Operands], list[tuple[int, bytes]]]:
    """Where each instruction's operands live: buffer, data pool entry, value slot."""
    ops, pool, at, slot = [], [], DATA, STATUS + _VALUES
    for insn in program.insns:
        m, data = insn.mnemonic, operand_data(insn)
        where = 0
        if data:
            where, at = at, (at + len(data) + 63) // 64 * 64
            pool.append((where, data))
        value = 0
        if m in VALUE_MNEMONICS:
            value, slot = slot, slot + 8
        buf = 0
        if 0 <= insn.buf < len(program.buffers):
            buf = buffer_address(insn.buf, program.buffers[insn.buf].misalign)
        ops.append(Operands(buf=buf, data=where, value=value, scratch=SCRATCH))
    if at > MEM_SIZE or slot > STATUS + 0x1000:
        raise ProgramError("the program's data or values do not fit in the guest's memory")
    return ops, pool


# -- the guest machine -----------------------------------------------------------------------


class GuestMachine:
    """One VM with one vCPU in 64-bit long mode, ready to run programs.

    ``cpuid`` is the guest CPUID for KVM_SET_CPUID2 (default: KVM_GET_SUPPORTED_CPUID as is,
    so that the guest may XSETBV every XCR0 bit KVM offers). ``irqchip`` adds the in-kernel
    irqchip, which `Vcpu.init_vcpu` needs. The vCPU is available as ``.vcpu`` for the KVM
    ioctls (KVM_GET_XSAVE, KVM_SET_XCRS, ...).
    """

    def __init__(self, kvm: Kvm | None = None, *, cpuid: Sequence[CpuidEntry] | None = None,
                 irqchip: bool = False) -> None:
        self._own_kvm = kvm is None
        self.kvm = kvm or open_kvm()
        try:
            self.vm = self.kvm.create_vm(irqchip=irqchip)
        except BaseException:
            self.close_kvm()
            raise
        try:
            self.mem = self.vm.add_memory(0, 0, MEM_SIZE)
            self.vcpu = self.vm.create_vcpu(0)
            self.cpuid = tuple(cpuid) if cpuid is not None else self.kvm.supported_cpuid()
            self.vcpu.set_cpuid2(self.cpuid)
            self._build_tables()
        except BaseException:
            self.close()
            raise
        d1 = find_cpuid(self.cpuid, 0xD, 1)[0]
        self.has_xgetbv1 = bool(d1 & 4)
        self.has_xsaves = bool(d1 & 8)
        self.has_xfd = bool(d1 & 0x10)
        self.offsets = {i: (o, s) for i in range(2, 63)
                        for s, o, _c, _d in [find_cpuid(self.cpuid, 0xD, i)] if s}
        self._cpl0: str | None = ""  # "" = not probed yet (xstate_at_cpl0)
        self._selectors: dict[int, tuple[int, int]] = {}  # cpl -> (CS, DS) (selectors)

    def close(self) -> None:
        self.vm.close()
        self.close_kvm()

    def close_kvm(self) -> None:
        """Close /dev/kvm if this machine opened it."""
        if self._own_kvm:
            self.kvm.close()

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
        self.write(PD, struct.pack("<Q", 0x87))
        self.write(GDT, _gdt_entries())
        self.write(TSS + 4, struct.pack("<Q", KERNEL_STACK))  # RSP0
        for v in range(32):
            handler = STUBS + 0x80 * v
            gate = struct.pack("<HHBBHII", handler & 0xFFFF, KERNEL_CS, 0, 0x8E,
                               (handler >> 16) & 0xFFFF, handler >> 32, 0)
            self.write(IDT + 16 * v, gate)
            self.write(handler, _stub(v))

    def long_mode_sregs(self) -> u.KvmSregs:
        """CR0/CR4/EFER and segments of a 64-bit kernel with CR4.OSXSAVE (SDM Vol. 3A 10.8.5)."""
        s = self.vcpu.get_sregs()
        s.cs = _segment(KERNEL_CS, code=True)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(s, name, _segment(KERNEL_DS, code=False))
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
        """Run CPL 0 ``code`` at SETUP_CODE (it must end by reporting through `EXIT_PORT` or
        HLT) from a fresh long-mode register state with RBX = 0; the status block's fields."""
        self.write(STATUS, bytes(0x1000))
        self.write(SETUP_CODE, code)
        self.vcpu.set_sregs(self.long_mode_sregs())
        self.vcpu.set_regs(u.KvmRegs(rip=SETUP_CODE, rsp=KERNEL_STACK, rflags=2))
        reason = self.vcpu.run()
        if reason == u.KVM_EXIT_IO:
            direction, port, _size, _data = self.vcpu.exit_io()
            if direction != u.KVM_EXIT_IO_OUT or port != EXIT_PORT:
                raise HostError(reason, f"unexpected I/O on port {port:#x}")
        elif reason != u.KVM_EXIT_HLT:
            raise HostError(reason, self.vcpu.exit_detail(reason))
        state, vector, error, step, rip, xinuse, cs, ds = struct.unpack_from(
            "<IIQqQQHH", self.read(STATUS, 44))
        return {"state": state, "vector": vector, "error": error, "step": step, "rip": rip,
                "xinuse": xinuse, "cs": cs, "ds": ds}

    def run_program(self, program: Program, *, xcr0: int, xss: int = 0, xfd: int = 0
                    ) -> Outcome:
        """Run ``program`` in the guest (see the module docstring) and return its Outcome;
        ``xfd`` is the IA32_XFD the guest arms before the program (AMX under XFD)."""
        return self._run(program, xcr0=xcr0, xss=xss, xfd=xfd, xstate=True)

    def run_insns(self, insns: Sequence[Insn], *, xcr0: int, cpl: int = 0,
                  buffers: Sequence[Buffer] = ()) -> Outcome:
        """Run bare instructions: XSETBV(xcr0) at CPL 0, then ``insns`` at ``cpl``, with no
        XRSTOR of a start image and no final XSAVE (the registers are whatever the vCPU holds,
        as KVM_SET_XSAVE or the previous run left them). For the XSETBV and XGETBV questions,
        and for hosts whose KVM cannot run the XSAVE family at guest CPL 0. ``final`` and
        ``xinuse`` of the Outcome are None."""
        program = Program(start=bytes(576), insns=tuple(insns), buffers=tuple(buffers), cpl=cpl)
        return self._run(program, xcr0=xcr0, xss=0, xfd=0, xstate=False)

    def _run(self, program: Program, *, xcr0: int, xss: int, xfd: int, xstate: bool
             ) -> Outcome:
        check_program(program)
        keyed = [n for n, b in enumerate(program.buffers) if b.pkey]
        if keyed:
            raise HostUnavailable(f"buf{keyed[0]} has a protection key: the test guest's "
                                  "page tables give every page key 0 and it leaves CR4.PKE "
                                  "clear")
        if xss and not self.has_xsaves:
            raise HostUnavailable(
                f"IA32_XSS={xss:#x} needs XSAVES, and the guest CPUID lacks it: "
                f"CPUID.(EAX=0DH,ECX=1):EAX[3]=0")
        if xfd and not self.has_xfd:
            raise HostUnavailable(
                f"IA32_XFD={xfd:#x} needs XFD, and the guest CPUID lacks it: "
                f"CPUID.(EAX=0DH,ECX=1):EAX[4]=0")
        ops, pool = _operands(program)
        # 1. setup at CPL 0: XCR0 and IA32_XSS (KVM intercepts both), then IRETQ to program.cpl
        a = Asm(SETUP_CODE)
        _step(a, _STEP_XSETBV)
        a.mov32(Register.ECX, 0)
        a.edx_eax(xcr0)
        a.op(Code.XSETBV)
        if self.has_xsaves:
            _step(a, _STEP_XSS)
            a.mov32(Register.ECX, u.MSR_IA32_XSS)
            a.edx_eax(xss)
            a.op(Code.WRMSR)
        if self.has_xfd:  # every run: IA32_XFD is vCPU state that outlives a run
            _step(a, _STEP_XFD)
            a.mov32(Register.ECX, u.MSR_IA32_XFD)
            a.edx_eax(xfd)
            a.op(Code.WRMSR)
        user = program.cpl == 3
        for value in (USER_DS if user else KERNEL_DS, USER_STACK if user else KERNEL_STACK - 0x1000,
                      0x3002 if user else 0x2, USER_CS if user else KERNEL_CS, PROGRAM_CODE):
            a.emit(Instruction.create_u32(Code.PUSHQ_IMM32, value))  # SS, RSP, RFLAGS, CS, RIP
        a.op(Code.IRETQ)
        b, where = self._program_code(program, ops, xcr0, xstate)
        # memory
        bufs = [buffer_address(i, x.misalign) for i, x in enumerate(program.buffers)]
        for i, x in enumerate(program.buffers):
            self.write(BUFFERS + BUFFER_STRIDE * i, bytes(BUFFER_STRIDE))
            self.write(bufs[i], x.data)
        self.write(START_IMAGE, program.start.ljust(BUFFER_SIZE, b"\0"))
        self.write(FINAL_IMAGE, bytes(BUFFER_SIZE))
        for at, data in pool:
            self.write(at, data)
        self.write(PROGRAM_CODE, bytes(b.code))
        st = self.run_code(bytes(a.code))
        sel = self._selectors[program.cpl] = (st["cs"], st["ds"])
        place = tuple(placed_at(b.code, PROGRAM_CODE, at, data, sel) for at, data in where)
        return replace(self._outcome(program, st, bufs, ops, xcr0, xstate), placement=place)

    def _program_code(self, program: Program, ops: list[Operands], xcr0: int, xstate: bool
                      ) -> tuple[Asm, list[tuple[int, int]]]:
        """Steps 2-4 at ``program.cpl``: the program's CS and DS into the status block (MOV
        r/m16, Sreg), XRSTOR64 of the start image, the program, XGETBV(1) and XSAVE64; with
        the address of each instruction and of its data-pool operand."""
        b = Asm(PROGRAM_CODE)
        for n, sreg in enumerate((Register.CS, Register.DS)):  # as the program reads them
            b.emit(Instruction.create_mem_reg(Code.MOV_RM16_SREG, mem(STATUS + _SELECTORS + 2 * n),
                                              sreg))
        if xstate:
            _step(b, _STEP_XRSTOR)
            b.edx_eax(xcr0)
            b.emit(Instruction.create_mem(Code.XRSTOR64_MEM, mem(START_IMAGE)))
        where = []
        for n, (insn, op) in enumerate(zip(program.insns, ops, strict=True)):
            _step(b, n)
            where.append((emit_insn(b, insn, op), op.data))
        _step(b, len(program.insns))
        if xstate:
            if self.has_xgetbv1:
                b.mov32(Register.ECX, 1)
                b.op(Code.XGETBV)
                b.store32(STATUS + _XINUSE, Register.EAX)
                b.store32(STATUS + _XINUSE + 4, Register.EDX)
            b.edx_eax(xcr0)
            b.emit(Instruction.create_mem(Code.XSAVE64_MEM, mem(FINAL_IMAGE)))
        _report(b, _DONE)
        if len(b.code) > BUFFERS - PROGRAM_CODE:
            raise ProgramError(f"program of {len(program.insns)} instructions is too long")
        return b, where

    def placement(self, program: Program, *, xcr0: int) -> tuple[Placement, ...]:
        """Where `run_program` puts each instruction of ``program`` and the selectors it runs
        with -- the guest's addresses are fixed, and the selectors are those `selectors`
        reads, so this needs no run of the program: the model, told it, knows the x87
        pointers and selectors an x87 instruction leaves (`fpstate.x86.insn.run_program`).
        Guest-linear addresses equal guest-physical ones."""
        check_program(program)
        ops, _pool = _operands(program)
        b, where = self._program_code(program, ops, xcr0, True)
        sel = self.selectors(program.cpl)
        return tuple(placed_at(b.code, PROGRAM_CODE, at, data, sel) for at, data in where)

    def selectors(self, cpl: int) -> tuple[int, int]:
        """(CS, DS) as a program at guest ``cpl`` reads them, the FCS and FDS an x87 instruction
        of it leaves: read by every run (the program code starts with MOV r/m16, Sreg), here
        by a run of no instruction the first time. On VMX and SVM, `architectural_selectors`;
        kvm_pvm runs guest CPL 3 with the host's user CS (BACKEND_DIVERGENCES
        "guest_cs_of_host")."""
        if cpl not in self._selectors:
            self.run_insns([], xcr0=1, cpl=cpl)
        return self._selectors[cpl]

    def _outcome(self, program: Program, st: dict[str, int], bufs: list[int],
                 ops: list[Operands], xcr0: int, xstate: bool) -> Outcome:
        n = len(program.insns)
        buffers = tuple(self.read(at, BUFFER_SIZE) for at in bufs)
        step = st["step"]
        fault = None
        if st["state"] == _FAULTED:
            vector = VECTORS.get(st["vector"], f"vector {st['vector']}")
            why = f"guest vector {st['vector']}, error code {st['error']:#x}, rip {st['rip']:#x}"
            if step < 0:
                raise ProgramError(f"{_SETUP_NAMES[step]} faulted in the guest: {vector} "
                                   f"(xcr0 {xcr0:#x}); {why}")
            if step >= n:
                raise HostError(u.KVM_EXIT_IO, f"final XGETBV/XSAVE64 faulted: {vector}; {why}")
            fault = Fault(vector, why)
        elif st["state"] != _DONE:
            raise HostError(u.KVM_EXIT_HLT, f"guest stopped at step {step} without a report")
        ran = program.insns if fault is None else program.insns[:step]
        values = tuple(struct.unpack_from("<Q", self.mem, op.value)[0]
                       for insn, op in zip(ran, ops, strict=False)
                       if insn.mnemonic in VALUE_MNEMONICS)
        if fault is not None:
            return Outcome(buffers, values, fault, step)
        if not xstate:
            return Outcome(buffers, values)
        image = self.read(FINAL_IMAGE, self.standard_size(xcr0))
        final = normalise_image(image, xcr0, self.offsets)
        xinuse = st["xinuse"] & xcr0 if self.has_xgetbv1 else None
        return Outcome(buffers, values, None, None, xinuse, final)

    def standard_size(self, xcr0: int) -> int:
        """The standard-format size for ``xcr0`` from the guest CPUID (xstate_required_size(
        xcr0, false) in arch/x86/kvm/cpuid.c): max(576, offset + size over its components)."""
        ends = [o + s for i, (o, s) in self.offsets.items() if xcr0 >> i & 1]
        return max([576, *ends])

    def xstate_at_cpl0(self) -> str | None:
        """None if this KVM runs XGETBV at guest CPL 0, else why not (the HostError text)."""
        if self._cpl0 == "":
            try:
                self.run_insns([Insn("XGETBV", reg=0)], xcr0=1, cpl=0)
                self._cpl0 = None
            except HostError as e:
                self._cpl0 = f"guest CPL 0 cannot run XSAVE-family instructions here: {e}"
        return self._cpl0


_machines: dict[tuple, GuestMachine] = {}


def machine_for(cpuid: Sequence[CpuidEntry] | None = None) -> GuestMachine:
    """A cached GuestMachine per guest CPUID (KVM allows KVM_SET_CPUID2 to change only before
    the first KVM_RUN, so each CPUID gets its own VM)."""
    key = tuple(cpuid) if cpuid is not None else ()
    if key not in _machines:
        _machines[key] = GuestMachine(cpuid=cpuid)
    return _machines[key]


def run_guest_program(program: Program, *, xcr0: int, xss: int = 0, xfd: int = 0,
                      cpuid: Sequence[CpuidEntry] | None = None) -> Outcome:
    """Run ``program`` at ``program.cpl`` in a KVM guest whose own XSETBV sets XCR0 = ``xcr0``
    (and WRMSR sets IA32_XSS = ``xss`` when the guest CPUID has XSAVES, IA32_XFD = ``xfd``
    when asked for); see the module docstring. ProgramError for a malformed program or a
    setup that faults (an XCR0 KVM rejects, a start image XRSTOR rejects); HostError for an
    unexpected KVM exit (on a host whose KVM cannot run the XSAVE family at guest CPL 0, a
    CPL 0 program ends in one)."""
    return machine_for(cpuid).run_program(program, xcr0=xcr0, xss=xss, xfd=xfd)
