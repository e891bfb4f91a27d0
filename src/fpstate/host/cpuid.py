"""This CPU as a CpuidProfile: execute CPUID over every leaf and sub-leaf the CPU enumerates.

The twin of a dump tool (``cpuid -r``, AIDA64): basic leaves 0..CPUID.0:EAX, extended leaves
0x80000000..CPUID.80000000H:EAX, and for the leaves that take a sub-leaf in ECX exactly the
sub-leaves the CPU says exist (Intel SDM Vol. 2A, CPUID, Table 3-8; AMD APM Vol. 3, App. E):

==========  ===========================================================================
leaf        sub-leaves read
==========  ===========================================================================
4, 0x8000001D  0.. until the cache type (EAX[4:0]) is 0 (the null sub-leaf is kept)
7, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x24   0..EAX of sub-leaf 0 (the maximum sub-leaf)
0xB, 0x1F   0.. until the level type (ECX[15:8]) is 0 (the invalid level is kept)
0xD         0..63 (every component number)
0xF         0, and i for every resource bit i set in sub-leaf 0 EDX
0x10        0, and i for every resource bit i set in sub-leaf 0 EBX
0x12        0, 1, then 2.. until the EPC sub-leaf type (EAX[3:0]) is 0
==========  ===========================================================================

Every walk stops after 64 sub-leaves whatever the CPU says. Leaves outside the enumerated
ranges (hypervisor leaves 0x40000000.., Transmeta, Centaur) are not read.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

from fpstate.host import native
from fpstate.x86.cpuid import CpuidProfile, Regs

_MAX_SUB = 64


def _until(cpuid: Callable[[int, int], Regs], leaf: int, done: Callable[[Regs], bool]) -> (
        dict[int, Regs]):
    out: dict[int, Regs] = {}
    for sub in range(_MAX_SUB):
        regs = cpuid(leaf, sub)
        out[sub] = regs
        if done(regs):
            break
    return out


def _upto_eax(cpuid: Callable[[int, int], Regs], leaf: int) -> dict[int, Regs]:
    first = cpuid(leaf, 0)
    top = min(first[0], _MAX_SUB - 1)
    return {0: first, **{s: cpuid(leaf, s) for s in range(1, top + 1)}}


def _by_bits(cpuid: Callable[[int, int], Regs], leaf: int, reg: int) -> dict[int, Regs]:
    first = cpuid(leaf, 0)
    subs = [i for i in range(1, 32) if (first[reg] >> i) & 1]
    return {0: first, **{s: cpuid(leaf, s) for s in subs}}


def subleaves(cpuid: Callable[[int, int], Regs], leaf: int) -> dict[int, Regs]:
    """The sub-leaves of ``leaf`` that the CPU enumerates, read through ``cpuid``."""
    if leaf in (0x4, 0x8000001D):
        return _until(cpuid, leaf, lambda r: r[0] & 0x1F == 0)
    if leaf in (0x7, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x24):
        return _upto_eax(cpuid, leaf)
    if leaf in (0xB, 0x1F):
        return _until(cpuid, leaf, lambda r: (r[2] >> 8) & 0xFF == 0)
    if leaf == 0xD:
        return {s: cpuid(leaf, s) for s in range(_MAX_SUB)}
    if leaf == 0xF:
        return _by_bits(cpuid, leaf, 3)
    if leaf == 0x10:
        return _by_bits(cpuid, leaf, 1)
    if leaf == 0x12:
        head = {0: cpuid(leaf, 0), 1: cpuid(leaf, 1)}
        epc = _until(lambda lf, s: cpuid(lf, s + 2), leaf, lambda r: r[0] & 0xF == 0)
        return {**head, **{s + 2: r for s, r in epc.items() if s + 2 < _MAX_SUB}}
    return {0: cpuid(leaf, 0)}


def snapshot(cpuid: Callable[[int, int], Regs]) -> dict[tuple[int, int], Regs]:
    """Every enumerated (leaf, sub-leaf) -> registers, read through ``cpuid(leaf, subleaf)``."""
    leaves: dict[tuple[int, int], Regs] = {}
    for base in (0x0, 0x80000000):
        top = cpuid(base, 0)[0]
        if not base <= top <= base + 0xFFFF:  # no such range (or a garbage answer)
            top = base
        for leaf in range(base, top + 1):
            for sub, regs in subleaves(cpuid, leaf).items():
                leaves[(leaf, sub)] = regs
    return leaves


def host_profile() -> CpuidProfile:
    """This CPU, by executing CPUID (fpstate.host.native.cpuid); HostUnavailable off x86-64."""
    native.require_x86_64()
    leaves = snapshot(native.cpuid)
    uname = os.uname()
    source = f"host: CPUID executed on this machine ({uname.sysname} {uname.release}, " \
             f"{platform.machine()})"
    return CpuidProfile.from_leaves("host", leaves, source)
