"""fpstate template against this machine's KVM. The template of this CPU alone is what
KVM_GET_SUPPORTED_CPUID offers; KVM_SET_CPUID2 takes the templates; upstream KVM keeps the
table it is given (rewriting sub-leaf 0/1 EBX only) and KVM_SET_XCRS (__kvm_set_xcr, as for the
guest's XSETBV) refuses what the template leaves out, while a backend that replaces leaf 0xD
(PVM) is named by the check's probe; a component the template advertises and KVM cannot give
is refused, and a real guest's XSETBV of it faults; a VMM's wrong sub-leaf 0 ECX is left alone
by upstream KVM, so the check must say it. Skips where /dev/kvm is unusable."""

from __future__ import annotations

import errno
from dataclasses import replace

import pytest

from fpstate.errors import HostUnavailable, ProgramError
from fpstate.host.cpuid import host_profile
from fpstate.host.kvm import CpuidEntry, KvmError, find_cpuid, open_kvm
from fpstate.host.kvm_guest import run_guest_program
from fpstate.kvm.x86.cpuid import CpuidEntry2
from fpstate.tools.template import check_template, measured_offer, pool_template
from fpstate.x86.program import Insn, Program

pytestmark = pytest.mark.host

PKRU = 1 << 9
XTILE = 1 << 17 | 1 << 18


@pytest.fixture(scope="module")
def kvm():
    try:
        k = open_kvm()
        k.supported_cpuid()
    except HostUnavailable as e:
        pytest.skip(str(e))
    except KvmError as e:
        pytest.skip(f"/dev/kvm is unusable: {e}")
    yield k
    k.close()


@pytest.fixture(scope="module")
def host(kvm):
    return host_profile()


@pytest.fixture(scope="module")
def offer(kvm, host):
    return measured_offer(host)


def _table(kvm, leaf_d) -> tuple[CpuidEntry, ...]:
    """KVM_GET_SUPPORTED_CPUID with its leaf 0xD replaced by ``leaf_d`` (what a VMM sets)."""
    rest = [e for e in kvm.supported_cpuid() if e.function != 0xD]
    return (*rest, *leaf_d)


def _held(kvm, leaf_d, xcr0s=()) -> tuple[tuple[CpuidEntry2, ...], list[int]]:
    """KVM_SET_CPUID2 of the table, KVM_GET_CPUID2's leaf 0xD, and the errno of KVM_SET_XCRS
    of each of ``xcr0s`` in turn."""
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(_table(kvm, leaf_d))
        errnos = []
        for x in xcr0s:
            try:
                vcpu.set_xcrs(x)
                errnos.append(0)
            except KvmError as e:
                errnos.append(e.errno)
        return tuple(e for e in vcpu.get_cpuid2() if e.function == 0xD), errnos
    finally:
        vm.close()


def _no_amx(host, offer):
    """This CPU's template without AMX (this process holds no AMX guest permission)."""
    return pool_template([host], xcr0=pool_template([host], offers=[offer]).xcr0 & ~XTILE,
                         offers=[offer])


def test_pool_of_this_cpu_is_what_kvm_supports(kvm, host, offer) -> None:
    """The template for this CPU alone against the real KVM_GET_SUPPORTED_CPUID, sub-leaf for
    sub-leaf (no AMX guest permission here: the dynamic components are left out of both)."""
    t = pool_template([host], offers=[offer])
    real = kvm.supported_cpuid()
    a0, _, c0, d0 = find_cpuid(real, 0xD, 0)
    assert t.xcr0 & ~XTILE == (a0 | d0 << 32) & ~XTILE
    a1, _, c1, d1 = find_cpuid(real, 0xD, 1)
    assert (t.d1_eax, t.xss) == (a1, c1 | d1 << 32)
    for i in range(2, 17):
        assert find_cpuid(t.entries(), 0xD, i)[:3] == find_cpuid(real, 0xD, i)[:3], i
    if not t.xcr0 & XTILE:
        assert find_cpuid(t.entries(), 0xD, 0)[2] == c0


def test_kvm_keeps_or_replaces_what_the_template_says(kvm, host, offer) -> None:
    """A template of x87|SSE|AVX on this CPU. Upstream KVM keeps it: XCR0 0x7 is taken and
    each other feature of the CPU refused (-EINVAL), as the check says. A backend that replaces
    leaf 0xD (PVM) then takes what it shows instead; the check's probe names the sub-leaf."""
    t = pool_template([host], xcr0=0x7, offers=[offer])
    c = check_template(t.entries(), host, offer=offer, probe=True)
    assert c.guest_supported_xcr0 == 0x7
    more = sorted({0xE7 if 5 <= i <= 7 else 0x7 | 1 << i
                   for i in range(3, 63) if offer.xcr0 >> i & 1 and i not in (17, 18)})
    held, errnos = _held(kvm, t.entries(), [0x7, *more])
    kept = find_cpuid(held, 0xD, 0)[0] == 0x7
    probe = [f.what for f in c.findings if f.what.startswith("this machine's KVM")]
    if kept:
        assert errnos == [0] + [errno.EINVAL] * len(more)
        assert not any("CPUID.(0DH,0x0) EAX" in p for p in probe) and c.ok
    else:
        eax = find_cpuid(held, 0xD, 0)[0]
        assert any(f"CPUID.(0DH,0x0) EAX {eax:#x} (template 0x7)" in p for p in probe), probe
        assert errnos == [0 if (x & ~eax) == 0 else errno.EINVAL for x in [0x7, *more]]


def test_pkru_advertised_without_pku(kvm, host, offer) -> None:
    """This CPU's template with PKRU added: the check says KVM drops it; the real KVM refuses
    XCR0 with PKRU, and a real guest's XSETBV of it faults."""
    if offer.xcr0 & PKRU:
        pytest.skip("this machine's KVM supports PKRU for guests")
    t = _no_amx(host, offer)
    e = tuple(replace(x, eax=x.eax | PKRU) if x.index == 0 else x for x in t.entries())
    e = (*e, CpuidEntry2(0xD, 9, 1, 8, 0x980, 0, 0))
    c = check_template(e, host, offer=offer, probe=True)
    assert not c.ok and c.guest_supported_xcr0 == c.xcr0 & ~PKRU
    whats = [f.what for f in c.findings]
    assert any("does not support pkru" in w for w in whats)
    assert any(w.endswith(f"KVM_SET_XCRS of the advertised XCR0 {c.xcr0:#x}: KVM_SET_XCRS: "
                          "EINVAL (22)") for w in whats), whats
    _, errnos = _held(kvm, e, [c.xcr0, c.guest_supported_xcr0])
    assert errnos == [errno.EINVAL, 0]
    with pytest.raises(ProgramError, match="XSETBV"):
        run_guest_program(Program(bytes(576), (Insn("FNINIT"),), cpl=0), xcr0=c.xcr0,
                          cpuid=_table(kvm, e))


def test_a_small_ecx(kvm, host, offer) -> None:
    """A template whose sub-leaf 0 ECX is too small: the check reports the overflow. Upstream
    KVM keeps the VMM's ECX (it rewrites EBX only) and EBX becomes the standard size of the
    guest's XCR0; a backend that rewrites ECX too is named by the probe."""
    t = _no_amx(host, offer)
    if t.standard_size <= 768:
        pytest.skip("this CPU's XSAVE area fits in 768 bytes")
    e = tuple(replace(x, ebx=576, ecx=768) if x.index == 0 else x for x in t.entries())
    c = check_template(e, host, offer=offer, probe=True)
    assert [f.what for f in c.findings if f.severity == "error"] == [
        f"CPUID.(0DH,0).ECX 768 is smaller than the {t.standard_size} bytes the advertised "
        f"XCR0 needs on {host.name}: a guest buffer sized from it overflows"]
    assert (f"KVM rewrites CPUID.(0DH,0).EBX from 576 to {t.standard_size} (the standard size "
            "of the XCR0 the guest has, kvm_update_cpuid_runtime)") in [f.what for f in c.findings]
    held, errnos = _held(kvm, e, [t.xcr0])
    _, ebx, ecx, _ = find_cpuid(held, 0xD, 0)
    assert errnos == [0] and ebx == t.standard_size
    if ecx != 768:
        assert any(f"ECX {ecx:#x} (template 0x300)" in f.what for f in c.findings)
