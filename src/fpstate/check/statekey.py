"""Canonical state keys of x86 worlds for the explorer's state hashing (arm64: statekey_arm64).

Two states get the same key when they behave alike: the same tasks in the same scheduler and
lazy-restore states, the same fpstate shapes, the same per-CPU ownership, and the same *pattern*
of register values. Values are tokens naming their writer and a generation
(fpstate.kernel.x86.hw.token); generations only matter through equality, so the key replaces
each generation by its rank among the generations of the same writer and component found in
the state (the checker's expected values included). A kernel path in flight is keyed by its
function and the task; the user memory a task can read back (its signal frames) by content,
the register values of their XSAVE areas as key values like any other (`frame_values`).

A key is ``(structure, ranks)``: the structure is nested tuples of ints, strings and bytes in
which a token is ``(TOKEN, writer, component)``, and ranks gives each token's rank in
traversal order. Keys are hashable and picklable, so the executor can return them from worker
processes. Values, decoded images and buffers are memoised (the same bytes objects and buffers
recur from one state to the next); a buffer's memo is verified against a snapshot of its
content. A memoised part (a decoded image, a dict of values) stands in the key as its
`digest`, made once per part: hashing the key then costs a few ints instead of every
component of every image again (tuples do not cache their hash).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from operator import attrgetter
from typing import Any

from fpstate.kernel.x86.hw import (
    PKRU,
    PKRU_TOKEN_MARK,
    init_value,
    pkru_bytes,
    read_token,
    token,
)
from fpstate.kernel.x86.regset import (
    USER32_CS,
    USER_DS,
    convert_from_fxsr,
    flip_inits_xmm,
    mxcsr_by_format,
)
from fpstate.kernel.x86.sched import STATE_DEAD
from fpstate.kernel.x86.signal import (
    RT_IA32_SC,
    SC32_FPSTATE,
    SC_FPSTATE_OFFSET,
    SIGFRAME_IA32_SC,
    SW_BYTES_OFFSET,
)
from fpstate.kernel.x86.types import FREGS_STATE_SIZE
from fpstate.x86.layout import compacted_offset
from fpstate.x86.xfeatures import XCOMP_BV_COMPACTED_FORMAT, bits


class Canon:
    """Collects the tokens of one key in traversal order: a value in the key's structure is
    -1 (none), 0 (initial), the digest of its bytes (`raw_digest`), or ``(TOKEN, owner,
    component)``; the generation of each token goes to `toks` as (owner, component, gen), and
    `finish` turns them into ranks."""

    __slots__ = ("toks",)

    def __init__(self) -> None:
        self.toks: list[tuple[int, int, int]] = []

    def value(self, v: bytes | None, i: int) -> Any:
        """An x86 component value of the key (see the class docstring)."""
        if v is None:
            return -1
        memo = _VALUES[i] if i < len(_VALUES) else None
        hit = memo.get(v) if memo is not None else None
        if hit is None:
            hit = _classify(v, i)
            if memo is not None:
                if len(memo) > 50_000:
                    memo.clear()
                memo[bytes(v)] = hit
        struct, tok = hit
        if tok is not None:
            self.toks.append(tok)
        return struct

    def finish(self, raw: Any) -> tuple[Any, tuple[int, ...]]:
        """``(raw, ranks)``: each token's generation replaced by its rank among the
        generations of the same writer and component in this state."""
        toks = self.toks
        if not toks:
            return (raw, ())
        rank: dict[tuple[int, int, int], int] = {}
        prev = None
        n = 0
        for t in sorted(set(toks)):
            oc = t[:2]
            n = n + 1 if oc == prev else 0
            prev = oc
            rank[t] = n
        return (raw, tuple([rank[t] for t in toks]))


def _classify(v: bytes, i: int) -> tuple[Any, tuple[int, int, int] | None]:
    if v == init_value(i, len(v)):
        return 0, None
    tok = read_token(v)
    # A token only if every byte is the token's; a value that starts like one but was
    # changed is keyed by content -- except a token's x87 bytes as an ia32 sigreturn folds
    # them (convert_from_fxsr, convert_to_fxsr: `fold_x87`), a function of the token whose
    # generation is ranked like the token's (by content, two states that differ only in the
    # generation of a folded value would differ: the memo audit found one, session 30).
    if tok is not None:
        if v == token(tok[0], tok[1], i, len(v)):
            return (TOKEN, tok[0], i), (tok[0], i, tok[1])
        if i == 0 and v == _folded(tok[0], tok[1], len(v)):
            return (FOLDED, tok[0], i), (tok[0], i, tok[1])
    return raw_digest(v), None


def _folded(owner: int, generation: int, size: int) -> bytes:
    """The x87 token of ``owner`` and ``generation`` folded by an ia32 sigreturn."""
    from fpstate.check.actions_x86 import fold_x87

    return fold_x87(token(owner, generation, 0, size))


#: The tag of a token in a key's structure (an int, so that parts of keys are `digest`-able).
TOKEN = -2
#: The tag of a token's x87 bytes folded by an ia32 sigreturn (`_classify`).
FOLDED = -3


#: Per component number: value bytes -> (structure, token): values are shared from one state to
#: the next (and bytes cache their hash), so each is classified once.
_VALUES: list[dict[bytes, tuple[Any, Any]]] = [{} for _ in range(64)]
_OFFSETS: dict[tuple[int, int, int], int] = {}


def _offset(profile: Any, xcomp_bv: int, i: int) -> int:
    k = (id(profile), xcomp_bv, i)
    off = _OFFSETS.get(k)
    if off is None:
        off = _OFFSETS[k] = (compacted_offset(profile, xcomp_bv, i)
                             if xcomp_bv & XCOMP_BV_COMPACTED_FORMAT
                             else profile.component(i).offset)
    return off


#: Decoded images by content (system, bytes): equal images recur in many buffers.
_DECODED: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def digest(part: tuple[Any, ...]) -> int:
    """A 64-bit name of a part of a key made of ints and tuples of them only, the same in
    every process: ``hash()`` of ints and of tuples of them is not salted, unlike that of
    strings, bytes and (before Python 3.12) None, and campaigns name states across processes
    (fpstate.campaign.partition)."""
    return hash(part)


def raw_digest(v: bytes) -> int:
    """A value that is neither initial nor a token, in a key: a 64-bit BLAKE2b digest of it."""
    return int.from_bytes(hashlib.blake2b(v, digest_size=8).digest(), "little")


def _component(buf: bytes, base: int, profile: Any, xcomp_bv: int,
               i: int) -> tuple[bytes, tuple[tuple[int, int], ...]]:
    """Component ``i`` of the XSAVE image at ``base`` in ``buf`` (its format: ``xcomp_bv``) as
    a key value reads it -- x87 without MXCSR and MXCSR_MASK, which are keyed apart -- and the
    spans of ``buf`` it was read from."""
    if i == 0:
        return (buf[base:base + 24] + bytes(8) + buf[base + 32:base + 160],
                ((base, base + 24), (base + 32, base + 160)))
    off = base + _offset(profile, xcomp_bv, i)
    end = min(off + profile.component(i).size, len(buf))
    return buf[off:end], ((off, end),)


def _decode_image(system: Any, regs: bytes) -> tuple[int, tuple[Any, ...]]:
    xstate_bv = int.from_bytes(regs[512:520], "little")
    xcomp_bv = int.from_bytes(regs[520:528], "little") if system.xcompacted else 0
    out: list[Any] = []
    toks: list[tuple[int, int, int]] = []
    for i in bits(xstate_bv & ~XCOMP_BV_COMPACTED_FORMAT):
        if i and system.xcompacted and not (xcomp_bv >> i) & 1:
            out = [(-1, raw_digest(regs))]
            toks = []
            break
        v, _ = _component(regs, 0, system.profile, xcomp_bv, i)
        struct, tok = _classify(v, i)
        out.append((i, struct))
        if tok is not None:
            toks.append(tok)
    if not xstate_bv & 2 and _flip_loads_stale_xmm(system):
        # XMM bytes outside XSTATE_BV, which Chang S. Bae's v3 as posted loads when its
        # copy_uabi_to_xstate() sets SSE for a non-default MXCSR (mxcsr-flip-keeps-xmm)
        struct, tok = _classify(regs[160:416], 1)
        out.append((-2, struct))
        if tok is not None:
            toks.append(tok)
    return digest((tuple(out), int.from_bytes(regs[24:28], "little"))), tuple(toks)


def _flip_loads_stale_xmm(system: Any) -> bool:
    """Whether an fpstate's XMM bytes count while its XSTATE_BV lacks SSE: on a compacted
    kernel with the proposed fix mxcsr_by_format but without its amendment
    mxcsr_flip_inits_xmm (fpstate.kernel.x86.regset._copy_uabi_v3)."""
    return system.xcompacted and mxcsr_by_format(system) and not flip_inits_xmm(system)


def pkru_value(cn: Canon, pkru: int) -> Any:
    """A PKRU register value held as an int (thread.pkru, vcpu->arch.pkru and host_pkru) in a
    key: a token ranked like any other value, any other value as itself."""
    if pkru & 0xFF == PKRU_TOKEN_MARK and pkru >> 20:  # maybe a PKRU token (hw.token)
        return cn.value(pkru_bytes(pkru), PKRU)
    return pkru


#: Dicts of component values -> (structure, tokens), by identity: id -> (dict, a copy of it,
#: digest, tokens). Register files and expected values change a few components per step, so
#: most dicts are met again unchanged (verified against the copy: the values are the same
#: bytes objects, so comparing them is cheap).
_BY_DICT_ENTRIES: dict[int, tuple[dict[int, bytes], dict[int, bytes], int, tuple[Any, ...]]] = {}


def _regs_entry(values: dict[int, bytes]) -> tuple[Any, dict[int, bytes], int, tuple[Any, ...]]:
    """The `_BY_DICT_ENTRIES` entry of ``values`` made afresh."""
    sub = Canon()
    # MXCSR (-1: expected values after LDMXCSR) as its int: its values name their writer
    # (hw.mxcsr_token: a pid or vCPU the key holds anyway) and carry no generation to rank.
    struct = tuple([(i, sub.value(values[i], i) if i >= 0 else int.from_bytes(values[i], "little"))
                    for i in sorted(values)])
    if len(_BY_DICT_ENTRIES) >= 8192:
        _BY_DICT_ENTRIES.clear()
    e = _BY_DICT_ENTRIES[id(values)] = (values, dict(values), digest(struct), tuple(sub.toks))
    return e


def regs_values(cn: Canon, values: dict[int, bytes]) -> int:
    """The digest of ((i, key value), ...) of a dict of component values, sorted by component
    (their tokens go to ``cn``)."""
    e = _BY_DICT_ENTRIES.get(id(values))
    if e is None or e[1] != values:
        e = _regs_entry(values)
    if e[3]:
        cn.toks.extend(e[3])
    return e[2]


#: Signal frames by (system, address, content, kind) -> (digest, tokens).
_FRAMES: dict[tuple[int, int, bytes, str], tuple[int, tuple[tuple[int, int, int], ...]]] = {}
#: The kinds of signal frame the world records (X86World.frames): 64-bit rt, ia32 rt
#: (rt_sigframe_ia32), ia32 non-rt (sigframe_ia32); where an ia32 frame holds its
#: sigcontext_32 (a 64-bit frame holds its fpstate pointer in uc_mcontext).
FRAME_X64, FRAME_IA32_RT, FRAME_IA32 = "x86_64", "ia32-rt", "ia32"
FRAME_SC: dict[str, int] = {FRAME_IA32_RT: RT_IA32_SC, FRAME_IA32: SIGFRAME_IA32_SC}


def frame_values(cn: Canon, system: Any, data: bytes, lo: int, kind: str = FRAME_X64) -> int:
    """A signal frame at ``lo`` (its bytes up to FP_XSTATE_MAGIC2) in a key: the components
    its XSAVE area stores (XSTATE_BV of its header, standard format) as key values, their
    tokens to ``cn`` as for any other value, and the digest of everything else in it by
    content (the areas of the components it does not store left out, but for x87 and SSE:
    an fx_only sigreturn loads their legacy-region bytes whatever the header says, so they
    are key values too, marked not stored) -- so that two frames whose values differ only in
    generations, with the same pattern, name the same state.
    An ia32 frame (``kind`` "ia32-rt" or "ia32") has its 32-bit fpstate pointer in its
    sigcontext_32 and the fsave header before the XSAVE area; the header is part of
    "everything else" unless it is what the kernel derives from the frame's x87 value (then
    that value names it)."""
    k = (id(system), lo, data, kind)
    got = _FRAMES.get(k)
    if got is None:
        got = _frame_values(system, data, lo, kind)
        if len(_FRAMES) > 4096:
            _FRAMES.clear()
        _FRAMES[k] = got
    if got[1]:
        cn.toks.extend(got[1])
    return got[0]


_HOLES: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}


def _holes(profile: Any, features: int) -> tuple[tuple[int, int], ...]:
    """The byte ranges of a standard-format XSAVE area of ``features`` past its header and
    below the end of its last component that belong to no component."""
    k = (id(profile), features)
    got = _HOLES.get(k)
    if got is None:
        spans = sorted((c.offset, c.offset + c.size) for c in
                       (profile.component(i) for i in bits(features) if i >= 2))
        holes, at = [], 576
        for a, b in spans:
            if a > at:
                holes.append((at, a))
            at = max(at, b)
        got = _HOLES[k] = tuple(holes)
    return got


def _frame_values(system: Any, data: bytes, lo: int,
                  kind: str) -> tuple[int, tuple[Any, ...]]:
    sc = FRAME_SC.get(kind)
    if sc is not None:
        at = sc + SC32_FPSTATE
        fp = int.from_bytes(data[at:at + 4], "little") - lo + FREGS_STATE_SIZE
    else:
        fp = int.from_bytes(data[SC_FPSTATE_OFFSET:SC_FPSTATE_OFFSET + 8], "little") - lo
    out: list[Any] = []
    toks: list[tuple[int, int, int]] = []
    rest = bytearray(data)
    if 0 <= fp and fp + 576 <= len(data):
        xstate_bv = int.from_bytes(data[fp + 512:fp + 520], "little")
        profile = system.profile
        for i in bits(system.user.max_features):
            v, spans = _component(data, fp, profile, 0, i)
            stored = (xstate_bv >> i) & 1
            # A component not in XSTATE_BV was not written (XSAVE's init optimisation): its
            # bytes are those of an older frame, which sigreturn's XRSTOR ignores -- but not
            # x87 and SSE, whose legacy-region bytes an fx_only sigreturn (a frame whose
            # fx_sw_bytes or MAGIC2 do not check out) loads with FXRSTOR whatever the header
            # says: they stay in the key, marked as not stored.
            if stored or i <= 1:
                struct, tok = _classify(v, i)
                out.append((i, struct) if stored else (i, struct, 0))
                if tok is not None:
                    toks.append(tok)
            for a, b in spans:
                rest[a:b] = bytes(b - a)
        # The standard layout's holes (MPX's area on a CPU without it, the pad before
        # XTILECFG) are written by no XSAVE and read by no XRSTOR: they hold an older frame's
        # bytes. Only MAGIC2 may sit in one, where the frame's own xstate_size puts it (a
        # handler's resize).
        at = fp + SW_BYTES_OFFSET + 16
        magic2 = fp + int.from_bytes(data[at:at + 4], "little")
        for a, b in _holes(profile, system.user.max_features):
            rest[fp + a:fp + b] = bytes(b - a)
        rest[magic2:magic2 + 4] = data[magic2:magic2 + 4]
        if sc is not None and fp >= FREGS_STATE_SIZE:
            # An ia32 frame's fsave header, as the kernel wrote it, follows from the x87
            # value of its XSAVE area (convert_from_fxsr, status = FSW), which the key holds
            # (or sigreturn ignores both): its bytes, generations included, would tell apart
            # states the key names alike. A header that differs from that is kept as it is.
            head = fp - FREGS_STATE_SIZE
            fx = data[fp:fp + 512]
            env = convert_from_fxsr(fx, USER32_CS, USER_DS) + fx[2:4]
            if data[head:head + len(env)] == env:
                rest[head:head + len(env)] = bytes(len(env))
    return digest((tuple(out), raw_digest(bytes(rest)))), tuple(toks)


#: Every field of the x86 model's objects and what the key does with it: "key" (named by
#: `x86_key` or KvmX86World.extra_key), or why it may stay out (it cannot change what a state
#: does). tests/check/test_key_fields.py holds each class to this table, so a new field must
#: be placed here, and changes each "key" field of a state to see its key change.
FIELDS: dict[str, dict[str, str]] = {
    "Task": {
        **dict.fromkeys(("pid", "comm", "flags", "process", "fpu", "state", "need_fpu_load",
                         "on_cpu", "thread_pkru", "sas_ss_sp", "sas_ss_size", "sas_ss_flags",
                         "user_sp", "pasid_activated", "kpath", "pending", "handlers",
                         "killed_by"), "key"),
        "kresult": "a finished path's result, read in the step that finished it",
        "generation": "the next token's generation: keys rank generations, and a new token "
                      "outranks every older one of its writer whatever the number",
    },
    "Process": {
        **dict.fromkeys(("tgid", "pasid", "next_mmap", "compat"), "key"),
        "mm": "user memory is read back across steps only in signal frames, which the key "
              "holds (the world's frames); mappings follow from next_mmap and the stacks; "
              "its protection keys (pkey_allocation_map, the keyed mappings), page protections "
              "and execute-only key are keyed with the process's fields",
        "threads": "membership is each task's tgid; the leader (threads[0]) is keyed by the "
                   "permissions it holds",
        "siglock_holder": "held only inside a step",
    },
    "Fpu": {
        **dict.fromkeys(("embedded", "fpstate", "perm", "guest_perm", "last_cpu",
                         "task_fpstate"), "key"),
        "owner": "a name for reports",
        "avx512_timestamp": "nothing in the model reads it (the kernel's /proc arch_status does)",
    },
    "Fpstate": {
        **dict.fromkeys(("size", "user_size", "xfeatures", "user_xfeatures", "xfd", "regs",
                         "is_guest", "in_use", "freed"), "key"),
        "is_valloc": "true exactly when the fpstate is not its fpu's embedded one, which is "
                     "keyed",
        "is_confidential": "fixed when the fpstate is made (a TDX guest's)",
        "ident": "a name for reports",
    },
    "FpuStatePerm": dict.fromkeys(("state_perm", "state_size", "user_state_size"), "key"),
    "Cpu": {
        **dict.fromkeys(("regs", "current", "fpu_fpregs_owner_ctx", "kernel_fpu_allowed",
                         "xfd_state"), "key"),
        **dict.fromkeys(("nr", "m", "idle"), "fixed at boot"),
        **dict.fromkeys(("irqs_disabled", "bh_disabled", "preempt_count", "hardirq", "softirq",
                         "nmi", "pagefault_disabled"),
                        "raised and dropped inside a step (a kernel path never yields with "
                        "them raised: Machine._advance asserts it)"),
        **dict.fromkeys(("irq_in_lock", "irq_in_lock_used", "irq_in_lock_site"),
                        "set and cleared by one action (X86World's `irq` argument)"),
    },
    "FpRegs": {
        **dict.fromkeys(("xcr0", "xss", "xfd", "xfd_err", "xinuse", "mxcsr", "values"), "key"),
        **dict.fromkeys(("profile", "xsavec_supported", "mxcsr_mask"), "fixed at boot"),
        "cr4": "its FPU bits are clear only inside a hotplug or suspend step, from INIT or "
               "RESET to fpu__init_cpu() or restore_processor_state()",
    },
    "KvmVcpu": {
        **dict.fromkeys(("arch", "wants_to_run", "last_vmentry_cpu", "pending_init"), "key"),
        **dict.fromkeys(("kvm", "vm", "vcpu_id"), "fixed when the vCPU is made (its name)"),
        "stat_fpu_reload": "a statistic no action reads",
    },
    "VcpuArch": dict.fromkeys((
        "guest_fpu", "xcr0", "ia32_xss", "pkru", "host_pkru", "guest_supported_xcr0",
        "guest_supported_xss", "cpuid", "cpuid_dynamic_bits_dirty", "xfd_no_write_intercept",
        "nm_intercepted", "cr4_osxsave", "cr4_pke", "cr0_ts", "user_fpu", "user_fpu_tail"),
        "key"),
    "FpuGuest": dict.fromkeys(("xfeatures", "xfd_err", "uabi_size", "fpstate"), "key"),
    "Machine": {
        **dict.fromkeys(("cpus", "tasks", "next_pid"), "key"),
        **dict.fromkeys(("system", "init_fpstate"), "fixed at boot"),
        "generation": "the next kernel-written token's generation: ranked in keys",
        "jiffies": "a clock read by avx512_timestamp only",
        **dict.fromkeys(("freed", "unreferenced", "log", "events"),
                        "a record of what happened, no step reads it"),
    },
    # The checker's own bookkeeping beside the model (X86World, KvmX86World).
    "World": {
        **dict.fromkeys(("m", "expected", "sigstack", "frames", "nm_pending", "vcpus",
                         "vm_mm", "_pending_run", "exec_abi", "exec_at", "guest_xfd_err",
                         "guest_loose"), "key"),
        "tasks": "names to tasks: a task's name is its comm, which is keyed",
        **dict.fromkeys(("config", "variant", "max_tasks", "autosleep", "init_values",
                         "fresh_values",
                         "pkru_tracked", "tracked",
                         "supervisor_tracked", "writable", "view_comps", "vm_names", "vcpu_vm",
                         "kvm", "omit"),
                        "fixed by the configuration (the VMs' list; the vCPUs are keyed)"),
        **dict.fromkeys(("history", "steps", "_snapshot", "sizes"),
                        "how the state was reached, or a cache of what is fixed"),
        **dict.fromkeys(("emitted", "broken", "_seen_bugs"),
                        "what the last step emitted or reported: judged in that step (its "
                        "event key), never carried into the next"),
    },
}


#: The plain fields of the key, fetched in one call each (operator.attrgetter); a task's state
#: by its number (TaskState.no: an Enum member's hash is a Python-level call).
_CPU_FIELDS = attrgetter("kernel_fpu_allowed", "xfd_state")
_REGS_FIELDS = attrgetter("xfd", "xfd_err", "xinuse", "mxcsr", "xcr0", "xss")
#: A task's own fields with those of its struct fpu and its permissions, in one call.
_TASK_FIELDS = attrgetter("pid", "comm", "flags", "state.no", "need_fpu_load", "on_cpu",
                          "sas_ss_sp", "sas_ss_size", "sas_ss_flags", "user_sp",
                          "pasid_activated", "fpu.last_cpu", "fpu.perm.state_perm",
                          "fpu.perm.state_size", "fpu.perm.user_state_size",
                          "fpu.guest_perm.state_perm", "fpu.guest_perm.state_size",
                          "fpu.guest_perm.user_state_size")
#: A process's fields, with its leader's permissions (the group's, also once the leader is
#: dead): made once per process in a key.
_PROCESS_FIELDS = attrgetter("tgid", "pasid", "next_mmap", "compat")
_PERM_FIELDS = attrgetter("state_perm", "state_size", "user_state_size")
_FPS_FIELDS = attrgetter("size", "user_size", "xfeatures", "user_xfeatures", "xfd", "is_guest",
                         "in_use", "freed")


#: An fpstate in a key, by buffer: id -> (fpstate, snapshot of its regs, digest of its
#: stored values, MXCSR, XSTATE_BV/XCOMP_BV header and allocation size, tokens). Verified
#: against the snapshot (a memcmp), which is far cheaper than decoding or hashing the image.
_FPS_MEMO: dict[int, tuple[Any, bytes, int, tuple[Any, ...]]] = {}


def _fps_entry(system: Any, fps: Any) -> tuple[Any, bytes, int, tuple[Any, ...]]:
    """The `_FPS_MEMO` entry of ``fps`` made afresh (decoded images are shared by content)."""
    snap = bytes(fps.regs)
    k = (id(system), snap)
    got = _DECODED.get(k)
    if got is None:
        got = _decode_image(system, snap)
        if len(_DECODED) > 4096:
            _DECODED.clear()
        _DECODED[k] = got
    if len(_FPS_MEMO) >= 4096:
        _FPS_MEMO.clear()
    header = int.from_bytes(snap[512:528], "little")
    e = _FPS_MEMO[id(fps)] = (fps, snap, digest((got[0], header, len(snap))), got[1])
    return e


def fps_values(cn: Canon, system: Any, fps: Any) -> int:
    """An fpstate's image in a key: the components it stores (XSTATE_BV) as key values with
    its MXCSR, its XSTATE_BV/XCOMP_BV header and its allocation size, as one digest (the
    values' tokens go to ``cn``)."""
    e = _FPS_MEMO.get(id(fps))
    if e is None or e[1] != fps.regs:
        e = _fps_entry(system, fps)
    if e[3]:
        cn.toks.extend(e[3])
    return e[2]


def _kpath_key(w: Any, t: Any, kp: Any) -> Any:
    """A kernel path in flight: its function, and for an exec the kind of program it loads
    (the world's ``exec_abi``), which decides the new mm once de_thread() lets it go on, and
    where it sleeps (``exec_at``: before flush_thread() or after it)."""
    name = kp.__qualname__
    if name == "sys_execve":
        return (name, w.exec_abi.get(t.comm), w.exec_at.get(t.comm))
    return name


def x86_key(w: Any) -> Hashable:
    """The canonical key of an `X86World` (its KVM extension adds ``w.extra_key(cn)``)."""
    m = w.m
    s = m.system
    cn = Canon()
    toks = cn.toks
    by_dict = _BY_DICT_ENTRIES
    fps_memo = _FPS_MEMO
    mtasks = m.tasks
    # Each CPU's fpu_fpregs_owner_ctx as the pid of the task whose struct fpu it is.
    owners = {id(t.fpu): pid for pid, t in mtasks.items()}
    cpus = []
    for c in m.cpus:
        r = c.regs
        owner = c.fpu_fpregs_owner_ctx
        vals = r.values
        e = by_dict.get(id(vals))
        if e is None or e[1] != vals:
            e = _regs_entry(vals)
        if e[3]:
            toks.extend(e[3])
        cpus.append((c.current.pid, None if owner is None else owners.get(id(owner), -1),
                     _REGS_FIELDS(r), e[2], _CPU_FIELDS(c)))
    fps_ids: dict[int, int] = {}
    procs: dict[int, tuple[Any, ...]] = {}
    tasks = []
    dead = STATE_DEAD
    for pid in sorted(mtasks):
        t = mtasks[pid]
        if t.state is dead:
            tasks.append((pid, "DEAD"))
            continue
        fpu = t.fpu
        fps = fpu.fpstate
        e = fps_memo.get(id(fps))
        if e is None or e[1] != fps.regs:
            e = _fps_entry(s, fps)
        if e[3]:
            toks.extend(e[3])
        shape = (fps_ids.setdefault(id(fps), len(fps_ids)), fps is fpu.embedded,
                 _FPS_FIELDS(fps), e[2])
        fps = fpu.task_fpstate
        if fps is not None:
            shape = (shape, fps_ids.setdefault(id(fps), len(fps_ids)), fps is fpu.embedded,
                     _FPS_FIELDS(fps), fps_values(cn, s, fps))
        p = t.process
        proc = procs.get(id(p))
        if proc is None:
            # The group's permissions live in its leader's fpu, also once the leader is dead.
            leader = p.threads[0].fpu
            mm = p.mm
            proc = procs[id(p)] = (_PROCESS_FIELDS(p), _PERM_FIELDS(leader.perm),
                                   _PERM_FIELDS(leader.guest_perm),
                                   (mm.pkey_allocation_map, tuple(sorted(mm.pkeys.items())),
                                    tuple(sorted(mm.prots.items())), mm.execute_only_pkey)
                                   if mm.pkeys or mm.pkey_allocation_map != 1 or mm.prots
                                   or mm.execute_only_pkey != -1 else ())
        kp = t.kpath
        h = t.handlers
        pkru = t.thread_pkru
        tasks.append((
            _TASK_FIELDS(t), pkru_value(cn, pkru) if pkru & 0xFF == PKRU_TOKEN_MARK else pkru,
            proc, shape,
            None if kp is None else _kpath_key(w, t, kp),
            # Killed by its group's fatal signal while inside a kernel path: it exits once it
            # has left the path (Machine.kill_thread).
            t.killed_by is not None,
            tuple([(p.sig, p.code) for p in t.pending]) if t.pending else (),
            tuple(sorted([(k, v.flags) for k, v in h.items()])) if h else (),
        ))
    expected = []
    wtasks = w.tasks
    wexp = w.expected
    for name in sorted(wexp):
        t = wtasks.get(name)
        if t is None or t.state is dead:
            continue
        vals = wexp[name]
        e = by_dict.get(id(vals))
        if e is None or e[1] != vals:
            e = _regs_entry(vals)
        if e[3]:
            toks.extend(e[3])
        stack = w.sigstack[name]
        if stack:
            stack = tuple([regs_values(cn, d) for d in stack])
        frames = w.frames[name]
        if frames:
            frames = tuple([frame_values(cn, s, t.process.mm.read(lo, hi - lo), lo, kind)
                            for lo, hi, kind in frames])
        nm = w.nm_pending.get(name)
        if nm is not None:  # an instruction whose #NM handler sleeps (write_nm)
            nm = (nm[0], cn.value(nm[1], nm[0]))
        expected.append((name, e[2], stack or (), frames or (), nm))
    raw = (m.next_pid, tuple(cpus), tuple(tasks), tuple(expected), w.extra_key(cn))
    return cn.finish(raw)


__all__ = [
    "FIELDS",
    "Canon",
    "digest",
    "fps_values",
    "frame_values",
    "pkru_value",
    "raw_digest",
    "regs_values",
    "x86_key",
]
