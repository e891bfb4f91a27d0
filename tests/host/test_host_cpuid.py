"""The layout model against this CPU and this kernel.

- standard_size(XGETBV(0)) must equal CPUID.(EAX=0DH,ECX=0).EBX, the size the CPU reports for
  the components enabled in XCR0 (SDM 13.2);
- compacted_size(XCR0 | IA32_XSS) must equal CPUID.(EAX=0DH,ECX=1).EBX. IA32_XSS is an MSR that
  user space cannot read, so it is derived: Linux writes IA32_XSS = xfeatures_mask_supervisor()
  | xfeatures_mask_independent() (fpu__init_cpu_xstate, xstate.c), and prints
  fpu_kernel_cfg.max_features = XCR0 | supervisor features in "x86/fpu: Enabled xstate features
  0x...". So IA32_XSS = that mask & ~XCR0, plus independent features (arch LBR), which the line
  does not show: the test skips on a CPU that enumerates arch LBR in XSS.
- the kernel's own printed compacted offsets and context size must equal the model's.

Skipped off x86-64, and (for the dmesg checks) where the kernel log is unreadable, or has
rotated out the boot lines and none were kept in this boot. The sub-leaf walk of
host_profile() is tested everywhere, replayed on a bundled profile.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.cpuid import host_profile, snapshot
from fpstate.host.dmesg import host_fpu_lines
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.layout import compacted_offset, compacted_size, standard_size
from fpstate.x86.profiles import bundled_profile, list_profiles
from fpstate.x86.profiles.dumps import parse_cpuid_r

ENABLED = re.compile(r"x86/fpu: Enabled xstate features (0x[0-9a-f]+), context size is (\d+) "
                     r"bytes, using '(\w+)' format")
OFFSET = re.compile(r"x86/fpu: xstate_offset\[(\d+)\]:\s*(\d+), xstate_sizes\[\d+\]:\s*(\d+)")


@pytest.fixture(scope="module")
def host() -> CpuidProfile:
    if not native.is_x86_64():
        pytest.skip("host is not x86-64: CPUID/XGETBV cannot be executed")
    return host_profile()


def test_snapshot_walks_the_subleaves_the_cpu_enumerates() -> None:
    spr = bundled_profile("sapphire-rapids")
    leaves = snapshot(spr.cpuid)
    subs = {leaf: sorted(s for lf, s in leaves if lf == leaf) for leaf, _ in leaves}
    assert subs[0x4] == [0, 1, 2, 3, 4]  # 4 caches, then the null cache type
    assert subs[0x7] == [0, 1, 2]  # sub-leaf 0 EAX = 2
    assert subs[0xB] == [0, 1, 2]  # SMT, core, then level type 0
    assert subs[0xD] == list(range(64))
    assert subs[0xF] == [0, 1]  # sub-leaf 0 EDX = 2: L3 monitoring only
    assert subs[0x10] == [0, 1, 2, 3]  # sub-leaf 0 EBX = 0xE: L3, L2 CAT, MBA
    assert subs[0x12] == [0, 1, 2]  # no EPC section: sub-leaf 2 type 0 ends the walk
    assert subs[0x18] == list(range(9)) and subs[0x1D] == [0, 1]
    assert subs[0x1F] == [0, 1, 2]
    assert max(lf for lf, _ in leaves if lf < 1 << 31) == 0x20
    assert max(lf for lf, _ in leaves) == 0x80000008
    # every register the dump holds is read back unchanged
    assert all(leaves[k] == v for k, v in spr.leaves.items() if k in leaves)
    assert {k for k in spr.leaves if k not in leaves} == set()


def test_snapshot_ignores_an_absurd_leaf_range() -> None:
    def cpuid(leaf: int, sub: int) -> tuple[int, int, int, int]:
        return (0xFFFFFFFF, 0, 0, 0) if leaf in (0, 0x80000000) else (0, 0, 0, 0)

    assert set(snapshot(cpuid)) == {(0, 0), (0x80000000, 0)}


@pytest.fixture(scope="module")
def dmesg() -> str:
    """The kernel's x86/fpu boot lines: from the log, or as kept in this boot once the ring
    buffer has wrapped (`fpstate.host.dmesg.host_fpu_lines`)."""
    try:
        text = "\n".join(host_fpu_lines())
    except HostUnavailable as e:
        pytest.skip(str(e))
    if not ENABLED.search(text):
        pytest.skip("the kernel log holds no 'x86/fpu: Enabled xstate features' boot line")
    return text


@pytest.mark.host
def test_xcr0_is_within_the_supported_mask(host: CpuidProfile) -> None:
    if not host.has("OSXSAVE"):
        pytest.skip("host lacks OSXSAVE: CPUID.(EAX=1):ECX[27]=0, XGETBV would fault")
    xcr0 = native.xgetbv(0)
    assert xcr0 & 0x3 == 0x3 and xcr0 & ~host.xcr0_supported == 0


@pytest.mark.host
def test_standard_size_of_xcr0_is_subleaf0_ebx(host: CpuidProfile) -> None:
    if not host.has("OSXSAVE"):
        pytest.skip("host lacks OSXSAVE: CPUID.(EAX=1):ECX[27]=0, XGETBV would fault")
    xcr0 = native.xgetbv(0)
    assert standard_size(host, xcr0) == host.cpuid(0xD, 0)[1]
    # ECX: the size for every bit XCR0 may have (SDM Vol. 2A CPUID leaf 0DH) -- on silicon.
    # A hypervisor may mask components out of EAX but not the sizes: this machine's Emerald
    # Rapids guest enumerates AMX's sub-leaves 17 and 18 with EAX = 0xE7, and ECX = 11008
    # counts TILEDATA's end. ECX is then the furthest end of any enumerated user sub-leaf.
    ends = [host.cpuid(0xD, i)[1] + host.cpuid(0xD, i)[0] for i in range(2, 63)
            if host.cpuid(0xD, i)[0] and not host.cpuid(0xD, i)[2] & 1]
    assert host.cpuid(0xD, 0)[2] in {standard_size(host, host.xcr0_supported), max(ends, default=0)}


@pytest.mark.host
def test_compacted_size_of_xcr0_and_xss_is_subleaf1_ebx(host: CpuidProfile, dmesg: str) -> None:
    if not host.has("XSAVES"):
        pytest.skip("host lacks XSAVES: CPUID.(EAX=0DH,ECX=1):EAX[3]=0, IA32_XSS is unused")
    if host.xss_supported & (1 << 15):
        pytest.skip("host enumerates arch LBR in XSS: IA32_XSS holds an independent feature "
                    "that the 'Enabled xstate features' line does not show")
    xcr0 = native.xgetbv(0)
    enabled = int(ENABLED.search(dmesg).group(1), 16)  # type: ignore[union-attr]
    xss = enabled & ~xcr0
    assert enabled & xcr0 == xcr0, "the kernel's features include XCR0"
    assert compacted_size(host, xcr0 | xss) == host.cpuid(0xD, 1)[1]


@pytest.mark.host
def test_kernel_printed_offsets_and_context_size(host: CpuidProfile, dmesg: str) -> None:
    m = ENABLED.search(dmesg)
    assert m is not None
    features, size, fmt = int(m.group(1), 16), int(m.group(2)), m.group(3)
    offsets = {int(i): (int(o), int(s)) for i, o, s in OFFSET.findall(dmesg)}
    assert offsets, "the kernel prints xstate_offset lines for every extended feature"
    if fmt == "compacted":
        assert compacted_size(host, features) == size
        for i, (offset, sz) in offsets.items():
            assert compacted_offset(host, features, i) == offset
            assert host.component(i).size == sz
    else:
        assert standard_size(host, features) == size
        for i, (offset, _) in offsets.items():
            assert host.component(i).offset == offset


@pytest.mark.host
def test_xinuse_is_within_xcr0(host: CpuidProfile) -> None:
    if not host.has("XGETBV1"):
        pytest.skip("host lacks XGETBV1: CPUID.(EAX=0DH,ECX=1):EAX[2]=0")
    assert native.xgetbv(1) & ~native.xgetbv(0) == 0


@pytest.mark.host
def test_host_profile_agrees_with_cpuid_tool(host: CpuidProfile) -> None:
    if shutil.which("cpuid") is None:
        pytest.skip("the 'cpuid' tool is not installed (Debian package cpuid)")
    r = subprocess.run(["cpuid", "-r", "-1"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cpuid -r failed: {r.stderr.strip()[:80]}")
    tool = parse_cpuid_r(r.stdout, "tool", "cpuid -r -1")
    # leaf 0xD and the feature leaves do not depend on which CPU the process runs on
    # (the tool dumps the sub-leaves of leaf 0xD that EAX/EDX of sub-leaf 0 and ECX/EDX of
    # sub-leaf 1 name; a hypervisor may enumerate others, as this machine's does AMX's)
    named = (host.cpuid(0xD, 0)[0] | host.cpuid(0xD, 0)[3] << 32 | host.cpuid(0xD, 1)[2]
             | host.cpuid(0xD, 1)[3] << 32)
    subleaves = [0, 1, *(i for i in range(2, 64) if named >> i & 1)]
    for key in [(0xD, s) for s in subleaves] + [(7, 0), (7, 1), (0x80000001, 0)]:
        assert host.cpuid(*key) == tool.cpuid(*key), f"leaf {key[0]:#x}.{key[1]}"


@pytest.mark.host
def test_host_profile_round_trips_through_json(host: CpuidProfile) -> None:
    again = CpuidProfile.from_json(host.to_json())
    assert again == host and again.xfeatures_supported == host.xfeatures_supported


def test_bundled_profile_of_this_cpu_model_describes_its_components(host: CpuidProfile) -> None:
    """A bundled profile of the host's own family, model and stepping (a real dump of that
    silicon) must enumerate every XSAVE component the host enumerates with the same size,
    standard offset and alignment (CPUID.(EAX=0DH,ECX=i), i >= 2), and the same largest
    standard size CPUID.(EAX=0DH,ECX=0).ECX, or the end of the last component the host
    supports, placed as the bundled profile places it. A guest's CPUID may hide features from
    XCR0; it does not move them. This project's Emerald Rapids KVM guest hid AMX and left ECX
    as the silicon's; its Zen 4 guest hides PKRU and ECX shrinks to 2432, the end of
    Hi16_ZMM (SDM Vol. 1 13.3: ECX covers every feature supported in XCR0)."""
    same = [p for p in map(bundled_profile, list_profiles())
            if (p.vendor, p.family_model_stepping) == (host.vendor, host.family_model_stepping)]
    if not same:
        pytest.skip(f"no bundled profile is a {host.vendor} family/model/stepping "
                    f"{host.family_model_stepping} like this host")
    enumerated = [i for i in range(2, 64) if host.cpuid(0xD, i)[0]]
    assert enumerated, "the host enumerates no XSAVE component beyond x87 and SSE"
    for p in same:
        for i in enumerated:
            assert host.cpuid(0xD, i) == p.cpuid(0xD, i), (p.name, i)
        supported = host.cpuid(0xD, 0)[0] | host.cpuid(0xD, 0)[3] << 32
        end = max(p.cpuid(0xD, i)[1] + p.cpuid(0xD, i)[0] for i in range(2, 64)
                  if supported >> i & 1)
        assert host.cpuid(0xD, 0)[2] in (p.cpuid(0xD, 0)[2], end), (p.name, end)
