"""arm64 thread state records, their translation to another CPU's vector lengths, and the
order a restorer writes them back in.

A checkpoint of an arm64 thread (CRIU), a debugger's saved state (gdb, lldb) or a VMM's
snapshot of a task reads the thread's FP regsets, whose layout is the vector length of the
saving thread: Z0-Z31, P0-P15 and FFR at the SVE VL (at the SME VL in streaming mode), ZA as
SVL x SVL bytes. Moving such a state to a CPU with other vector lengths, or without SVE, SME,
SME2 or FPMR, and writing it back with PTRACE_SETREGSET are the three questions of this file
(peers.md request #10: lldb's SME-only systems, ZT0, FPMR and "VL ordering on restore").

- **Records** (`Arm64Record`, JSON ``fpstate-arm64-state-record/1``): one thread's FP state
  with its vector lengths and modes, registers by name, read from the FP notes of one thread of
  an arm64 core (`record_from_core`). The notes are read as the kernel wrote them
  (fpstate.kernel.arm64.ptrace: GETREGSET), and the state read is checked by writing the notes
  again with the model's GETREGSET: a note that differs is reported.
- **Translation** (`translate`) re-lays the state at the target's vector lengths: by default
  the VL the target's kernel gives a header of the record's VL (vec_set_vector_length()
  rounds down to an implemented one), else the VL asked for. Every register keeps its value
  when the target's registers can hold it: widening zero-extends (the bits a longer vector
  adds), narrowing is refused for a register whose bits beyond the new length are not zero,
  naming it; so is each piece of state the target has no place for -- streaming mode or ZA
  without SME, a non-zero ZT0 without SME2, a non-zero FPMR without FPMR, SVE-format state
  whose Z bits above 128, P or FFR are not zero on a CPU without SVE (with zeros there it is
  held in FPSIMD format, the V registers being the low 128 bits of Z). Nothing is dropped
  silently: a refusal names every register, a note says what changed representation.
- **Restore order** (`restore_writes`): the PTRACE_SETREGSET writes that put the state on a
  stopped thread of the target, in the order the kernel's rules need (ptrace.c, v6.17):
  1. NT_ARM_ZA, header only, at the SME VL: sets the SME VL first, with PSTATE.ZA off --
     a later change of the SME VL would turn ZA off again and zero Z's upper bits, P and
     FFR (change_live_vector_length());
  2. NT_ARM_SVE: the state in SVE or FPSIMD format (NT_PRFPREG on a CPU without SVE), or
     in streaming mode its inactive-mode note (size 8, FPSIMD format, the V registers),
     which sets the SVE VL and leaves streaming mode;
  3. NT_ARM_SSVE with the streaming state, in streaming mode only: a non-streaming thread's
     NT_ARM_SSVE is an FPSIMD-format note that SETREGSET refuses (-EINVAL);
  4. NT_ARM_ZA with ZA, when PSTATE.ZA is on (at the same SME VL: streaming mode stays);
  5. NT_ARM_ZT, when PSTATE.ZA is on (zt_set() turns ZA on, zeroing it, if it was off);
  6. NT_ARM_FPMR;
  7. NT_ARM_TLS, TPIDR_EL0 and TPIDR2_EL0 (tls_set() touches nothing else: any place would
     do), when the record holds TPIDR_EL0 -- 8 bytes only when it does not hold TPIDR2_EL0,
     so that the thread's own is kept. A signal frame holds TPIDR2_EL0 and not TPIDR_EL0:
     its TPIDR2_EL0 is restored by the frame (`sigframe`), not by a regset.
  Each write is the model's GETREGSET of the translated state; `translate` replays them on a
  fresh thread of the target with the model's SETREGSET and checks that every regset then
  reads back as the translated state's.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fpstate.arm64.regs import (
    SVE_PT_REGS_SVE,
    SVE_PT_VL_INHERIT,
    USER_FPSIMD_STATE_SIZE,
    USER_SVE_HEADER_SIZE,
    ZT_SIG_REG_BYTES,
    sve_pt_fpsr_offset,
    sve_regs_size,
    sve_vl_valid,
    sve_vq_from_vl,
    za_regs_size,
)
from fpstate.errors import BlobError
from fpstate.kernel.arm64 import ptrace as pt
from fpstate.kernel.arm64 import signal as sig
from fpstate.kernel.arm64.state import (
    ARM64_VEC_SME,
    ARM64_VEC_SVE,
    FP_STATE_FPSIMD,
    FP_STATE_SVE,
    HostCaps,
)
from fpstate.tools import blob_arm64 as ba
from fpstate.tools.corefile import thread_notes

RECORD_FORMAT_ARM64 = "fpstate-arm64-state-record/1"
_FP_NOTES = frozenset(pt.NOTE_NAMES)


# --- the state as registers by name --------------------------------------------------------------
def _split(data: bytes, size: int, count: int, at: int = 0) -> list[bytes]:
    return [data[at + n * size:at + (n + 1) * size] for n in range(count)]


def _sve_regs(block: bytes, vl: int) -> dict[str, list[bytes]]:
    """Z0-31, P0-15 and FFR of an sve_state block at ``vl`` (the __SVE_* layout)."""
    p = vl // 8
    return {"Z": _split(block, vl, 32), "P": _split(block, p, 16, 32 * vl),
            "FFR": [block[32 * vl + 16 * p:32 * vl + 17 * p]]}


def _sve_block(regs: Mapping[str, list[bytes]]) -> bytes:
    return b"".join(regs["Z"]) + b"".join(regs["P"]) + regs["FFR"][0]


@dataclass(frozen=True, slots=True)
class Arm64Record:
    """One arm64 thread's FP state: ``state`` is the stopped thread as the ptrace model sees
    it (fpstate.kernel.arm64.ptrace.RegsetTarget); ``cpu`` names the CPU it was saved on and
    ``max_vls`` the (SVE, SME) maximum vector lengths its regset headers gave (0: none)."""

    cpu: str
    state: pt.RegsetTarget
    max_vls: tuple[int, int] = (0, 0)
    #: Whether TPIDR_EL0 and TPIDR2_EL0 were recorded (a core's NT_ARM_TLS holds both, or
    #: TPIDR_EL0 only from an older kernel; a signal frame's tpidr2_context TPIDR2_EL0 only);
    #: ``state`` holds 0 for one that was not.
    tls: tuple[bool, bool] = (False, False)

    def registers(self) -> dict[str, Any]:
        """The registers by name: V0-V31 (FPSIMD format) or Z0-Z31, P0-P15 and FFR (SVE
        format, at the live VL), ZA rows when PSTATE.ZA is on, ZT0 then."""
        t = self.state
        out: dict[str, Any] = {}
        if t.fp_type == FP_STATE_SVE:
            out.update(_sve_regs(t.sve, t.live_vl))
        else:
            out["V"] = _split(t.vregs, 16, 32)
        if t.za_on:
            out["ZA"] = _split(t.za, t.sme_vl, t.sme_vl)
            out["ZT0"] = [t.zt0]
        return out

    def to_dict(self) -> dict[str, Any]:
        t = self.state
        regs = {k: [v.hex() for v in vs] for k, vs in self.registers().items()}
        return {"format": RECORD_FORMAT_ARM64, "arch": "arm64", "cpu": self.cpu,
                "sve_vl": t.sve_vl, "sme_vl": t.sme_vl,
                "sve_max_vl": self.max_vls[0], "sme_max_vl": self.max_vls[1],
                "sve_vl_inherit": t.sve_inherit, "sme_vl_inherit": t.sme_inherit,
                "streaming": t.sm, "za": t.za_on, "sve_format": t.fp_type == FP_STATE_SVE,
                "fpsr": t.fpsr, "fpcr": t.fpcr, "fpmr": t.fpmr,
                "tpidr": t.tpidr if self.tls[0] else None,
                "tpidr2": t.tpidr2 if self.tls[1] else None, "registers": regs}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any]) -> Arm64Record:
        """A record from `to_json`'s text; BlobError naming the first field that is wrong."""
        try:
            obj = json.loads(data) if isinstance(data, (str, bytes)) else data
        except (ValueError, UnicodeDecodeError) as e:
            raise BlobError(f"not a state record: {e}") from None
        if not isinstance(obj, Mapping) or obj.get("format") != RECORD_FORMAT_ARM64:
            raise BlobError(f"not an arm64 state record (format {RECORD_FORMAT_ARM64!r})")
        return _record_from_obj(obj)


def _field(obj: Mapping[str, Any], key: str, kind: type, lo: int = 0,
           hi: int = (1 << 64) - 1) -> Any:
    v = obj.get(key)
    if kind is bool:
        if not isinstance(v, bool):
            raise BlobError(f"record field {key!r} must be true or false, not {v!r}")
        return v
    if kind is str:
        if not isinstance(v, str):
            raise BlobError(f"record field {key!r} must be a string, not {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BlobError(f"record field {key!r} must be an integer from {lo} to {hi}, not {v!r}")
    return v


def _vl_field(obj: Mapping[str, Any], key: str) -> int:
    vl = _field(obj, key, int, 0, 0xFFFF)
    if vl and not sve_vl_valid(vl):
        raise BlobError(f"record field {key!r}: {vl} is not a vector length (a multiple of 16 "
                        "from 16 to 8192, or 0)")
    return vl


def _hex_regs(regs: Mapping[str, Any], name: str, count: int, size: int) -> list[bytes]:
    vals = regs.get(name)
    if not isinstance(vals, list) or len(vals) != count:
        raise BlobError(f"record registers {name!r}: {count} values expected")
    out = []
    for n, v in enumerate(vals):
        try:
            b = bytes.fromhex(v) if isinstance(v, str) else None
        except ValueError:
            b = None
        if b is None or len(b) != size:
            raise BlobError(f"record register {name}{n}: {size} bytes in hex expected")
        out.append(b)
    return out


def _record_from_obj(obj: Mapping[str, Any]) -> Arm64Record:
    sve_vl, sme_vl = _vl_field(obj, "sve_vl"), _vl_field(obj, "sme_vl")
    sm, za_on, sve_format = (_field(obj, k, bool) for k in ("streaming", "za", "sve_format"))
    if sm and not sve_format:
        raise BlobError("record: streaming mode state is in SVE format (sve_format true)")
    live = sme_vl if sm else sve_vl
    if sve_format and not live:
        raise BlobError(f"record: SVE-format state needs {'sme_vl' if sm else 'sve_vl'}")
    if za_on and not sme_vl:
        raise BlobError("record: ZA on needs sme_vl")
    regs = obj.get("registers")
    if not isinstance(regs, Mapping):
        raise BlobError("record field 'registers' must be a mapping of register names")
    want = ({"Z", "P", "FFR"} if sve_format else {"V"}) | ({"ZA", "ZT0"} if za_on else set())
    extra = sorted(set(regs) - want)
    if extra:
        raise BlobError(f"record registers: {extra[0]!r} is not part of this state (expected "
                        f"{', '.join(sorted(want))})")
    t = pt.RegsetTarget(
        sve_vl=sve_vl, sme_vl=sme_vl, sm=sm, za_on=za_on,
        fp_type=FP_STATE_SVE if sve_format else FP_STATE_FPSIMD,
        sve_inherit=_field(obj, "sve_vl_inherit", bool),
        sme_inherit=_field(obj, "sme_vl_inherit", bool),
        fpsr=_field(obj, "fpsr", int, 0, 0xFFFFFFFF), fpcr=_field(obj, "fpcr", int, 0, 0xFFFFFFFF),
        fpmr=_field(obj, "fpmr", int))
    if sve_format:
        block = _sve_block({"Z": _hex_regs(regs, "Z", 32, live),
                            "P": _hex_regs(regs, "P", 16, live // 8),
                            "FFR": _hex_regs(regs, "FFR", 1, live // 8)})
        t = replace(t, sve=block)
        t = replace(t, vregs=pt.effective_vregs(t))
    else:
        t = replace(t, vregs=b"".join(_hex_regs(regs, "V", 32, 16)))
    if za_on:
        t = replace(t, za=b"".join(_hex_regs(regs, "ZA", sme_vl, sme_vl)),
                    zt0=_hex_regs(regs, "ZT0", 1, ZT_SIG_REG_BYTES)[0])
    # TPIDR_EL0 and TPIDR2_EL0: null or absent when not recorded (records made before them).
    tls = tuple(obj.get(k) is not None for k in ("tpidr", "tpidr2"))
    t = replace(t, **{k: _field(obj, k, int) for k, known in zip(("tpidr", "tpidr2"), tls,
                                                                 strict=True) if known})
    maxes = (_vl_field(obj, "sve_max_vl"), _vl_field(obj, "sme_max_vl"))
    return Arm64Record(_field(obj, "cpu", str), t, maxes, (tls[0], tls[1]))


# --- reading a core ---------------------------------------------------------------------------
def _header(data: bytes, name: str) -> tuple[int, int, int, int]:
    """(size, vl, max_vl, flags) of a user_sve_header / user_za_header."""
    if len(data) < USER_SVE_HEADER_SIZE:
        raise BlobError(f"{name}: {len(data)} bytes, shorter than its 16-byte header")
    size, _max_size, vl, max_vl, flags, _ = struct.unpack_from("<IIHHHH", data)
    if not sve_vl_valid(vl):
        raise BlobError(f"{name}: header vl {vl} is not a vector length")
    return size, vl, max_vl, flags


def _need(data: bytes, size: int, name: str) -> None:
    if len(data) < size:
        raise BlobError(f"{name}: {len(data)} bytes, {size} needed for its header's payload")


def notes_active(notes: Mapping[int, bytes], note: int) -> bool:
    """Whether ``note`` is present with more than its header (the thread's current mode)."""
    data = notes.get(note)
    return data is not None and len(data) >= 4 and \
        struct.unpack_from("<I", data)[0] > USER_SVE_HEADER_SIZE


def state_from_notes(notes: Mapping[int, bytes]) -> tuple[pt.RegsetTarget, tuple[int, int]]:
    """The thread state the FP notes of one thread (note type -> bytes, as GETREGSET wrote
    them) describe, and the (SVE, SME) max VLs of their headers; BlobError for a note that
    cannot be read."""
    t = pt.RegsetTarget()
    sve_max = sme_max = 0
    fpr = notes.get(pt.NT_PRFPREG)
    if fpr is not None:
        _need(fpr, USER_FPSIMD_STATE_SIZE, "NT_PRFPREG")
        fpsr, fpcr = struct.unpack_from("<II", fpr, 512)
        t = replace(t, vregs=fpr[:512], fpsr=fpsr, fpcr=fpcr)
    for note, kind in ((pt.NT_ARM_SVE, ARM64_VEC_SVE), (pt.NT_ARM_SSVE, ARM64_VEC_SME)):
        data = notes.get(note)
        if data is None:
            continue
        name = pt.NOTE_NAMES[note]
        size, vl, max_vl, flags = _header(data, name)
        inherit = bool(flags & SVE_PT_VL_INHERIT)
        if kind == ARM64_VEC_SVE:
            t, sve_max = replace(t, sve_vl=vl, sve_inherit=inherit), max_vl
        else:
            t, sme_max = replace(t, sme_vl=vl, sme_inherit=inherit), max_vl
        if size <= USER_SVE_HEADER_SIZE:
            continue  # the mode the thread is not in (v6.16+: size 8, FPSIMD payload after)
        sm = kind == ARM64_VEC_SME
        if sm and notes_active(notes, pt.NT_ARM_SVE):
            raise BlobError("both NT_ARM_SVE and NT_ARM_SSVE hold register data: a thread is "
                            "in one mode, and the kernel marks the other's note with size 8")
        if not flags & SVE_PT_REGS_SVE:
            if sm:
                raise BlobError("NT_ARM_SSVE holds FPSIMD-format data: the kernel writes "
                                "streaming mode state in SVE format")
            _need(data, USER_SVE_HEADER_SIZE + USER_FPSIMD_STATE_SIZE, name)
            body = data[USER_SVE_HEADER_SIZE:]
            fpsr, fpcr = struct.unpack_from("<II", body, 512)
            t = replace(t, sm=sm, fp_type=FP_STATE_FPSIMD, sve=b"", vregs=body[:512],
                        fpsr=fpsr, fpcr=fpcr)
            continue
        vq = sve_vq_from_vl(vl)
        at = sve_pt_fpsr_offset(vq)
        _need(data, at + 8, name)
        fpsr, fpcr = struct.unpack_from("<II", data, at)
        block = data[USER_SVE_HEADER_SIZE:USER_SVE_HEADER_SIZE + sve_regs_size(vq)]
        t = replace(t, sm=sm, fp_type=FP_STATE_SVE, sve=block, fpsr=fpsr, fpcr=fpcr)
        t = replace(t, vregs=pt.effective_vregs(t))
    za = notes.get(pt.NT_ARM_ZA)
    if za is not None:
        size, vl, max_vl, flags = _header(za, "NT_ARM_ZA")
        t, sme_max = replace(t, sme_vl=vl, sme_inherit=bool(flags & SVE_PT_VL_INHERIT)), max_vl
        if size > USER_SVE_HEADER_SIZE:
            n = za_regs_size(sve_vq_from_vl(vl))
            _need(za, USER_SVE_HEADER_SIZE + n, "NT_ARM_ZA")
            t = replace(t, za_on=True, za=za[USER_SVE_HEADER_SIZE:USER_SVE_HEADER_SIZE + n])
    zt = notes.get(pt.NT_ARM_ZT)
    if zt is not None:
        _need(zt, ZT_SIG_REG_BYTES, "NT_ARM_ZT")
        t = replace(t, zt0=zt[:ZT_SIG_REG_BYTES] if t.za_on else bytes(ZT_SIG_REG_BYTES))
    fpmr = notes.get(pt.NT_ARM_FPMR)
    if fpmr is not None:
        _need(fpmr, 8, "NT_ARM_FPMR")
        t = replace(t, fpmr=struct.unpack_from("<Q", fpmr)[0])
    tls = notes.get(pt.NT_ARM_TLS)
    if tls is not None:
        _need(tls, 8, "NT_ARM_TLS")
        t = replace(t, tpidr=struct.unpack_from("<Q", tls)[0],
                    tpidr2=struct.unpack_from("<Q", tls, 8)[0] if len(tls) >= 16 else 0)
    if t.sm and t.sve_vl == 0 and t.sme_vl == 0:
        raise BlobError("NT_ARM_SSVE holds streaming state but no vector length")
    return t, (sve_max, sme_max)


def tls_recorded(notes: Mapping[int, bytes]) -> tuple[bool, bool]:
    """Whether the notes hold TPIDR_EL0 and TPIDR2_EL0 (NT_ARM_TLS: 8 bytes from a kernel
    before TPIDR2, 16 since)."""
    n = len(notes.get(pt.NT_ARM_TLS, b""))
    return n >= 8, n >= 16


def core_threads(data: bytes) -> dict[int, dict[int, bytes]]:
    """The FP notes of each thread of an arm64 core: tid -> note type -> bytes."""
    out: dict[int, dict[int, bytes]] = {}
    for n in thread_notes(data, _FP_NOTES, machine="EM_AARCH64"):
        out.setdefault(n.tid if n.tid is not None else 0, {})[n.kind] = n.data
    if not out:
        raise BlobError("the core file has no arm64 FP note (NT_PRFPREG, NT_ARM_TLS, "
                        "NT_ARM_SVE, NT_ARM_SSVE, NT_ARM_ZA, NT_ARM_ZT, NT_ARM_FPMR)")
    return out


def mismatches(caps: HostCaps, state: pt.RegsetTarget, notes: Mapping[int, bytes]) -> list[str]:
    """Each note that GETREGSET of ``state`` on ``caps`` would not write byte for byte as it
    is in ``notes`` (the first differing offset named), and each FP regset ``caps`` has that
    ``notes`` lacks (fill_thread_core_info() dumps every regset whose get succeeds)."""
    out = [f"{pt.NOTE_NAMES[n]}: the CPU has it and the core does not"
           for n in pt.REGSETS if n not in notes and pt.regset_supported(caps, n)]
    for note, data in notes.items():
        try:
            want = pt.regset_get(caps, state, note)
        except ValueError as e:
            out.append(str(e))
            continue
        if want != data:
            at = next((i for i, (a, b) in enumerate(zip(want, data, strict=False)) if a != b),
                      min(len(want), len(data)))
            out.append(f"{pt.NOTE_NAMES[note]}: the kernel would write {len(want)} bytes for "
                       f"this state, the core has {len(data)}, first difference at byte {at}")
    return out


def core_thread(data: bytes, tid: int | None = None) -> dict[int, bytes]:
    """The FP notes of one thread of an arm64 core (``tid``; None: the core's only thread)."""
    threads = core_threads(data)
    if tid is None:
        if len(threads) != 1:
            tids = ", ".join(map(str, threads))
            raise BlobError(f"the core holds {len(threads)} threads ({tids}): choose one with "
                            "--thread")
        tid = next(iter(threads))
    if tid not in threads:
        raise BlobError(f"the core has no thread {tid} (threads: "
                        f"{', '.join(map(str, threads))})")
    return threads[tid]


def record_from_notes(notes: Mapping[int, bytes], caps: HostCaps
                      ) -> tuple[Arm64Record, list[str]]:
    """The record of the thread whose FP notes these are, and notes on what the model's
    GETREGSET of that state on ``caps`` would write otherwise."""
    state, maxes = state_from_notes(notes)
    return (Arm64Record(caps.profile.name, state, maxes, tls_recorded(notes)),
            mismatches(caps, state, notes))


def record_from_core(data: bytes, caps: HostCaps, tid: int | None = None
                     ) -> tuple[Arm64Record, list[str]]:
    """`record_from_notes` of one thread of an arm64 core (`core_thread`)."""
    return record_from_notes(core_thread(data, tid), caps)


# --- reading a signal frame ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FrameRead:
    """What an rt_sigframe holds: the thread state of its FP records, the frame's address
    (from an extra_context's datap; 0 without one), the decoder's warnings, and its records
    (name, offset, size) in order, extra_context left out."""

    state: pt.RegsetTarget
    base: int
    warnings: tuple[str, ...]
    records: tuple[tuple[str, int, int], ...]


def state_from_sigframe(frame: bytes) -> FrameRead:
    """The thread an rt_sigframe was written for (setup_sigframe()'s records), read once;
    BlobError for a frame that cannot be read. The frame does not say the SVE VL of a
    streaming thread (its sve_context holds the SME VL): it is 0 then."""
    [blob] = ba.decode(frame, "sigframe")
    warnings = list(blob.warnings)
    secs = {sec.name: sec for sec in blob.sections}
    fp = secs.get("fpsimd_context")
    if fp is None:
        raise BlobError("the frame has no fpsimd_context: no FP state to record")
    fpsr, fpcr = struct.unpack_from("<II", frame, fp.offset + 8)
    t = pt.RegsetTarget(vregs=frame[fp.offset + 16:fp.offset + 16 + 512], fpsr=fpsr, fpcr=fpcr)
    base = dict(secs["extra_context"].fields)["frame_address"] if "extra_context" in secs else 0
    sve = secs.get("sve_context")
    if sve is not None:
        f = dict(sve.fields)
        sm = bool(f.get("streaming"))
        t = replace(t, **({"sme_vl": f["vl"]} if sm else {"sve_vl": f["vl"]}))
        regs = secs.get("SVE registers")
        if regs is not None:
            t = replace(t, sm=sm, fp_type=FP_STATE_SVE,
                        sve=frame[regs.offset:regs.offset + regs.size])
            v = pt.effective_vregs(t)
            if v != t.vregs:
                n = next(i for i in range(32)
                         if v[16 * i:16 * (i + 1)] != t.vregs[16 * i:16 * (i + 1)])
                warnings.append(f"fpsimd_context V{n} is not the low 128 bits of Z{n} (the "
                                "kernel writes them equal; rt_sigreturn restores Z)")
            t = replace(t, vregs=v)
        elif sm:
            raise BlobError("the sve_context says streaming mode but holds no registers")
    za = secs.get("za_context")
    if za is not None:
        vl = dict(za.fields)["vl"]
        if t.sm and vl != t.sme_vl:
            raise BlobError(f"za_context vl {vl} is not the streaming VL {t.sme_vl}")
        t = replace(t, sme_vl=vl)
        rows = secs.get("ZA")
        if rows is not None:
            t = replace(t, za_on=True, za=frame[rows.offset:rows.offset + rows.size])
    zt = secs.get("ZT0")
    if zt is not None and t.za_on:
        t = replace(t, zt0=frame[zt.offset:zt.offset + zt.size])
    fpmr = secs.get("fpmr_context")
    if fpmr is not None:
        t = replace(t, fpmr=struct.unpack_from("<Q", frame, fpmr.offset + 8)[0])
    tpidr2 = secs.get("tpidr2_context")
    if tpidr2 is not None:
        t = replace(t, tpidr2=struct.unpack_from("<Q", frame, tpidr2.offset + 8)[0])
    records = tuple((sec.name.removesuffix("_context"), sec.offset, sec.size)
                    for sec in blob.sections
                    if sec.name.endswith("_context") and sec.name != "extra_context")
    return FrameRead(t, base, tuple(warnings), records)


def frame_mismatches(caps: HostCaps, read: FrameRead, frame: bytes) -> list[str]:
    """Why ``frame`` (read as ``read``) is not what setup_sigframe() of a thread of ``caps``
    in its state writes: its VLs, its FP records' places (their set and offsets follow the
    CPU's features and the VLs), and the model's rt_sigreturn of it refusing."""
    t, records = read.state, list(read.records)
    task = replace(sig_task(t), fault_code=1 if any(r[0] == "esr" for r in records) else 0)
    layout = sig.setup_sigframe_layout(caps, task)
    want = [(r.name, r.offset, r.size) for r in layout.records if r.name != "extra"]
    out = [f"{kind} VL {vl} is not one the CPU implements"
           for kind, vl, info in (("SVE", t.sve_vl, caps.sve_vl), ("SME", t.sme_vl, caps.sme_vl))
           if vl and info is not None and info.find_supported_vector_length(vl) != vl]
    if [r[0] for r in records] != [r[0] for r in want]:
        out.append(f"the frame's records ({', '.join(r[0] for r in records)}) are not those "
                   f"the CPU's kernel writes ({', '.join(r[0] for r in want)})")
    elif records != want:
        bad = next(r for r, w in zip(records, want, strict=True) if r != w)
        out.append(f"{bad[0]}_context at {bad[1]:#x}, {bad[2]} bytes, is not where or as large "
                   "as the CPU's kernel writes it")
    back = sig.restore_sigframe_fp(frame, caps, task, read.base)
    if back.ret:
        out.append(f"the CPU's rt_sigreturn refuses it: {back.reason}")
    return out


def record_from_frame_read(read: FrameRead, frame: bytes, caps: HostCaps
                           ) -> tuple[Arm64Record, list[str]]:
    """The record of a frame already read, with notes: the decoder's warnings and why
    ``caps``'s kernel would not have written or would not take it."""
    maxes = (caps.sve_vl.max_vl if caps.sve_vl else 0, caps.sme_vl.max_vl if caps.sme_vl else 0)
    tls = (False, any(r[0] == "tpidr2" for r in read.records))
    return (Arm64Record(caps.profile.name, read.state, maxes, tls),
            [*read.warnings, *frame_mismatches(caps, read, frame)])


def record_from_sigframe(frame: bytes, caps: HostCaps) -> tuple[Arm64Record, list[str]]:
    """`record_from_frame_read` of a frame read now."""
    return record_from_frame_read(state_from_sigframe(frame), frame, caps)


# --- translation ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Arm64Translation:
    """`translate`'s answer: the record on the target (None when refused), each refusal
    naming what the target cannot hold, notes on what changed representation, and the
    PTRACE_SETREGSET writes that restore it, in order."""

    record: Arm64Record | None
    refusals: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    writes: tuple[tuple[int, bytes], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.record is not None


def _target_vl(caps: HostCaps, kind: str, have: int, want: int | None) -> int:
    """The VL the target gives the record's (``have``) or the one asked for (``want``)."""
    info = caps.vl_info(kind)
    name = "SVE" if kind == ARM64_VEC_SVE else "SME"
    if want is not None:
        if info is None:
            raise BlobError(f"the target has no {name}: no {name} vector length to set")
        if not sve_vl_valid(want) or info.find_supported_vector_length(want) != want:
            raise BlobError(f"{name} vl {want} is not one the target implements (VLs "
                            f"{', '.join(str(q * 16) for q in sorted(info.vqs))})")
        return want
    if info is None:
        return 0
    return info.find_supported_vector_length(have) if have else info.default_vl


def _ranges(name: str, numbers: list[int]) -> str:
    """``Z0-Z3, Z7``: register numbers as runs."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{name}{a}" if a == b else f"{name}{a}-{name}{b}" for a, b in runs)


def _resize(name: str, vals: list[bytes], size: int, refusals: list[str]) -> list[bytes]:
    """Each value cut or zero-extended to ``size`` bytes; the registers a cut would lose a
    non-zero byte of are refused, named in one refusal."""
    lost = [n for n, v in enumerate(vals) if len(v) > size and any(v[size:])]
    if lost:
        label = _ranges(name, lost) if len(vals) > 1 else name
        refusals.append(f"{label} {'has' if len(lost) == 1 else 'have'} non-zero bits above "
                        f"bit {size * 8 - 1} (the target's registers hold {size * 8} bits)")
    return [v[:size] + bytes(max(0, size - len(v))) for v in vals]


def _za_resize(za: bytes, old: int, new: int, refusals: list[str]) -> bytes:
    """ZA (``old`` rows of ``old`` bytes) as ``new`` rows of ``new`` bytes, each byte at its
    (row, column)."""
    rows = _split(za, old, old)
    lost = [r for r, row in enumerate(rows) if (r >= new and any(row)) or any(row[new:])]
    if lost:
        rows_ = ", ".join(map(str, lost[:8])) + (" ..." if len(lost) > 8 else "")
        refusals.append(f"ZA row{'s' if len(lost) > 1 else ''} {rows_} "
                        f"hold{'' if len(lost) > 1 else 's'} non-zero bytes beyond the "
                        f"target's {new}-byte SVL")
    out = bytearray(new * new)
    for r in range(min(old, new)):
        out[r * new:r * new + min(old, new)] = rows[r][:new]
    return bytes(out)


def translate(rec: Arm64Record, caps: HostCaps, sve_vl: int | None = None,
              sme_vl: int | None = None) -> Arm64Translation:
    """``rec`` on a thread of ``caps`` (the module docstring's rules); BlobError for a VL the
    target does not implement."""
    s = rec.state
    refusals: list[str] = []
    notes: list[str] = []
    new_sve = _target_vl(caps, ARM64_VEC_SVE, s.sve_vl, sve_vl)
    new_sme = _target_vl(caps, ARM64_VEC_SME, s.sme_vl, sme_vl)
    if s.sm and not caps.sme:
        refusals.append("streaming mode (SVCR.SM) needs SME")
    if s.za_on and not caps.sme:
        refusals.append("PSTATE.ZA on needs SME")
    if s.za_on and any(s.zt0) and not caps.sme2:
        refusals.append("ZT0 is not zero and the target has no SME2")
    if s.fpmr and not caps.fpmr:
        refusals.append(f"FPMR {s.fpmr:#x} is not zero and the target has no FPMR")
    if s.tpidr2 and not caps.sme:
        refusals.append(f"TPIDR2_EL0 {s.tpidr2:#x} is not zero and the target has no SME (its "
                        "NT_ARM_TLS ignores TPIDR2_EL0: the thread's TPIDR2 block, the ZA "
                        "lazy-saving scheme's, would be forgotten)")
    t = pt.RegsetTarget(sve_vl=new_sve, sme_vl=new_sme, sm=s.sm and caps.sme,
                        za_on=s.za_on and caps.sme,
                        sve_inherit=s.sve_inherit and new_sve > 0,
                        sme_inherit=s.sme_inherit and new_sme > 0,
                        fpsr=s.fpsr, fpcr=s.fpcr, fpmr=s.fpmr if caps.fpmr else 0,
                        tpidr=s.tpidr, tpidr2=s.tpidr2 if caps.sme else 0)
    if s.sm and not caps.sme:
        pass  # refused above: streaming state has no place to go
    elif s.fp_type == FP_STATE_SVE:
        regs = _sve_regs(s.sve, s.live_vl)
        live = new_sme if s.sm else new_sve
        if s.sm or caps.sve:
            if live != s.live_vl and live:
                notes.append(f"{'streaming ' if s.sm else ''}SVE registers re-laid from vl "
                             f"{s.live_vl} to {live}")
            regs = {"Z": _resize("Z", regs["Z"], live, refusals),
                    "P": _resize("P", regs["P"], live // 8, refusals),
                    "FFR": _resize("FFR", regs["FFR"], live // 8, refusals)}
            t = replace(t, fp_type=FP_STATE_SVE, sve=_sve_block(regs))
            t = replace(t, vregs=pt.effective_vregs(t))
        else:  # no SVE on the target: FPSIMD format when nothing beyond V is lost
            _resize("Z", regs["Z"], 16, refusals)
            for name in ("P", "FFR"):
                nonzero = [n for n, v in enumerate(regs[name]) if any(v)]
                if nonzero:
                    label = _ranges(name, nonzero) if name == "P" else name
                    refusals.append(f"{label} not zero and the target has no SVE")
            t = replace(t, vregs=pt.effective_vregs(s))
            notes.append("SVE-format state held in FPSIMD format (the target has no SVE; "
                         "V0-V31 are the low 128 bits of Z0-Z31)")
    else:
        t = replace(t, vregs=s.vregs)
    if t.za_on:
        za = s.za
        if new_sme != s.sme_vl:
            notes.append(f"ZA re-laid from SVL {s.sme_vl} to {new_sme} bytes")
            za = _za_resize(za, s.sme_vl, new_sme, refusals)
        t = replace(t, za=za, zt0=s.zt0 if caps.sme2 else bytes(ZT_SIG_REG_BYTES))
    if refusals:
        return Arm64Translation(None, tuple(refusals), tuple(notes))
    out = Arm64Record(caps.profile.name, t,
                      (caps.sve_vl.max_vl if caps.sve_vl else 0,
                       caps.sme_vl.max_vl if caps.sme_vl else 0), rec.tls)
    writes = restore_writes(caps, t, rec.tls)
    unwritten = rec.tls == (False, True) and t.tpidr2 != 0
    if unwritten:
        notes.append(f"TPIDR2_EL0 {t.tpidr2:#x} is not among the regset writes: NT_ARM_TLS "
                     "begins with TPIDR_EL0, which the record does not hold (write the "
                     "thread's TPIDR_EL0 and this, 16 bytes, or restore with the sigframe)")
    check_restore(caps, t, writes, ignore=(pt.NT_ARM_TLS,) if unwritten else ())
    return Arm64Translation(out, (), tuple(notes), writes)


# --- restoring ----------------------------------------------------------------------------------
def _za_header(caps: HostCaps, t: pt.RegsetTarget) -> bytes:
    """A user_za_header that sets the SME VL with ZA off (za_set() with no data)."""
    return struct.pack("<IIHHHH", USER_SVE_HEADER_SIZE, USER_SVE_HEADER_SIZE, t.sme_vl,
                       caps.sme_vl.max_vl if caps.sme_vl else 0,
                       SVE_PT_VL_INHERIT if t.sme_inherit else 0, 0)


def restore_writes(caps: HostCaps, t: pt.RegsetTarget, tls: tuple[bool, bool] = (True, True)
                   ) -> tuple[tuple[int, bytes], ...]:
    """The PTRACE_SETREGSET writes (note type, bytes) that give a stopped thread of ``caps``
    the state ``t``, in order (the module docstring says why this order); ``tls`` says
    whether ``t``'s TPIDR_EL0 and TPIDR2_EL0 are known (`Arm64Record.tls`)."""
    out: list[tuple[int, bytes]] = []
    if caps.sme:
        out.append((pt.NT_ARM_ZA, _za_header(caps, t)))
    if caps.sve:
        out.append((pt.NT_ARM_SVE, pt.regset_get(caps, t, pt.NT_ARM_SVE)))
    elif not t.sm:
        out.append((pt.NT_PRFPREG, pt.regset_get(caps, t, pt.NT_PRFPREG)))
    if t.sm:
        out.append((pt.NT_ARM_SSVE, pt.regset_get(caps, t, pt.NT_ARM_SSVE)))
    if t.za_on:
        out.append((pt.NT_ARM_ZA, pt.regset_get(caps, t, pt.NT_ARM_ZA)))
        if caps.sme2:
            out.append((pt.NT_ARM_ZT, pt.regset_get(caps, t, pt.NT_ARM_ZT)))
    if caps.fpmr:
        out.append((pt.NT_ARM_FPMR, pt.regset_get(caps, t, pt.NT_ARM_FPMR)))
    if tls[0]:
        data = pt.regset_get(caps, t, pt.NT_ARM_TLS)
        out.append((pt.NT_ARM_TLS, data if tls[1] else data[:8]))
    return tuple(out)


class RestoreError(BlobError):
    """A sequence of regset writes that does not leave the thread in the state asked for."""


def replay(caps: HostCaps, writes: tuple[tuple[int, bytes], ...],
           start: pt.RegsetTarget | None = None) -> pt.RegsetTarget:
    """The thread after ``writes`` (PTRACE_SETREGSET each, in order) on ``start`` (a fresh
    thread of ``caps``); RestoreError naming the first write the kernel refuses."""
    t = start if start is not None else pt.RegsetTarget.fresh(caps)
    for n, (note, data) in enumerate(writes, 1):
        r = pt.regset_set(caps, t, note, data)
        if r.ret:
            raise RestoreError(f"write {n}, {pt.NOTE_NAMES[note]}: refused ({r.ret}): "
                               f"{r.reason}")
        t = r.target
    return t


def differences(caps: HostCaps, got: pt.RegsetTarget, want: pt.RegsetTarget,
                ignore: tuple[int, ...] = ()) -> list[str]:
    """The regsets of ``caps`` (but ``ignore``) that read back otherwise on ``got`` than on
    ``want``."""
    out = []
    for note in pt.REGSETS:
        if note in ignore:
            continue
        try:
            a, b = pt.regset_get(caps, got, note), pt.regset_get(caps, want, note)
        except ValueError:
            continue  # the system lacks it
        if a != b:
            out.append(pt.NOTE_NAMES[note])
    return out


def check_restore(caps: HostCaps, want: pt.RegsetTarget,
                  writes: tuple[tuple[int, bytes], ...], ignore: tuple[int, ...] = ()) -> None:
    """RestoreError unless ``writes`` on a fresh thread of ``caps`` leave every regset (but
    ``ignore``) reading back as ``want``'s."""
    got = replay(caps, writes)
    bad = differences(caps, got, want, ignore)
    if bad:
        raise RestoreError(f"after the writes {', '.join(bad)} read back otherwise than the "
                           "state asked for")


# --- a signal frame (CRIU restores a thread with rt_sigreturn) ---------------------------------
def sig_task(t: pt.RegsetTarget) -> sig.SigTask:
    """The signal model's view of a thread in state ``t``."""
    return sig.SigTask(t.fp_type, t.sm, t.za_on, t.sve_vl, t.sme_vl, fpsr=t.fpsr, fpcr=t.fpcr,
                       fpmr=t.fpmr, tpidr2=t.tpidr2)


def sigframe(caps: HostCaps, t: pt.RegsetTarget, base: int = 0) -> bytes:
    """The struct rt_sigframe setup_sigframe() writes for a thread of ``caps`` in state ``t``
    at address ``base`` (extra_context.datap points into it): the records' headers as
    fpstate.kernel.arm64.signal lays them out, with the registers -- the effective V0-V31
    (fpsimd_signal_preserve_current_state()), Z/P/FFR in SVE format or streaming mode, ZA
    and ZT0 while PSTATE.ZA is on, FPSR, FPCR, FPMR and TPIDR2_EL0. RestoreError if the model's
    rt_sigreturn of it, on a thread at the same vector lengths, does not give ``t`` back."""
    task = sig_task(t)
    layout = sig.setup_sigframe_layout(caps, task)
    buf = bytearray(sig.encode_sigframe(layout, task, base))
    for r in layout.records:
        at = r.offset + 16  # every payload follows a 16-byte record head
        if r.name == "fpsimd":
            buf[at:at + 512] = pt.effective_vregs(t)
        elif r.name == "sve" and r.size > sig.SVE_CONTEXT_SIZE:
            buf[at:at + len(t.sve)] = t.sve
        elif r.name == "za" and t.za_on:
            buf[at:at + len(t.za)] = t.za
        elif r.name == "zt":
            buf[at:at + ZT_SIG_REG_BYTES] = t.zt0
    frame = bytes(buf)
    back = sig.restore_sigframe_fp(frame, caps, replace(task, za=False, tpidr2=0), base)
    want = (task.fp_type, task.sm, task.za, task.fpsr, task.fpcr, task.fpmr if caps.fpmr else 0,
            task.tpidr2 if caps.sme else 0)
    got = back.task
    if back.ret or (got.fp_type, got.sm, got.za, got.fpsr, got.fpcr, got.fpmr,
                    got.tpidr2) != want:
        raise RestoreError(f"the model's rt_sigreturn does not take the frame back: "
                           f"{back.reason or got}")
    return frame


__all__ = [
    "RECORD_FORMAT_ARM64",
    "Arm64Record",
    "Arm64Translation",
    "FrameRead",
    "RestoreError",
    "check_restore",
    "core_thread",
    "core_threads",
    "differences",
    "frame_mismatches",
    "mismatches",
    "record_from_core",
    "record_from_frame_read",
    "record_from_notes",
    "record_from_sigframe",
    "replay",
    "restore_writes",
    "sig_task",
    "sigframe",
    "state_from_notes",
    "state_from_sigframe",
    "tls_recorded",
    "translate",
]
