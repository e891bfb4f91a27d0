"""Every invariant the checker holds the models to, named, with the rule it comes from.

This module is the one place where invariants are stated. `INVARIANTS` lists them in the order
they are reported; each predicate below is registered under an invariant's name and a model
(``x86`` for the kernel model with KVM on top, ``arm64`` for the arm64 host with KVM/arm64) and
yields one line of evidence per violation. The models themselves detect some bugs at the very
instruction (an XSAVE past the end of its buffer raises `KernelBug("xsave-out-of-bounds")`
before a byte is written); `BUG_INVARIANTS` says which invariant each such model report is a
violation of. The checker runs every predicate of a world after every step.

A predicate reads the model and the checker's bookkeeping (the values each context expects,
what the step emitted); it never decides how the kernel should have moved state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fpstate.check import world as _world
from fpstate.check.world import MEMO_LIMIT, Violation


@dataclass(frozen=True, slots=True)
class Invariant:
    name: str
    statement: str  #: what must hold
    origin: str  #: the seed thread or kernel rule it encodes


INVARIANTS: tuple[Invariant, ...] = (
    Invariant(
        "save-within-allocation",
        "No XSAVE*/XRSTOR* or memcpy of register state touches bytes outside the buffer it "
        "was allocated for, and no freed buffer is referenced.",
        "seed 000 (tglx on kvm_save_current_fpu: 'save_fpregs_to_fpstate(fpu); <- Out of "
        "bounds write'); xstate.c xfd_validate_state()/xstate_op_valid()"),
    Invariant(
        "size-covers-features",
        "Every live fpstate's size covers the XSAVE size of its xfeatures (compacted when the "
        "kernel uses XSAVEC/XSAVES, else standard), user_size covers user_xfeatures in the "
        "standard format, and the allocation covers size.",
        "seed 000 (tglx: 'What guarantees that the state size of @fpu is big enough when "
        "src_fpu has dynamic features included?'); xstate.c fpstate_realloc()"),
    Invariant(
        "xcomp-bv-matches-features",
        "In a compacted buffer XCOMP_BV = xfeatures | bit 63 and XSTATE_BV is within XCOMP_BV; "
        "in a standard one XCOMP_BV = 0 and XSTATE_BV is within xfeatures.",
        "SDM 13.8.1 (XRSTOR #GP when XSTATE_BV has bits outside XCOMP_BV); xstate.h "
        "xstate_init_xcomp_bv(); seed 004 (BUG_ON(!(xcomp_bv & XFEATURE_MASK_PASID)))"),
    Invariant(
        "valid-registers-match-memory",
        "Registers marked valid for a context (fpregs_state_valid on its last_cpu while "
        "TIF_NEED_FPU_LOAD is set) equal what restoring its memory image would load.",
        "seed 004 (Andy Lutomirski: 'you will break coherence between CPU regs and the memory "
        "image'); context.h: the save on switch-out preserves the registers"),
    Invariant(
        "tif-clear-owns-registers",
        "A context whose TIF_NEED_FPU_LOAD is clear is current on a CPU whose registers it "
        "owns (fpu_fpregs_owner_ctx == fpu and last_cpu == cpu). arm64: a task whose "
        "TIF_FOREIGN_FPSTATE is clear holds the CPU's registers with EL0 SVE and SME access "
        "as its TIF_SVE and TIF_SME say; a guest owns them with the traps KVM computed.",
        "context.h / fpregs_assert_state_consistent(): 'If TIF_NEED_FPU_LOAD is cleared then "
        "the CPU's FPU registers are holding the current thread's FPU registers'"),
    Invariant(
        "dynamic-state-needs-permission",
        "No fpstate holds or enables a dynamic feature (AMX tile data) the process was not "
        "permitted (guest fpstates: the guest permission), and a host fpstate without space "
        "for a permitted dynamic feature keeps it armed in XFD.",
        "Documentation/arch/x86/xstate.rst (arch_prctl ARCH_REQ_XCOMP_PERM); xstate.c "
        "__xfd_enable_feature(), fpstate_realloc(); seed 000"),
    Invariant(
        "permission-keeps-defaults",
        "A process's permission (and its guest permission) includes every default feature: "
        "they are permitted without asking, and a request for more adds to them.",
        "core.c fpstate_reset() (the defaults); xstate.c __xstate_request_perm() (mask = "
        "permitted | requested) since 063452fd94d1: 'This master bitmask should include "
        "non-dynamic features always, as they are permitted by default.'"),
    Invariant(
        "guest-only-not-in-host-fpstate",
        "A guest-only supervisor feature (CET_KERNEL) is never in a non-guest fpstate's "
        "xfeatures, XCOMP_BV or XSTATE_BV, nor in a host task's permission.",
        "seed 001 (guest_default_cfg: 'CET-S space is allocated for guest fpu only'); types.h "
        "XFEATURE_MASK_GUEST_SUPERVISOR"),
    Invariant(
        "init-clears-architectural",
        "vCPU INIT zeroes exactly the XSAVE components the SDM clears on INIT that the guest can "
        "use (MPX BNDREGS/BNDCSR, CET_USER, CET_KERNEL in KVM's supported XCR0|XSS) and leaves "
        "every other component as it was.",
        "seed 003 (Sean Christopherson: kvm_xstate_reset(), XSTATE_CLEAR_ON_INIT); SDM Vol. 3 "
        "Table 10-1 (state after INIT)"),
    Invariant(
        "reset-zeroed-buffer",
        "After vCPU RESET (creation) the guest fpstate is zero apart from the header and "
        "legacy fields fpstate_init_user() writes (XCOMP_BV, FCW, MXCSR).",
        "seed 003 ('fpstate is zero allocated, and KVM absolutely relies on that')"),
    Invariant(
        "nothing-beyond-advertised",
        "Nothing a guest or userspace can observe (registers, signal frames, ptrace and "
        "KVM_GET_XSAVE buffers, ONE_REG, ARCH_GET_XCOMP_*) carries state of a feature it was "
        "not advertised; an access to such state is refused (UNDEF, #UD, errno).",
        "seed 002 (Marc Zyngier: 'userspace shouldn't be able to observe the state that a "
        "guest isn't supposed to generate'); x86.c kvm_vcpu_ioctl_x86_get_xsave2()"),
    Invariant(
        "regset-view-shows-the-task",
        "NT_X86_XSTATE of a task -- what PTRACE_GETREGSET gives a debugger of a stopped task, "
        "what a core file holds -- read as a restore reads it, shows every tracked component "
        "and MXCSR as the task holds them; the kernel rules that break it are stated with the "
        "predicate (docs/findings/kernel-findings.md).",
        "arch/x86/kernel/fpu/regset.c xstateregs_get() ('for ptrace, core dumps, etc.'), "
        "xstate.c copy_xstate_to_uabi_buf(); fs/binfmt_elf.c fill_thread_core_info()"),
    Invariant(
        "sigframe-fits-and-describes",
        "A signal frame lies entirely within the stack it was placed on (the sigaltstack when "
        "one was used) and its fx_sw_bytes describe it: MAGIC1, xstate_size covering "
        "xfeatures in the standard format, extended_size = xstate_size + 4, MAGIC2 at "
        "xstate_size, header XSTATE_BV within xfeatures.",
        "arch/x86/kernel/fpu/signal.c save_sw_bytes(), save_xstate_epilog(); "
        "arch/x86/kernel/signal.c get_sigframe()"),
    Invariant(
        "sigframe-delivered-with-room",
        "A signal with a handler is delivered (its frame written) when the stack the frame "
        "goes to has at least AT_MINSIGSTKSZ bytes of room below the frame's start, whatever "
        "PKRU the interrupted code runs with: a sigaltstack behind a protection key that code "
        "closed takes the frame too.",
        "arch/x86/kernel/signal.c get_sigframe() and sig_prepare_pkru() (70044df250d0, v6.12: "
        "'the application can use any of the available pkeys to protect the alternate signal "
        "stack'); AT_MINSIGSTKSZ = get_sigframe_size()"),
    Invariant(
        "sigreturn-restores-own-frame",
        "rt_sigreturn accepts a signal frame the kernel wrote -- edited by its handler only as "
        "the ABI allows (a component's value or XSTATE_BV bit, the fx_only fallback of a "
        "cleared magic1) -- whenever the handler's PKRU lets it read the frame, even after the "
        "handler's first use of a dynamic feature grew the task's fpstate.",
        "arch/x86/kernel/fpu/signal.c fpu__restore_sig(), check_xstate_in_sigframe() (the "
        "frame's own xstate_size locates MAGIC2; dc8aa31a7ac2 read it at the current user_size "
        "in v6.15-v6.17 and was reverted, 44eeff9bc467)"),
    Invariant(
        "no-foreign-value",
        "No context observes a value written by another context (another task, a guest, or "
        "the kernel's own FPU use) that it did not legitimately receive.",
        "context.h (the owner tracking exists so that a CPU's registers are never restored "
        "into the wrong context); seed 002 (no covert channel)"),
    Invariant(
        "no-lost-write",
        "A context observes its own latest value of every tracked component, and of MXCSR "
        "for tasks: what it wrote last, or what the ABI set (signal entry/return, fork, exec, "
        "ptrace, the kernel's xstate updates); a guest's RDMSR IA32_XFD_ERR reads what its "
        "XFD #NMs and its own WRMSR left (SDM 13.14).",
        "seed 004 (Andy Lutomirski: modify the registers only when they are the one source "
        "of truth, else the memory image, and invalidate every cached copy)"),
    Invariant(
        "kernel-warn",
        "The modelled kernel never reaches a WARN/BUG it states (any other model-detected "
        "bug: raw-xsave-addr, bad-fpu-state, unexpected-nm, invalid-opcode, ...).",
        "the WARN_ON_FPU()/WARN_ON_ONCE() assertions of arch/x86/kernel/fpu/{core,xstate}.c, "
        "arch/x86/kvm/x86.c, arch/arm64/kernel/fpsimd.c and arch/arm64/kvm/fpsimd.c"),
)

BY_NAME: dict[str, Invariant] = {i.name: i for i in INVARIANTS}

#: Model-detected bugs (KernelBug.name and kin) -> the invariant they violate.
BUG_INVARIANTS: dict[str, str] = {
    "xsave-out-of-bounds": "save-within-allocation",
    "use-after-free": "save-within-allocation",
    "xfd-state-invalid": "save-within-allocation",
    "free-guest-fpstate-in-use": "save-within-allocation",
    "fpregs-inconsistent": "tif-clear-owns-registers",
    "pasid-fixup-not-live": "tif-clear-owns-registers",
}


def violation_for_bug(name: str, detail: str) -> Violation:
    """The violation a model-detected bug stands for."""
    inv = BUG_INVARIANTS.get(name, "kernel-warn")
    return Violation(inv, f"{name}: {detail}")


# -- registry ------------------------------------------------------------------------------------

Predicate = Callable[[Any], Iterator[str]]

#: What a predicate reads, so that `check` can tell when its answer cannot have changed:
#: READS_STATE anything (run on every check); READS_EVENTS only what the step emitted (signal
#: frames, ptrace and KVM_GET_XSAVE buffers, INIT/RESET: run when the world's `events()` is
#: true); READS_SHAPES only the shapes of the world's buffers (their fields, sizes, headers and
#: permissions: run when `shapes_hash()` is None or was not found clean before for this world's
#: configuration and variant).
READS_STATE, READS_EVENTS, READS_SHAPES = "state", "events", "shapes"
PREDICATES: dict[str, list[tuple[str, Predicate, str]]] = {}


def predicate(name: str, *models: str,
              reads: str = READS_STATE) -> Callable[[Predicate], Predicate]:
    """Register ``fn`` as a check of invariant ``name`` for worlds of ``models``; ``reads``
    says what it reads (READS_*)."""
    assert name in BY_NAME, f"unknown invariant {name}"
    assert reads in (READS_STATE, READS_EVENTS, READS_SHAPES), reads

    def wrap(fn: Predicate) -> Predicate:
        for model in models:
            PREDICATES.setdefault(model, []).append((name, fn, reads))
        return fn

    return wrap


def check(world: Any) -> list[Violation]:
    """Every registered predicate of ``world.model``, in `INVARIANTS` order, except those
    whose inputs say they cannot fail now (see READS_*): event predicates after a step that
    emitted nothing, shape predicates on buffer shapes they all found clean before (a memo:
    `fpstate.check.world.no_memos` turns it off)."""
    preds = _ORDERED.get(world.model)
    if preds is None or len(preds) != len(PREDICATES.get(world.model, ())):
        order = {i.name: n for n, i in enumerate(INVARIANTS)}
        preds = _ORDERED[world.model] = tuple(sorted(PREDICATES.get(world.model, ()),
                                                     key=lambda p: order[p[0]]))
    events = world.events()
    shapes = world.shapes_hash() if _world.MEMOS_ON else None
    clean_shapes = world.memo().clean_shapes if shapes is not None else None
    skip_shapes = clean_shapes is not None and shapes in clean_shapes
    out = []
    shapes_bad = False
    for name, fn, reads in preds:
        if reads is not READS_STATE:
            if reads is READS_EVENTS:
                if not events:
                    continue
            elif skip_shapes:
                continue
        for detail in fn(world):
            out.append(Violation(name, detail))
            if reads is READS_SHAPES:
                shapes_bad = True
    if clean_shapes is not None and not skip_shapes and not shapes_bad:
        if len(clean_shapes) > MEMO_LIMIT:
            clean_shapes.clear()
        clean_shapes.add(shapes)
    return out


#: PREDICATES of each model in INVARIANTS order (sorted once).
_ORDERED: dict[str, tuple[tuple[str, Predicate, str], ...]] = {}


# The predicates live next to the models they read; importing them registers them.
from fpstate.check import invariants_arm64, invariants_x86  # noqa: E402,F401

__all__ = ["BUG_INVARIANTS", "BY_NAME", "INVARIANTS", "READS_EVENTS", "READS_SHAPES",
           "READS_STATE", "Invariant", "check", "predicate", "violation_for_bug"]
