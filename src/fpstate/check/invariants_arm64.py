"""The arm64 predicates of the invariants stated in `fpstate.check.invariants`.

The KVM/arm64 model (helper E) states its rules as predicates over a `KvmWorld`
(fpstate.kvm.arm64.invariants), each quoting seed 002 or the kernel; this module registers each
of them under the checker's invariant it is an instance of (`ARM64_RULES`), so that one
vocabulary of invariant names covers both architectures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fpstate.check.invariants import predicate
from fpstate.kvm.arm64 import invariants as kvm_inv

ARM64 = "arm64"

#: fpstate.kvm.arm64.invariants predicate -> the checker's invariant.
ARM64_RULES: dict[str, str] = {
    "host_state_in_own_storage": "save-within-allocation",
    "vcpu_sve_state_at_max_vl": "size-covers-features",
    "traps_iff_not_owned": "tif-clear-owns-registers",
    "guest_owned_state_bound": "tif-clear-owns-registers",
    "host_traps_follow_tif": "tif-clear-owns-registers",
    "guest_observes_only_advertised": "nothing-beyond-advertised",
    "userspace_observes_only_advertised": "nothing-beyond-advertised",
    "traps_follow_advertised": "nothing-beyond-advertised",
    "id_regs_frozen_after_run": "nothing-beyond-advertised",
    "no_streaming_or_za_in_guest": "no-foreign-value",
    "no_context_observes_another": "no-foreign-value",
    "context_reads_own_latest": "no-lost-write",
    "host_never_warns": "kernel-warn",
}


def _register(rule: str, invariant: str) -> None:
    fn = getattr(kvm_inv, rule)

    def check(w: Any) -> Iterable[str]:
        found = fn(w.kw)
        return [f"{rule}: {detail}" for detail in found] if found else ()

    check.__name__ = rule
    predicate(invariant, ARM64)(check)


for _rule, _inv in ARM64_RULES.items():
    _register(_rule, _inv)
